"""Digests and canonical JSON: the only way content and build keys are named.

A digest is ``<algorithm>:<hex>`` (``sha256`` everywhere except where a registry hands us
``sha512``). Canonical JSON gives one byte string per value, so a key computed from it is the
same on every machine.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol, TypeGuard

from microagent.errors import IntegrityError, InvalidInputError
from microagent.frozen import FrozenOrdered

if TYPE_CHECKING:
    from hashlib import _Hash

DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")


def canonical_json(value: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a string of the form ``sha256:<64 lowercase hex>``."""
    return isinstance(value, str) and DIGEST_RE.fullmatch(value) is not None


def check_digest(text: str, what: str = "digest") -> str:
    """``text`` if it is a sha256 digest, else an InvalidInputError naming ``what``."""
    if not is_digest(text):
        raise InvalidInputError(
            f"invalid {what} {text!r}", hint="a digest is sha256: followed by 64 hex digits"
        )
    return text


@dataclass(frozen=True, eq=False, repr=False)
class Digest(FrozenOrdered):
    """A content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        length = _HEX_LENGTHS.get(self.algorithm)
        if length is None:
            raise IntegrityError(f"unsupported digest algorithm {self.algorithm!r}")
        if len(self.hex) != length or not _HEX.fullmatch(self.hex):
            raise IntegrityError(f"malformed {self.algorithm} digest {self.hex!r}")

    @classmethod
    def parse(cls, text: str | Digest) -> Digest:
        """Parse ``"<alg>:<hex>"``; raises IntegrityError when malformed."""
        if isinstance(text, Digest):
            return text
        algorithm, sep, hexpart = text.partition(":")
        if not sep:
            raise IntegrityError(f"malformed digest {text!r}: expected '<algorithm>:<hex>'")
        return cls(algorithm, hexpart)

    @classmethod
    def from_hasher(cls, hasher: _Hash) -> Digest:
        """The digest a finished hashlib object stands for."""
        return cls(hasher.name, hasher.hexdigest())

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """Digest of an in-memory value."""
        return cls.from_hasher(hashlib.new(algorithm, data))

    def hasher(self) -> _Hash:
        """A fresh hashlib object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def key_hex(key: str | Digest) -> str:
    """Normalise a step key (``sha256:<hex>`` or bare hex) to its hex part."""
    text = str(key)
    if ":" not in text:
        text = "sha256:" + text
    return Digest.parse(text).hex


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class HashingWriter:
    """Passes bytes on to ``sink`` (if any) while hashing (sha256) and counting them."""

    def __init__(self, sink: Writable | None = None) -> None:
        self.sink = sink
        self.hasher: _Hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        return None

    def digest(self) -> Digest:
        return Digest.from_hasher(self.hasher)


# -- sparse images: a digest over the data runs and where they lie ------------------------------

SPARSE_BLOCK = 64 << 10  # an all-zero aligned block of this size is a hole
SPARSE_RUN = 4 << 20  # data runs are cut into pieces of at most this many bytes
_SPARSE_DOMAIN = b"microagent.sparse-image.v1\n"
_ZERO_BLOCK = bytes(SPARSE_BLOCK)


class SparseDigest:
    """sha256 over an image's size and, in order, each data run's offset, length and sha256:
    what a packed image (format 2) commits to, so holes are neither stored nor hashed.
    Feed it the runs of :func:`data_runs` (or of a blob's chunk map) with their digests."""

    def __init__(self, size: int) -> None:
        self.hasher = hashlib.sha256(_SPARSE_DOMAIN + size.to_bytes(8, "little"))

    def add(self, offset: int, length: int, run_sha256: bytes) -> None:
        self.hasher.update(offset.to_bytes(8, "little") + length.to_bytes(4, "little"))
        self.hasher.update(run_sha256)

    def hexdigest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


def data_runs(fh: BinaryIO, size: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, data)`` of each data run of the file ``fh`` of ``size`` bytes, in order: the
    maximal runs of aligned :data:`SPARSE_BLOCK` blocks that are not all zero, cut every
    :data:`SPARSE_RUN` bytes. A function of the content only (file holes read as zeros and
    are skipped without reading them), so packing and checking a file agree."""
    start, pending = -1, bytearray()
    for region_start, region_end in _data_regions(fh.fileno(), size):
        fh.seek(region_start)
        offset = region_start
        while offset < region_end:
            block = fh.read(min(SPARSE_BLOCK, region_end - offset))
            if not block:
                raise OSError(f"{fh.name}: shorter than its {size} bytes")
            if block == _ZERO_BLOCK[: len(block)] or (
                start >= 0 and start + len(pending) != offset
            ):
                if pending:
                    yield start, bytes(pending)
                start, pending = -1, bytearray()
            if block != _ZERO_BLOCK[: len(block)]:
                start = offset if start < 0 else start
                pending += block
                if len(pending) >= SPARSE_RUN:
                    yield start, bytes(pending)
                    start, pending = -1, bytearray()
            offset += len(block)
    if pending:
        yield start, bytes(pending)


def _data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Block-aligned ``(start, end)`` regions that may hold data (SEEK_DATA / SEEK_HOLE; the
    whole file where the file system cannot say)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return
            yield offset, size  # SEEK_DATA unsupported: read it all
            return
        start -= start % SPARSE_BLOCK
        end = min(size, -(-end // SPARSE_BLOCK) * SPARSE_BLOCK)
        yield max(start, offset), end
        offset = end
