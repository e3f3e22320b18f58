"""A spec's disks and bundles in a real guest: a rw disk keeps its writes across halt/start, a
ro disk (read-only to the VMM, mounted ro,noload) refuses them, a bundle is mounted read-only.

Two boots under TCG (about a minute each): the first writes and waits to be halted, the
second reads what the first wrote and exits.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from microagent import Microagent, Settings
from microagent.kit.guestkit import GuestKit
from testenv import standin

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 300

ENTRYPOINT = r"""
n=$(cat /data/count 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" >/data/count
if echo x >/ref/probe 2>/dev/null; then ro=writable; else ro=refused; fi
ref_opts=$(sed -n 's|^[^ ]* /ref [^ ]* \([^ ]*\) .*|\1|p' /proc/mounts)
echo "boot=$n ro=$ro ref=$(cat /ref/hello.txt) corpus=$(cat /corpus/docs/a.txt) opts=$ref_opts"
[ "$n" -ge 2 ] && exit 0
echo "halt-me-$n"
exec sleep 600
"""


def _spec(folder: Path) -> Path:
    spec = folder / "microagent.yaml"
    indented = "".join(f"  {line}\n" for line in ENTRYPOINT.strip().splitlines())
    spec.write_text(
        "name: disks-vm\n"
        "image: oci:layout:latest\n"
        "profile: tiny\n"
        "network: {mode: isolated}\n"
        f"entrypoint: |\n{indented}"
        "disks:\n"
        "  - {name: data, path: data.ext4, mountpoint: /data, mode: rw}\n"
        "  - {name: ref, path: ref.ext4, mountpoint: /ref}\n"
        "bundles:\n"
        "  - {name: corpus, path: corpus.tar, mountpoint: /corpus}\n"
    )
    return spec


def _ext4(path: Path, files: dict[str, bytes]) -> None:
    tree = path.with_suffix(".tree")
    tree.mkdir()
    for name, data in files.items():
        (tree / name).write_bytes(data)
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(path), "16M"], check=True
    )


@pytest.fixture
def project(tmp_path: Path, busybox_layout: standin.BuiltImage) -> Path:
    folder = tmp_path / "proj"
    folder.mkdir()
    shutil.copytree(busybox_layout.layout, folder / "layout")
    _ext4(folder / "data.ext4", {})
    _ext4(folder / "ref.ext4", {"hello.txt": b"reference"})
    (folder / "docs").mkdir()
    (folder / "docs" / "a.txt").write_text("from-the-bundle")
    subprocess.run(["tar", "-cf", "corpus.tar", "docs"], cwd=folder, check=True)
    return _spec(folder)


def _wait_for(api: Microagent, name: str, text: bytes) -> str:
    """The console once ``text`` shows on it (the workspace still running)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    seen = b""
    while time.monotonic() < deadline:
        seen = b"".join(api.logs(name))
        if text in seen:
            return seen.decode(errors="replace")
        assert api.status(name)["event"]["state"] in ("starting", "running"), seen[-2000:]
        time.sleep(2)
    pytest.fail(f"{text!r} never showed on the console:\n{seen[-2000:].decode(errors='replace')}")


def test_rw_disk_persists_across_halt_and_start_and_ro_disk_refuses_writes(
    project: Path, kit: GuestKit, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", kernel=kit.kernel, initrd=kit.initrd)
    api = Microagent(settings)
    api.create(project)
    source = (project.parent / "data.ext4").read_bytes()

    api.start("disks-vm")
    first = _wait_for(api, "disks-vm", b"halt-me-1")
    assert "boot=1 ro=refused ref=reference corpus=from-the-bundle opts=ro," in first, first
    assert api.halt("disks-vm", timeout=60).value == "halted"

    report = api.start("disks-vm", wait=True, timeout=BOOT_TIMEOUT)
    second = api.result("disks-vm")["stdout"]
    assert report.exit_code == 0, second
    console = b"".join(api.logs("disks-vm")).decode(errors="replace")
    # the guest powered off after the command, not into a panic ("poweroff: not found")
    assert "not found" not in console and "Kernel panic" not in console, console[-3000:]
    assert "boot=2 ro=refused ref=reference" in second, second
    # the workspace wrote its own copy, never the spec's image
    assert (project.parent / "data.ext4").read_bytes() == source
    api.delete(["disks-vm"])
