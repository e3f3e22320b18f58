"""Verified stamps: a file's digest remembered for one version of the file, so that a file
that has not changed since it was hashed is not hashed again (a snapshot's VM state on every
restore, the guest kernel and initramfs on every start and warm create).

A **version** is what ``stat(2)`` says of the file: device, inode, size, mtime and ctime (to
the nanosecond the filesystem keeps). A **stamp** is a version, the name of the digest
(``sha256`` or ``sparse-sha256``) and the digest; a **book** is a small JSON file of stamps
(``verified.json`` in a snapshot's folder, one in the microagent home for the guest kit). A
digest is taken from the book only when the file's version now is the stamped one, exactly.

The rule that makes this safe (a changed file never passes):

1. Any change to a file's bytes, through any of its hard links, sets its mtime and ctime to
   the kernel's current (coarse) time; a change of its metadata (a new or removed hard link,
   chmod, chown, ``utime``) sets its ctime. Userspace can set mtime back (``utime``) but
   never ctime. A file put in its place is another inode, with a ctime of its own.
2. So a change made *after* the digest was taken is seen, unless it happened within the same
   clock tick as the file's last change before it (the time would not move). A stamp is
   therefore recorded only when the hash began at least :func:`window_ns` after both the
   file's mtime and its ctime (0.1 s on a filesystem that keeps sub-millisecond times: Linux
   stamps files from a clock that advances every 1-10 ms; 2.5 s on one that keeps whole
   seconds, or milliseconds), and only when the version is the same before and after the
   read. A file hashed too soon after its last change is hashed, not stamped.
3. A hard link made by microagent itself (a warm template's files linked into a workspace,
   or into the store) moves the stamp forward (:func:`link`): the link changes the file's
   ctime, and nothing else may have changed, which the mtime shows: it is the stamped one,
   settled long before, and any write since would have set it to the present. The new
   version is stamped in the books of both folders. What this cannot see is a write that
   also sets the mtime back to its exact old value (``utime``) within the same clock tick as
   the link: only a process of the store's owner can do that, and it could rewrite the
   manifest's digests as well.

Who can write what: the books live in folders of the user's own (a snapshot folder is 0700,
the home is the user's); other local users can neither write a book nor change a file in
those folders, and the guest never touches them (it sees only its disks, which are copied
out of a snapshot, never handed to the VMM). A lost or malformed book costs a hash, never a
wrong answer: books are read bounded, field by field, and written atomically without a lock
(two writers racing lose a stamp, not correctness).

What a stamp does not catch: bytes that change on the medium under the filesystem (bit rot);
``microagent cache verify`` hashes every file whatever the books say. A system clock stepped
back by more than the window between two changes, or a network filesystem whose server clock
runs behind this host's, can defeat rule 2: the store is meant to be local.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent.errors import HostIOError, InvalidInputError
from microagent.fsutil import load_json_bounded, write_json_atomic

BOOK = "verified.json"  # a snapshot folder's book of stamps
FORMAT = 1
MAX_STAMPS = 64  # a book keeps the newest this many (a snapshot has at most 33 files)
BOOK_MAX = MAX_STAMPS * 400  # bytes
FINE_WINDOW_NS = 100_000_000  # sub-millisecond file times: the kernel's clock tick is <= 10 ms
COARSE_WINDOW_NS = 2_500_000_000  # whole-second (or millisecond) file times
CHUNK = 1 << 20  # the sparse digest's unit
_ZERO_CHUNK = hashlib.sha256(bytes(CHUNK)).digest()
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- digests of an open file --------------------------------------------------------------------


def sha256_fd(fd: int) -> str:
    """sha256 of the whole file open at ``fd`` (read from offset 0)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def sparse_sha256_fd(fd: int) -> str:
    """sha256 over 1 MiB chunk digests, a chunk that is a hole (or all zeros) counting as
    zeros without being read: a sparse and a dense copy of the same bytes agree, and a
    mostly empty disk image is digested in a moment."""
    outer = hashlib.sha256()
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
        data_at = _next_data(fd, offset, size)
        while offset + CHUNK <= data_at:  # whole chunks inside a hole
            outer.update(_ZERO_CHUNK)
            offset += CHUNK
        if offset >= size:
            break
        chunk = os.pread(fd, min(CHUNK, size - offset), offset)
        full = chunk if len(chunk) == CHUNK else chunk + bytes(CHUNK - len(chunk))
        outer.update(_ZERO_CHUNK if not full.strip(b"\0") else hashlib.sha256(full).digest())
        offset += CHUNK
    outer.update(size.to_bytes(8, "big"))
    return outer.hexdigest()


def _next_data(fd: int, offset: int, size: int) -> int:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:  # ENXIO: only a hole after offset
        return size


ALGORITHMS: Mapping[str, Callable[[int], str]] = {
    "sha256": sha256_fd,
    "sparse-sha256": sparse_sha256_fd,
}


# -- versions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """One version of a file, as ``stat(2)`` tells it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Version:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def window_ns(self) -> int:
        """How long after its last change a change of this file is sure to move its times."""
        fine = self.mtime_ns % 1_000_000 or self.ctime_ns % 1_000_000
        return FINE_WINDOW_NS if fine else COARSE_WINDOW_NS

    def settled_at(self) -> int:
        """The moment (ns since the epoch) from which a hash of this version may be stamped."""
        return max(self.mtime_ns, self.ctime_ns) + self.window_ns()

    def linked_from(self, before: Version) -> bool:
        """Whether this can be ``before`` after a hard link and nothing else: the same
        inode, size and mtime; only the ctime moved (rule 3)."""
        return (self.dev, self.ino, self.size, self.mtime_ns) == (
            before.dev,
            before.ino,
            before.size,
            before.mtime_ns,
        )


