#!/usr/bin/env bash
# The newcomer's walkthrough, as far as the project goes today (see README.md).
#
# There is no route to Docker Hub here, so the demo runs a real local OCI registry on
# 127.0.0.1:5000, builds a python:3.13-slim stand-in (Debian trixie + Python 3.13 + pip) into it,
# and configures microagent's registry mirror so the example spec's `python:3.13-slim`
# resolves there - exactly what a user behind a firewall does with an internal mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MA=.venv/bin/microagent
DEMO_HOME=${MICROAGENT_DEMO_DIR:-$HOME/.cache/microagent-demo}
REGISTRY=127.0.0.1:${MICROAGENT_DEMO_PORT:-5000}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "local OCI registry on $REGISTRY"
"$PY" scripts/testenv/registry.py start --data "$DEMO_HOME/registry" \
  --port "${REGISTRY##*:}" --pidfile "$DEMO_HOME/registry.pid"

say "python:3.13-slim stand-in (built once, then cached)"
"$PY" scripts/testenv/standin.py build --which python --push "$REGISTRY"

say "registry mirror: docker.io -> http://$REGISTRY"
config=$("$PY" -c 'from microagent.config import config_file; print(config_file())')
if [ ! -e "$config" ]; then
  mkdir -p "$(dirname "$config")"
  printf 'registries:\n  docker.io:\n    mirrors: ["http://%s"]\n' "$REGISTRY" > "$config"
  echo "wrote $config"
else
  echo "$config exists; using MICROAGENT_REGISTRY_MIRRORS for this demo"
fi
export MICROAGENT_REGISTRY_MIRRORS="docker.io=http://$REGISTRY"

say "validate the example agents"
for spec in examples/*/microagent.yaml; do
  "$MA" validate --file "$spec"
done

say "plan examples/minimal-agent (the tag resolves through the mirror)"
"$MA" plan --file examples/minimal-agent/microagent.yaml --env ANTHROPIC_API_KEY=never-shown

say "a spec error is reported with file:line:col and a hint"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'name: demo\nimage: python:3.13-slim\nentrypiont: python /app/agent.py\n' > "$tmp/microagent.yaml"
"$MA" validate --file "$tmp/microagent.yaml" || echo "(exit code $? = invalid input)"

say "next on the roadmap: image pull, then create/start/result in a microVM"
