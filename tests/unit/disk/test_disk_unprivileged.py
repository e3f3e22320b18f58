"""The disk tools work without root: owners come from debugfs, never from the host."""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from disk_kit import inode_of

from microagent.ext4.mkfs import make_state_disk
from microagent.ext4.overlay import copy_in, copy_out, read_bytes
from microagent.ext4.upper import export_upper_image
from testenv import nobody


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory nobody can write (pytest's tmp_path is private to root)."""
    with nobody.shared_dir() as path:
        yield path


def test_state_disk_copy_and_export_as_nobody(shared_dir: Path, rootfs: Path, state: Path) -> None:
    root, upper = shared_dir / "rootfs.ext4", shared_dir / "upper.ext4"
    for src, dst in ((rootfs, root), (state, upper)):
        shutil.copyfile(src, dst)
        dst.chmod(0o644)
    (shared_dir / "src").write_bytes(b"hello")
    (shared_dir / "src").chmod(0o644)
    disk = shared_dir / "state.ext4"

    def work() -> None:
        make_state_disk(disk, 64)
        copy_in(disk, root, shared_dir / "src", "/data/deep/dir/new")
        assert read_bytes(disk, root, "/data/deep/dir/new") == b"hello"
        copy_out(disk, root, "/workspace/input.json", shared_dir)
        export_upper_image(disk, shared_dir / "state.tar")
        export_upper_image(upper, shared_dir / "upper-nobody.tar")

    nobody.as_nobody(work)
    for d in ("/upper", "/work"):
        got = inode_of(disk, d)
        assert got is not None and (got["uid"], got["gid"]) == (0, 0)
    with tarfile.open(shared_dir / "state.tar") as tf:
        deep = tf.getmember("data/deep/dir")
        assert (deep.uid, deep.gid, deep.mode) == (1000, 1001, 0o700)
    assert (shared_dir / "input.json").read_bytes() == b'{"n": 1}'
    export_upper_image(state, shared_dir / "upper-root.tar")
    as_nobody_tar = (shared_dir / "upper-nobody.tar").read_bytes()
    assert as_nobody_tar == (shared_dir / "upper-root.tar").read_bytes()
