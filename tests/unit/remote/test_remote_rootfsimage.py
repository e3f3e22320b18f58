"""Rootfs images: a sparse round trip, and every way a blob can be wrong (format 2, the data
runs behind chunk headers; format 1, one zstd frame, as older versions published)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import threading
from pathlib import Path

import pytest
import zstandard

from microagent.digests import SPARSE_BLOCK, SPARSE_RUN, Digest, SparseDigest, data_runs
from microagent.errors import IntegrityError
from microagent.ext4.packed import CHUNK_HEADER, HEADER, MAGIC, MAX_RUN, pack, pack_v1, unpack
from microagent.store.records import PackedImage


def _image(tmp_path: Path) -> Path:
    """A real (sparse) ext4 image: unpack refuses anything ``e2fsck -fn`` does not accept."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "random").write_bytes(os.urandom(3000))
    image = tmp_path / "rootfs.ext4"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), "16M"],
        check=True,
        capture_output=True,
    )
    return image


def test_round_trip_is_exact_and_sparse(tmp_path: Path) -> None:
    image = _image(tmp_path)
    blob = io.BytesIO()
    packed = pack(image, blob)
    assert packed.size == 16 << 20 and packed.blob_size == len(blob.getvalue()) < 100_000
    out = tmp_path / "out.ext4"
    unpack(io.BytesIO(blob.getvalue()), out, packed)
    assert out.read_bytes() == image.read_bytes()
    assert out.stat().st_blocks * 512 < 2 << 20, "zero runs become holes"


@pytest.mark.parametrize("what", ["flipped", "truncated", "trailing", "blob", "size"])
def test_a_wrong_blob_or_image_is_refused(tmp_path: Path, what: str) -> None:
    blob = io.BytesIO()
    packed = pack(_image(tmp_path), blob)
    data = blob.getvalue()
    expected: PackedImage = packed
    if what == "flipped":
        data = data[:50] + bytes([data[50] ^ 1]) + data[51:]
    elif what == "truncated":
        data = data[:-20]
    elif what == "trailing":
        data += b"junk"
        expected = dataclasses.replace(packed, blob_size=len(data))
    elif what == "blob":
        expected = dataclasses.replace(packed, blob="sha256:" + "0" * 64)
    else:
        expected = dataclasses.replace(packed, size=packed.size - 1)
    with pytest.raises(IntegrityError):
        unpack(io.BytesIO(data), tmp_path / "out.ext4", expected)


# -- format 2: data runs behind chunk headers --------------------------------------------------

Chunk = tuple[int, int, bytes]  # offset, decoded length, zstd frame


def _chunks(blob: bytes) -> tuple[int, list[Chunk]]:
    """The image size and chunks of a format 2 blob (the test's own reader)."""
    magic, version, size = HEADER.unpack_from(blob)
    assert (magic, version) == (MAGIC, 2)
    at, chunks = HEADER.size, []
    while True:
        offset, length, framed = CHUNK_HEADER.unpack_from(blob, at)
        at += CHUNK_HEADER.size
        if length == 0:
            assert (offset, framed, at) == (size, 0, len(blob))
            return size, chunks
        chunks.append((offset, length, blob[at : at + framed]))
        at += framed


def _blob(size: int, chunks: list[Chunk], end: bytes | None = None) -> bytes:
    parts = [HEADER.pack(MAGIC, 2, size)]
    for offset, length, frame in chunks:
        parts += [CHUNK_HEADER.pack(offset, length, len(frame)), frame]
    parts.append(CHUNK_HEADER.pack(size, 0, 0) if end is None else end)
    return b"".join(parts)


def _signed(packed: PackedImage, blob: bytes) -> PackedImage:
    """``packed`` with the blob digest and size of ``blob``: a publisher who writes the record
    for a crafted blob (so only the checks inside the blob can refuse it)."""
    return dataclasses.replace(packed, blob=str(Digest.of_bytes(blob)), blob_size=len(blob))


