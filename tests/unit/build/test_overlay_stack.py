"""``cp``'s merged view over a stack of lowers: overlayfs' rules in every layer.

Three layer disks (``ext4.layerdisk``, from tars) under a workspace state disk: a whiteout, an
opaque directory and a non-directory in the middle layer each hide the bottom one's entries;
a directory continues only into directories; reads come from the topmost layer holding an
entry; writes land in the upper, copying parents up from whichever lower holds them.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from layer_kit import T2, T3, source, tar_info, tar_of

from microagent.errors import InvalidInputError, NotFoundError
from microagent.ext4.debugfs import Inode, check_image, parse_stat, run_debugfs
from microagent.ext4.layerdisk import build_layer_disk
from microagent.ext4.mkfs import make_state_disk
from microagent.ext4.overlay import (
    MAX_LOWERS,
    copy_in,
    copy_out,
    exists,
    lookup,
    make_dirs,
    read_bytes,
)
from microagent.layers.stagemeta import Kind

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")

Entry = tuple[tarfile.TarInfo, bytes | None]


def d(name: str, mode: int = 0o755, mtime: int = T2, uid: int = 0, gid: int = 0) -> Entry:
    return tar_info(name, tarfile.DIRTYPE, mode, mtime=mtime, uid=uid, gid=gid), None


def f(name: str, data: bytes = b"", mtime: int = T2) -> Entry:
    return tar_info(name, tarfile.REGTYPE, 0o644, mtime=mtime), data


def ln(name: str, target: str) -> Entry:
    return tar_info(name, tarfile.SYMTYPE, 0o777, linkname=target), None


BOTTOM = [
    d("a"), d("a/b"), f("a/b/file", b"bottom file"),
    d("d"), d("d/child"), f("d/child/old", b"old"),
    d("e"), d("e/deep"), f("e/deep/x", b"x"),
    d("g"), f("g/child", b"under a file"),
    d("h"), f("h/child", b"under a file under a dir"),
    d("m", 0o750, uid=5, gid=5), f("m/botfile", b"bottom of m"),
    f("loop1"),
]  # fmt: skip
MIDDLE = [
    f(".wh.d"),
    d("e", 0o700), f("e/.wh..wh..opq"), f("e/mid", b"middle"),
    f("g", b"g is a file here"),
    f("h", b"h is a file here"),
    d("m", 0o751, uid=6, gid=6), d("m/n", 0o710, mtime=T3, uid=1000, gid=1001),
    f("m/n/lowerfile", b"lf"),
    ln("loop2", "/loop1"),
    ln("to-a", "/a/b"),
]  # fmt: skip
TOP = [
    d("d"), f("d/new", b"new over a whiteout"),
    d("e"), f("e/top", b"top"),
    d("h", 0o711),
    ln("loop1", "/loop2"),
    f("a-file", b"top only"),
]  # fmt: skip


@pytest.fixture
def stack(tmp_path: Path) -> list[Path]:
    """The three layer disks, top first."""
    out = []
    for name, entries in (("top", TOP), ("middle", MIDDLE), ("bottom", BOTTOM)):
        layer = source(tmp_path / f"{name}.tar", tar_of(entries))
        out.append(build_layer_disk(layer, tmp_path / f"{name}.ext4").path)
    return out


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return make_state_disk(tmp_path / "state.ext4", 16)


def upper_inode(state: Path, path: str) -> Inode | None:
    return parse_stat(run_debugfs(state, [f'stat "/upper{path}"']).outputs[0])


def test_reads_follow_the_stack(state: Path, stack: list[Path]) -> None:
    assert read_bytes(state, stack, "/a/b/file") == b"bottom file"  # only the bottom has /a
    assert read_bytes(state, stack, "/a-file") == b"top only"
    assert not exists(state, stack, "/d/child")  # the middle's whiteout hides the bottom's
    assert read_bytes(state, stack, "/d/new") == b"new over a whiteout"  # the top's d/ stays
    assert read_bytes(state, stack, "/e/top") == b"top"
    assert read_bytes(state, stack, "/e/mid") == b"middle"
    assert not exists(state, stack, "/e/deep")  # the middle's e/ is opaque
    assert read_bytes(state, stack, "/g") == b"g is a file here"  # a file hides a directory
    assert not exists(state, stack, "/g/child")
    assert not exists(state, stack, "/h/child")  # a dir goes on into directories only
    h = lookup(state, stack, "/h")
    assert h is not None and (h.layer, h.inode.kind, h.inode.mode) == (1, Kind.DIR, 0o711)
    assert read_bytes(state, stack, "/m/botfile") == b"bottom of m"  # m/ merges two lowers
    m = lookup(state, stack, "/m")
    assert m is not None and (m.layer, m.image, m.inode.uid) == (2, stack[1], 6)
    assert read_bytes(state, stack, "/to-a/file") == b"bottom file"  # a link across layers
    link = lookup(state, stack, "/to-a")
    assert link is not None and link.inode.kind is Kind.SYMLINK
    with pytest.raises(InvalidInputError, match="too many levels of symbolic links"):
        exists(state, stack, "/loop1")  # a loop across two layers


def test_a_write_copies_up_parents_from_the_second_lower(
    tmp_path: Path, state: Path, stack: list[Path]
) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"mine")
    copy_in(state, stack, src, "/m/n/new")
    check_image(state, "state disk")
    for path, want in (("/m", (0o751, 6, 6, T2)), ("/m/n", (0o710, 1000, 1001, T3))):
        got = upper_inode(state, path)
        assert got is not None and got.kind is Kind.DIR, path
        assert (got.mode, got.uid, got.gid, got.mtime) == want, path
    assert read_bytes(state, stack, "/m/n/new") == b"mine"
    assert upper_inode(state, "/m/n/new") is not None
    # copied-up directories are not opaque: both lowers stay visible beside the new file
    assert read_bytes(state, stack, "/m/n/lowerfile") == b"lf"
    assert read_bytes(state, stack, "/m/botfile") == b"bottom of m"
    copy_out(state, stack, "/m/botfile", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"bottom of m"
    for path in ("/a", "/e", "/d"):
        assert upper_inode(state, path) is None  # nothing else was copied up


def test_a_file_written_over_a_lower_file_hides_it(
    tmp_path: Path, state: Path, stack: list[Path]
) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"replaced")
    copy_in(state, stack, src, "/e/mid")
    assert read_bytes(state, stack, "/e/mid") == b"replaced"
    assert read_bytes(state, stack, "/e/top") == b"top"
    assert not exists(state, stack, "/e/deep")  # still opaque below the middle


def test_make_dirs_where_a_lower_whited_out_a_deeper_one(state: Path, stack: list[Path]) -> None:
    make_dirs(state, stack, "/d/child/sub")
    check_image(state, "state disk")
    assert exists(state, stack, "/d/child/sub")
    assert not exists(state, stack, "/d/child/old")  # the middle's whiteout still hides it
    assert exists(state, stack, "/d/new")
    d_up = upper_inode(state, "/d")
    assert d_up is not None and d_up.mtime == T2  # copied up from the top layer


def test_one_lower_in_a_list_is_the_lower_alone(state: Path, stack: list[Path]) -> None:
    bottom = stack[-1]
    for path in ("/d/child/old", "/g/child", "/e/deep/x", "/a/b/file", "/nope"):
        assert exists(state, bottom, path) == exists(state, [bottom], path), path
    assert exists(state, (bottom,), "/h/child")


def test_the_stack_is_bounded_and_must_exist(
    tmp_path: Path, state: Path, stack: list[Path]
) -> None:
    with pytest.raises(InvalidInputError, match=f"at most {MAX_LOWERS}"):
        exists(state, [stack[0]] * (MAX_LOWERS + 1), "/a")
    with pytest.raises(InvalidInputError, match="no root filesystem image"):
        exists(state, [], "/a")
    with pytest.raises(NotFoundError, match="does not exist"):
        exists(state, [stack[0], tmp_path / "missing.ext4"], "/a")
