"""What the cache must keep: everything an existing workspace still boots from."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from microagent.digests import key_hex
from microagent.errors import IntegrityError
from microagent.store.content import Store
from microagent.store.records import StepRecord, read_record


@contextlib.contextmanager
def builds_in_flight(
    store: Store, *, exclusive: bool = False, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Builds (``create``, ``build``) hold this lock shared from their first look at the
    store until their workspace is recorded; ``cache prune`` holds it exclusively. What a
    build in flight uses is named by no workspace record yet, so without it a prune removed
    a blob or root filesystem a create was about to use. ``on_wait``: called once if the
    lock is busy (then this waits)."""
    store.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    (store.root / "locks").mkdir(exist_ok=True)
    fd = os.open(store.root / "locks" / "builds.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def _blob_name(digest: str) -> str:
    algorithm, _, hexd = digest.partition(":")
    return f"blobs/{algorithm}/{hexd}"


def names_in_use(store: Store, rootfs_keys: Iterable[str], blobs: Iterable[str]) -> set[str]:
    """Store entry names behind ``rootfs_keys`` (the step chain, its layers, each step's root:
    its rootfs and its stack's image and layer disks) and the given blob digests (e.g.
    captured workspace files). A step whose stack was also merged into one image keeps both:
    a workspace made before the merge boots from the stack."""
    keep = {_blob_name(b) for b in blobs if b}
    for key in rootfs_keys:
        current: str | None = key
        while current:
            keep.add(f"keys/{key_hex(current)}.json")
            record = read_record(store, current)
            if record is None:
                break
            keep.update(_root_names(record))
            keep.update(_blob_name(layer.digest) for layer in record.layers)
            if record.origin is not None:
                keep.update(_blob_name(d) for d in (record.origin.manifest, record.origin.config))
            current = record.parent
    return keep


def _root_names(record: StepRecord) -> tuple[str, ...]:
    """Every store entry the record's root is or was made of (its image, its stack)."""
    stacked = record.stack.entries if record.stack is not None else ()
    return (record.rootfs, *stacked) if record.rootfs else stacked


def keeper(names: set[str]) -> Callable[[str], bool]:
    return lambda name: name in names


def left_incomplete(store: Store, gone: set[str], keep: Callable[[str], bool]) -> list[str]:
    """What else must go once the entries ``gone`` are removed: every step record (and its
    root filesystem) that would name a layer or image-config blob no longer in the store.

    Such a record would still count as built, yet its step could never be published or
    flattened again (``cache verify`` reports it ``missing``), so ``cache prune`` takes it
    with the blob. Entries ``keep`` protects stay, and so does a rootfs that a staying
    record's stack stands on (a base's, when only its image config went). Layer disks are
    shared by content and named by no record of their own: they stay, for the LRU pass of a
    later prune. Unreadable records are ``cache verify``'s business. Records are read without
    marking them used."""
    going: list[tuple[str, StepRecord]] = []
    stacked: set[str] = set()  # what the stacks of the records that stay stand on
    keys = store.root / "keys"
    for path in sorted(keys.glob("*.json")) if keys.is_dir() else []:
        name = f"keys/{path.name}"
        record = _peek_record(path)
        if name in gone or record is None:
            continue
        if not keep(name) and _lacks_blob(store, record, gone):
            going.append((name, record))
        elif record.stack is not None:
            stacked.update(record.stack.entries)
    names: list[str] = []
    for name, record in going:
        names.append(name)
        rootfs = record.rootfs
        if rootfs and rootfs not in gone and not keep(rootfs) and rootfs not in stacked:
            names.append(rootfs)
    return names


def _peek_record(path: Path) -> StepRecord | None:
    try:
        raw = json.loads(path.read_bytes())
        record = StepRecord.from_json(raw) if isinstance(raw, dict) else None
    except (OSError, ValueError, IntegrityError):
        return None
    return record if record is not None and key_hex(record.key) == path.stem else None


def _lacks_blob(store: Store, record: StepRecord, gone: set[str]) -> bool:
    wanted = [layer.digest for layer in record.layers]
    if record.origin is not None:
        wanted.append(record.origin.config)
    return any(_blob_name(d) in gone or not store.has_blob(d) for d in wanted)
