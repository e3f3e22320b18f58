"""Turn an overlayfs upper directory into a deterministic OCI layer tar (optionally zstd).

Overlay whiteouts (a 0/0 character device) become ``.wh.<name>`` entries and opaque
directories (xattr ``trusted.overlay.opaque=y`` or ``user.overlay.opaque=y``) get a
``.wh..wh..opq`` entry. Entries are sorted, every mtime is the same fixed value, owners
are numeric, and no pax header carries a time, so the same upper dir always gives the
same bytes and the same diff_id.

The tar writer itself (:func:`write_upper_tar`) takes :class:`UpperEntry` records, so an
upper dir read from somewhere else (an ext4 image, see ``ext4/upper.py``) gets the same
normalised, sorted output.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from microagent.digests import Digest, HashingWriter
from microagent.errors import BuildError
from microagent.layers.stagemeta import Kind, PathMeta

if TYPE_CHECKING:
    pass

CHUNK = 1 << 20
ZSTD_LEVEL = 3
_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


@dataclass(frozen=True)
class CompressedLayer:
    """A compressed layer blob: its digest and size (for the manifest) and its diff_id."""

    digest: Digest
    size: int
    diff_id: Digest


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
        writer = HashingWriter(fh)
        _write_tar(upper, writer, source_date_epoch() if mtime is None else mtime)
    return writer.digest()


def export_upper_as_zstd_layer(
    upper: Path, out: Path | BinaryIO, *, mtime: int | None = None, level: int = ZSTD_LEVEL
) -> CompressedLayer:
    """Write ``upper`` as a zstd-compressed layer to ``out`` in one pass."""
    import zstandard  # deferred: ~10 ms to import; a cache-hit create never (de)compresses

    with _opened(out) as fh:
        compressed = HashingWriter(fh)
        cctx = zstandard.ZstdCompressor(level=level)
        with cctx.stream_writer(cast(BinaryIO, compressed), closefd=False) as zw:
            tar_bytes = HashingWriter(zw)
            _write_tar(upper, tar_bytes, source_date_epoch() if mtime is None else mtime)
    return CompressedLayer(compressed.digest(), compressed.size, tar_bytes.digest())


def compress_zstd(
    src: BinaryIO, out: Path | BinaryIO, *, level: int = ZSTD_LEVEL
) -> CompressedLayer:
    """zstd-compress an uncompressed layer tar from ``src`` into ``out``."""
    import zstandard  # deferred: ~10 ms to import; a cache-hit create never (de)compresses

    with _opened(out) as fh:
        compressed = HashingWriter(fh)
        cctx = zstandard.ZstdCompressor(level=level)
        with cctx.stream_writer(cast(BinaryIO, compressed), closefd=False) as zw:
            plain = HashingWriter(zw)
            while chunk := src.read(CHUNK):
                plain.write(chunk)
    return CompressedLayer(compressed.digest(), compressed.size, plain.digest())


def _write_tar(upper: Path, sink: HashingWriter, mtime: int) -> None:
    if not upper.is_dir():
        raise BuildError(f"overlay upper directory {upper} does not exist")
    write_upper_tar(_dir_entries(upper, ()), sink, mtime=mtime)


@dataclass(frozen=True)
class UpperEntry:
    """One path of an overlay upper dir, in the terms a layer tar needs.

    Whiteouts are character devices 0/0 (see :attr:`whiteout`); regular files sharing a
    ``link_key`` are hard links of one inode.
    """

    parts: tuple[str, ...]  # path components below the upper dir
    meta: PathMeta  # type, permission bits, owner, mtime, device numbers
    opaque: bool = False  # a directory hiding everything below it in lower layers
    target: str = ""  # symlink target
    # A regular file's bytes: a file to open, or a stream positioned at them (read in
    # the order write_upper_tar writes entries; only the first name of a hard link reads)
    content: Path | BinaryIO | None = None
    size: int = 0
    link_key: Hashable = None

    @property
    def whiteout(self) -> bool:
        m = self.meta
        return m.kind is Kind.CHAR and m.major == 0 and m.minor == 0

    def tar_parts(self) -> tuple[str, ...]:
        """Components of the entry's tar name (a whiteout is named ``.wh.<name>``)."""
        if self.whiteout:
            return (*self.parts[:-1], WHITEOUT_PREFIX + self.parts[-1])
        return self.parts


