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

# Built by the root install step (scripts/bootstrap.sh) into /var/cache/microagent-standin;
# a normal user's run copies it from there, verified, into its own cache (else it says which
# root command to run).
say "python:3.13-slim stand-in (built once by the root install step, then copied and cached)"
"$PY" scripts/testenv/standin.py build --which python --push "$REGISTRY"

say "registry mirror: docker.io -> http://$REGISTRY"
config=$("$PY" -c 'from microagent.settings import config_path; print(config_path())')
if [ ! -e "$config" ]; then
  mkdir -p "$(dirname "$config")"
  printf 'registries:\n  docker.io:\n    mirrors: ["http://%s"]\n' "$REGISTRY" > "$config"
  echo "wrote $config"
else
  echo "$config exists; using MICROAGENT_REGISTRY_MIRRORS for this demo"
fi
export MICROAGENT_REGISTRY_MIRRORS="docker.io=http://$REGISTRY"

say "validate and plan the example agents"
for spec in examples/*/microagent.yaml; do
  "$MA" validate --file "$spec"
done
"$MA" plan --file examples/minimal-agent/microagent.yaml

say "a spec error is reported with file:line:col and a hint"
tmp=$(mktemp -d)
cleanup() { [ -n "${MODEL_PID:-}" ] && kill "$MODEL_PID" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
printf 'name: demo\nimage: python:3.13-slim\nentrypiont: python /app/agent.py\n' > "$tmp/microagent.yaml"
"$MA" validate --file "$tmp/microagent.yaml" || echo "(exit code $? = invalid input)"

# This machine reaches the internet through a TLS-intercepting proxy: guests trust the host's CA
# bundle (runtime configuration, never baked into a layer).
export MICROAGENT_EXTRA_CA=${MICROAGENT_EXTRA_CA:-host}
# The key never enters the guest: --credential anthropic makes the workspace's broker (a host
# process) add it to each model call; the guest holds a placeholder (docs/broker.md).
if [ -n "${ANTHROPIC_API_KEY:-}" ]; then
  say "model: the real Anthropic API through the credential broker (ANTHROPIC_API_KEY is set)"
  export ANTHROPIC_API_KEY
  MODEL_ARGS=(--credential anthropic)
else
  say "model: a scripted stand-in on the host, through the credential broker (set ANTHROPIC_API_KEY to use Claude)"
  MODEL_PORT=${MICROAGENT_DEMO_MODEL_PORT:-18089}
  ANTHROPIC_API_KEY="demo-key-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
  export ANTHROPIC_API_KEY
  # The stand-in answers 401 to any other key, as the real API would.
  "$PY" scripts/testenv/scripted_model.py --port "$MODEL_PORT" --expect-key-env ANTHROPIC_API_KEY &
  MODEL_PID=$!
  MODEL_ARGS=(--credential anthropic --credential-upstream "anthropic=http://127.0.0.1:$MODEL_PORT")
fi
"$MA" delete -y minimal-agent minimal-agent-again >/dev/null 2>&1 || true

say "microagent doctor"
"$MA" doctor || true

say "create (first time: pull, setup in a microVM, cache every step)"
time "$MA" create --file examples/minimal-agent/microagent.yaml "${MODEL_ARGS[@]}"

wait_for_result() {
  until "$MA" --json status minimal-agent | "$PY" -c \
      'import json,sys; s=json.load(sys.stdin)["event"]["state"]; sys.exit(s not in ("stopped","failed","halted"))'; do
    sleep 3
  done
  "$MA" status minimal-agent
  "$MA" result minimal-agent
}

say "request 1: install rich, write /workspace/biggest.py, run it"
"$MA" cp examples/minimal-agent/demo/input-001.json minimal-agent:/workspace/input.json
"$MA" start minimal-agent
wait_for_result

say "every model call, as the broker audited it (the key itself is nowhere in the guest)"
"$MA" audit minimal-agent

say "the script the agent wrote, copied out and run on the host"
"$MA" cp minimal-agent:/workspace/biggest.py "$tmp/biggest.py"
"$PY" "$tmp/biggest.py"

say "halt, deliver request 2, start again: the disk kept biggest.py"
"$MA" halt minimal-agent
"$MA" cp examples/minimal-agent/demo/input-002.json minimal-agent:/workspace/input.json
"$MA" start minimal-agent
wait_for_result

say "create the same spec again: a cache hit that boots nothing"
time "$MA" create --file examples/minimal-agent/microagent.yaml --name minimal-agent-again "${MODEL_ARGS[@]}"

say "clean up"
"$MA" halt minimal-agent
"$MA" delete -y minimal-agent minimal-agent-again
