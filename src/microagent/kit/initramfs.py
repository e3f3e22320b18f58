"""A deterministic ``newc`` cpio writer for initramfs images (no cpio binary needed).

Entries carry no timestamps or host ownership: every file is owned by root with mtime 0, and
inode numbers are assigned in order, so the same entries always give the same bytes.
"""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: a path (no leading slash), its full mode, and content.

    Regular files carry ``data``; symlinks carry the target as ``data``; device nodes set
    ``rdev`` as ``(major, minor)``.
    """

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, path: str, perm: int = 0o755) -> CpioEntry:
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, path: str, target: str) -> CpioEntry:
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(entry: CpioEntry, ino: int, name: bytes) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name) + 1,
        0,  # check
    )
    return _MAGIC + b"".join(b"%08X" % value for value in fields)


def _write_entry(out: BinaryIO, entry: CpioEntry, ino: int) -> None:
    name = entry.path.strip("/").encode() or b"."
    head = _header(entry, ino, name) + name + b"\0"
    out.write(head + _pad(len(head)))
    out.write(entry.data + _pad(len(entry.data)))


def write_cpio(out: BinaryIO, entries: Iterable[CpioEntry]) -> None:
    """Write ``entries`` (parents before children) and the trailer as a newc archive."""
    ino = 0
    for ino, entry in enumerate(entries, start=1):
        _write_entry(out, entry, ino)
    _write_entry(out, CpioEntry(_TRAILER, 0), ino + 1)


def write_initramfs(path: Path, entries: Iterable[CpioEntry], *, gzip_level: int = 0) -> None:
    """Write a newc archive, plain (the default) or gzip-compressed at ``gzip_level``.

    Plain is faster to boot under emulation: the kernel's inflate of a ~3 MB archive costs
    ~0.3-0.4 s under TCG (measured), far more than QEMU copying 1.6 MB more into RAM.
    The gzip header carries no name or mtime, so either form is reproducible.
    """
    with path.open("wb") as raw:
        if not gzip_level:
            write_cpio(raw, entries)
            return
        with gzip.GzipFile(
            filename="", fileobj=raw, mode="wb", compresslevel=gzip_level, mtime=0
        ) as gz:
            write_cpio(gz, entries)  # type: ignore[arg-type]


def with_parents(entries: Iterable[CpioEntry]) -> list[CpioEntry]:
    """Add missing parent directories (mode 0755) before the entries that need them."""
    seen: set[str] = set()
    out: list[CpioEntry] = []
    for entry in entries:
        parts = entry.path.strip("/").split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in seen:
                seen.add(parent)
                out.append(CpioEntry.directory(parent))
        key = entry.path.strip("/")
        if key in seen and stat.S_ISDIR(entry.mode):
            continue
        seen.add(key)
        out.append(entry)
    return out