def write_upper_tar(
    entries: Iterable[UpperEntry], sink: BinaryIO | HashingWriter, *, mtime: int | None = None
) -> int:
    """Write ``entries`` as a deterministic layer tar to ``sink``; return the member count.

    Entries are sorted (parents first, siblings by tar name), owners are numeric, and no
    pax header carries a time. ``mtime`` replaces every entry's own mtime when given.
    """
    stream = cast(BinaryIO, sink)  # tarfile's stream mode only calls write()
    count = 0
    with tarfile.open(
        fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT, errors="surrogateescape"
    ) as tf:
        links: dict[Hashable, str] = {}
        for entry in sorted(entries, key=UpperEntry.tar_parts):
            count += _add(tf, entry, mtime, links)
    return count


@dataclass(frozen=True)
class ExportedLayer:
    """An uncompressed layer tar that was written: its diff_id, size and member count."""

    diff_id: Digest
    size: int
    entries: int


def export_entries(
    entries: Iterable[UpperEntry], out: BinaryIO, *, mtime: int | None = None
) -> ExportedLayer:
    """Write ``entries`` as an uncompressed layer tar to ``out`` (see :func:`write_upper_tar`)."""
    writer = HashingWriter(out)
    count = write_upper_tar(entries, writer, mtime=mtime)
    return ExportedLayer(writer.digest(), writer.size, count)


def _dir_entries(directory: Path, parts: tuple[str, ...]) -> Iterator[UpperEntry]:
    """Entries of everything below ``directory`` (a real upper dir), parents first."""
    for path in directory.iterdir():
        st = path.lstat()
        entry = _dir_entry(path, (*parts, path.name), st)
        if entry is not None:
            yield entry
        if stat.S_ISDIR(st.st_mode):
            yield from _dir_entries(path, (*parts, path.name))


def _dir_entry(path: Path, parts: tuple[str, ...], st: os.stat_result) -> UpperEntry | None:
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None  # sockets cannot be represented in a tar; like other tools, leave them out
    _refuse_overlay_features(path, st.st_mode)
    major, minor = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind.is_device else (0, 0)
    meta = PathMeta(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, 0, major, minor)
    if kind is Kind.DIR:
        return UpperEntry(parts, meta, opaque=_xattr(path, "opaque") == b"y")
    if kind is Kind.SYMLINK:
        # os.readlink keeps the target verbatim; Path.readlink would normalise it
        return UpperEntry(parts, meta, target=os.readlink(path))  # noqa: PTH115
    if kind is Kind.FILE:
        key = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
        return UpperEntry(parts, meta, content=path, size=st.st_size, link_key=key)
    return UpperEntry(parts, meta)


def _add(
    tf: tarfile.TarFile, entry: UpperEntry, mtime: int | None, links: dict[Hashable, str]
) -> int:
    """Add one entry (plus its opaque marker); return how many members were written."""
    m = entry.meta
    when = m.mtime if mtime is None else mtime
    name = "/".join(entry.tar_parts())
    if entry.whiteout:
        tf.addfile(_info(name, m, when, 0o600))
        return 1
    info = _info(name, m, when, m.mode)
    if m.kind is Kind.DIR:
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
        if entry.opaque:
            tf.addfile(_info(f"{name}/{OPAQUE_MARKER}", m, when, 0o600))
            return 2
    elif m.kind is Kind.FILE:
        _add_file(tf, info, entry, links)
    elif m.kind is Kind.SYMLINK:
        info.type, info.linkname = tarfile.SYMTYPE, entry.target
        tf.addfile(info)
    else:
        info.type = _SPECIAL_TYPES[m.kind]
        info.devmajor, info.devminor = m.major, m.minor
        tf.addfile(info)
    return 1


def _add_file(
    tf: tarfile.TarFile, info: tarfile.TarInfo, entry: UpperEntry, links: dict[Hashable, str]
) -> None:
    if entry.link_key is not None:
        first = links.setdefault(entry.link_key, info.name)
        if first != info.name:
            info.type, info.linkname = tarfile.LNKTYPE, first
            tf.addfile(info)
            return
    if entry.content is None:
        raise BuildError(f"{info.name}: no content to export")
    info.size = entry.size
    if isinstance(entry.content, Path):
        with entry.content.open("rb") as fh:
            tf.addfile(info, fh)
    else:
        tf.addfile(info, entry.content)


def _info(name: str, meta: PathMeta, mtime: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.uid, info.gid = meta.uid, meta.gid
    info.uname = info.gname = ""
    info.mtime = mtime
    return info


_KINDS = {
    stat.S_IFREG: Kind.FILE,
    stat.S_IFDIR: Kind.DIR,
    stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFCHR: Kind.CHAR,
    stat.S_IFBLK: Kind.BLOCK,
}
_SPECIAL_TYPES = {
    Kind.FIFO: tarfile.FIFOTYPE,
    Kind.CHAR: tarfile.CHRTYPE,
    Kind.BLOCK: tarfile.BLKTYPE,
}


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
