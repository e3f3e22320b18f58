"""What the cache must keep: everything an existing workspace still boots from."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator

from microagent.digests import key_hex
from microagent.store.content import Store
from microagent.store.records import read_record


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
    """Store entry names behind ``rootfs_keys`` (the step chain, its layers, its rootfs) and
    the given blob digests (e.g. captured workspace files)."""
    keep = {_blob_name(b) for b in blobs if b}
    for key in rootfs_keys:
        current: str | None = key
        while current:
            keep.add(f"keys/{key_hex(current)}.json")
            record = read_record(store, current)
            if record is None:
                break
            if record.rootfs:
                keep.add(record.rootfs)
            keep.update(_blob_name(layer.digest) for layer in record.layers)
            if record.origin is not None:
                keep.update(_blob_name(d) for d in (record.origin.manifest, record.origin.config))
            current = record.parent
    return keep


def keeper(names: set[str]) -> Callable[[str], bool]:
    return lambda name: name in names
