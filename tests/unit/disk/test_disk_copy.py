"""Offline copy between the host and a stopped workspace's merged (overlay) view."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from disk_kit import debugfs, debugfs_w, fsck_clean, inode_of, read_image_file

from microagent.errors import ConflictError, InvalidInputError, NotFoundError, ToolError
from microagent.ext4.mkfs import make_state_disk
from microagent.ext4.overlay import copy_in, copy_out, exists, read_bytes


def host_file(tmp_path: Path, data: bytes, name: str = "src.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_round_trip_is_byte_exact(tmp_path: Path, state: Path, rootfs: Path) -> None:
    data = os.urandom(1 << 20) + b"\x00tail"
    src = host_file(tmp_path, data)
    assert copy_in(state, rootfs, src, "/workspace/blob.bin") == len(data)
    fsck_clean(state)
    out = tmp_path / "back.bin"
    assert copy_out(state, rootfs, "/workspace/blob.bin", out) == len(data)
    assert out.read_bytes() == data
    assert read_bytes(state, rootfs, "/workspace/blob.bin") == data
    assert read_image_file(state, "/upper/workspace/blob.bin", tmp_path) == data
    assert not [p for p in tmp_path.iterdir() if ".microagent-cp-" in p.name]


def test_new_file_is_root_0644_and_empty_files_work(
    tmp_path: Path, state: Path, rootfs: Path
) -> None:
    src = host_file(tmp_path, b"")
    src.chmod(0o600)
    assert copy_in(state, rootfs, src, "/workspace/empty") == 0
    fsck_clean(state)
    got = inode_of(state, "/upper/workspace/empty")
    assert got is not None
    assert (got["type"], got["mode"], got["uid"], got["gid"], got["size"]) == (1, 0o644, 0, 0, 0)
    assert read_bytes(state, rootfs, "/workspace/empty") == b""


def test_parent_only_in_lower_is_copied_up(tmp_path: Path, state: Path, rootfs: Path) -> None:
    assert inode_of(state, "/upper/data") is None
    copy_in(state, rootfs, host_file(tmp_path, b"mine"), "/data/deep/dir/new.txt")
    fsck_clean(state)
    deep, leaf = inode_of(state, "/upper/data/deep"), inode_of(state, "/upper/data/deep/dir")
    assert deep is not None and leaf is not None
    assert (deep["type"], deep["mode"], deep["uid"], deep["gid"]) == (2, 0o711, 1000, 1000)
    assert (leaf["type"], leaf["mode"], leaf["uid"], leaf["gid"]) == (2, 0o700, 1000, 1001)
    assert leaf["mtime"] == 1_500_000_000
    assert read_bytes(state, rootfs, "/data/deep/dir/new.txt") == b"mine"
    # copied-up directories are not opaque: the lower's files stay visible beside the new one
    assert read_bytes(state, rootfs, "/data/deep/dir/lowerfile") == b"lf"


def test_whited_out_name_is_writable_again(tmp_path: Path, state: Path, rootfs: Path) -> None:
    assert not exists(state, rootfs, "/etc/passwd")
    with pytest.raises(NotFoundError, match="/etc/passwd"):
        copy_out(state, rootfs, "/etc/passwd", tmp_path / "passwd")
    copy_in(state, rootfs, host_file(tmp_path, b"root:x:0:0:new\n"), "/etc/passwd")
    fsck_clean(state)
    assert read_bytes(state, rootfs, "/etc/passwd") == b"root:x:0:0:new\n"
    got = inode_of(state, "/upper/etc/passwd")
    assert got is not None and (got["type"], got["mode"], got["uid"]) == (1, 0o644, 0)


def test_shared_whiteout_inode_is_unlinked_cleanly(
    tmp_path: Path, state: Path, rootfs: Path
) -> None:
    copy_in(state, rootfs, host_file(tmp_path, b"back"), "/workspace/old1")
    fsck_clean(state)  # the link count of the shared whiteout inode went down by one
    assert read_bytes(state, rootfs, "/workspace/old1") == b"back"
    assert not exists(state, rootfs, "/workspace/old2")  # its twin still hides the lower


def test_opaque_dir_hides_lower_children(tmp_path: Path, state: Path, rootfs: Path) -> None:
    assert exists(state, rootfs, "/opt/app/new")
    assert not exists(state, rootfs, "/opt/app/a")
    with pytest.raises(NotFoundError):
        read_bytes(state, rootfs, "/opt/app/a")
    with pytest.raises(NotFoundError, match="parent directory does not exist"):
        copy_in(state, rootfs, host_file(tmp_path, b"y"), "/opt/app/sub/y")


def test_whited_out_directory_hides_its_tree(tmp_path: Path, state: Path, rootfs: Path) -> None:
    assert not exists(state, rootfs, "/var/cache/c1")
    with pytest.raises(NotFoundError, match="parent directory does not exist"):
        copy_in(state, rootfs, host_file(tmp_path, b"z"), "/var/cache/c2")


def test_reads_fall_back_to_the_rootfs(tmp_path: Path, state: Path, rootfs: Path) -> None:
    assert read_bytes(state, rootfs, "/etc/hosts") == b"127.0.0.1 localhost\n"
    assert read_bytes(state, rootfs, "/etc/hostname") == b"upper\n"  # upper shadows lower
    copy_out(state, rootfs, "/usr/bin/tool", tmp_path / "tool")
    assert (tmp_path / "tool").read_bytes().startswith(b"#!/bin/sh")
    assert (tmp_path / "tool").stat().st_mode & 0o100  # stays executable


def test_symlinks_are_followed_in_the_merged_view(
    tmp_path: Path, state: Path, rootfs: Path
) -> None:
    assert read_bytes(state, rootfs, "/bin/tool") == read_bytes(state, rootfs, "/usr/bin/tool")
    assert read_bytes(state, rootfs, "/lib/libx.so") == b"\x7fELF lib"  # absolute target
    copy_in(state, rootfs, host_file(tmp_path, b"via link"), "/bin/added")
    fsck_clean(state)
    assert read_image_file(state, "/upper/usr/bin/added", tmp_path) == b"via link"
    assert inode_of(state, "/upper/bin") is None  # the link itself was not copied up


def test_missing_parent_is_a_clear_error(tmp_path: Path, state: Path, rootfs: Path) -> None:
    with pytest.raises(NotFoundError, match="parent directory does not exist") as err:
        copy_in(state, rootfs, host_file(tmp_path, b"x"), "/nope/deeper/file")
    assert "/nope" in err.value.message and err.value.hint
    fsck_clean(state)


def test_copy_out_into_a_directory_keeps_the_basename(
    tmp_path: Path, state: Path, rootfs: Path
) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    assert copy_out(state, rootfs, "/workspace/result.json", dest) == len(b'{"ok": true}\n')
    assert (dest / "result.json").read_bytes() == b'{"ok": true}\n'
    assert stat.S_IMODE((dest / "result.json").stat().st_mode) == 0o600


def test_replacing_keeps_owner_and_mode(tmp_path: Path, state: Path, rootfs: Path) -> None:
    copy_in(state, rootfs, host_file(tmp_path, b'{"ok": false}'), "/workspace/result.json")
    copy_in(state, rootfs, host_file(tmp_path, b"new tool", "t"), "/usr/bin/tool")
    copy_in(state, rootfs, host_file(tmp_path, b'{"n": 2}', "i"), "/workspace/input.json")
    fsck_clean(state)
    upper_file = inode_of(state, "/upper/workspace/result.json")
    lower_file = inode_of(state, "/upper/usr/bin/tool")
    from_lower = inode_of(state, "/upper/workspace/input.json")
    assert upper_file and lower_file and from_lower
    assert (upper_file["mode"], upper_file["uid"], upper_file["gid"]) == (0o600, 1000, 1000)
    assert (lower_file["mode"], lower_file["uid"]) == (0o755, 0)
    assert (from_lower["mode"], from_lower["uid"], from_lower["gid"]) == (0o640, 1000, 1000)
    assert read_bytes(state, rootfs, "/workspace/result.json") == b'{"ok": false}'
    assert read_bytes(state, rootfs, "/workspace/input.json") == b'{"n": 2}'


def test_odd_names_round_trip(tmp_path: Path, state: Path, rootfs: Path) -> None:
    for name in ['we ird "q" é.txt', "-dash", "back\\slash", "#hash;$x*", " lead", "日本"]:
        guest = f"/workspace/{name}"
        copy_in(state, rootfs, host_file(tmp_path, name.encode()), guest)
        assert read_bytes(state, rootfs, guest) == name.encode()
        copy_out(state, rootfs, guest, tmp_path / "o")
        assert (tmp_path / "o").read_bytes() == name.encode()
    fsck_clean(state)
    with pytest.raises(InvalidInputError):
        copy_in(state, rootfs, host_file(tmp_path, b"x"), "/workspace/new\nline")


@pytest.mark.parametrize("bad", ["workspace/x", "/workspace/../etc/x", "/a//b", "/a/./b", "/a/"])
def test_guest_paths_must_be_absolute_and_clean(
    tmp_path: Path, state: Path, rootfs: Path, bad: str
) -> None:
    with pytest.raises(InvalidInputError, match="absolute and clean"):
        copy_in(state, rootfs, host_file(tmp_path, b"x"), bad)
    with pytest.raises(InvalidInputError, match="absolute and clean"):
        copy_out(state, rootfs, bad, tmp_path / "o")


def test_directories_and_missing_files_are_refused(
    tmp_path: Path, state: Path, rootfs: Path
) -> None:
    with pytest.raises(InvalidInputError, match="is a directory"):
        copy_in(state, rootfs, host_file(tmp_path, b"x"), "/workspace")
    with pytest.raises(InvalidInputError, match="is a directory"):
        copy_out(state, rootfs, "/etc", tmp_path / "etc")
    with pytest.raises(NotFoundError, match="/workspace/missing"):
        copy_out(state, rootfs, "/workspace/missing", tmp_path / "m")
    with pytest.raises(NotFoundError, match="does not exist"):
        copy_in(state, rootfs, tmp_path / "no-such-host-file", "/workspace/x")
    with pytest.raises(InvalidInputError, match="not a regular file"):
        copy_in(state, rootfs, tmp_path, "/workspace/x")
    with pytest.raises(NotFoundError, match="host directory"):
        copy_out(state, rootfs, "/etc/hosts", tmp_path / "nodir" / "hosts")
    assert not (tmp_path / "m").exists()


def test_full_disk_keeps_the_old_file(tmp_path: Path, rootfs: Path) -> None:
    disk = tmp_path / "small.ext4"
    make_state_disk(disk, 16)
    copy_in(disk, rootfs, host_file(tmp_path, b"precious"), "/workspace/f")
    with pytest.raises(ToolError, match="is full"):
        copy_in(disk, rootfs, host_file(tmp_path, os.urandom(32 << 20), "big"), "/workspace/f")
    fsck_clean(disk)
    assert read_bytes(disk, rootfs, "/workspace/f") == b"precious"
    assert "microagent-cp" not in debugfs(disk, "ls /upper/workspace")


def test_pending_journal_is_replayed_before_reading(
    tmp_path: Path, state: Path, rootfs: Path
) -> None:
    debugfs_w(state, "feature needs_recovery")
    assert "needs_recovery" in debugfs(state, "stats -h")
    assert read_bytes(state, rootfs, "/etc/hostname") == b"upper\n"
    assert "needs_recovery" not in debugfs(state, "stats -h")


def test_missing_images_are_not_found(tmp_path: Path, rootfs: Path) -> None:
    with pytest.raises(NotFoundError, match="state disk"):
        read_bytes(tmp_path / "nope.ext4", rootfs, "/etc/hosts")


def test_make_state_disk(tmp_path: Path, rootfs: Path) -> None:
    disk = tmp_path / "ws" / "state.ext4"
    make_state_disk(disk, 1024)
    fsck_clean(disk)
    assert disk.stat().st_size == 1024 << 20
    assert disk.stat().st_blocks * 512 < 16 << 20  # sparse
    for d in ("/upper", "/work"):
        got = inode_of(disk, d)
        assert got is not None and (got["type"], got["mode"], got["uid"], got["gid"]) == (
            2,
            0o755,
            0,
            0,
        )
    assert [p.name for p in disk.parent.iterdir()] == ["state.ext4"]
    assert exists(disk, rootfs, "/etc/hosts")  # an empty upper shows the rootfs
    with pytest.raises(ConflictError):
        make_state_disk(disk, 1024)
    with pytest.raises(InvalidInputError):
        make_state_disk(tmp_path / "tiny.ext4", 4)
