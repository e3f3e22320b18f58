"""Exporting the overlay upper dir of an unmounted ext4 image as an OCI layer."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from disk_kit import (
    MTIME,
    build_lower,
    debugfs,
    debugfs_w,
    mkdir,
    mkfs,
    opaque,
    put,
    snapshot,
    whiteout,
)

from microagent.digests import Digest
from microagent.errors import BuildError, IntegrityError, NotFoundError
from microagent.ext4.mkfs import make_state_disk
from microagent.ext4.overlay import copy_in
from microagent.ext4.upper import export_upper_image
from microagent.layers.apply import LayerSource, flatten

LONG_TARGET = "/" + "x" * 100 + "/target"  # too long to live inside the inode
ODD_NAMES = ['we ird "q" é', "-dash", "back\\slash", " lead", "#h;$x*", "日本"]


def make_upper(up: Path) -> None:
    """What overlayfs leaves in the upper dir after :func:`change_merged`'s changes."""
    mkdir(up / "etc")
    whiteout(up / "etc/passwd")
    put(up / "etc/hostname", b"upper\n")
    mkdir(up / "opt/app")
    opaque(up / "opt/app")
    put(up / "opt/app/new", b"new")
    mkdir(up / "var")
    whiteout(up / "var/cache")
    mkdir(up / "usr/bin")
    put(up / "usr/bin/newtool", b"#!/bin/sh\n", mode=0o4755)
    os.link(up / "usr/bin/newtool", up / "usr/bin/alias")
    put(up / "usr/bin/sgid", b"g", mode=0o2755, gid=50)
    mkdir(up / "home/u", mode=0o750, uid=1000, gid=1000)
    put(up / "home/u/notes", b"mine", mode=0o600, uid=1000, gid=1000)
    os.symlink("../../etc/hosts", up / "home/u/l")
    os.lchown(up / "home/u/l", 1000, 1000)
    os.symlink(LONG_TARGET, up / "home/u/long")
    mkdir(up / "tmp", mode=0o1777)
    os.mkfifo(up / "tmp/fifo", 0o640)
    os.mknod(up / "tmp/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (up / "tmp/null").chmod(0o666)  # mknod honours the umask
    for name in ODD_NAMES:
        put(up / "odd" / name, name.encode())


def change_merged(m: Path) -> None:
    """The same changes made to a copy of the lower tree, as the guest saw them."""
    put(m / "etc/hostname", b"upper\n")
    (m / "etc/passwd").unlink()
    shutil.rmtree(m / "opt/app")
    mkdir(m / "opt/app")
    put(m / "opt/app/new", b"new")
    shutil.rmtree(m / "var/cache")
    put(m / "usr/bin/newtool", b"#!/bin/sh\n", mode=0o4755)
    os.link(m / "usr/bin/newtool", m / "usr/bin/alias")
    put(m / "usr/bin/sgid", b"g", mode=0o2755, gid=50)
    mkdir(m / "home/u", mode=0o750, uid=1000, gid=1000)
    put(m / "home/u/notes", b"mine", mode=0o600, uid=1000, gid=1000)
    os.symlink("../../etc/hosts", m / "home/u/l")
    os.lchown(m / "home/u/l", 1000, 1000)
    os.symlink(LONG_TARGET, m / "home/u/long")
    os.mkfifo(m / "tmp/fifo", 0o640)
    for name in ODD_NAMES:
        put(m / "odd" / name, name.encode())


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    return build_lower(tmp_path / "lower")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "statesrc"
    make_upper(src / "upper")
    mkdir(src / "work")
    return mkfs(src, tmp_path / "state.ext4")


def export(image: Path, out: Path, **kw: int) -> tuple[bytes, list[tarfile.TarInfo]]:
    layer = export_upper_image(image, out, **kw)
    data = out.read_bytes()
    assert layer.size == len(data) and layer.diff_id == Digest.of_bytes(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    assert layer.entries == len(members)
    return data, members


def lower_layer(lower: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(lower, arcname=".")
    return buf.getvalue()


def test_reapplying_the_export_gives_the_merged_view(
    tmp_path: Path, lower: Path, image: Path
) -> None:
    data, _ = export(image, tmp_path / "layer.tar")
    base = lower_layer(lower)
    out = tmp_path / "again"
    sources = [
        LayerSource("lower", lambda: io.BytesIO(base)),
        LayerSource("upper", lambda: io.BytesIO(data), Digest.of_bytes(data)),
    ]
    flatten(out, sources)
    expected = tmp_path / "merged"
    subprocess.run(["cp", "-a", str(lower), str(expected)], check=True)
    change_merged(expected)
    assert snapshot(out) == snapshot(expected)
    assert (out / "usr/bin/alias").stat().st_ino == (out / "usr/bin/newtool").stat().st_ino


def test_whiteouts_and_opaque_dirs_become_wh_entries(tmp_path: Path, image: Path) -> None:
    _, members = export(image, tmp_path / "layer.tar")
    names = [m.name for m in members]
    by_name = {m.name: m for m in members}
    for wh in ("etc/.wh.passwd", "var/.wh.cache"):
        assert by_name[wh].isreg() and by_name[wh].size == 0 and by_name[wh].mode == 0o600
    assert "etc/passwd" not in names and "var/cache" not in names
    assert names[names.index("opt/app") + 1] == "opt/app/.wh..wh..opq"
    assert names.count("opt/.wh..wh..opq") == 0  # only the opaque dir gets a marker
    assert names == sorted(names, key=lambda n: n.split("/"))


def test_owners_modes_times_devices_and_links_are_kept(tmp_path: Path, image: Path) -> None:
    _, members = export(image, tmp_path / "layer.tar")
    m = {x.name: x for x in members}
    assert (m["usr/bin/alias"].mode, m["usr/bin/alias"].size) == (0o4755, 10)
    assert m["usr/bin/newtool"].islnk() and m["usr/bin/newtool"].linkname == "usr/bin/alias"
    assert (m["usr/bin/sgid"].mode, m["usr/bin/sgid"].gid) == (0o2755, 50)
    assert m["tmp"].isdir() and m["tmp"].mode == 0o1777
    notes = m["home/u/notes"]
    assert (notes.uid, notes.gid, notes.mode, notes.mtime) == (1000, 1000, 0o600, MTIME)
    assert (m["home/u"].uid, m["home/u"].mode) == (1000, 0o750)
    assert m["home/u/l"].issym() and m["home/u/l"].linkname == "../../etc/hosts"
    assert m["home/u/l"].uid == 1000
    assert m["home/u/long"].linkname == LONG_TARGET
    assert m["tmp/fifo"].isfifo() and m["tmp/fifo"].mode == 0o640
    null = m["tmp/null"]
    assert null.ischr() and (null.devmajor, null.devminor, null.mode) == (1, 3, 0o666)
    assert all(not x.uname and not x.gname for x in members)
    assert all(set(x.pax_headers) <= {"path", "linkpath"} for x in members)  # no atime/ctime


def test_odd_names_survive(tmp_path: Path, image: Path) -> None:
    data, _ = export(image, tmp_path / "layer.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for name in ODD_NAMES:
            got = tf.extractfile(f"odd/{name}")
            assert got is not None and got.read() == name.encode()


def test_export_is_deterministic(tmp_path: Path, image: Path) -> None:
    first, _ = export(image, tmp_path / "a.tar")
    second, _ = export(image, tmp_path / "b.tar")
    assert first == second
    # Another image of the same tree (other size, so other inode and block numbers)
    src = tmp_path / "statesrc"
    other = mkfs(src, tmp_path / "other.ext4", size="200M")
    assert export(other, tmp_path / "c.tar")[0] == first
    put(src / "upper/etc/hostname", b"changed\n")
    changed = mkfs(src, tmp_path / "changed.ext4")
    assert export(changed, tmp_path / "d.tar")[0] != first


def test_mtime_can_be_fixed(tmp_path: Path, image: Path) -> None:
    _, members = export(image, tmp_path / "layer.tar", mtime=1234)
    assert {m.mtime for m in members} == {1234}


@pytest.mark.parametrize("name", [b"new\nline", b"tab\there", b"latin1-\xe9"])
def test_names_debugfs_cannot_express_are_refused(tmp_path: Path, name: bytes) -> None:
    src = tmp_path / "src"
    mkdir(src / "upper/d")
    (src / "upper/d").joinpath(os.fsdecode(name)).write_bytes(b"x")
    image = mkfs(src, tmp_path / "odd.ext4")
    with pytest.raises(IntegrityError):
        export_upper_image(image, tmp_path / "layer.tar")
    assert not (tmp_path / "layer.tar").exists()


@pytest.mark.parametrize(("where", "xattr"), [("d", "redirect"), ("d/f", "metacopy")])
def test_redirect_and_metacopy_are_refused(tmp_path: Path, where: str, xattr: str) -> None:
    src = tmp_path / "src"
    put(src / "upper/d/f", b"f")
    os.setxattr(src / "upper" / where, f"trusted.overlay.{xattr}", b"/x")
    with pytest.raises(BuildError, match=xattr):
        export_upper_image(mkfs(src, tmp_path / "i.ext4"), tmp_path / "layer.tar")


def test_names_deleted_at_a_directory_block_s_start_are_not_entries(tmp_path: Path) -> None:
    """ext4 deletes the first record of a directory block by zeroing its inode number only,
    and debugfs lists such a record with its old name (inode 0): a setup step that made and
    removed many files in one directory (pip does) left one, and the export failed with
    "debugfs printed nothing for inode 0"."""
    src = tmp_path / "src"
    for n in range(200):  # long names: the directory spans several 4 KiB blocks
        put(src / f"upper/d/a-file-with-a-rather-long-name-{n:03}", b"x")
    image = mkfs(src, tmp_path / "state.ext4")
    gone = [f"rm /upper/d/a-file-with-a-rather-long-name-{n:03}" for n in range(150)]
    script = tmp_path / "rm.cmds"
    script.write_text("\n".join(gone) + "\n")
    subprocess.run(
        ["debugfs", "-w", "-f", str(script), str(image)], check=True, capture_output=True
    )
    listing = subprocess.run(
        ["debugfs", "-R", "ls -p /upper/d", str(image)], check=True, capture_output=True, text=True
    ).stdout
    assert any(line.startswith("/0/") for line in listing.splitlines()), listing  # the case
    _, members = export(image, tmp_path / "layer.tar")
    names = sorted(m.name for m in members if m.name.startswith("d/"))
    assert names == [f"d/a-file-with-a-rather-long-name-{n:03}" for n in range(150, 200)]


def test_missing_and_empty_upper(tmp_path: Path) -> None:
    disk = tmp_path / "state.ext4"
    make_state_disk(disk, 32)
    with pytest.raises(NotFoundError, match="/nope"):
        export_upper_image(disk, tmp_path / "x.tar", upper="/nope")
    _, members = export(disk, tmp_path / "empty.tar")
    assert members == []


def test_export_after_copy_in(tmp_path: Path, lower: Path) -> None:
    rootfs = mkfs(lower, tmp_path / "rootfs.ext4")
    disk = tmp_path / "state.ext4"
    make_state_disk(disk, 64)
    (tmp_path / "f").write_bytes(b"from host")
    copy_in(disk, rootfs, tmp_path / "f", "/data/deep/dir/f")
    data, members = export(disk, tmp_path / "layer.tar")
    got = {m.name: m for m in members}
    assert list(got) == ["data", "data/deep", "data/deep/dir", "data/deep/dir/f"]
    assert (got["data/deep/dir"].uid, got["data/deep/dir"].mode) == (1000, 0o700)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        f = tf.extractfile("data/deep/dir/f")
        assert f is not None and f.read() == b"from host"


def test_pending_journal_is_replayed_first(tmp_path: Path, image: Path) -> None:
    before, _ = export(image, tmp_path / "a.tar")
    debugfs_w(image, "feature needs_recovery")
    assert export(image, tmp_path / "b.tar")[0] == before
    assert "needs_recovery" not in debugfs(image, "stats -h")
