"""What the cache must keep: everything an existing workspace still boots from."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from microagent.digests import key_hex
from microagent.store.content import Store
from microagent.store.records import read_record


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
