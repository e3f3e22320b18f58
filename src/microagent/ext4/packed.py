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
DECODED_CHUNK = 128 << 10  # decoded bytes per hand-over: small enough to stay in the CPU cache
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
    """Hashes and counts the compressed stream, refusing more than expected."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.hasher = hashlib.sha256()
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise IntegrityError(
                f"rootfs image blob is larger than the expected {self.limit} bytes"
            )
        self.hasher.update(data)


class _Prefetch:
    """Reads (and hashes, see :class:`_Counted`) a stream in a background thread, so the
    download and its digest overlap decompression."""

    def __init__(self, raw: BinaryIO, counted: _Counted, depth: int = 16) -> None:
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self.counted = counted
        self.pending = b""
        self.offset = 0
        self.done = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, args=(raw,), daemon=True)
        self.thread.start()

    def _pump(self, raw: BinaryIO) -> None:
        try:
            while not self.stop.is_set() and (chunk := raw.read(CHUNK)):
                self.counted.add(chunk)  # bounded before decompression sees it
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


class _Sink:
    """Hashes decoded chunks and writes them (sparse) in a thread of its own: sha256 and
    file writes release the GIL, so they overlap decompression. An error there (a full
    disk) is raised to the producer at its next :meth:`put` or at :meth:`finish`."""

    def __init__(self, fh: BinaryIO, depth: int = 16) -> None:
        self.fh = fh
        self.hasher = hashlib.sha256()
        self.chunks: queue.Queue[bytes | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            while (chunk := self.chunks.get()) is not None:
                self.hasher.update(chunk)
                _write_sparse(self.fh, chunk)
        except BaseException as exc:  # raised to the producer; keep draining until None
            self.error = exc
            while self.chunks.get() is not None:
                pass

    def put(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.chunks.put(chunk)

    def close(self) -> None:
        """Stop the thread (idempotent); its error, if any, is left for :meth:`finish`."""
        if not self.closed:
            self.closed = True
            self.chunks.put(None)
            self.thread.join()

    def finish(self) -> str:
        """Wait for every chunk to be written; the decoded bytes' digest."""
        self.close()
        if self.error is not None:
            raise self.error
        return "sha256:" + self.hasher.hexdigest()


def unpack(stream: BinaryIO, out: Path, expected: PackedImage) -> None:
    """Decompress ``stream`` into a new sparse file ``out`` (see :func:`_unpack`), then refuse
    it unless ``e2fsck -fn`` finds a clean file system."""
    counted = _Counted(expected.blob_size)
    prefetch = _Prefetch(stream, counted)
    try:
        _unpack(cast(BinaryIO, prefetch), counted, out, expected)
    finally:
        prefetch.close()
    check_image(out, "rootfs image")


def _unpack(stream: BinaryIO, counted: _Counted, out: Path, expected: PackedImage) -> None:
    """Decompress ``stream`` into a new sparse file ``out``, verifying the blob's digest and
    size and the decoded image's digest and size. Three threads share the work: the
    download with its digest (:class:`_Prefetch`), decompression (here) and the decoded
    digest with the writes (:class:`_Sink`)."""
    size = 0
    import zstandard  # deferred: ~10 ms to import; a cache-hit create never (de)compresses

    reader = zstandard.ZstdDecompressor().stream_reader(stream, read_size=CHUNK)
    with out.open("xb") as fh:
        sink = _Sink(fh)
        try:
            while chunk := reader.read(DECODED_CHUNK):
                size += len(chunk)
                if size > expected.size:
                    raise IntegrityError(f"rootfs image is larger than {expected.size} bytes")
                sink.put(chunk)
            while stream.read(CHUNK):  # what follows the frame counts too (a fixed total)
                pass
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"rootfs image blob is not valid zstd: {exc}") from exc
        finally:
            sink.close()
        decoded = sink.finish()
        fh.truncate(size)
    _check(counted, expected, size, decoded)


def _write_sparse(fh: BinaryIO, chunk: bytes) -> None:
    """Write ``chunk``, seeking over all-zero 64 KiB blocks (they stay holes); each run of
    data blocks goes out in one write."""
    view = memoryview(chunk)
    data_from = -1  # where the pending run of data blocks begins
    for start in range(0, len(chunk), SPARSE_BLOCK):
        end = min(start + SPARSE_BLOCK, len(chunk))
        if chunk[start:end] != _ZEROS[: end - start]:  # bytes: compared with memcmp
            data_from = start if data_from < 0 else data_from
            continue
        if data_from >= 0:
            fh.write(view[data_from:start])
            data_from = -1
        fh.seek(end - start, os.SEEK_CUR)
    if data_from >= 0:
        fh.write(view[data_from:])


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
