"""The ext4 root filesystem is reproducible and carries the recorded owners and modes."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from microagent.errors import BuildError
from microagent.ext4.mkfs import build_ext4, image_size_mib
from microagent.layers.apply import LayerSource, flatten
from microagent.runner import run


def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(40):
            info = tarfile.TarInfo(f"usr/lib/pkg{i % 7}/file{i}.py")
            data = f"print({i})\n".encode() * (i + 1)
            info.size, info.mtime, info.uid, info.gid = len(data), 1_600_000_000 + i, 1000, 1000
            tar.addfile(info, io.BytesIO(data))
        suid = tarfile.TarInfo("usr/bin/tool")
        suid.size, suid.mode, suid.mtime = 3, 0o4755, 1_600_000_000
        tar.addfile(suid, io.BytesIO(b"abc"))
        tmp = tarfile.TarInfo("tmp")
        tmp.type, tmp.mode, tmp.mtime = tarfile.DIRTYPE, 0o1777, 1_600_000_000
        tar.addfile(tmp)
    return buf.getvalue()


def _build(work: Path) -> Path:
    data = _layer()
    meta = flatten(work / "stage", [LayerSource("l0", lambda: io.BytesIO(data))])
    out = work / "root.ext4"
    build_ext4(work / "stage", meta, out, key="sha256:" + "1" * 64)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_byte_identical_across_builds_and_filesystems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    other = shm / f"ma-repro-{tmp_path.name}" if shm.is_dir() else tmp_path / "b"
    try:
        assert _sha(_build(tmp_path / "a")) == _sha(_build(other))
    finally:
        run(["rm", "-rf", str(other)])


def test_owners_and_special_modes_are_in_the_image(tmp_path: Path) -> None:
    image = _build(tmp_path)
    tool = run(["debugfs", "-R", "stat /usr/bin/tool", str(image)]).stdout
    assert "Mode:  04755" in tool
    lib = run(["debugfs", "-R", "stat /usr/lib/pkg0/file0.py", str(image)]).stdout
    assert "User:  1000   Group:  1000" in lib
    assert "Mode:  01777" in run(["debugfs", "-R", "stat /tmp", str(image)]).stdout
    assert run(["e2fsck", "-fn", str(image)], check=False).returncode == 0


def test_pinned_size_too_small_is_a_clear_error() -> None:
    with pytest.raises(BuildError, match="too small"):
        image_size_mib(500 << 20, size_mib=100, headroom_mib=None)
    assert image_size_mib(1 << 20, size_mib=None, headroom_mib=None) >= 64
