"""Layers for the build tests: a small OS-like base written with tarfile, and a setup step's
layer written by the setup exporter's own tar writer (whiteouts, an opaque directory, hard
links, kinds replaced both ways)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from microagent.digests import Digest
from microagent.layers.apply import LayerSource
from microagent.layers.stagemeta import Kind, PathMeta
from microagent.layers.tarwrite import UpperEntry, write_upper_tar

T0, T1 = 1_600_000_000, 1_700_000_000


def tar_info(name: str, kind: bytes, mode: int, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, T0
    for key, value in kw.items():
        setattr(info, key, value)
    return info


def base_tar() -> bytes:
    """A small OS-like tree: what the step below replaces, deletes and hides."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        files = {
            "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
            "etc/keep": b"keep",
            "usr/lib/a/one.py": b"1" * 5000,
            "usr/lib/a/sub/two.py": b"2",
            "usr/lib/b/three": b"3",
            "opt/gone/deep/x": b"x",
            "srv/was-file": b"f",
            "bin/tool": b"\x7fELF" + bytes(9000),
            "var/log/old.log": b"log",
        }
        for d in (
            "etc",
            "usr",
            "usr/lib",
            "usr/lib/a",
            "usr/lib/a/sub",
            "usr/lib/b",
            "opt",
            "opt/gone",
            "opt/gone/deep",
            "srv",
            "srv/was-dir",
            "bin",
            "var",
            "var/log",
            "tmp",
        ):
            tf.addfile(tar_info(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
        for name, data in files.items():
            tf.addfile(tar_info(name, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
        tf.addfile(tar_info("srv/was-dir/inner", tarfile.REGTYPE, 0o600, size=1), io.BytesIO(b"i"))
        tf.addfile(tar_info("bin/tool2", tarfile.LNKTYPE, 0o755, linkname="bin/tool"))
        tf.addfile(tar_info("usr/lib/link", tarfile.SYMTYPE, 0o777, linkname="a/one.py"))
        tf.addfile(tar_info("var/log/fifo", tarfile.FIFOTYPE, 0o600))
    return buf.getvalue()


def meta(kind: Kind, mode: int = 0o755, uid: int = 0, gid: int = 0) -> PathMeta:
    return PathMeta(kind, mode, uid, gid, T1)


def step_entries() -> list[UpperEntry]:
    """An overlay upper as the exporter sees it: parents as entries, whiteouts as 0/0 char
    devices, an opaque directory, a hard-linked pair, kinds replaced both ways."""
    d, f = Kind.DIR, Kind.FILE
    data = {
        ("usr", "lib", "a", "new.py"): b"new" * 3000,
        ("etc", "passwd"): b"changed\n",
        ("srv", "was-dir"): b"now a file",
        ("opt", "gone"): b"",
    }
    out = [
        UpperEntry(("etc",), meta(d)),
        UpperEntry(("usr",), meta(d)),
        UpperEntry(("usr", "lib"), meta(d, 0o700, 5, 6)),  # a kept dir takes the new owner
        UpperEntry(("usr", "lib", "a"), meta(d), opaque=True),  # hides one.py and sub/
        UpperEntry(("usr", "lib", "a", "sub"), meta(d)),
        UpperEntry(("usr", "lib", "b"), meta(Kind.CHAR, 0, 0, 0)),  # whiteout of a dir
        UpperEntry(
            ("usr", "lib", "link"),
            PathMeta(Kind.SYMLINK, 0o777, 0, 0, T1),
            target="/" + "long/" * 30 + "target",
        ),
        UpperEntry(("bin",), meta(d)),
        UpperEntry(("bin", "tool2"), meta(Kind.CHAR, 0, 0, 0)),  # a hard link's name goes
        UpperEntry(("opt",), meta(d)),
        UpperEntry(("srv",), meta(d, 0o750)),
        UpperEntry(("srv", "was-file"), meta(d, 0o711, 1000, 1000)),  # file -> dir
        UpperEntry(("srv", "was-file", "pipe"), meta(Kind.FIFO, 0o640)),
        UpperEntry(("srv", "dev"), PathMeta(Kind.BLOCK, 0o660, 0, 6, T1, 8, 1)),
        UpperEntry(("x",), meta(d)),
        UpperEntry(
            ("x", "hello"), meta(f, 0o4755), size=2, link_key="h", content=io.BytesIO(b"hi")
        ),
        UpperEntry(("x", "twin"), meta(f, 0o4755), size=2, link_key="h"),
        UpperEntry(("tmp",), meta(d, 0o1777)),
        UpperEntry(("var",), meta(d)),
        UpperEntry(("var", "log"), meta(d)),
        UpperEntry(("var", "log", "old.log"), meta(Kind.CHAR, 0, 0, 0)),
    ]
    for parts, content in data.items():
        out.append(
            UpperEntry(parts, meta(f, 0o644, 0, 0), size=len(content), content=io.BytesIO(content))
        )
    return out


def exporter_tar(entries: list[UpperEntry]) -> bytes:
    buf = io.BytesIO()
    write_upper_tar(entries, buf)
    return buf.getvalue()


def source(path: Path, data: bytes) -> LayerSource:
    path.write_bytes(data)
    return LayerSource.from_path(path, path.name, Digest.of_bytes(data))


T2, T3 = 1_650_000_000, 1_750_000_000


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A plain tar of ``(header, content)`` pairs, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _d(name: str, mode: int = 0o755, mtime: int = T2, **kw: object) -> tuple[tarfile.TarInfo, None]:
    return tar_info(name, tarfile.DIRTYPE, mode, mtime=mtime, **kw), None


def _f(
    name: str, data: bytes, mode: int = 0o644, mtime: int = T2, **kw: object
) -> tuple[tarfile.TarInfo, bytes]:
    return tar_info(name, tarfile.REGTYPE, mode, mtime=mtime, **kw), data


def third_tar() -> bytes:
    """On top of the step: a whiteout of one name of a hard-linked pair, of a directory
    tree, of nothing; an opaque directory over the step's directory; a directory where the
    step whited one out; a whiteout and a directory of the same name (written in that order)
    over a lower tree; a kept directory taking yet another owner."""
    return tar_of([
        _d("x"),
        _f("x/.wh.twin", b"", 0o600, uid=7, gid=8),
        _d("var"),
        _f("var/.wh.log", b""),
        _d("srv", 0o755),
        _d("srv/was-file", 0o700, uid=1000, gid=1000),
        _f("srv/was-file/.wh..wh..opq", b""),
        _f("srv/was-file/new", b"new in an opaque dir"),
        _d("usr"),
        _d("usr/lib", 0o751, uid=9, gid=9),
        _d("usr/lib/b", 0o700),
        _f("usr/lib/b/new", b"b again"),
        _f(".wh.opt", b""),
        _d("opt", 0o755),
        _f("opt/fresh", b"fresh"),
        _d("etc"),
        _f("etc/.wh.nothing-here", b""),
    ])  # fmt: skip


def fourth_tar() -> bytes:
    """Kinds replaced again (a directory by a file, a file by a directory, a symlink by a
    file), a new hard-linked pair, a slow symlink, a FIFO, an owned directory."""
    long = "/" + "y/" * 50 + "end"
    return tar_of([
        _d("srv", mtime=T3),
        _f("srv/was-file", b"a file again", mtime=T3),
        _d("etc", mtime=T3),
        _d("etc/passwd", 0o750, mtime=T3, uid=3),
        _f("etc/passwd/inside", b"in", mtime=T3),
        _d("usr", mtime=T3),
        _d("usr/lib", 0o751, uid=9, gid=9, mtime=T3),
        _f("usr/lib/link", b"not a link now", 0o600, mtime=T3),
        _d("data", 0o770, uid=1234, gid=1234, mtime=T3),
        _f("data/a", b"linked", 0o640, mtime=T3),
        (tar_info("data/b", tarfile.LNKTYPE, 0o640, mtime=T3, linkname="data/a"), None),
        (tar_info("data/long", tarfile.SYMTYPE, 0o777, mtime=T3, linkname=long), None),
        (tar_info("data/fifo", tarfile.FIFOTYPE, 0o620, mtime=T3), None),
    ])  # fmt: skip


def chain(tmp: Path) -> list[LayerSource]:
    """Four layers, bottom first: the base, the exporter's step, then the two above."""
    datas = (base_tar(), exporter_tar(step_entries()), third_tar(), fourth_tar())
    return [source(tmp / f"layer{i}.tar", data) for i, data in enumerate(datas)]
