"""The newc cpio writer, checked against GNU cpio's own reading of the archive."""

from __future__ import annotations

import gzip
import io
import os
import stat
from pathlib import Path

from microagent.errors import ToolError
from microagent.kit.initramfs import CpioEntry, with_parents, write_cpio, write_initramfs
from microagent.runner import find_tool, run
from testenv.prereq import tool_missing

ENTRIES = [
    CpioEntry.directory("bin"),
    CpioEntry.file("bin/busybox", b"\x7fELF" + b"x" * 4093, 0o755),
    CpioEntry.symlink("bin/sh", "busybox"),
    CpioEntry.chardev("dev/console", 5, 1),
    CpioEntry.file("init", b"#!/bin/sh\necho hi\n", 0o755),
    CpioEntry.file("lib/modules/a.ko", b"odd"),
]


def cpio_bytes(entries: list[CpioEntry]) -> bytes:
    buf = io.BytesIO()
    write_cpio(buf, entries)
    return buf.getvalue()


def cpio_tool() -> str:
    try:
        return find_tool("cpio")
    except ToolError as exc:
        tool_missing("GNU cpio reads the archives back", exc)


def test_listing_matches_gnu_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    entries = with_parents(ENTRIES)
    archive.write_bytes(cpio_bytes(entries))
    listing = run([cpio_tool(), "-t", "--quiet", "-F", str(archive)]).stdout.split()
    assert listing == [e.path for e in entries]


def test_gnu_cpio_extracts_the_same_content(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio_bytes(with_parents(ENTRIES)))
    out = tmp_path / "out"
    out.mkdir()
    run([cpio_tool(), "-i", "--quiet", "-d", "-F", str(archive)], cwd=out)
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "bin/busybox").stat().st_mode & 0o777 == 0o755
    assert os.readlink(out / "bin/sh") == "busybox"
    assert (out / "lib/modules/a.ko").read_bytes() == b"odd"
    if os.geteuid() == 0:
        st = (out / "dev/console").stat()
        assert stat.S_ISCHR(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)


def test_alignment_and_trailer() -> None:
    data = cpio_bytes([CpioEntry.file("x", b"abc")])
    assert len(data) % 4 == 0
    assert data.startswith(b"070701")
    assert b"TRAILER!!!\0" in data


def test_reproducible(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gz", tmp_path / "b.gz"
    write_initramfs(a, with_parents(ENTRIES), gzip_level=1)
    write_initramfs(b, with_parents(ENTRIES), gzip_level=1)
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes()) == cpio_bytes(with_parents(ENTRIES))
    plain = tmp_path / "plain.cpio"
    write_initramfs(plain, with_parents(ENTRIES))
    assert plain.read_bytes() == cpio_bytes(with_parents(ENTRIES))


def test_with_parents_adds_each_directory_once() -> None:
    paths = [e.path for e in with_parents([CpioEntry.file("a/b/c", b""), CpioEntry.directory("a")])]
    assert paths == ["a", "a/b", "a/b/c"]
