"""The recorded metadata fixes an ``mke2fs -d`` image with debugfs, as root or not."""

from __future__ import annotations

import io
import multiprocessing
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cache_tarkit import chardev, dir_, file, hard, sym, tar_bytes

from microagent.errors import IntegrityError
from microagent.ext4.debugfs import fix_ownership_script
from microagent.ext4.debugfs import quote as debugfs_quote
from microagent.layers.apply import LayerSource, flatten
from microagent.layers.stagemeta import Kind, PathMeta, StageMetadata
from microagent.runner import run
from testenv import nobody

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")

NOBODY = 65534
ODD = 'sp ace "quoted" it\'s back\\slash'
LAYER = tar_bytes(
    [
        dir_("tmp", mode=0o1777),
        dir_("srv", mode=0o2775, uid=1000, gid=1000),
        file("usr/bin/su", b"\x7fELF", mode=0o4755),
        hard("usr/bin/su2", "usr/bin/su"),
        file("home/u/notes", b"n", mode=0o600, uid=1000, gid=1000),
        file("etc/shadow", b"s", mode=0o000, gid=42),
        sym("home/u/link", "notes", uid=1000, gid=1000),
        chardev("dev/null", 1, 3, mode=0o666),
        dir_(f"opt/{ODD}", mode=0o750, uid=7, gid=8),
        file(f"opt/{ODD}/{ODD}", b"odd", mode=0o640, uid=9, gid=10),
        file("big", 100000 * b"x", uid=100000, gid=200000),
    ]
)
EXPECTED = {
    "/tmp": ("directory", 0o1777, 0, 0),
    "/srv": ("directory", 0o2775, 1000, 1000),
    "/usr/bin/su": ("regular", 0o4755, 0, 0),
    "/usr/bin/su2": ("regular", 0o4755, 0, 0),
    "/home/u/notes": ("regular", 0o600, 1000, 1000),
    "/home/u/link": ("symlink", 0o777, 1000, 1000),
    "/etc/shadow": ("regular", 0o000, 0, 42),
    "/dev/null": ("character special", 0o666, 0, 0),
    f"/opt/{ODD}": ("directory", 0o750, 7, 8),
    f"/opt/{ODD}/{ODD}": ("regular", 0o640, 9, 10),
    "/big": ("regular", 0o644, 100000, 200000),
    "/": ("directory", 0o755, 0, 0),
}


def debugfs_stat(image: Path, path: str) -> tuple[str, int, int, int]:
    out = run(["debugfs", "-R", f"stat {debugfs_quote(path)}", image]).stdout
    m = re.search(r"Type: (.+?)\s+Mode:\s+(\d+).*?User:\s+(\d+)\s+Group:\s+(\d+)", out, re.S)
    assert m, out
    return m[1], int(m[2], 8), int(m[3]), int(m[4])


def build_image(stage: Path, meta: StageMetadata, image: Path, *, diff: bool) -> str:
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", stage, image, "16M"])
    script = fix_ownership_script(meta, stage=stage if diff else None)
    done = run(["debugfs", "-w", "-f", "-", image], input=script.encode("utf-8", "surrogateescape"))
    assert "not found" not in done.stderr.lower(), done.stderr
    run(["e2fsck", "-fn", image])  # still a clean filesystem
    return script


def check_image(image: Path) -> None:
    for path, expected in EXPECTED.items():
        assert debugfs_stat(image, path) == expected, path
    out = run(["debugfs", "-R", "stat /dev/null", image]).stdout
    assert "Device major/minor number: 01:03" in out
    assert "Links: 2" in run(["debugfs", "-R", "stat /usr/bin/su", image]).stdout
    text = run(["debugfs", "-R", f"cat {debugfs_quote(f'/opt/{ODD}/{ODD}')}", image]).stdout
    assert text == "odd"


def flatten_layer(stage: Path) -> StageMetadata:
    return flatten(stage, [LayerSource("t", lambda: io.BytesIO(LAYER))])


@pytest.mark.root("a flatten as root keeps owners on the stage")
def test_image_from_root_flatten(tmp_path: Path) -> None:
    meta = flatten_layer(tmp_path / "stage")
    script = build_image(tmp_path / "stage", meta, tmp_path / "img", diff=True)
    # as root the stage already carries owners and modes: only the device needs debugfs
    assert "mknod" in script and 'sif "/usr/bin/su"' not in script
    check_image(tmp_path / "img")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp dir an unprivileged user can reach (pytest's tmp_path is root-only)."""
    with nobody.shared_dir("microagent-test-", mode=0o755) as path:
        yield path


def _flatten_as_nobody(stage: str, meta_path: str) -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    flatten_layer(Path(stage)).write_jsonl(Path(meta_path))


@pytest.mark.root("to drop to another user")
def test_image_from_unprivileged_flatten(shared_tmp: Path) -> None:
    stage, work = shared_tmp / "stage", shared_tmp / "work"
    for d in (stage, work):
        d.mkdir()
        os.chown(d, NOBODY, NOBODY)
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_flatten_as_nobody, args=(str(stage), str(work / "meta.jsonl")))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert (stage / "usr" / "bin" / "su").stat().st_uid == NOBODY  # the host copy is ours
    meta = StageMetadata.read_jsonl(work / "meta.jsonl")
    script = build_image(stage, meta, work / "img", diff=True)
    assert 'sif "/usr/bin/su" uid 0' in script
    check_image(work / "img")


def test_script_format_and_quoting() -> None:
    meta = StageMetadata()
    meta.set('/a "b"', PathMeta(Kind.DIR, 0o2755, 1, 2, 0))
    meta.set('/a "b"/null', PathMeta(Kind.CHAR, 0o666, 0, 0, 5, 1, 3))
    meta.set("/sda", PathMeta(Kind.BLOCK, 0o660, 0, 6, 5, 8, 0))
    assert fix_ownership_script(meta).splitlines() == [
        'sif "/" uid 0',
        'sif "/" gid 0',
        'sif "/" mode 040755',
        'sif "/a ""b""" uid 1',
        'sif "/a ""b""" gid 2',
        'sif "/a ""b""" mode 042755',
        'cd "/a ""b"""',
        'mknod "null" c 1 3',
        "cd /",
        'sif "/a ""b""/null" uid 0',
        'sif "/a ""b""/null" gid 0',
        'sif "/a ""b""/null" mode 020666',
        'sif "/a ""b""/null" mtime @5',
        'cd "/"',
        'mknod "sda" b 8 0',
        "cd /",
        'sif "/sda" uid 0',
        'sif "/sda" gid 6',
        'sif "/sda" mode 060660',
        'sif "/sda" mtime @5',
    ]


def test_control_characters_cannot_be_scripted() -> None:
    with pytest.raises(IntegrityError):
        debugfs_quote("/a\nsif / uid 0")
