"""Turn an overlayfs upper directory into a deterministic OCI layer tar (optionally zstd).

Overlay whiteouts (a 0/0 character device) become ``.wh.<name>`` entries and opaque
directories (xattr ``trusted.overlay.opaque=y`` or ``user.overlay.opaque=y``) get a
``.wh..wh..opq`` entry. Entries are sorted, every mtime is the same fixed value, owners
are numeric, and no pax header carries a time, so the same upper dir always gives the
same bytes and the same diff_id.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

import zstandard

from microagent.cache.store import Digest
from microagent.errors import BuildError

if TYPE_CHECKING:
    from hashlib import _Hash

CHUNK = 1 << 20
ZSTD_LEVEL = 3
_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")


@dataclass(frozen=True)
class CompressedLayer:
    """A compressed layer blob: its digest and size (for the manifest) and its diff_id."""

    digest: Digest
    size: int
    diff_id: Digest


class _HashingWriter:
    """Passes bytes to ``sink`` (if any) while hashing and counting them."""

    def __init__(self, sink: BinaryIO | _HashingWriter | None) -> None:
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


def source_date_epoch() -> int:
    """``$SOURCE_DATE_EPOCH`` if set to an integer, else 0."""
    try:
        return max(int(os.environ.get("SOURCE_DATE_EPOCH", "0")), 0)
    except ValueError:
        return 0


@contextlib.contextmanager
def _opened(out: Path | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(out, Path):
        with out.open("wb") as fh:
            yield fh
    else:
        yield out


def export_upper_as_layer(upper: Path, out: Path | BinaryIO, *, mtime: int | None = None) -> Digest:
    """Write ``upper`` as an uncompressed layer tar to ``out``; return its diff_id.

    Every entry gets ``mtime`` (default: ``$SOURCE_DATE_EPOCH`` or 0).
    """
    with _opened(out) as fh:
        writer = _HashingWriter(fh)
        _write_tar(upper, writer, source_date_epoch() if mtime is None else mtime)
    return writer.digest()


def export_upper_as_zstd_layer(
    upper: Path, out: Path | BinaryIO, *, mtime: int | None = None, level: int = ZSTD_LEVEL
) -> CompressedLayer:
    """Write ``upper`` as a zstd-compressed layer to ``out`` in one pass."""
    with _opened(out) as fh:
        compressed = _HashingWriter(fh)
        cctx = zstandard.ZstdCompressor(level=level)
        with cctx.stream_writer(cast(BinaryIO, compressed), closefd=False) as zw:
            tar_bytes = _HashingWriter(zw)
            _write_tar(upper, tar_bytes, source_date_epoch() if mtime is None else mtime)
    return CompressedLayer(compressed.digest(), compressed.size, tar_bytes.digest())


def compress_zstd(
    src: BinaryIO, out: Path | BinaryIO, *, level: int = ZSTD_LEVEL
) -> CompressedLayer:
    """zstd-compress an uncompressed layer tar from ``src`` into ``out``."""
    with _opened(out) as fh:
        compressed = _HashingWriter(fh)
        cctx = zstandard.ZstdCompressor(level=level)
        with cctx.stream_writer(cast(BinaryIO, compressed), closefd=False) as zw:
            plain = _HashingWriter(zw)
            while chunk := src.read(CHUNK):
                plain.write(chunk)
    return CompressedLayer(compressed.digest(), compressed.size, plain.digest())


def _write_tar(upper: Path, sink: _HashingWriter, mtime: int) -> None:
    if not upper.is_dir():
        raise BuildError(f"overlay upper directory {upper} does not exist")
    stream = cast(BinaryIO, sink)  # tarfile's stream mode only calls write()
    with tarfile.open(
        fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT, errors="surrogateescape"
    ) as tf:
        links: dict[tuple[int, int], str] = {}
        for arcname, path, st in _walk(upper, ""):
            _add(tf, arcname, path, st, mtime=mtime, links=links)


def _walk(directory: Path, prefix: str) -> Iterator[tuple[str, Path, os.stat_result]]:
    """(archive name, path, lstat) of everything below ``directory``, parents first.

    Siblings are sorted by the name they get in the tar (a whiteout sorts as ``.wh.<name>``).
    """
    children = [(path, path.lstat()) for path in directory.iterdir()]
    children.sort(key=lambda c: _tar_basename(c[0].name, c[1]))
    for path, st in children:
        yield prefix + path.name, path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(path, f"{prefix}{path.name}/")


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _tar_basename(name: str, st: os.stat_result) -> str:
    return f".wh.{name}" if _is_whiteout(st) else name


def _add(
    tf: tarfile.TarFile,
    arcname: str,
    path: Path,
    st: os.stat_result,
    *,
    mtime: int,
    links: dict[tuple[int, int], str],
) -> None:
    mode = st.st_mode
    if _is_whiteout(st):
        parent, _, name = arcname.rpartition("/")
        tf.addfile(_info(f"{parent}/.wh.{name}" if parent else f".wh.{name}", st, mtime, 0o600))
        return
    _refuse_overlay_features(path, mode)
    info = _info(arcname, st, mtime, stat.S_IMODE(mode))
    if stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
        if _xattr(path, "opaque") == b"y":
            tf.addfile(_info(f"{arcname}/.wh..wh..opq", st, mtime, 0o600))
    elif stat.S_ISREG(mode):
        _add_file(tf, info, path, st, links)
    elif stat.S_ISLNK(mode):
        # os.readlink keeps the target verbatim; Path.readlink would normalise it
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)  # noqa: PTH115
        tf.addfile(info)
    elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = _special_type(mode)
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        tf.addfile(info)
    # sockets cannot be represented in a tar; like other tools, leave them out


def _add_file(
    tf: tarfile.TarFile,
    info: tarfile.TarInfo,
    path: Path,
    st: os.stat_result,
    links: dict[tuple[int, int], str],
) -> None:
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links:
        info.type, info.linkname = tarfile.LNKTYPE, links[key]
        tf.addfile(info)
        return
    links[key] = info.name
    info.size = st.st_size
    with path.open("rb") as fh:
        tf.addfile(info, fh)


def _info(name: str, st: os.stat_result, mtime: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = mtime
    return info


def _special_type(mode: int) -> bytes:
    if stat.S_ISFIFO(mode):
        return tarfile.FIFOTYPE
    return tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE


def _xattr(path: Path, name: str) -> bytes | None:
    for ns in _OVERLAY_XATTRS:
        with contextlib.suppress(OSError):
            return os.getxattr(path, ns + name, follow_symlinks=False)
    return None


def _refuse_overlay_features(path: Path, mode: int) -> None:
    # With redirect_dir or metacopy the upper dir alone does not hold the content.
    checks = (("redirect", stat.S_ISDIR(mode)), ("metacopy", stat.S_ISREG(mode)))
    for feature, applies in checks:
        if applies and _xattr(path, feature) is not None:
            raise BuildError(
                f"{path}: overlay {feature} is in use; the upper dir cannot be exported",
                hint="mount the overlay with redirect_dir=off,metacopy=off",
            )
