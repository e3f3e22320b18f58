#!/usr/bin/env bash
# Run the vm tier (tests/vm) as an ordinary user, the way a developer or a CI runner without
# root runs microagent (issue 17). Run it as root, after scripts/bootstrap.sh installed the host
# packages: it prepares the host as distributions ship it (/dev/net/tun mode 0666, user
# namespaces on), creates the user, makes sure the shared cache holds the test image root alone
# can build (debootstrap; the same `standin.py share` as bootstrap.sh), gives the user a copy of
# this checkout, its own virtualenv and an empty stand-in cache, and runs pytest as that user with
# nothing but what a normal user has.
#
#   CI_VM_USER   the user (default microagent-ci; created when missing)
#   CI_VM_ARGS   pytest arguments (default: -q --durations=12 tests/vm)
#   CI_VM_NICE   niceness of the test run (default 0)
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
user=${CI_VM_USER:-microagent-ci}
args=${CI_VM_ARGS:--q --durations=12 tests/vm}
nice=${CI_VM_NICE:-0}
root_vm_home=${MICROAGENT_VM_HOME:-/var/cache/microagent-test-home}

if [ "$(id -u)" != 0 ]; then
  echo "vm_as_user: run me as root (I create the user and prepare the host)" >&2
  exit 2
fi

# The host as distributions ship it.
chmod 0666 /dev/net/tun
if [ -e /proc/sys/kernel/unprivileged_userns_clone ]; then
  sysctl -q -w kernel.unprivileged_userns_clone=1
fi
if [ "$(cat /proc/sys/user/max_user_namespaces)" = 0 ]; then
  sysctl -q -w user.max_user_namespaces=28633
fi

id -u "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
home=$(getent passwd "$user" | cut -d: -f6)

# The stand-in image that needs root (python: debootstrap) comes from the system-wide cache
# that the root install step fills (scripts/bootstrap.sh; a no-op when it is current), the same
# path a normal user's demo takes: the user's tests copy it from there, verified.
PYTHONDONTWRITEBYTECODE=1 python3 scripts/testenv/standin.py share

# The user's own copies: the checkout as committed (HEAD: what CI's clean clone holds; work in
# progress in this tree is left out) and the guest kit. The user's stand-in cache starts empty:
# busybox is built as the user, python copied from the shared cache.
work=$home/microagent
mkdir -p "$work" "$home/.cache"
# A rerun keeps the user's virtualenv (bootstrap.sh brings it up to date) and nothing else.
find "$work" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
rm -rf "$home/.cache/microagent-testenv" "$home/.cache/microagent-test-home"
git archive --format=tar HEAD | tar -xf - -C "$work"
mkdir -p "$home/.cache/microagent-test-home/store"
if [ -d "$root_vm_home/store/kits" ]; then
  cp -a "$root_vm_home/store/kits" "$home/.cache/microagent-test-home/store/kits"
fi
chown -R "$user:" "$home"

path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec runuser -u "$user" -- env -i HOME="$home" USER="$user" PATH="$path" LANG=C.UTF-8 \
  CI="${CI:-true}" \
  MICROAGENT_TESTENV_CACHE="$home/.cache/microagent-testenv" \
  MICROAGENT_VM_HOME="$home/.cache/microagent-test-home" \
  bash -c "cd '$work' && bash scripts/bootstrap.sh && nice -n $nice .venv/bin/pytest $args"
