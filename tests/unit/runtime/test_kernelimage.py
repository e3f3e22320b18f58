"""bzImage -> vmlinux: payload location, every compression, the lz4 decoder, the PVH check."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import pytest
import zstandard

from microagent.errors import BuildError
from microagent.kit import kernelimage


def elf_with_note(name: bytes, kind: int) -> bytes:
    """A 64-bit ELF with one PT_NOTE program header holding one note."""
    desc = b"\0" * 8
    note = struct.pack("<III", len(name) + 1, len(desc), kind) + name + b"\0"
    note += b"\0" * (-len(note) % 4) + desc
    phoff, notes_at = 64, 64 + 56
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(note), len(note), 4)
    return header + phdr + note + b"KERNEL" * 100


PVH_ELF = elf_with_note(b"Xen", 18)


def bzimage(payload: bytes, setup_sects: int = 2) -> bytes:
    """A fake bzImage: setup sectors with a boot header, then the payload."""
    setup = bytearray(512 * (setup_sects + 1))
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, 16, len(payload))
    return bytes(setup) + b"\xeb" * 16 + payload + struct.pack("<I", len(PVH_ELF))


def lz4_legacy_literal_only(data: bytes) -> bytes:
    """An lz4 legacy frame whose one block is a single literal run (valid lz4)."""
    length = len(data)
    token = bytes([0xF0]) + b"\xff" * ((length - 15) // 255) + bytes([(length - 15) % 255])
    block = token + data
    return struct.pack("<II", 0x184C2102, len(block)) + block


@pytest.mark.parametrize(
    "compress",
    [
        gzip.compress,
        lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
        lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
        bz2.compress,
        lambda d: zstandard.ZstdCompressor().compress(d),
        lz4_legacy_literal_only,
    ],
    ids=["gzip", "xz", "lzma", "bzip2", "zstd", "lz4"],
)
def test_every_payload_compression(compress: object) -> None:
    image = bzimage(compress(PVH_ELF))  # type: ignore[operator]
    assert kernelimage.vmlinux_from_bzimage(image) == PVH_ELF


def test_lz4_overlapping_match() -> None:
    out = bytearray()
    # literal "abc", then a match at distance 3 of length 9 (overlapping), then literal "x"
    kernelimage.lz4_block(bytes([0x35]) + b"abc" + b"\x03\x00" + bytes([0x10]) + b"x", out)
    assert bytes(out) == b"abc" + b"abcabcabc" + b"x"


def test_lz4_long_lengths() -> None:
    out = bytearray()
    # 20 literals (15 + 5), a match of 4 + 15 + 255 + 1 = 275 bytes at distance 1
    block = bytes([0xFF, 5]) + b"y" * 20 + b"\x01\x00" + bytes([255, 1]) + bytes([0x00])
    kernelimage.lz4_block(block, out)
    assert bytes(out) == b"y" * (20 + 275)


def test_lz4_bad_offset() -> None:
    with pytest.raises(BuildError, match="bad match offset"):
        kernelimage.lz4_block(bytes([0x10]) + b"a" + b"\x05\x00", bytearray())


def test_no_pvh_note_keeps_the_bzimage() -> None:
    plain = elf_with_note(b"GNU", 3)
    assert not kernelimage.has_pvh_entry(plain)
    assert kernelimage.vmlinux_from_bzimage(bzimage(gzip.compress(plain))) is None


def test_not_a_bzimage_or_unknown_compression() -> None:
    with pytest.raises(BuildError, match="not a bzImage"):
        kernelimage.bzimage_payload(b"\0" * 4096)
    with pytest.raises(BuildError, match="unknown kernel payload compression"):
        kernelimage.vmlinux_from_bzimage(bzimage(b"JUNKJUNK"))