@dataclass(frozen=True)
class Stamp:
    version: Version
    algorithm: str
    digest: str

    def to_json(self) -> dict[str, Any]:
        v = self.version
        return {
            "dev": v.dev,
            "ino": v.ino,
            "size": v.size,
            "mtimeNs": v.mtime_ns,
            "ctimeNs": v.ctime_ns,
            "algorithm": self.algorithm,
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: Any) -> Stamp | None:
        """The stamp ``data`` describes; None for anything malformed (a lost stamp)."""
        if not isinstance(data, Mapping):
            return None
        numbers = [data.get(k) for k in ("dev", "ino", "size", "mtimeNs", "ctimeNs")]
        algorithm, digest = data.get("algorithm"), data.get("digest")
        ints = [n for n in numbers if type(n) is int and n >= 0]
        if len(ints) != len(numbers) or not isinstance(algorithm, str):
            return None
        if algorithm not in ALGORITHMS or not _HEX64.fullmatch(str(digest)):
            return None
        return cls(Version(*ints), algorithm, str(digest))


# -- books --------------------------------------------------------------------------------------


class Book:
    """The stamps kept in one JSON file, by ``dev:ino``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of_folder(cls, folder: Path) -> Book:
        return cls(folder / BOOK)

    def stamps(self) -> dict[str, Stamp]:
        try:
            with self.path.open("rb") as fh:
                raw = fh.read(BOOK_MAX + 1)
            data = load_json_bounded(raw, max_bytes=BOOK_MAX, max_depth=4)
        except (OSError, InvalidInputError):
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return {}
        entries = data.get("stamps")
        if not isinstance(entries, dict):
            return {}
        found = {}
        for key, value in list(entries.items())[-MAX_STAMPS:]:
            stamp = Stamp.from_json(value)
            if stamp is not None and key == _key(stamp.version):
                found[key] = stamp
        return found

    def lookup(self, version: Version, algorithm: str) -> str | None:
        """The digest stamped for exactly ``version`` (None: hash it)."""
        stamp = self.stamps().get(_key(version))
        if stamp is None or stamp.version != version or stamp.algorithm != algorithm:
            return None
        return stamp.digest

    def record(self, *stamps: Stamp) -> None:
        """Keep ``stamps`` (replacing older ones of the same inodes); best effort: a book
        that cannot be written costs a hash later."""
        kept = self.stamps()
        for stamp in stamps:
            kept.pop(_key(stamp.version), None)
            kept[_key(stamp.version)] = stamp
        newest = list(kept.items())[-MAX_STAMPS:]
        document = {"format": FORMAT, "stamps": {k: s.to_json() for k, s in newest}}
        with contextlib.suppress(OSError, HostIOError):  # HostIOError: the disk is full
            write_json_atomic(self.path, document, mode=0o600)


def _key(version: Version) -> str:
    return f"{version.dev}:{version.ino}"


# -- hashing with a book ------------------------------------------------------------------------


def digest(path: Path, algorithm: str, book: Book | None, *, wait: bool = False) -> str:
    """The ``algorithm`` digest of ``path`` (see :func:`take`)."""
    return take(path, algorithm, book, wait=wait)[0]


def take(path: Path, algorithm: str, book: Book | None, *, wait: bool = False) -> tuple[str, bool]:
    """The ``algorithm`` digest of ``path`` and whether it came from a stamp: from ``book``
    when it has a stamp for the file's version now, else hashed (and stamped when rule 2
    allows). ``wait``: a file changed moments ago (one this process just wrote) is first left
    to settle when that takes at most :data:`FINE_WINDOW_NS`, so it can be stamped. ``book``
    None: always hashed, nothing recorded. OSError when the file cannot be read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = Version.of(os.fstat(fd))
        if book is not None:
            known = book.lookup(before, algorithm)
            if known is not None:
                return known, True
        if wait and book is not None:
            _sleep_until(before.settled_at(), at_most_ns=FINE_WINDOW_NS)
        began = time.time_ns()
        value = ALGORITHMS[algorithm](fd)
        after = Version.of(os.fstat(fd))
    finally:
        os.close(fd)
    if book is not None and after == before and began >= before.settled_at():
        book.record(Stamp(before, algorithm, value))
    return value, False


def _sleep_until(moment_ns: int, *, at_most_ns: int) -> None:
    remaining = moment_ns - time.time_ns()
    if 0 < remaining <= at_most_ns:
        time.sleep(remaining / 1e9)


def link(source: Path, target: Path, books: tuple[Book, Book]) -> None:
    """Hard-link ``source`` as ``target`` and move a stamp of ``source`` forward into both
    ``books`` (the source's folder's and the target's), as rule 3 allows. OSError from the
    link (another filesystem, say): the caller copies instead."""
    source_book, target_book = books
    before = Version.of(source.stat())
    stamp = source_book.stamps().get(_key(before))
    os.link(source, target)
    if stamp is None or stamp.version != before:
        return
    try:
        after = Version.of(target.stat())
    except OSError:
        return
    if after.linked_from(before):
        moved = Stamp(after, stamp.algorithm, stamp.digest)
        source_book.record(moved)
        target_book.record(moved)
