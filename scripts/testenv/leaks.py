"""Search what microagent wrote for a secret, reading only the data of each file.

    assert files_holding(home, SECRET) == []
    assert not holds(disk, SECRET.encode())

Disk images are sparse: a workspace's rootfs may be gigabytes long with a few megabytes of
data. Reading such a file whole costs seconds per test (and its size in memory); these read
the data regions that ``SEEK_DATA``/``SEEK_HOLE`` report, in bounded chunks that overlap by
the needle's length, so a needle across a chunk or region boundary is still found. A hole
reads as zeros, so nothing but zeros is skipped: a needle of zero bytes only could be
missed, and is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CHUNK", "files_holding", "holds"]

CHUNK = 4 << 20


def _regions(fd: int, size: int) -> Iterable[tuple[int, int]]:
    """The ``(start, end)`` data regions of an open file (all of it where SEEK_DATA fails)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:  # ENXIO: no data after offset; EINVAL: not supported
            if offset == 0 and err.errno == 22:
                yield 0, size
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def holds(path: Path, needle: bytes) -> bool:
    """Whether ``needle`` occurs in the file at ``path``."""
    if not needle.strip(b"\0"):
        raise ValueError("a needle of zero bytes could sit in a hole; search for real data")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        for start, end in _regions(fd, size):
            # Begin early by the needle's length: it may straddle the previous region's end.
            offset = max(start - len(needle), 0)
            while offset < end:
                chunk = os.pread(fd, min(CHUNK, end - offset) + len(needle), offset)
                if needle in chunk:
                    return True
                offset += CHUNK
        return False
    finally:
        os.close(fd)


def files_holding(root: Path, needle: str | bytes) -> list[str]:
    """The regular files below ``root`` (symlinks not followed) that hold ``needle``, as
    sorted paths relative to ``root``."""
    data = needle.encode() if isinstance(needle, str) else needle
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and holds(path, data)
    )
