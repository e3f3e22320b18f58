"""Rootfs images: a sparse round trip, and every way a blob can be wrong."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
from pathlib import Path

import pytest

from microagent.errors import IntegrityError
from microagent.ext4.packed import pack, unpack
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
