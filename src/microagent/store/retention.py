"""What the cache must keep: everything an existing workspace still boots from."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from microagent.store.content import Store, key_hex


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
            record = store.get_key(current) or {}
            if record.get("rootfs"):
                keep.add(str(record["rootfs"]))
            layers = record.get("layers")
            for layer in layers if isinstance(layers, list) else []:
                keep.add(_blob_name(str(layer.get("digest", ""))))
            for field in ("manifest", "config"):
                if record.get(field):
                    keep.add(_blob_name(str(record[field])))
            parent = record.get("parent")
            current = str(parent) if parent else None
    return keep


def keeper(names: set[str]) -> Callable[[str], bool]:
    return lambda name: name in names
