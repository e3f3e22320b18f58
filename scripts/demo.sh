#!/usr/bin/env bash
# The newcomer's walkthrough, as far as the project goes today (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MA=".venv/bin/microagent"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "validate the example agents"
for spec in examples/*/microagent.yaml; do
  "$MA" validate --file "$spec"
done

say "plan examples/minimal-agent (base image pinned for the demo)"
# The image stage (registry pull, lock file writing) lands next; until then the demo pins the
# base image to a fixed digest on the command line, which needs no network.
DEMO_DIGEST="sha256:$(printf 'microagent-demo' | sha256sum | cut -d' ' -f1)"
"$MA" plan --file examples/minimal-agent/microagent.yaml \
  --image "python:3.13-slim@${DEMO_DIGEST}" --env ANTHROPIC_API_KEY=not-shown-anywhere

say "a spec error is reported with file:line:col and a hint"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'name: demo\nimage: python:3.13-slim\nentrypiont: python /app/agent.py\n' > "$tmp/microagent.yaml"
"$MA" validate --file "$tmp/microagent.yaml" || echo "(exit code $? - invalid input)"

say "done: the runtime (create/start/result) is next on the roadmap"
