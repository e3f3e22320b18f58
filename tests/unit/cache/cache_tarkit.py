"""Build layer tarballs in code, and snapshot directory trees, for the layer tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

MTIME = 1_700_000_000


@dataclass(frozen=True)
class E:
    """One tar entry to write."""

    name: str
    kind: str = "file"  # file dir symlink hardlink fifo char block
    data: bytes = b""
    target: str = ""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    major: int = 0
    minor: int = 0
    pax: tuple[tuple[str, str], ...] = ()


def file(name: str, data: bytes = b"data", **kw: object) -> E:
    return E(name, "file", data, **kw)  # type: ignore[arg-type]


def dir_(name: str, **kw: object) -> E:
    return E(name, "dir", **kw)  # type: ignore[arg-type]


def sym(name: str, target: str, **kw: object) -> E:
    return E(name, "symlink", target=target, **kw)  # type: ignore[arg-type]


def hard(name: str, target: str, **kw: object) -> E:
    return E(name, "hardlink", target=target, **kw)  # type: ignore[arg-type]


def fifo(name: str, **kw: object) -> E:
    return E(name, "fifo", **kw)  # type: ignore[arg-type]


def chardev(name: str, major: int = 1, minor: int = 3, **kw: object) -> E:
    return E(name, "char", major=major, minor=minor, **kw)  # type: ignore[arg-type]


def blockdev(name: str, major: int = 8, minor: int = 0, **kw: object) -> E:
    return E(name, "block", major=major, minor=minor, **kw)  # type: ignore[arg-type]


def whiteout(name: str) -> E:
    head, _, base = name.rpartition("/")
    return file(f"{head}/.wh.{base}" if head else f".wh.{base}", b"", mode=0o600)


def opaque(directory: str) -> E:
    return file(f"{directory.rstrip('/')}/.wh..wh..opq", b"", mode=0o600)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
}
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}


def _info(e: E) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.name)
    info.type = _TYPES[e.kind]
    info.mode = e.mode if e.mode is not None else _DEFAULT_MODES.get(e.kind, 0o644)
    info.uid, info.gid, info.mtime = e.uid, e.gid, e.mtime
    info.linkname = e.target
    info.devmajor, info.devminor = e.major, e.minor
    info.size = len(e.data) if e.kind == "file" else 0
    if e.pax:
        info.pax_headers = dict(e.pax)
    return info


def tar_bytes(entries: Iterable[E], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            info = _info(e)
            tf.addfile(info, io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zstd_bytes(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def snapshot(root: Path, exclude: Sequence[Path] = ()) -> dict[str, tuple[object, ...]]:
    """Everything below ``root`` (minus ``exclude``): type, mode, owner, size, content hash."""
    out: dict[str, tuple[object, ...]] = {}
    skip = {os.fspath(p) for p in exclude}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
        for name in [*dirnames, *files]:
            path = os.path.join(dirpath, name)
            if path in skip:
                continue
            out[os.path.relpath(path, root)] = describe(Path(path))
    return out


def describe(path: Path) -> tuple[object, ...]:
    st = path.lstat()
    kind = stat.S_IFMT(st.st_mode)
    extra: object = None
    if stat.S_ISREG(st.st_mode):
        extra = hashlib.sha256(path.read_bytes()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        extra = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        extra = st.st_rdev
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra)


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """The content of a stage, for comparing two stages."""
    return snapshot(root)
