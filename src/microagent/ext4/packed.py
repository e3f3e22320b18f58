"""The built root filesystem of a setup step as one zstd blob, for remote cache hits that need
no flatten and no ``mke2fs``.

``pack`` compresses ``rootfs/<key>.ext4`` (hashing the image as it goes, for the record);
``unpack`` streams a blob back into a sparse file and accepts it only if the compressed bytes
match the blob digest and size, the decoded bytes match the image digest and size, and
``e2fsck -fn`` finds the file system clean. All of that happens before the caller publishes
the file (``Store.build_once``), so a damaged, truncated or crafted download never becomes a
rootfs that the host's debugfs reads (``microagent cp``) or a VM boots.

Trust: the image is what the publisher built for the key, like its setup layers: whoever can
push to the cache chooses it. ``remotecache`` ties it to the verified step record and bounds
its size; only setup steps publish an image, and a base step is always rebuilt from layers
verified against the image digest. ``MICROAGENT_CACHE_ROOTFS=0`` (``Settings.cache_rootfs``)
turns packed images off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from pathlib import Path
from typing import BinaryIO, cast

from microagent.digests import HashingWriter
from microagent.errors import IntegrityError
from microagent.ext4.debugfs import check_image
from microagent.store.records import PackedImage

MEDIA_TYPE = "application/vnd.microagent.rootfs.ext4+zstd"
LEVEL = 3
CHUNK = 1 << 20
SPARSE_BLOCK = 64 << 10
_ZEROS = bytes(SPARSE_BLOCK)


def pack(image: Path, out: BinaryIO) -> PackedImage:
    """Compress ``image`` into ``out``."""
    plain = hashlib.sha256()
    size = 0
    sink = HashingWriter(out)
    import zstandard  # deferred: ~10 ms to import; a cache-hit create never (de)compresses

    cctx = zstandard.ZstdCompressor(level=LEVEL)
    with image.open("rb") as src, cctx.stream_writer(cast(BinaryIO, sink), closefd=False) as zw:
        while chunk := src.read(CHUNK):
            plain.update(chunk)
            size += len(chunk)
            zw.write(chunk)
    return PackedImage(str(sink.digest()), sink.size, "sha256:" + plain.hexdigest(), size)


class _Counted:
    """Reads the compressed stream, hashing it and refusing more than expected."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self.raw = raw
        self.limit = limit
        self.hasher = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.size += len(data)
        if self.size > self.limit:
            raise IntegrityError(
                f"rootfs image blob is larger than the expected {self.limit} bytes"
            )
        self.hasher.update(data)
        return data


class _Prefetch:
    """Reads a stream in a background thread so the download overlaps decompression."""

    def __init__(self, raw: BinaryIO, depth: int = 16) -> None:
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self.pending = b""
        self.offset = 0
        self.done = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, args=(raw,), daemon=True)
        self.thread.start()

    def _pump(self, raw: BinaryIO) -> None:
        try:
            while not self.stop.is_set() and (chunk := raw.read(CHUNK)):
                self.chunks.put(chunk)
            self.chunks.put(b"")
        except BaseException as exc:  # handed to the reader, re-raised there
            self.chunks.put(exc)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the current chunk (short reads are fine for zstd)."""
        if self.offset >= len(self.pending):
            if self.done:
                return b""
            item = self.chunks.get()
            if isinstance(item, BaseException):
                raise item
            self.pending, self.offset, self.done = item, 0, not item
        end = len(self.pending) if size < 0 else self.offset + size
        data = self.pending[self.offset : end]
        self.offset += len(data)
        return data

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():  # drain so a blocked put can finish
            with contextlib.suppress(queue.Empty):
                self.chunks.get(timeout=0.1)
        self.thread.join()


def unpack(stream: BinaryIO, out: Path, expected: PackedImage) -> None:
    """Decompress ``stream`` into a new sparse file ``out`` (see :func:`_unpack`), then refuse
    it unless ``e2fsck -fn`` finds a clean file system."""
    prefetch = _Prefetch(stream)
    try:
        _unpack(cast(BinaryIO, prefetch), out, expected)
    finally:
        prefetch.close()
    check_image(out, "rootfs image")


def _unpack(stream: BinaryIO, out: Path, expected: PackedImage) -> None:
    """Decompress ``stream`` into a new sparse file ``out``, verifying the blob's digest and
    size and the decoded image's digest and size."""
    counted = _Counted(stream, expected.blob_size)
    plain = hashlib.sha256()
    size = 0
    import zstandard  # deferred: ~10 ms to import; a cache-hit create never (de)compresses

    reader = zstandard.ZstdDecompressor().stream_reader(cast(BinaryIO, counted))
    with out.open("xb") as fh:
        try:
            while chunk := reader.read(CHUNK):
                size += len(chunk)
                if size > expected.size:
                    raise IntegrityError(f"rootfs image is larger than {expected.size} bytes")
                plain.update(chunk)
                _write_sparse(fh, chunk)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"rootfs image blob is not valid zstd: {exc}") from exc
        fh.truncate(size)
    _check(counted, expected, size, "sha256:" + plain.hexdigest())


def _write_sparse(fh: BinaryIO, chunk: bytes) -> None:
    """Write ``chunk``, seeking over all-zero 64 KiB blocks (they stay holes)."""
    for start in range(0, len(chunk), SPARSE_BLOCK):
        block = chunk[start : start + SPARSE_BLOCK]  # bytes: compared with memcmp
        if block == _ZEROS[: len(block)]:
            fh.seek(len(block), os.SEEK_CUR)
        else:
            fh.write(block)


def _check(counted: _Counted, expected: PackedImage, size: int, decoded: str) -> None:
    blob = "sha256:" + counted.hasher.hexdigest()
    if counted.size != expected.blob_size or blob != expected.blob:
        raise IntegrityError(
            f"digest mismatch: expected {expected.blob}, content hashes to {blob}",
            hint="the rootfs image is corrupt or was changed; nothing was stored",
        )
    if size != expected.size:
        raise IntegrityError(f"rootfs image has {size} bytes, expected {expected.size}")
    if decoded != expected.digest:
        raise IntegrityError(
            f"digest mismatch: the decoded rootfs image hashes to {decoded}, "
            f"its record says {expected.digest}",
            hint="the image record does not describe this blob; nothing was stored",
        )