def _packed(tmp_path: Path) -> tuple[bytes, PackedImage]:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(3):  # several data runs with holes between them
        (tree / f"f{i}").write_bytes(os.urandom(300_000))
    image = tmp_path / "rootfs.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), "32M"],
                   check=True, capture_output=True)  # fmt: skip
    out = io.BytesIO()
    packed = pack(image, out)
    return out.getvalue(), packed


def test_format_2_stores_only_data_runs_and_commits_to_where_they_lie(tmp_path: Path) -> None:
    blob, packed = _packed(tmp_path)
    size, chunks = _chunks(blob)
    assert (packed.format, size, packed.size) == (2, 32 << 20, 32 << 20)
    assert len(chunks) >= 2, "runs are cut at holes"
    stored = sum(length for _offset, length, _frame in chunks)
    assert stored < 4 << 20, "free space is not stored"
    assert all(length <= SPARSE_RUN for _o, length, _f in chunks)
    image = tmp_path / "rootfs.ext4"
    with image.open("rb") as fh:
        digest = SparseDigest(size)
        for offset, data in data_runs(fh, size):
            digest.add(offset, len(data), hashlib.sha256(data).digest())
    assert digest.hexdigest() == packed.digest
    out = tmp_path / "out.ext4"
    unpack(io.BytesIO(blob), out, packed)
    assert out.read_bytes() == image.read_bytes()
    assert out.stat().st_blocks * 512 <= stored + (1 << 20), "written with holes"


def test_a_format_1_blob_from_an_older_publisher_still_unpacks(tmp_path: Path) -> None:
    image = _image(tmp_path)
    blob = io.BytesIO()
    packed = pack_v1(image, blob)
    assert packed.format == 1 and "format" not in packed.to_json()
    assert PackedImage.from_json(packed.to_json()) == packed
    out = tmp_path / "out.ext4"
    unpack(io.BytesIO(blob.getvalue()), out, packed)
    assert out.read_bytes() == image.read_bytes()


def test_a_format_this_version_does_not_know_is_refused_clearly(tmp_path: Path) -> None:
    blob, packed = _packed(tmp_path)
    future = dataclasses.replace(packed, format=3)
    assert PackedImage.from_json(future.to_json()) == future
    with pytest.raises(IntegrityError, match="format 3 is not supported by this version"):
        unpack(io.BytesIO(blob), tmp_path / "out.ext4", future)
    assert not (tmp_path / "out.ext4").exists(), "nothing is decoded"


def _crafted(what: str, size: int, chunks: list[Chunk]) -> bytes:
    first, second, last = chunks[0], chunks[1], chunks[-1]
    bomb = zstandard.ZstdCompressor().compress(bytes(first[1] + 1))  # claims more than its run
    crafted = {
        # a hole map that puts the data elsewhere (still in order and in bounds)
        "moved": lambda: _blob(size, [(first[0] + SPARSE_BLOCK, *first[1:]), *chunks[1:]]),
        "overlap": lambda: _blob(size, [first, (first[0], *second[1:]), *chunks[2:]]),
        "beyond": lambda: _blob(size, [*chunks[:-1], (size - last[1] + 1, *last[1:])]),
        "long": lambda: _blob(size, [(first[0], MAX_RUN + 1, first[2])]),
        "frame-bound": lambda: _blob(size, [(*first[:2], first[2] + bytes(first[1] + 8192))]),
        "frame-size": lambda: _blob(size, [(*first[:2], bomb), *chunks[1:]]),
        "two-frames": lambda: _blob(size, [(*first[:2], first[2] + first[2]), *chunks[1:]]),
        "end-mark": lambda: _blob(size, chunks, end=CHUNK_HEADER.pack(size - 1, 0, 0)),
        "after-end": lambda: _blob(size, chunks) + b"\0" * 100,
        "magic": lambda: b"MAROOTFX" + _blob(size, chunks)[8:],
    }
    return crafted[what]()


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("moved", "the decoded rootfs image hashes to"),
        ("overlap", "out of order or bounds"),
        ("beyond", "out of order or bounds"),
        ("long", "out of order or bounds"),
        ("frame-bound", "-byte frame"),
        ("frame-size", "frame size differs"),
        ("two-frames", "not valid zstd"),
        ("end-mark", "bad end mark"),
        ("after-end", "bytes after its end mark"),
        ("magic", "not a format 2 packed image"),
    ],
)
def test_a_crafted_format_2_blob_is_refused_even_under_its_own_digest(
    tmp_path: Path, what: str, message: str
) -> None:
    blob, packed = _packed(tmp_path)
    crafted = _crafted(what, *_chunks(blob))
    before = set(threading.enumerate())
    with pytest.raises(IntegrityError, match=message):
        unpack(io.BytesIO(crafted), tmp_path / "out.ext4", _signed(packed, crafted))
    assert set(threading.enumerate()) <= before, "no decoder thread outlives unpack"


