"""The content-addressed store: verified blobs, step records and built entries.

Layout under the root directory (which the caller chooses)::

    blobs/<alg>/<hex>      content, verified against its digest before it becomes visible
    keys/<hex>.json        one record per build-step key
    <kind>/<name>          built entries such as rootfs/<key>.ext4 (see Store.build_once)
    locks/<kind>/<name>.lock
    tmp/                   scratch directories (Store.scratch_dir)

Everything is written under a temp name (starting with ``.tmp-``), fsync'd and renamed into
place, so a crash leaves garbage for :meth:`Store.collect_garbage`, never a half-written
entry. The mtime of an entry is its last use.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from microagent.digests import Digest, key_hex
from microagent.errors import BuildError, IntegrityError, InvalidInputError, NotFoundError
from microagent.frozen import Frozen
from microagent.fsutil import (
    TEMP_PREFIX,
    atomic_write,
    flocked,
    fsync_dir,
    fsync_tree,
    is_no_space,
    link_no_replace,
    no_space,
    remove_any,
    temp_file,
    temp_sibling,
    usage,
)

if TYPE_CHECKING:
    from hashlib import _Hash

CHUNK = 1 << 20
STALE_TEMP_SECONDS = 6 * 3600
_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_RESERVED_KINDS = frozenset({"blobs", "keys", "locks", "tmp"})
_UNLISTED_KINDS = frozenset({"locks", "tmp"})
SIZE_HINT = "the source sent the wrong number of bytes; nothing was stored (retrying is safe)"


@dataclass(frozen=True, eq=False, repr=False)
class Entry(Frozen):
    """One thing in the store, as listed by :meth:`Store.entries`."""

    name: str  # relative to the root: "blobs/sha256/<hex>", "keys/<hex>.json", "rootfs/<k>.ext4"
    path: Path
    size: int  # apparent bytes
    disk_bytes: int  # allocated bytes (what pruning counts)
    last_used: float  # seconds since the epoch

    @property
    def kind(self) -> str:
        """The top-level directory: ``blobs``, ``keys``, ``rootfs`` ..."""
        return self.name.split("/", 1)[0]


@dataclass(frozen=True, eq=False, repr=False)
class PruneReport(Frozen):
    """What :meth:`Store.prune` removed."""

    removed: tuple[Entry, ...]
    garbage: tuple[Path, ...]

    @property
    def freed_bytes(self) -> int:
        return sum(e.disk_bytes for e in self.removed)


def check_name(name: str) -> tuple[str, ...]:
    """Validate an entry name like ``rootfs/<key>.ext4`` and split it into parts."""
    parts = tuple(name.split("/"))
    if len(parts) < 2 or not all(_NAME_PART.fullmatch(p) for p in parts):
        raise InvalidInputError(f"invalid store entry name {name!r}")
    if parts[0] in _RESERVED_KINDS:
        raise InvalidInputError(f"store entry name {name!r} uses a reserved directory")
    return parts


def touch(path: Path) -> None:
    """Record a use of ``path`` (its mtime); a read-only store is not an error."""
    with contextlib.suppress(OSError):
        os.utime(path, follow_symlinks=False)


def create_once(
    final: Path, build: Callable[[Path], None], *, lock: Path, replace: bool = False
) -> Path:
    """Create ``final`` once: ``build(tmp)`` makes a file or directory at ``tmp``.

    Holds an exclusive flock on ``lock`` while building, re-checks ``final`` after getting
    it (so concurrent callers build once and the rest reuse the result), and renames the
    finished, fsync'd temp into place. On any error the temp is removed and nothing is
    published. With ``replace`` a file ``final`` is built anew and renamed over the old one
    (readers see the old or the new file, never a missing or partial one).
    """
    if os.path.lexists(final) and not replace:
        touch(final)
        return final
    with flocked(lock):
        if os.path.lexists(final) and not replace:
            touch(final)
            return final
        tmp = temp_sibling(final)
        try:
            build(tmp)
            if not os.path.lexists(tmp):
                raise BuildError(f"building {final.name} produced nothing at {tmp}")
            fsync_tree(tmp)
            tmp.rename(final)
        except BaseException as exc:
            remove_any(tmp)
            if isinstance(exc, OSError) and is_no_space(exc):
                raise no_space(final.parent) from exc
            raise
        fsync_dir(final.parent)
    return final


class Store:
    """A content store rooted at ``root`` (created on first write, mode 0700)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- blobs -------------------------------------------------------------------------------

    def blob_path(self, digest: Digest | str) -> Path:
        """Where the blob with ``digest`` lives (whether or not it exists)."""
        d = Digest.parse(digest)
        return self.root / "blobs" / d.algorithm / d.hex

    def has_blob(self, digest: Digest | str) -> bool:
        """Whether the blob is in the store."""
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: Digest | str) -> BinaryIO:
        """Open a stored blob for reading; NotFoundError when it is missing."""
        path = self.blob_path(digest)
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the store") from None
        touch(path)
        return fh

    def put_blob_bytes(self, data: bytes, expected_digest: Digest | str | None = None) -> Digest:
        """Store an in-memory blob; see :meth:`put_blob_file`."""
        return self.put_blob_file(io.BytesIO(data), expected_digest, expected_size=len(data))

    def put_blob_file(
        self,
        source: Path | BinaryIO,
        expected_digest: Digest | str | None = None,
        *,
        expected_size: int | None = None,
    ) -> Digest:
        """Copy a file or stream into the store, hashing as it goes, and return its digest.

        With ``expected_digest`` (and optionally ``expected_size``) the content must match or
        IntegrityError is raised and nothing is kept. An existing blob is never rewritten.
        """
        expected = Digest.parse(expected_digest) if expected_digest is not None else None
        if expected is not None and self.has_blob(expected):
            touch(self.blob_path(expected))
            return expected
        if isinstance(source, Path):
            with source.open("rb") as fh:
                return self._put_stream(fh, expected, expected_size)
        return self._put_stream(source, expected, expected_size)

    def _put_stream(
        self, src: BinaryIO, expected: Digest | None, expected_size: int | None
    ) -> Digest:
        hasher = expected.hasher() if expected else hashlib.sha256()
        directory = self.root / "blobs" / hasher.name
        self._mkdir(directory)
        try:
            with temp_file(directory) as (fh, tmp):
                size = _copy_hashing(src, fh, hasher, limit=expected_size)
                got = Digest.from_hasher(hasher)
                _check_blob(got, size, expected, expected_size)
                fh.flush()
                os.fchmod(fh.fileno(), 0o444)
                os.fsync(fh.fileno())
                final = directory / got.hex
                link_no_replace(tmp, final)
        except OSError as exc:
            if is_no_space(exc):  # (the temp is gone: nothing half-written stays)
                raise no_space(directory, expected_size) from exc
            raise
        fsync_dir(directory)
        touch(final)
        return got

    def verify_blob(self, digest: Digest | str) -> None:
        """Re-hash a stored blob; a corrupt one is removed and IntegrityError raised."""
        d = Digest.parse(digest)
        hasher = d.hasher()
        with self.open_blob(d) as fh:
            _copy_hashing(fh, None, hasher, limit=None)
        if hasher.hexdigest() != d.hex:
            remove_any(self.blob_path(d))
            raise IntegrityError(
                f"stored blob {d} is corrupt (content hashes to {hasher.hexdigest()}); removed",
                hint="retry the command to fetch it again",
            )

    # -- step records ------------------------------------------------------------------------

    def key_path(self, key: str | Digest) -> Path:
        """Where the record of step ``key`` lives."""
        return self.root / "keys" / f"{key_hex(key)}.json"

    def put_key(self, key: str | Digest, record: Mapping[str, object]) -> None:
        """Write (or replace) the record of a step key atomically."""
        path = self.key_path(key)
        data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        self._mkdir(path.parent)
        atomic_write(path, data + b"\n")

    def get_key(self, key: str | Digest) -> dict[str, object] | None:
        """The record of a step key, or None when missing or unreadable (a miss)."""
        path = self.key_path(key)
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict):
            return None
        touch(path)
        return record

    # -- built entries -----------------------------------------------------------------------

    def entry_path(self, name: str) -> Path:
        """Path of a built entry such as ``rootfs/<key>.ext4``."""
        return self.root.joinpath(*check_name(name))

    def lock_path(self, name: str) -> Path:
        """The flock file guarding entry ``name``."""
        parts = check_name(name)
        return self.root.joinpath("locks", *parts[:-1], parts[-1] + ".lock")

    def has_entry(self, name: str) -> bool:
        """Whether a built entry exists."""
        return os.path.lexists(self.entry_path(name))

    def build_once(
        self, name: str, build: Callable[[Path], None], *, replace: bool = False
    ) -> Path:
        """Return entry ``name``, building it with ``build(tmp_path)`` if it does not exist
        (with ``replace``: building it anew, atomically replacing a file entry).

        Concurrent callers (threads or processes) of the same name build it once; the
        others wait for the lock and reuse the result.
        """
        final = self.entry_path(name)
        self._mkdir(final.parent)
        return create_once(final, build, lock=self.lock_path(name), replace=replace)

    @contextlib.contextmanager
    def scratch_dir(self) -> Iterator[Path]:
        """A private working directory inside the store (same filesystem), removed afterwards.

        If the process dies, :meth:`collect_garbage` removes it once it is stale.
        """
        parent = self.root / "tmp"
        self._mkdir(parent)
        path = temp_sibling(parent / "scratch")
        path.mkdir(mode=0o700)
        try:
            yield path
        except OSError as exc:
            if is_no_space(exc):
                raise no_space(parent) from exc
            raise
        finally:
            remove_any(path)

    def touch(self, name: str) -> None:
        """Mark an entry (any store-relative name) as just used."""
        touch(self.root / name)

    # -- listing, pruning, garbage -----------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every blob, key record and built entry, sorted by name."""
        return [self._entry(name) for name in self._entry_names()]

    def disk_usage(self) -> int:
        """Allocated bytes of all entries."""
        return sum(e.disk_bytes for e in self.entries())

    def remove(self, name: str) -> bool:
        """Remove one entry by store-relative name; False when it was not there or busy."""
        if not self._is_entry_name(name):
            return False
        path = self.root / name
        lock = self._existing_lock(name)
        if lock is None:
            _retire(path)
            return True
        with flocked(lock, blocking=False) as got:
            if got:
                _retire(path)
            return got

    def prune(
        self,
        max_bytes: int | None = None,
        *,
        all: bool = False,
        keep: Callable[[str], bool] | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Remove least-recently-used entries until usage <= ``max_bytes`` (or all of them).

        ``keep(name)`` returning True protects an entry (e.g. the rootfs of a workspace).
        Stale temp files are collected as well. ``dry_run``: what would go, nothing removed
        (an entry busy at the time of the real prune stays then).
        """
        garbage = () if dry_run else tuple(self.collect_garbage())
        entries = sorted(self.entries(), key=lambda e: (e.last_used, e.name))
        total = sum(e.disk_bytes for e in entries)
        removed: list[Entry] = []
        for entry in entries:
            if not all and (max_bytes is None or total <= max_bytes):
                break
            if keep is not None and keep(entry.name):
                continue
            if dry_run or self.remove(entry.name):
                total -= entry.disk_bytes
                removed.append(entry)
        return PruneReport(tuple(removed), garbage)

    def collect_garbage(self, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Remove temp files left by crashed writers.

        A temp of a locked build is removed as soon as its lock is free (its builder is
        gone); other temps (blob downloads, records) once older than ``max_age`` seconds.
        """
        removed = self.stale_temps(max_age)
        for path in removed:
            remove_any(path)
        return removed

    def stale_temps(self, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
        """The temp files :meth:`collect_garbage` would remove now (nothing is removed)."""
        cutoff = time.time() - max_age
        return [path for path in self._temp_paths() if self._temp_is_stale(path, cutoff)]

    # -- internals ---------------------------------------------------------------------------

    def _mkdir(self, directory: Path) -> None:
        try:
            if not self.root.is_dir():
                self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if is_no_space(exc):
                raise no_space(directory) from exc
            raise

    def _is_entry_name(self, name: str) -> bool:
        parts = name.split("/")
        depth = 3 if parts[0] == "blobs" else 2
        if len(parts) != depth or parts[0] in _UNLISTED_KINDS:
            return False
        if any(not p or p.startswith(".") for p in parts):
            return False
        return os.path.lexists(self.root / name)

    def _entry(self, name: str) -> Entry:
        path = self.root / name
        st = path.lstat()
        size, disk = usage(path)
        return Entry(name, path, size, disk, st.st_mtime)

    def _entry_names(self) -> Iterator[str]:
        for kind in _listdir(self.root):
            if kind in _UNLISTED_KINDS:
                continue
            depth = 2 if kind == "blobs" else 1
            yield from (f"{kind}/{rel}" for rel in _names_at_depth(self.root / kind, depth))

    def _temp_paths(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for kind in _listdir(self.root):
            dirs = [self.root / kind]
            if kind == "blobs":
                dirs = [self.root / kind / alg for alg in _listdir(self.root / kind)]
            for directory in dirs:
                yield from (p for p in _iterdir(directory) if p.name.startswith(TEMP_PREFIX))

    def _temp_is_stale(self, path: Path, cutoff: float) -> bool:
        entry_name = _entry_of_temp(path, self.root)
        lock = self._existing_lock(entry_name) if entry_name else None
        if lock is not None:
            with flocked(lock, blocking=False) as free:
                return free
        try:
            return path.lstat().st_mtime < cutoff
        except FileNotFoundError:
            return False

    def _existing_lock(self, name: str) -> Path | None:
        try:
            lock = self.lock_path(name)
        except InvalidInputError:
            return None
        return lock if lock.exists() else None


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None, hasher: _Hash, *, limit: int | None) -> int:
    size = 0
    while chunk := src.read(CHUNK):
        size += len(chunk)
        if limit is not None and size > limit:
            raise IntegrityError(
                f"content is larger than the expected {limit} bytes", hint=SIZE_HINT
            )
        hasher.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return size


def _check_blob(got: Digest, size: int, expected: Digest | None, expected_size: int | None) -> None:
    if expected_size is not None and size != expected_size:
        raise IntegrityError(f"content has {size} bytes, expected {expected_size}", hint=SIZE_HINT)
    if expected is not None and got != expected:
        raise IntegrityError(
            f"digest mismatch: expected {expected}, content hashes to {got}",
            hint="the source is corrupt or was changed; nothing was stored",
        )


def _retire(path: Path) -> None:
    # Rename first so the entry vanishes atomically; a crash leaves only a temp.
    tmp = temp_sibling(path)
    try:
        path.rename(tmp)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)
    remove_any(tmp)


def _entry_of_temp(path: Path, root: Path) -> str | None:
    # ".tmp-<entry name>.<token>" in <root>/<kind>/ belongs to entry "<kind>/<entry name>".
    rel = path.relative_to(root).parts
    if len(rel) != 2 or rel[0] in _RESERVED_KINDS:
        return None
    stem = path.name[len(TEMP_PREFIX) :].rpartition(".")[0]
    return f"{rel[0]}/{stem}" if stem else None


def _listdir(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _iterdir(directory: Path) -> Iterator[Path]:
    try:
        paths = sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    yield from paths


def _names_at_depth(directory: Path, depth: int) -> Iterator[str]:
    for name in _listdir(directory):
        if depth == 1:
            yield name
        else:
            yield from (f"{name}/{rel}" for rel in _names_at_depth(directory / name, depth - 1))
