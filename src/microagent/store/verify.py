"""``cache verify``: check every stored thing against its name or its record, and repair.

What each kind of entry is checked against (``docs/cli.md``, "cache verify"):

- ``blobs/<alg>/<hex>``: a regular file whose content hashes to its name. Anything else in
  ``blobs/`` (an unknown algorithm, a name that is no digest) is orphaned: nothing can name it.
- ``keys/<hex>.json``: parses as a :class:`~microagent.store.records.StepRecord` for the key its
  name says, naming its own ``rootfs/<hex>.ext4`` if any and, in a root stack, only the layer
  disks of its own layers over the rootfs of a step up its chain; every layer blob of its
  chain (and a base step's image config) is in the store, sound. A record missing one is
  ``missing``: the build would take it as built, yet it could never be published or rebuilt
  from its layers. A root that is not there (a pruned rootfs, image or layer disk of a stack)
  is no problem: the step counts as not built and its root is made again from its layers.
- ``rootfs/<hex>.ext4``: a regular ext4 image at least as long as its superblock says; the
  size and sha256 its record states (a packed image's) when it states them; ``e2fsck -fn``
  clean when a checker is given (the CLI gives one). A rootfs that no sound record names (as
  its image or its stack's) and no workspace uses is orphaned once older than ``grace`` (a
  build writes the record just after it), or at once when its own record is broken.
- ``layerdisks/<hex>.ext4`` (a layer's disk, keyed by its diff_id): the same image checks. Shared
  by content, it has no record of its own: one that no sound record's stack names and no
  workspace uses is orphaned once older than ``grace``. A removed one is built again from its
  layer; until then the steps stacked on it count as not built.
- other built entries (``disks/``, ``bundles/``, ``kits/``): checked by the ``checks`` the
  caller gives per kind (the packages above the store know their insides; the CLI checks a
  shared disk's or bundle's image against its manifest), else only counted.
- temp files: stale by :meth:`Store.stale_temps` (a builder that is gone).
- lock files: a lock path that is not a regular file breaks every build of its entry. A lock
  file whose entry is gone is normal (a prune, a failed build) and stays: removing one could
  let two builders in at once.

``repair`` removes what is wrong, records first (so no record claims what is going), each
entry by an atomic rename (:meth:`Store.remove`, which skips an entry whose build lock is
held), and a rootfs whose record is removed goes too unless a workspace uses it or a sound
record's stack stands on it, so the next build rebuilds the step. Nothing is touched when
``repair`` is false, not even last-use times.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.digests import Digest, SparseDigest, data_runs, key_hex
from microagent.errors import IntegrityError
from microagent.frozen import Frozen
from microagent.fsutil import remove_any
from microagent.store.content import CHUNK, STALE_TEMP_SECONDS, Store
from microagent.store.records import (
    LAYER_DISK_KIND,
    StepRecord,
    layer_disk_entry,
    rootfs_entry,
    write_record,
)

if TYPE_CHECKING:
    from hashlib import _Hash

Fsck = Callable[[Path], None]  # raises IntegrityError for an unsound file system
# What is wrong with a built entry of another kind (``disks/<key>``): (problem, detail) or None.
EntryCheck = Callable[[Path], "tuple[str, str] | None"]

_KEY_NAME = re.compile(r"[0-9a-f]{64}\.json")
_IMAGE_NAME = re.compile(r"[0-9a-f]{64}\.ext4")
_EXT4_MAGIC = 0xEF53
_INCOMPAT_64BIT = 0x80
_REPAIR_ORDER = ("key", "lock", "rootfs", "layerdisk", "entry", "blob", "temp")  # entry: others
_LAYER_DISK = LAYER_DISK_KIND.removesuffix("s")  # the kind of its problems


@dataclass(frozen=True, eq=False, repr=False)
class Problem(Frozen):
    """One thing wrong: ``kind`` (blob, key, rootfs, layerdisk, disk, bundle, temp, lock), the
    store-relative ``name``, the ``problem`` (corrupt, missing, orphaned, stale), a ``detail``."""

    kind: str
    name: str
    problem: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "problem": self.problem,
            "detail": self.detail,
        }


@dataclass(frozen=True, eq=False, repr=False)
class VerifyReport(Frozen):
    """What :func:`verify` checked, found and (with ``repair``) removed."""

    checked: Mapping[str, int]
    problems: tuple[Problem, ...]
    repaired: tuple[str, ...] = ()

    @property
    def remaining(self) -> tuple[Problem, ...]:
        """The problems still there (all of them without ``repair``)."""
        gone = set(self.repaired)
        return tuple(p for p in self.problems if p.name not in gone)

    @property
    def ok(self) -> bool:
        return not self.remaining

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": dict(self.checked),
            "problems": [p.to_json() for p in self.problems],
            "repaired": list(self.repaired),
        }


@dataclass
class _Scan:
    store: Store
    in_use: Collection[str]
    fsck: Fsck | None
    checks: Mapping[str, EntryCheck]
    cutoff: float  # orphans last used before this (seconds since the epoch)
    checked: dict[str, int] = field(default_factory=lambda: {"blobs": 0, "keys": 0, "entries": 0})
    problems: list[Problem] = field(default_factory=list)
    bad_blobs: dict[str, str] = field(default_factory=dict)  # digest -> why it is unusable
    records: dict[str, StepRecord] = field(default_factory=dict)  # rootfs name -> sound record
    stacked: set[str] = field(default_factory=set)  # entries in sound records' root stacks
    broken_keys: set[str] = field(default_factory=set)  # hex of key records that are going

    def add(self, kind: str, name: str, problem: str, detail: str) -> None:
        if os.path.lexists(self.store.root / name):  # else removed meanwhile (a prune): moot
            self.problems.append(Problem(kind, name, problem, detail))


def verify(
    store: Store,
    *,
    repair: bool = False,
    in_use: Collection[str] = (),
    fsck: Fsck | None = None,
    checks: Mapping[str, EntryCheck] | None = None,
    grace: float = STALE_TEMP_SECONDS,
) -> VerifyReport:
    """Check the whole store; with ``repair`` remove every entry found wrong.

    ``in_use``: store entry names a workspace boots from (never orphans). ``fsck``: a full
    file system check for root filesystems (``ext4.debugfs.check_image``). ``grace``: seconds
    a rootfs without a record is left alone (its builder may still be writing the record).
    ``checks``: per kind of other built entry (``disks``), what is wrong with one; problems
    of kind ``disk`` for ``disks/``. An entry in use is never orphaned.
    """
    scan = _Scan(store, frozenset(in_use), fsck, checks or {}, time.time() - grace)
    _check_blobs(scan)
    _check_keys(scan)
    _check_rootfs(scan)
    _check_layer_disks(scan)
    _check_other_entries(scan)
    _check_locks(scan)
    for path in store.stale_temps():
        name = path.relative_to(store.root).as_posix()
        scan.add("temp", name, "stale", "left by a writer that is gone")
    problems = tuple(sorted(scan.problems, key=_order))
    repaired = _repair(store, problems) if repair else ()
    return VerifyReport(dict(scan.checked), problems, repaired)


def _order(problem: Problem) -> tuple[int, str]:
    kind = problem.kind if problem.kind in _REPAIR_ORDER else "entry"
    return _REPAIR_ORDER.index(kind), problem.name


# -- blobs ------------------------------------------------------------------------------------


def _check_blobs(scan: _Scan) -> None:
    top = scan.store.root / "blobs"
    for alg_dir in _children(top):
        for path in _children(alg_dir):
            scan.checked["blobs"] += 1
            problem = _blob_problem(alg_dir.name, path)
            if problem is None:
                continue
            name = path.relative_to(scan.store.root).as_posix()
            what, detail = problem
            scan.add("blob", name, what, detail)
            scan.bad_blobs[f"{alg_dir.name}:{path.name}"] = f"is {what}"


def _blob_problem(algorithm: str, path: Path) -> tuple[str, str] | None:
    try:
        digest = Digest(algorithm, path.name)
    except IntegrityError as exc:
        return "orphaned", f"not a blob name ({exc.message})"
    if not _is_file(path):
        return "corrupt", "not a regular file"
    hasher = digest.hasher()
    try:
        _hash_file(path, hasher)
    except OSError as exc:
        return "corrupt", f"unreadable: {exc.strerror or exc}"
    if hasher.hexdigest() != digest.hex:
        return "corrupt", f"content hashes to {algorithm}:{hasher.hexdigest()}"
    return None


def _hash_file(path: Path, hasher: _Hash) -> int:
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return size


# -- step records -----------------------------------------------------------------------------


def _check_keys(scan: _Scan) -> None:
    parsed: dict[str, StepRecord] = {}  # key -> every record that parses, sound or not
    for path in _children(scan.store.root / "keys"):
        scan.checked["keys"] += 1
        name = f"keys/{path.name}"
        if not _KEY_NAME.fullmatch(path.name):
            scan.add("key", name, "orphaned", "not a step record name (<64 hex>.json)")
            continue
        hexkey = path.name.removesuffix(".json")
        try:
            parsed["sha256:" + hexkey] = _parse_record(path, "sha256:" + hexkey)
        except IntegrityError as exc:
            scan.broken_keys.add(hexkey)
            scan.add("key", name, "corrupt", exc.message)
    for record in parsed.values():
        _judge_record(scan, record, parsed)


def _judge_record(scan: _Scan, record: StepRecord, parsed: Mapping[str, StepRecord]) -> None:
    """Report a record that parses yet names a foreign image or lacks a blob; else note what
    its root is made of."""
    hexkey = key_hex(record.key)
    name = f"keys/{hexkey}.json"
    foreign = _foreign_image(record, parsed)
    if foreign:
        scan.broken_keys.add(hexkey)
        scan.add("key", name, "corrupt", foreign)
        return
    lacking = _lacking(scan, record)
    if lacking:
        scan.broken_keys.add(hexkey)
        scan.add("key", name, "missing", lacking)
        return
    if record.rootfs is not None:
        scan.records[record.rootfs] = record
    if record.stack is not None:
        scan.stacked.update(record.stack.entries)


def _foreign_image(record: StepRecord, parsed: Mapping[str, StepRecord]) -> str:
    """Why the image under the record's stack is not an ancestor's rootfs ("" when it is, or
    when a missing record leaves the chain unknown above it)."""
    if record.stack is None:
        return ""
    image, current, seen = record.stack.image, record.parent, {record.key}
    while current is not None and current not in seen:
        if image == rootfs_entry(current):
            return ""
        ancestor = parsed.get(current)
        if ancestor is None:
            return ""  # the chain above is unknown: the image may be of a step up there
        seen.add(current)
        current = ancestor.parent
    return f"its root stack stands on {image!r}, the rootfs of no step of its chain"


def _parse_record(path: Path, key: str) -> StepRecord:
    """The record at ``path`` (read without marking it used), or IntegrityError saying why."""
    if not _is_file(path):
        raise IntegrityError("not a regular file")
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise IntegrityError("not a JSON object")
    record = StepRecord.from_json(raw)
    if record.key != key:
        raise IntegrityError(f"it is the record of {record.key}, not of {key}")
    if record.rootfs is not None and record.rootfs != rootfs_entry(key):
        raise IntegrityError(f"names a foreign rootfs {record.rootfs!r}")
    if record.stack is not None:
        own = {layer_disk_entry(layer.diff_id) for layer in record.layers}
        for disk in record.stack.layers:
            if disk not in own:
                raise IntegrityError(f"names a foreign layer disk {disk!r} (not of its layers)")
    return record


def _lacking(scan: _Scan, record: StepRecord) -> str:
    """What the record names that is not soundly in the store ("" when nothing)."""
    wanted = [("layer blob", layer.digest) for layer in record.layers]
    if record.origin is not None:
        wanted.append(("image config blob", record.origin.config))
    for what, digest in wanted:
        if digest in scan.bad_blobs:
            return f"its {what} {digest} {scan.bad_blobs[digest]}"
        if not scan.store.has_blob(digest):
            return f"its {what} {digest} is not in the store"
    return ""


# -- root filesystems -------------------------------------------------------------------------


def _check_rootfs(scan: _Scan) -> None:
    for path in _children(scan.store.root / "rootfs"):
        scan.checked["entries"] += 1
        name = f"rootfs/{path.name}"
        problem = _rootfs_problem(scan, name, path)
        if problem is not None:
            scan.add("rootfs", name, *problem)


def _rootfs_problem(scan: _Scan, name: str, path: Path) -> tuple[str, str] | None:
    if not _IMAGE_NAME.fullmatch(path.name):
        return None if name in scan.in_use else ("orphaned", "not a <64 hex>.ext4 name")
    corrupt = _corrupt_image(scan, name, scan.records.get(name), path)
    if corrupt:
        return "corrupt", corrupt
    if name in scan.records or name in scan.stacked or name in scan.in_use:
        return None
    hexkey = path.name.removesuffix(".ext4")
    if hexkey in scan.broken_keys:
        return "orphaned", f"its record keys/{hexkey}.json is broken (see above)"
    if _last_used(path) < scan.cutoff:
        return "orphaned", f"no step record names it (keys/{hexkey}.json)"
    return None


def _corrupt_image(scan: _Scan, name: str, record: StepRecord | None, path: Path) -> str:
    """What is wrong with the image at ``path`` ("" when nothing), saying if a workspace uses it."""
    corrupt = _image_problem(scan, record, path)
    if corrupt and name in scan.in_use:
        corrupt += " (a workspace boots from it: create that workspace again)"
    return corrupt


def _check_layer_disks(scan: _Scan) -> None:
    for path in _children(scan.store.root / LAYER_DISK_KIND):
        scan.checked["entries"] += 1
        name = f"{LAYER_DISK_KIND}/{path.name}"
        problem = _layer_disk_problem(scan, name, path)
        if problem is not None:
            scan.add(_LAYER_DISK, name, *problem)


def _layer_disk_problem(scan: _Scan, name: str, path: Path) -> tuple[str, str] | None:
    if not _IMAGE_NAME.fullmatch(path.name):
        return None if name in scan.in_use else ("orphaned", "not a <64 hex>.ext4 name")
    corrupt = _corrupt_image(scan, name, None, path)
    if corrupt:
        return "corrupt", corrupt
    if name in scan.stacked or name in scan.in_use or _last_used(path) >= scan.cutoff:
        return None
    return "orphaned", "no step record's root stack names it"


def _image_problem(scan: _Scan, record: StepRecord | None, path: Path) -> str:
    if not _is_file(path):
        return "not a regular file"
    try:
        short = _ext4_truncation(path)
        if short:
            return short
        if record is not None and record.packed is not None:
            packed, mismatch = record.packed, ""
            if packed.format == 2:
                mismatch = _sparse_digest_mismatch(path, packed.digest, packed.size)
            elif packed.format == 1:  # a format this version does not know is not checked
                mismatch = _digest_mismatch(path, packed.digest, packed.size)
            if mismatch:
                return mismatch
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if scan.fsck is not None:
        try:
            scan.fsck(path)
        except IntegrityError as exc:
            return exc.message
    return ""


def _ext4_truncation(path: Path) -> str:
    """Why ``path`` is no whole ext4 image by its superblock ("" when it may be one)."""
    with path.open("rb") as fh:
        fh.seek(1024)
        sb = fh.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != _EXT4_MAGIC:
        return "no ext4 superblock"
    blocks = struct.unpack_from("<I", sb, 0x4)[0]
    if struct.unpack_from("<I", sb, 0x60)[0] & _INCOMPAT_64BIT:
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    need = blocks * (1024 << struct.unpack_from("<I", sb, 0x18)[0])
    size = path.stat().st_size
    return f"truncated: {size} bytes, its superblock says {need}" if size < need else ""


def _digest_mismatch(path: Path, digest: str, size: int) -> str:
    hasher = hashlib.sha256()
    got = _hash_file(path, hasher)
    if got != size:
        return f"{got} bytes, its record says {size}"
    if "sha256:" + hasher.hexdigest() != digest:
        return f"content hashes to sha256:{hasher.hexdigest()}, its record says {digest}"
    return ""


def _sparse_digest_mismatch(path: Path, digest: str, size: int) -> str:
    """The check for an image packed in format 2 (``ext4.packed``): its sparse digest."""
    with path.open("rb") as fh:
        got = os.fstat(fh.fileno()).st_size
        if got != size:
            return f"{got} bytes, its record says {size}"
        sparse = SparseDigest(size)
        for offset, data in data_runs(fh, size):
            sparse.add(offset, len(data), hashlib.sha256(data).digest())
    if sparse.hexdigest() != digest:
        return f"its data runs hash to {sparse.hexdigest()}, its record says {digest}"
    return ""


# -- the rest ---------------------------------------------------------------------------------


def _check_other_entries(scan: _Scan) -> None:
    for kind in _children(scan.store.root):
        if kind.name in {"blobs", "keys", "rootfs", LAYER_DISK_KIND, "locks", "tmp"}:
            continue
        check = scan.checks.get(kind.name)
        for path in _children(kind):
            scan.checked["entries"] += 1
            found = check(path) if check is not None else None
            name = f"{kind.name}/{path.name}"
            if found is None or (found[0] == "orphaned" and name in scan.in_use):
                continue
            problem, detail = found
            if name in scan.in_use:
                detail += " (a workspace uses it: create that workspace again)"
            scan.add(kind.name.removesuffix("s"), name, problem, detail)


def _check_locks(scan: _Scan) -> None:
    top = scan.store.root / "locks"
    for path in _walk(top):
        if path.name.endswith(".lock") and not _is_file(path):
            name = path.relative_to(scan.store.root).as_posix()
            scan.add("lock", name, "corrupt", "not a regular file: its entry cannot be built")


def _walk(directory: Path) -> Iterator[Path]:
    for path in _children(directory):
        yield path
        if path.is_dir() and not path.is_symlink() and not path.name.endswith(".lock"):
            yield from _walk(path)


# -- repair -----------------------------------------------------------------------------------


def _repair(store: Store, problems: tuple[Problem, ...]) -> tuple[str, ...]:
    """Remove every entry of ``problems`` (already in repair order); the names removed."""
    removed = []
    for problem in problems:
        if not _remove(store, problem):
            continue
        removed.append(problem.name)
        if problem.kind == "rootfs":
            _forget_packed(store, problem.name)
    return tuple(removed)


def _remove(store: Store, problem: Problem) -> bool:
    path = store.root / problem.name
    if problem.kind in {"temp", "lock"}:
        remove_any(path)
        return True
    return store.remove(problem.name) or not os.path.lexists(path)


def _forget_packed(store: Store, name: str) -> None:
    """A rootfs that is going takes the packed image's description in its record with it
    (a rebuilt image need not have those bytes)."""
    hexkey = Path(name).name.removesuffix(".ext4")
    try:
        record = _parse_record(store.root / "keys" / f"{hexkey}.json", "sha256:" + hexkey)
    except IntegrityError:
        return
    if record.packed is not None:
        write_record(store, replace(record, packed=None))


# -- helpers ----------------------------------------------------------------------------------


def _children(directory: Path) -> list[Path]:
    """Entries of ``directory`` without dot names (temps are checked apart), sorted."""
    try:
        return sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def _last_used(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return time.time()