@pytest.mark.parametrize("what", ["flipped-frame", "flipped-map", "truncated", "digest", "size"])
def test_a_damaged_format_2_blob_or_record_is_refused(tmp_path: Path, what: str) -> None:
    blob, packed = _packed(tmp_path)
    size, chunks = _chunks(blob)
    expected = packed
    if what == "flipped-frame":
        at = blob.index(chunks[1][2]) + len(chunks[1][2]) // 2
        blob = blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :]
    elif what == "flipped-map":  # the second chunk's offset, one block on: digest mismatch
        at = blob.index(chunks[1][2]) - CHUNK_HEADER.size + 2
        blob = blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :]
    elif what == "truncated":
        blob = blob[: len(blob) // 2]
    elif what == "digest":
        expected = dataclasses.replace(packed, digest="sha256:" + "0" * 64)
    else:
        expected = dataclasses.replace(packed, size=size + SPARSE_BLOCK)
    with pytest.raises(IntegrityError):
        unpack(io.BytesIO(blob), tmp_path / "out.ext4", expected)


def test_a_record_that_claims_a_smaller_blob_is_refused_before_decoding(tmp_path: Path) -> None:
    blob, packed = _packed(tmp_path)
    short = dataclasses.replace(packed, blob_size=100)
    with pytest.raises(IntegrityError, match="larger than the expected 100 bytes"):
        unpack(io.BytesIO(blob), tmp_path / "out.ext4", short)


def test_data_runs_depend_on_the_content_only(tmp_path: Path) -> None:
    """The same bytes, once with holes and once with the zeros written out, give the same runs
    (so the sparse digest a publisher records is what ``cache verify`` recomputes); runs are
    cut at all-zero aligned blocks and every ``SPARSE_RUN`` bytes."""
    size = 3 * SPARSE_RUN + 5 * SPARSE_BLOCK + 123
    data = bytearray(size)
    data[100:200] = b"x" * 100  # one block
    data[2 * SPARSE_BLOCK : 2 * SPARSE_BLOCK + SPARSE_RUN + 10] = os.urandom(SPARSE_RUN + 10)
    data[-50:] = b"y" * 50  # the short last block
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    dense.write_bytes(bytes(data))
    with sparse.open("wb") as fh:
        fh.truncate(size)
        for start in range(0, size, SPARSE_BLOCK):
            block = bytes(data[start : start + SPARSE_BLOCK])
            if block.strip(b"\0"):
                fh.seek(start)
                fh.write(block)
    runs = {}
    for path in (dense, sparse):
        with path.open("rb") as fh:
            runs[path.name] = [(offset, len(chunk)) for offset, chunk in data_runs(fh, size)]
    assert (
        runs["dense"]
        == runs["sparse"]
        == [
            (0, SPARSE_BLOCK),
            (2 * SPARSE_BLOCK, SPARSE_RUN),
            (2 * SPARSE_BLOCK + SPARSE_RUN, SPARSE_BLOCK),
            (size - size % SPARSE_BLOCK, size % SPARSE_BLOCK),
        ]
    )
