"""Disk images a user brings (spec ``disks``) and tar archives made into ext4 images (spec
``bundles``).

Both are untrusted input. An image is copied (sparse: runs of zeros stay holes) and then
checked with ``e2fsck -fn`` — the copy, not the source, so what was checked is what boots.
An archive is unpacked by the same hardened extractor as image layers (no ``..``, no
escaping links, no device nodes, bounded entries and bytes) and packed with ``mke2fs -d``
into a reproducible image: the same archive gives the same image on any machine.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from microagent.errors import IntegrityError
from microagent.ext4.debugfs import check_image
from microagent.ext4.mkfs import RootfsInfo, build_ext4
from microagent.layers.apply import LayerSource, Limits, flatten

if TYPE_CHECKING:
    from hashlib import _Hash

CHUNK = 1 << 20
BLOCK = 4096  # holes are kept at this granularity (ext4's block size)
_ZEROS = bytes(CHUNK)
MAX_BUNDLE_BYTES = 8 << 30  # file content of one archive, uncompressed
BUNDLE_LIMITS = Limits(max_bytes=MAX_BUNDLE_BYTES, allow_devices=False)
BUNDLE_LABEL = "bundle"
ARCHIVE_HINT = (
    "a bundle is unpacked like an image layer: no '..' names, no hard links or paths through "
    "symlinks that leave it, no device nodes; make it from a plain folder, e.g. "
    "`tar -C DIR -czf corpus.tar.gz .`"
)


def copy_sparse(src: Path, dst: Path, hasher: _Hash | None = None) -> int:
    """Copy ``src`` to the new file ``dst`` (mode 0600), leaving holes where ``src`` reads
    as zeros; every byte read goes to ``hasher``. Returns the size."""
    size = 0
    with src.open("rb") as fin, open(dst, "xb", opener=_private) as fout:
        while chunk := fin.read(CHUNK):
            if hasher is not None:
                hasher.update(chunk)
            if chunk != _ZEROS[: len(chunk)]:
                _write_data(fout, size, chunk)
            size += len(chunk)
        fout.truncate(size)
    return size


def _write_data(fout: BinaryIO, offset: int, chunk: bytes) -> None:
    """Write the runs of ``chunk``'s blocks that are not all zeros at ``offset``."""
    view = memoryview(chunk)
    start = None
    for pos in range(0, len(chunk) + BLOCK, BLOCK):
        block = view[pos : pos + BLOCK]
        zero = not block or block == _ZEROS[: len(block)]
        if not zero and start is None:
            start = pos
        elif zero and start is not None:
            fout.seek(offset + start)
            fout.write(view[start:pos])
            start = None


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def copy_checked(src: Path, dst: Path, *, expect: str | None = None, what: str) -> str:
    """Copy a user's ext4 image to ``dst`` and check the copy; the hex sha256 of what was
    copied. With ``expect``, IntegrityError when the source changed since it was hashed."""
    hasher = hashlib.sha256()
    copy_sparse(src, dst, hasher)
    got = hasher.hexdigest()
    if expect is not None and got != expect:
        raise IntegrityError(
            f"{src} changed while it was being copied",
            hint="run create again once nothing is writing to the image",
        )
    try:
        check_image(dst, what)
    except IntegrityError as exc:  # name the user's file, not our copy of it
        found = exc.message.partition("\n")[2]
        raise IntegrityError(
            f"{what}: {src} is not a sound ext4 image (e2fsck -fn found errors); "
            f"refusing it:\n{found}",
            hint=f"`e2fsck -f {src}` shows and repairs them (damaged files may be lost), "
            "or make the image again",
        ) from exc
    return got


class _HashingReader:
    """Reads a file and hashes every byte handed out; on a clean exit it reads the rest of
    the file first, so the hash covers all of it (not only the tar stream)."""

    def __init__(self, fh: BinaryIO, hasher: _Hash) -> None:
        self._fh = fh
        self._hasher = hasher

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._hasher.update(data)
        return data

    def __enter__(self) -> _HashingReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_rest: object) -> None:
        try:
            while exc_type is None and self.read(CHUNK):
                pass
        finally:
            self._fh.close()


@dataclass(frozen=True)
class ArchiveImage:
    """An ext4 image made from a tar archive, and the archive's sha256 (hex)."""

    info: RootfsInfo
    archive_sha256: str


def archive_to_ext4(
    archive: Path, out: Path, *, key: str, name: str, limits: Limits = BUNDLE_LIMITS
) -> ArchiveImage:
    """Unpack ``archive`` (tar, gzip or zstd tar) safely and write it as an ext4 image at
    ``out``. ``key`` seeds the image's UUID (reproducible); ``name`` is for messages.

    IntegrityError names the entry the extractor refused.
    """
    hasher = hashlib.sha256()

    def opened() -> BinaryIO:
        return cast(BinaryIO, _HashingReader(archive.open("rb"), hasher))

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".stage-") as tmp:
        stage = Path(tmp) / "stage"
        try:
            meta = flatten(stage, [LayerSource(archive.name, opened)], limits=limits)
        except IntegrityError as exc:
            raise IntegrityError(
                f"bundle {name}: {exc.message.removeprefix('layer ')}", hint=ARCHIVE_HINT
            ) from exc
        info = build_ext4(stage, meta, out, key=key, label=BUNDLE_LABEL)
    return ArchiveImage(info, hasher.hexdigest())
