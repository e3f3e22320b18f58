"""Fixtures for the vm tier: a guest kit, a tiny busybox rootfs and helpers that boot QEMU.

- The store (and with it the guest kit, ~30 MB downloaded once from the Debian mirror, and the
  cached KVM/TSC probes) lives in ``$MICROAGENT_VM_HOME``, default
  ``/var/cache/microagent-test-home`` (or a temp dir when that is not writable).
- ``rootfs`` is an ext4 image of the host's busybox-static with applet links, built once per
  session with ``mke2fs -d``.
- A missing tool skips locally but fails under ``CI=true`` (``testenv.prereq``): CI must not go
  green by skipping.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.errors import MicroagentError
from microagent.kit import guestkit
from microagent.kit.guestkit import GuestKit
from microagent.runner import find_tool, run
from microagent.runtime import network
from microagent.runtime.backend import GuestResult
from microagent.runtime.boot import RunRequest, run_once
from microagent.runtime.qemu import QemuBackend
from microagent.settings import Settings
from microagent.store.content import Store
from testenv import standin
from testenv.prereq import require_tools, unavailable
from testenv.registry import RegistryHandle

DEFAULT_HOME = Path("/var/cache/microagent-test-home")
HOST_CA = b"-----BEGIN CERTIFICATE-----\nORIGINAL-GUEST-BUNDLE\n-----END CERTIFICATE-----\n"


def require_user_network() -> None:
    problem = network.user_network_problem()
    if problem:
        unavailable(f"user networking unavailable: {problem}")


@pytest.fixture(scope="session")
def runtime_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = Path(os.environ.get("MICROAGENT_VM_HOME", DEFAULT_HOME))
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=wanted):
            pass
    except OSError:
        return tmp_path_factory.mktemp("microagent-home")
    return wanted


@pytest.fixture(scope="session")
def store(runtime_home: Path) -> Store:
    return Store(Settings(home=runtime_home).store_dir)


@pytest.fixture(scope="session")
def kit(store: Store) -> GuestKit:
    require_tools("qemu-system-x86_64", "mke2fs")
    try:
        return guestkit.ensure_kit(store)
    except MicroagentError as exc:
        unavailable(f"cannot build the guest kit: {exc.message}")


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB ext4 image: busybox + applet links, /etc basics and a CA bundle."""
    require_tools("busybox", "mke2fs")
    tree = tmp_path_factory.mktemp("bbroot")
    for d in ("bin", "etc/ssl/certs", "root", "tmp", "proc", "sys", "dev", "run"):
        (tree / d).mkdir(parents=True)
    (tree / "tmp").chmod(0o1777)
    busybox = Path(find_tool("busybox")).resolve()
    shutil.copy2(busybox, tree / "bin/busybox")
    for applet in run([str(busybox), "--list"]).stdout.split():
        if applet != "busybox":
            (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\n")
    (tree / "etc/ssl/certs/ca-certificates.crt").write_bytes(HOST_CA)
    image = tmp_path_factory.mktemp("rootfs") / "busybox.ext4"
    with image.open("wb") as fh:
        fh.truncate(64 << 20)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-d", str(tree), str(image)])
    return image


@pytest.fixture(scope="session")
def backend(store: Store) -> QemuBackend:
    qemu = QemuBackend(cache_dir=store.root / "probes")
    ok = qemu.available()
    if not ok:
        unavailable(ok.reason)
    return qemu


@pytest.fixture
def env(
    vm_home: Path, registry: RegistryHandle, python_image: standin.PushedImage,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:  # fmt: skip
    """``MICROAGENT_HOME`` for a CLI test that boots the python stand-in: ``python:3.13-slim``
    resolves through the local registry (a docker.io mirror) and the guest trusts the host's CAs.
    """
    monkeypatch.setenv("MICROAGENT_HOME", str(vm_home))
    monkeypatch.setenv("MICROAGENT_REGISTRY_MIRRORS", f"docker.io={registry.url}")
    monkeypatch.setenv("MICROAGENT_EXTRA_CA", "host")
    return vm_home


RunVM = Callable[..., GuestResult]


@pytest.fixture
def run_vm(rootfs: Path, kit: GuestKit, backend: QemuBackend) -> RunVM:
    """``run_vm(cmd..., **RunRequest fields)``: boot the busybox rootfs and run a command."""

    def go(*command: str, **fields: Any) -> GuestResult:
        fields.setdefault("timeout", 90)
        use_kit = fields.pop("kit", kit)
        request = RunRequest(rootfs=fields.pop("rootfs", rootfs), command=command, **fields)
        return run_once(request, backend=backend, kit=use_kit)

    return go


def our_children() -> set[int]:
    """PIDs of live (non-zombie) child processes of this test process (QEMU, helpers)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == os.getpid():
            found.add(int(entry.name))
    return found


def our_namespaces() -> list[str]:
    try:
        names = [p.name for p in network.NETNS_DIR.iterdir()]
    except OSError:
        return []
    return [n for n in names if n.startswith(f"{network.NETNS_PREFIX}{os.getpid()}-")]


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Fail the test if it leaves a child process (QEMU, slirp4netns, socat) or one of our
    network namespaces behind. Other users' VMs on the same host are not looked at."""
    before = our_children()
    yield
    leaked = our_children() - before
    assert not leaked, f"processes left running: {sorted(leaked)}"
    assert our_namespaces() == []
