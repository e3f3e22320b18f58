"""The declared ``files`` as one deterministic OCI layer (zstd), for the published image.

Workspaces never boot from this layer (files travel on the per-boot config disk); it exists
so a pushed or exported image is complete. Entries come from the plan's :class:`FileTree`:
sorted, owner 0:0, the declared modes, every mtime ``$SOURCE_DATE_EPOCH`` (else 0). A file
that changed since it was planned is refused rather than published under the old key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO, cast

from microagent.compiler.files import FileItem, FileTree
from microagent.digests import HashingWriter
from microagent.errors import BuildError
from microagent.layers.stagemeta import Kind, PathMeta
from microagent.layers.tarwrite import (
    ZSTD_LEVEL,
    UpperEntry,
    source_date_epoch,
    write_upper_tar,
)
from microagent.oci.documents import OCI_LAYER_ZSTD
from microagent.store.content import Store
from microagent.store.records import LayerRef

_KINDS = {"file": Kind.FILE, "dir": Kind.DIR, "symlink": Kind.SYMLINK}


class _CheckedFile:
    """Reads a declared file for the tar, opening it lazily and hashing what was read."""

    def __init__(self, item: FileItem) -> None:
        self.item = item
        self.hasher = hashlib.sha256()
        self.handle: BinaryIO | None = None

    def read(self, size: int = -1) -> bytes:
        if self.handle is None:
            assert self.item.src is not None
            self.handle = self.item.src.open("rb")
        data = self.handle.read(size)
        self.hasher.update(data)
        return data

    def check(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.hasher.hexdigest() != self.item.sha256:
            raise BuildError(
                f"declared file {self.item.src} changed while the files layer was written",
                hint="run the command again",
            )


def _entry(item: FileItem, mtime: int) -> tuple[UpperEntry, _CheckedFile | None]:
    parts = tuple(p for p in item.dst.split("/") if p)
    meta = PathMeta(_KINDS[item.kind], item.mode & 0o7777, 0, 0, mtime)
    if item.kind != "file":
        return UpperEntry(parts, meta, target=item.target), None
    reader = _CheckedFile(item)
    return UpperEntry(parts, meta, content=cast(BinaryIO, reader), size=item.size), reader


def write_files_layer(tree: FileTree, out: BinaryIO) -> LayerRef:
    """Write the files of ``tree`` as a zstd layer to ``out``; return its descriptor."""
    mtime = source_date_epoch()
    pairs = [_entry(item, mtime) for item in tree.items]
    compressed = HashingWriter(out)
    import zstandard  # deferred: ~10 ms to import; a cache-hit create never (de)compresses

    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    try:
        with cctx.stream_writer(cast(BinaryIO, compressed), closefd=False) as zw:
            plain = HashingWriter(zw)
            write_upper_tar((entry for entry, _ in pairs), plain, mtime=mtime)
    except OSError as exc:
        raise BuildError(f"cannot read a declared file: {exc}") from exc
    for _, reader in pairs:
        if reader is not None:
            reader.check()
    return LayerRef(OCI_LAYER_ZSTD, str(compressed.digest()), compressed.size, str(plain.digest()))


def store_files_layer(store: Store, tree: FileTree) -> LayerRef:
    """Write the files layer into the store (verified like every blob) and describe it."""
    with store.scratch_dir() as work:
        path = Path(work) / "files.tar.zst"
        with path.open("wb") as fh:
            layer = write_files_layer(tree, fh)
        store.put_blob_file(path, layer.digest, expected_size=layer.size)
    return layer
