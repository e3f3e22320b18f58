"""Exporting an overlayfs upper dir as an OCI layer, and getting the merged view back."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from cache_tarkit import dir_, file, sha256, sym, tar_bytes, tree

from microagent.digests import Digest
from microagent.errors import BuildError, ToolError
from microagent.layers.apply import LayerSource, flatten
from microagent.layers.tarwrite import (
    compress_zstd,
    export_upper_as_layer,
    export_upper_as_zstd_layer,
)
from microagent.runner import run
from testenv.prereq import unavailable

needs_root = pytest.mark.root("whiteout devices")

LOWER = tar_bytes(
    [
        file("etc/passwd", b"root:x:0:0\n"),
        file("etc/hosts", b"127.0.0.1 localhost\n"),
        file("opt/app/a", b"a"),
        file("opt/app/sub/x", b"x"),
        file("var/cache/c1", b"c1"),
        file("usr/bin/tool", b"tool", mode=0o755),
        dir_("tmp", mode=0o1777),
        sym("bin", "usr/bin"),
    ]
)


def lower_stage(path: Path) -> Path:
    flatten(path, [LayerSource("lower", lambda: io.BytesIO(LOWER))])
    return path


def whiteout_dev(path: Path) -> None:
    os.mknod(path, 0o600 | 0o020000, os.makedev(0, 0))


def make_upper(upper: Path) -> None:
    """What overlayfs would leave after the changes in :func:`change_merged`."""
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "hosts").write_bytes(b"10.0.0.1 db\n")
    whiteout_dev(upper / "etc" / "passwd")
    (upper / "opt" / "app").mkdir(parents=True)
    os.setxattr(upper / "opt" / "app", "trusted.overlay.opaque", b"y")
    (upper / "opt" / "app" / "new").write_bytes(b"new")
    (upper / "var").mkdir()
    whiteout_dev(upper / "var" / "cache")
    (upper / "usr" / "bin").mkdir(parents=True)
    (upper / "usr" / "bin" / "newtool").write_bytes(b"#!/bin/sh\n")
    (upper / "usr" / "bin" / "newtool").chmod(0o4755)
    os.link(upper / "usr" / "bin" / "newtool", upper / "usr" / "bin" / "alias")
    (upper / "home" / "u").mkdir(parents=True)
    (upper / "home" / "u" / "notes").write_bytes(b"mine")
    os.chown(upper / "home" / "u" / "notes", 1000, 1000)
    (upper / "home" / "u" / "notes").chmod(0o600)
    (upper / "home" / "u" / "l").symlink_to("../../etc/hosts")
    (upper / "tmp").mkdir()
    (upper / "tmp").chmod(0o1777)
    os.mkfifo(upper / "tmp" / "fifo")


def change_merged(merged: Path) -> None:
    """The same changes, made through a mounted overlay."""
    (merged / "etc" / "hosts").write_bytes(b"10.0.0.1 db\n")
    (merged / "etc" / "passwd").unlink()
    shutil.rmtree(merged / "opt" / "app")
    (merged / "opt" / "app").mkdir()
    (merged / "opt" / "app" / "new").write_bytes(b"new")
    shutil.rmtree(merged / "var" / "cache")
    (merged / "usr" / "bin" / "newtool").write_bytes(b"#!/bin/sh\n")
    (merged / "usr" / "bin" / "newtool").chmod(0o4755)
    os.link(merged / "usr" / "bin" / "newtool", merged / "usr" / "bin" / "alias")
    (merged / "home" / "u").mkdir(parents=True)
    (merged / "home" / "u" / "notes").write_bytes(b"mine")
    os.chown(merged / "home" / "u" / "notes", 1000, 1000)
    (merged / "home" / "u" / "notes").chmod(0o600)
    (merged / "home" / "u" / "l").symlink_to("../../etc/hosts")
    os.mkfifo(merged / "tmp" / "fifo")


def apply_export(lower: Path, layer: bytes, out: Path) -> dict[str, tuple[object, ...]]:
    sources = [
        LayerSource("lower", lambda: io.BytesIO(LOWER)),
        LayerSource("upper", lambda: io.BytesIO(layer), Digest.parse(sha256(layer))),
    ]
    flatten(out, sources)
    return tree(out)


def export(upper: Path) -> tuple[bytes, Digest]:
    buf = io.BytesIO()
    diff_id = export_upper_as_layer(upper, buf)
    return buf.getvalue(), diff_id


@needs_root
def test_export_converts_overlay_whiteouts_and_is_deterministic(tmp_path: Path) -> None:
    make_upper(tmp_path / "upper")
    data, diff_id = export(tmp_path / "upper")
    assert str(diff_id) == sha256(data)
    assert export(tmp_path / "upper") == (data, diff_id)  # byte-identical
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert "etc/.wh.passwd" in names and "var/.wh.cache" in names
    assert names[names.index("opt/app") + 1] == "opt/app/.wh..wh..opq"
    assert all(m.mtime == 0 for m in members)
    assert all(not m.pax_headers for m in members)  # no atime/ctime records
    by_name = {m.name: m for m in members}
    assert by_name["usr/bin/alias"].mode == 0o4755  # first name (sorted) carries the data
    link = by_name["usr/bin/newtool"]
    assert link.islnk() and link.linkname == "usr/bin/alias"
    assert (by_name["home/u/notes"].uid, by_name["home/u/notes"].gid) == (1000, 1000)
    assert by_name["tmp"].mode == 0o1777 and by_name["tmp/fifo"].isfifo()
    assert by_name["home/u/l"].linkname == "../../etc/hosts"
    assert names == sorted(names, key=lambda n: n.split("/"))


@needs_root
def test_reapplying_export_reproduces_merged_view(tmp_path: Path) -> None:
    make_upper(tmp_path / "upper")
    data, _ = export(tmp_path / "upper")
    got = apply_export(lower_stage(tmp_path / "lower"), data, tmp_path / "again")
    assert "etc/passwd" not in got and "var/cache" not in got
    assert sorted(p for p in got if p.startswith("opt/app")) == ["opt/app", "opt/app/new"]
    assert got["usr/bin/tool"] == tree(tmp_path / "lower")["usr/bin/tool"]
    assert (tmp_path / "again" / "etc" / "hosts").read_bytes() == b"10.0.0.1 db\n"
    again = tmp_path / "again" / "usr" / "bin"
    assert (again / "alias").stat().st_ino == (again / "newtool").stat().st_ino


@contextlib.contextmanager
def overlay(lower: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    upper, work, merged = tmp_path / "u", tmp_path / "w", tmp_path / "m"
    for d in (upper, work, merged):
        d.mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off,metacopy=off"
    try:
        run(["mount", "-t", "overlay", "overlay", "-o", opts, merged])
    except ToolError as exc:
        unavailable(
            f"cannot mount overlayfs here: {exc.message.splitlines()[0]} "
            "(needs root in a VM or a privileged container, and the overlay module)"
        )
    try:
        yield upper, merged
    finally:
        run(["umount", merged])


@needs_root
def test_real_overlay_round_trip(tmp_path: Path) -> None:
    lower = lower_stage(tmp_path / "lower")
    with overlay(lower, tmp_path) as (upper, merged):
        change_merged(merged)
        expected = tree(merged)
    data, _ = export(upper)
    assert apply_export(lower, data, tmp_path / "again") == expected


@needs_root
def test_zstd_export_matches_plain_export(tmp_path: Path) -> None:
    make_upper(tmp_path / "upper")
    data, diff_id = export(tmp_path / "upper")
    out = io.BytesIO()
    layer = export_upper_as_zstd_layer(tmp_path / "upper", out)
    blob = out.getvalue()
    assert layer.diff_id == diff_id
    assert layer.size == len(blob) and str(layer.digest) == sha256(blob)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) == data
    again = compress_zstd(io.BytesIO(data), tmp_path / "layer.tar.zst")
    assert again.diff_id == diff_id and again.digest == layer.digest
    assert (tmp_path / "layer.tar.zst").read_bytes() == blob
    assert export_upper_as_layer(tmp_path / "upper", tmp_path / "layer.tar") == diff_id
    got = apply_export(lower_stage(tmp_path / "lower"), data, tmp_path / "a")
    src = LayerSource("z", lambda: io.BytesIO(blob), diff_id)
    flatten(tmp_path / "b", [LayerSource("lower", lambda: io.BytesIO(LOWER)), src])
    assert tree(tmp_path / "b") == got


def test_source_date_epoch_sets_mtimes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "f").write_text("x")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567")
    data, _ = export(tmp_path / "u")
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert [m.mtime for m in tf.getmembers()] == [1234567]


def test_redirect_dirs_cannot_be_exported(tmp_path: Path) -> None:
    (tmp_path / "u" / "d").mkdir(parents=True)
    try:
        os.setxattr(tmp_path / "u" / "d", "user.overlay.redirect", b"/old")
    except OSError:
        unavailable(f"no user xattrs on the filesystem of {tmp_path} (use ext4, xfs or tmpfs)")
    with pytest.raises(BuildError, match="redirect"):
        export(tmp_path / "u")
