"""The built root filesystem of a setup step as one blob, for remote cache hits that need no
flatten and no ``mke2fs``.

Two formats (``PackedImage.format``; the artifact's media type and tag say which):

* **2** (written now): the image's data runs only (see ``digests.data_runs``: aligned 64 KiB
  blocks that are not all zero, cut every 4 MiB), each as a zstd frame behind a chunk header
  (offset, length, frame size); holes are neither stored, transferred, decoded nor hashed.
  The image digest is a :class:`~microagent.digests.SparseDigest` over the size and each run's
  offset, length and sha256. Frames are decoded, hashed and written (``pwrite`` into a sparse
  file) by a few threads at once while the download is read and hashed.
* **1** (read for older caches): the whole image as one zstd frame, its digest the sha256 of
  every byte.

``pack`` writes format 2; ``unpack`` accepts a blob only if the compressed bytes match the
blob digest and size, every chunk header is in bounds (inside the image, in order, no
overlap, each frame within zstd's bound for its length), every run is what ``pack`` writes
(it starts on a 64 KiB block and is whole blocks, but for the image's short last block: so a
blob has at most one run per block, and a crafted one of tiny runs cannot make the host pay
a decoder, a hash and a write per few bytes), each frame decodes to exactly its
length, the decoded image matches its digest and size, and ``e2fsck -fn`` finds the file
system clean. All of that happens before the caller publishes the file
(``Store.build_once``), so a damaged, truncated or crafted download never becomes a rootfs
that the host's debugfs reads (``microagent cp``) or a VM boots.

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
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, cast

from microagent.digests import SPARSE_RUN, HashingWriter, SparseDigest, data_runs
from microagent.errors import IntegrityError
from microagent.ext4.debugfs import check_image
from microagent.store.records import PackedImage

FORMAT = 2  # what pack writes
MEDIA_TYPES = {
    1: "application/vnd.microagent.rootfs.ext4+zstd",
    2: "application/vnd.microagent.rootfs.ext4.sparse.v2+zstd",
}
MEDIA_TYPE = MEDIA_TYPES[FORMAT]
LEVEL = 3
CHUNK = 1 << 20
DECODED_CHUNK = 128 << 10  # decoded bytes per hand-over: small enough to stay in the CPU cache
SPARSE_BLOCK = 64 << 10
_ZEROS = bytes(SPARSE_BLOCK)

MAGIC = b"MAROOTFS"
HEADER = struct.Struct("<8sIQ")  # magic, format, image size
CHUNK_HEADER = struct.Struct("<QII")  # offset, decoded length, frame length (0, 0: the end)
MAX_RUN = SPARSE_RUN  # the longest decoded run a blob may declare (memory bound)
DECODERS = max(1, min(4, os.cpu_count() or 1))
IN_FLIGHT = 2 * DECODERS  # frames read ahead of the decoders: <= IN_FLIGHT * MAX_RUN bytes


def frame_bound(length: int) -> int:
    """The most bytes a zstd frame of ``length`` decoded bytes may take (ZSTD_compressBound
    plus room for the frame header)."""
    return length + (length >> 7) + 4096


def pack(image: Path, out: BinaryIO) -> PackedImage:
    """Write ``image``'s data runs into ``out`` (format 2)."""
    import zstandard  # deferred: ~10 ms to import; a cache-hit create never (de)compresses

    cctx = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    sink = HashingWriter(out)
    with image.open("rb") as src:
        size = os.fstat(src.fileno()).st_size
        digest = SparseDigest(size)
        sink.write(HEADER.pack(MAGIC, FORMAT, size))
        for offset, data in data_runs(src, size):
            frame = cctx.compress(data)
            sink.write(CHUNK_HEADER.pack(offset, len(data), len(frame)))
            sink.write(frame)
            digest.add(offset, len(data), hashlib.sha256(data).digest())
        sink.write(CHUNK_HEADER.pack(size, 0, 0))
    return PackedImage(str(sink.digest()), sink.size, digest.hexdigest(), size, FORMAT)


def pack_v1(image: Path, out: BinaryIO) -> PackedImage:
    """Compress ``image`` into ``out`` as one zstd frame (format 1: what older versions
    published; kept so their artifacts stay readable, and for the tests)."""
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
    """Decode the blob ``stream`` into a new sparse file ``out`` (format 2:
    :func:`_unpack_runs`, format 1: :func:`_unpack_v1`), then refuse it unless
    ``e2fsck -fn`` finds a clean file system."""
    if expected.format == 2:
        _unpack_runs(stream, out, expected)
    elif expected.format == 1:
        _unpack_v1(stream, out, expected)
    else:
        raise IntegrityError(
            f"rootfs image format {expected.format} is not supported by this version",
            hint="a newer microagent published it; upgrade, or let the layers be flattened",
        )
    check_image(out, "rootfs image")


def _unpack_v1(stream: BinaryIO, out: Path, expected: PackedImage) -> None:
    counted = _Counted(expected.blob_size)
    prefetch = _Prefetch(stream, counted)
    try:
        _unpack(cast(BinaryIO, prefetch), counted, out, expected)
    finally:
        prefetch.close()


