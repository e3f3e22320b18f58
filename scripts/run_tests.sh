#!/usr/bin/env bash
# The README's test command (`make test` runs lint and typecheck, then this): every test tier.
# As root with CI_VM_AS_USER=1 (as .ci/run sets it), the vm tier runs as an ordinary user
# instead (scripts/ci/vm_as_user.sh: the host as distributions ship it), and root's own
# network path (named namespaces) keeps its vm tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${CI_VM_AS_USER:-}" != 1 ] || [ "$(id -u)" != 0 ]; then
  exec .venv/bin/pytest -q tests
fi
.venv/bin/pytest -q --durations=12 tests --ignore=tests/vm
.venv/bin/pytest -q tests/vm/test_vm_network.py tests/vm/test_vm_heal.py
bash scripts/ci/vm_as_user.sh
