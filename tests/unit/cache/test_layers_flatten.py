"""Benign layers: whiteouts, opaque dirs, links, modes and ownership come out right."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest
from cache_tarkit import (
    MTIME,
    E,
    chardev,
    dir_,
    fifo,
    file,
    gzip_bytes,
    hard,
    opaque,
    sha256,
    sym,
    tar_bytes,
    tree,
    whiteout,
    zstd_bytes,
)

from microagent.digests import Digest
from microagent.layers.apply import LayerSource, apply_layer, flatten
from microagent.layers.stagemeta import Kind, PathMeta, StageMetadata

needs_root = pytest.mark.root("stage ownership")


def layers_of(*layers: Sequence[E]) -> list[LayerSource]:
    out = []
    for i, entries in enumerate(layers):
        data = tar_bytes(entries)
        out.append(LayerSource(f"#{i}", lambda d=data: io.BytesIO(d), Digest.parse(sha256(data))))
    return out


def run(tmp_path: Path, *layers: Sequence[E]) -> tuple[Path, StageMetadata]:
    stage = tmp_path / "stage"
    return stage, flatten(stage, layers_of(*layers))


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


BASE = (
    dir_("./"),
    dir_("./etc"),
    file("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    dir_("./usr/bin"),  # parent ./usr comes implicitly
    file("./usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
    dir_("./var/lib/apt"),
    file("./var/lib/apt/lists", b"lists"),
    dir_("./opt/app"),
    file("./opt/app/a", b"a"),
    file("./opt/app/b", b"b"),
    dir_("./opt/app/sub"),
    file("./opt/app/sub/x", b"x"),
)


def test_files_dirs_and_implicit_parents(tmp_path: Path) -> None:
    stage, meta = run(tmp_path, BASE)
    assert (stage / "etc" / "passwd").read_bytes().startswith(b"root:")
    assert (stage / "usr" / "bin" / "tool").stat().st_mode & 0o777 == 0o755
    assert meta.get("/usr") == PathMeta(Kind.DIR, 0o755, 0, 0, 0)  # implicit parent
    assert meta.get("/etc/passwd") == PathMeta(Kind.FILE, 0o644, 0, 0, MTIME)
    assert (stage / "etc" / "passwd").stat().st_mtime == MTIME
    assert (stage / "etc").stat().st_mtime == MTIME  # dir mtimes fixed after the last layer
    assert "/" in meta and len(meta) == 16


def test_whiteouts_delete_lower_files_and_trees(tmp_path: Path) -> None:
    upper = (whiteout("etc/passwd"), whiteout("var/lib/apt"), whiteout("opt/missing"))
    stage, meta = run(tmp_path, BASE, upper)
    assert names(stage / "etc") == []
    assert names(stage / "var" / "lib") == []
    assert meta.get("/etc/passwd") is None
    assert meta.get("/var/lib/apt/lists") is None and meta.get("/var/lib/apt") is None
    assert not any(n.startswith(".wh.") for _, _, fs in os.walk(stage) for n in fs)


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_dir_keeps_same_layer_entries_in_any_order(
    tmp_path: Path, marker_first: bool
) -> None:
    same_layer = [file("opt/app/new", b"n"), file("opt/app/sub/y", b"y")]
    upper = [opaque("opt/app"), *same_layer] if marker_first else [*same_layer, opaque("opt/app")]
    stage, meta = run(tmp_path, BASE, upper)
    assert names(stage / "opt" / "app") == ["new", "sub"]
    assert names(stage / "opt" / "app" / "sub") == ["y"]
    recorded = sorted(p for p, _ in meta if p.startswith("/opt/app/"))
    assert recorded == ["/opt/app/new", "/opt/app/sub", "/opt/app/sub/y"]


def test_opaque_on_missing_dir_creates_it(tmp_path: Path) -> None:
    stage, meta = run(tmp_path, BASE, [opaque("new/dir")])
    assert names(stage / "new" / "dir") == []
    assert meta.get("/new/dir") is not None


def test_whiteout_spares_same_layer_entry_and_next_layer_can_remove_it(tmp_path: Path) -> None:
    stage, _ = run(tmp_path, BASE, [file("etc/hosts", b"h"), whiteout("etc/hosts")])
    assert (stage / "etc" / "hosts").read_bytes() == b"h"
    stage2, _ = run(tmp_path / "2", BASE, [file("etc/hosts")], [whiteout("etc/hosts")])
    assert not (stage2 / "etc" / "hosts").exists()


def test_replacing_entries_of_another_type(tmp_path: Path) -> None:
    upper = [
        file("opt/app/sub", b"now a file"),  # dir -> file (its children go too)
        dir_("etc/passwd"),  # file -> dir
        sym("usr/bin/tool", "/bin/true"),  # file -> symlink
    ]
    stage, meta = run(tmp_path, BASE, upper)
    assert (stage / "opt" / "app" / "sub").read_bytes() == b"now a file"
    assert meta.get("/opt/app/sub/x") is None
    assert (stage / "etc" / "passwd").is_dir()
    assert os.readlink(stage / "usr" / "bin" / "tool") == "/bin/true"
    assert meta.get("/usr/bin/tool") == PathMeta(Kind.SYMLINK, 0o777, 0, 0, MTIME)


def test_directory_removed_and_recreated_within_a_layer(tmp_path: Path) -> None:
    entries = [file("d/x"), file("d/sub/z"), file("d", b"file now"), dir_("d"), file("d/sub/y")]
    stage, meta = run(tmp_path, entries)
    assert names(stage / "d") == ["sub"]
    assert names(stage / "d" / "sub") == ["y"]
    assert sorted(p for p, _ in meta if p.startswith("/d")) == ["/d", "/d/sub", "/d/sub/y"]


def test_hardlinks_share_an_inode_within_and_across_layers(tmp_path: Path) -> None:
    upper = [hard("usr/bin/tool2", "/usr/bin/tool"), hard("./etc/pw2", "./etc/passwd")]
    layer0 = [*BASE, hard("opt/app/a2", "opt/app/a")]
    stage, meta = run(tmp_path, layer0, upper)
    for a, b in [("opt/app/a", "opt/app/a2"), ("usr/bin/tool", "usr/bin/tool2")]:
        assert (stage / a).stat().st_ino == (stage / b).stat().st_ino
    assert meta.get("/usr/bin/tool2") == meta.get("/usr/bin/tool")


def test_symlinks_are_created_verbatim_and_never_followed(tmp_path: Path) -> None:
    entries = [
        *BASE,
        sym("bin", "usr/bin"),
        sym("etc/abs", "/etc/passwd"),
        sym("etc/rel", "../usr/bin/tool"),
        sym("etc/dangling", "/nonexistent/x"),
        sym("etc/up", "../../../../outside"),
    ]
    stage, _ = run(tmp_path, entries)
    assert os.readlink(stage / "bin") == "usr/bin"
    assert os.readlink(stage / "etc" / "abs") == "/etc/passwd"
    assert os.readlink(stage / "etc" / "up") == "../../../../outside"


def test_special_bits_sticky_tmp_and_ownership(tmp_path: Path) -> None:
    entries = [
        dir_("tmp", mode=0o1777),
        dir_("srv", mode=0o2775, uid=1000, gid=1000),
        file("usr/bin/su", b"elf", mode=0o4755),
        file("usr/bin/wall", b"elf", mode=0o2755, gid=5),
        file("home/u/notes", b"n", mode=0o600, uid=1000, gid=1000),
        file("etc/shadow", b"s", mode=0o000, gid=42),
    ]
    stage, meta = run(tmp_path, entries)
    expected = {
        "/tmp": (0o1777, 0, 0),
        "/srv": (0o2775, 1000, 1000),
        "/usr/bin/su": (0o4755, 0, 0),
        "/usr/bin/wall": (0o2755, 0, 5),
        "/home/u/notes": (0o600, 1000, 1000),
        "/etc/shadow": (0o000, 0, 42),
    }
    for path, (mode, uid, gid) in expected.items():
        m = meta.get(path)
        assert m is not None and (m.mode, m.uid, m.gid) == (mode, uid, gid), path
        if os.geteuid() == 0:
            st = (stage / path.lstrip("/")).lstat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), path


def test_root_entry_and_dot_slash_names(tmp_path: Path) -> None:
    stage, meta = run(tmp_path, [dir_("/", mode=0o700), dir_("./a/"), file("/a/b"), file("a//c")])
    assert meta.get("/") == PathMeta(Kind.DIR, 0o700, 0, 0, MTIME)
    assert names(stage / "a") == ["b", "c"]
    assert "/a/b" in meta and "/a/c" in meta


def test_fifo_created_device_recorded(tmp_path: Path) -> None:
    stage, meta = run(tmp_path, [fifo("run/ctl", mode=0o620), chardev("dev/null", 1, 3)])
    assert stat.S_ISFIFO((stage / "run" / "ctl").lstat().st_mode)
    assert meta.get("/dev/null") == PathMeta(Kind.CHAR, 0o644, 0, 0, MTIME, 1, 3)
    assert not (stage / "dev" / "null").exists()
    _, meta2 = run(tmp_path / "2", [chardev("dev/null", 1, 3)], [whiteout("dev/null")])
    assert meta2.get("/dev/null") is None


def test_gzip_zstd_and_plain_layers_give_the_same_stage(tmp_path: Path) -> None:
    plain = tar_bytes(BASE)
    stages = {}
    for label, blob in [("tar", plain), ("gz", gzip_bytes(plain)), ("zst", zstd_bytes(plain))]:
        stage = tmp_path / label
        src = LayerSource(label, lambda b=blob: io.BytesIO(b), Digest.parse(sha256(plain)))
        flatten(stage, [src])
        stages[label] = tree(stage)
    assert stages["tar"] == stages["gz"] == stages["zst"]
    assert len(stages["tar"]) == 15


def test_apply_layer_on_its_own(tmp_path: Path) -> None:
    stage = tmp_path / "s"
    stage.mkdir()
    meta = StageMetadata()
    apply_layer(stage, io.BytesIO(tar_bytes(BASE)), layer_name="base", meta=meta)
    assert (stage / "opt" / "app" / "a").read_bytes() == b"a"
    assert meta.get("/opt/app/a") is not None


def test_metadata_jsonl_round_trip(tmp_path: Path) -> None:
    _, meta = run(tmp_path, [*BASE, chardev("dev/null", 1, 3), file('odd "name"', uid=7)])
    path = tmp_path / "meta.jsonl"
    meta.write_jsonl(path)
    again = StageMetadata.read_jsonl(path)
    assert list(again) == list(meta)
    again.remove_tree("/opt")
    assert not any(p.startswith("/opt") for p, _ in again)
    assert list(meta) != list(again)


def test_many_entries_with_whiteouts(tmp_path: Path) -> None:
    import time

    entries = [file(f"d{i // 100}/f{i}", b"x") for i in range(3000)]
    upper = [whiteout(f"d{i}") for i in range(0, 30, 2)] + [opaque("d1")]
    start = time.monotonic()
    stage, meta = run(tmp_path, entries, upper)
    assert time.monotonic() - start < 15  # guards against quadratic bookkeeping only
    assert len(names(stage)) == 15
    assert names(stage / "d1") == []
    assert len(meta) == 1 + 15 + 1500 - 100  # root, dirs, files, minus d1's