# -- format 2: data runs as zstd frames, decoded in parallel ------------------------------------


class _Blob:
    """Exact reads from the download, each byte counted (bounded) and hashed as it arrives."""

    def __init__(self, stream: BinaryIO, counted: _Counted) -> None:
        self.stream = stream
        self.counted = counted

    def exact(self, size: int) -> bytes:
        pieces: list[bytes] = []
        missing = size
        while missing > 0:
            piece = self.stream.read(min(missing, CHUNK))
            if not piece:
                raise IntegrityError("the rootfs image blob ends early (truncated)")
            self.counted.add(piece)
            pieces.append(piece)
            missing -= len(piece)
        return b"".join(pieces)  # one piece: that piece, not a copy

    def at_end(self) -> bool:
        extra = self.stream.read(1)
        if extra:
            self.counted.add(extra)
        return not extra


def _unpack_runs(stream: BinaryIO, out: Path, expected: PackedImage) -> None:
    """Format 2: the calling thread reads (and hashes) the blob and checks each chunk header;
    up to :data:`DECODERS` threads decode, hash and ``pwrite`` the frames, at most
    :data:`IN_FLIGHT` ahead. The blob digest and the sparse digest are checked at the end."""
    counted = _Counted(expected.blob_size)
    blob = _Blob(stream, counted)
    magic, version, size = HEADER.unpack(blob.exact(HEADER.size))
    if magic != MAGIC or version != 2:
        raise IntegrityError("the rootfs image blob is not a format 2 packed image")
    if size != expected.size:
        raise IntegrityError(f"rootfs image has {size} bytes, expected {expected.size}")
    digest = SparseDigest(size)
    with out.open("xb") as fh:
        fh.truncate(size)
        with ThreadPoolExecutor(DECODERS, thread_name_prefix="rootfs-decode") as pool:
            _decode_runs(blob, pool, fh.fileno(), size, digest)
    _check(counted, expected, size, digest.hexdigest())


_Run = tuple[int, int, "Future[bytes]"]  # offset, length, the run's sha256 once written


def _decode_runs(
    blob: _Blob, pool: ThreadPoolExecutor, fd: int, size: int, digest: SparseDigest
) -> None:
    window: deque[_Run] = deque()
    try:
        end = 0
        while (run := _next_run(blob, size, end)) is not None:
            offset, length, frame = run
            end = offset + length
            if len(window) >= IN_FLIGHT:
                _settle(window.popleft(), digest)
            window.append((offset, length, pool.submit(_decode_run, fd, frame, offset, length)))
        while window:
            _settle(window.popleft(), digest)
    finally:
        for _offset, _length, future in window:  # after an error: stop what has not started
            future.cancel()


def _settle(run: _Run, digest: SparseDigest) -> None:
    offset, length, future = run
    digest.add(offset, length, future.result())


def _next_run(blob: _Blob, size: int, end: int) -> tuple[int, int, bytes] | None:
    """The next chunk's offset, length and frame, bounds checked; None after the end mark."""
    offset, length, framed = CHUNK_HEADER.unpack(blob.exact(CHUNK_HEADER.size))
    if length == 0:
        if (offset, framed) != (size, 0):
            raise IntegrityError("the rootfs image blob has a bad end mark")
        if not blob.at_end():
            raise IntegrityError("the rootfs image blob has bytes after its end mark")
        return None
    if offset < end or offset + length > size or length > MAX_RUN:
        raise IntegrityError(
            f"rootfs image chunk at {offset} (+{length} bytes) is out of order or bounds"
        )
    if offset % SPARSE_BLOCK or (length % SPARSE_BLOCK and offset + length != size):
        raise IntegrityError(  # tiny runs would cost a decoder, a hash and a write each
            f"rootfs image chunk at {offset} (+{length} bytes) is not on the 64 KiB blocks "
            "the packer writes"
        )
    if not 0 < framed <= frame_bound(length):
        raise IntegrityError(f"rootfs image chunk at {offset}: a {framed}-byte frame")
    return offset, length, blob.exact(framed)


def _decode_run(fd: int, frame: bytes, offset: int, length: int) -> bytes:
    """Decode one frame (exactly ``length`` bytes), write it at ``offset``; its sha256."""
    import zstandard  # deferred: ~10 ms to import; a cache-hit create never (de)compresses

    try:
        if zstandard.frame_content_size(frame) != length:  # checked before any allocation
            raise IntegrityError(f"rootfs image chunk at {offset}: frame size differs")
        data = zstandard.ZstdDecompressor().decompress(
            frame, max_output_size=length, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"rootfs image chunk at {offset} is not valid zstd: {exc}") from exc
    if len(data) != length:
        raise IntegrityError(f"rootfs image chunk at {offset} decodes to {len(data)} bytes")
    view, done = memoryview(data), 0
    while done < length:
        done += os.pwrite(fd, view[done:], offset + done)
    return hashlib.sha256(data).digest()


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
