#!/usr/bin/env bash
# Install everything microagent's tests and demo need on a Debian/Ubuntu machine:
# the host tools (apt, when run as root) and a Python virtualenv with the project in it.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  e2fsprogs qemu-system-x86 qemu-utils busybox-static cpio kmod
  docker-registry skopeo umoci debootstrap
  slirp4netns iptables iproute2 socat ca-certificates
  gpgv debian-archive-keyring gnupg
  gcc libc6-dev openssl mount util-linux coreutils bash
)
# Every package a test needs: under CI=true a missing tool fails its tests instead of skipping
# them (scripts/testenv/prereq.py), so a package dropped here turns CI red, never silently thin.
VENV=${VENV:-.venv}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing host packages (run as root, or: sudo apt-get install ${missing[*]})" >&2
  fi
fi

# The root-only step's other half: the stand-in images that need root to build (the demo's
# python:3.13-slim, with debootstrap) go into the system-wide cache /var/cache/microagent-standin
# (root's, readable by all); a normal user's demo and tests copy them from there, verified
# (scripts/testenv/sharedcache.py). The system python runs it: the virtualenv may not exist yet,
# or belong to the checkout's owner.
if [ "$(id -u)" = 0 ]; then
  PYTHONDONTWRITEBYTECODE=1 python3 scripts/testenv/standin.py share
  owner=$(stat -c %U .)
  if [ "$owner" != root ]; then
    # A checkout that belongs to a normal user: its virtualenv is that user's to make.
    echo "bootstrap: host ready; now, as $owner: make demo (or make test)"
    exit 0
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
log=$(mktemp)
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev,examples]' >"$log" 2>&1; then
  cat "$log" >&2
  echo "bootstrap: pip install failed" >&2
  exit 1
fi
rm -f "$log"
"$VENV/bin/python" -c "import microagent" && echo "bootstrap: ready ($VENV)"
