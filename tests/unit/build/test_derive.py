"""A setup step's rootfs derived from its parent's image holds the tree the flatten builds.

Real layers (a base written with tarfile, a step written by the setup exporter's own tar
writer, with whiteouts, opaque directories, hard links, replaced kinds), real ext4 images
(``mke2fs``, ``debugfs``, ``resize2fs``, ``e2fsck``): each step is built both ways and the
two images' trees are compared entry by entry (type, mode, owner, times, size, content,
symlink target, hard link groups, device numbers).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from microagent.digests import Digest
from microagent.errors import IntegrityError
from microagent.ext4 import derive
from microagent.ext4.debugfs import check_image
from microagent.ext4.mkfs import BLOCK
from microagent.ext4.rootfs import DeriveOutcome, build_rootfs, derive_rootfs
from microagent.layers.apply import LayerSource
from microagent.layers.stagemeta import Kind, PathMeta
from microagent.layers.tarwrite import UpperEntry, write_upper_tar
from microagent.store.content import Store
from testenv.tree_kit import image_tree

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck", "resize2fs")

T0, T1 = 1_600_000_000, 1_700_000_000


def _info(name: str, kind: bytes, mode: int, **kw: object) -> tarfile.TarInfo:
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
            tf.addfile(_info(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
        for name, data in files.items():
            tf.addfile(_info(name, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
        tf.addfile(_info("srv/was-dir/inner", tarfile.REGTYPE, 0o600, size=1), io.BytesIO(b"i"))
        tf.addfile(_info("bin/tool2", tarfile.LNKTYPE, 0o755, linkname="bin/tool"))
        tf.addfile(_info("usr/lib/link", tarfile.SYMTYPE, 0o777, linkname="a/one.py"))
        tf.addfile(_info("var/log/fifo", tarfile.FIFOTYPE, 0o600))
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


# -- the tests -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def build_both(store: Store, tmp_path: Path, step: bytes) -> tuple[Path, DeriveOutcome]:
    base = source(tmp_path / "base.tar", base_tar())
    layer = source(tmp_path / "layer.tar", step)
    parent, _ = build_rootfs(store, "sha256:" + "1" * 64, [base], compressed_bytes=1 << 20)
    flat, _ = build_rootfs(store, "sha256:" + "2" * 64, [base, layer], compressed_bytes=1 << 20)
    done = derive_rootfs(
        store, "sha256:" + "3" * 64, parent, tmp_path / "layer.tar", max_fraction=1000.0
    )
    return flat, done


def test_derived_image_holds_the_flattened_tree(store: Store, tmp_path: Path) -> None:
    flat, done = build_both(store, tmp_path, exporter_tar(step_entries()))
    assert done.path is not None, done.reason
    check_image(done.path, "derived rootfs")
    want, got = image_tree(flat), image_tree(done.path)
    assert "/usr/lib/a/one.py" not in got and "/usr/lib/b" not in got  # the step's deletions
    assert got["/srv/was-dir"][0] is Kind.FILE and got["/srv/was-file"][0] is Kind.DIR
    assert got["/x/twin"][9] == got["/x/hello"][9] == "/x/hello"  # one inode, two names
    assert "/bin/tool2" not in got and got["/bin/tool"][10] == "Links: 1"
    assert {p: r for p, r in got.items() if r != want.get(p)} == {}
    assert set(got) == set(want)


def test_a_change_that_does_not_fit_grows_the_image(store: Store, tmp_path: Path) -> None:
    size = 96 << 20  # more than the small parent image has free
    big = [
        UpperEntry(("big",), meta(Kind.DIR)),
        UpperEntry(("big", "blob"), meta(Kind.FILE), size=size, content=io.BytesIO(b"b" * size)),
    ]
    flat, done = build_both(store, tmp_path, exporter_tar(big))
    assert done.path is not None, done.reason
    assert done.grew
    check_image(done.path, "derived rootfs")
    assert image_tree(done.path) == image_tree(flat)


def test_a_layer_of_another_shape_is_flattened_instead(store: Store, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:  # no entry for the parent directory
        tf.addfile(_info("etc/new", tarfile.REGTYPE, 0o644, size=1), io.BytesIO(b"n"))
    _, done = build_both(store, tmp_path, buf.getvalue())
    assert done.path is None
    assert "/etc/new: its parent is not an earlier directory entry" in done.reason


def test_a_large_change_is_flattened(store: Store, tmp_path: Path) -> None:
    base = source(tmp_path / "base.tar", base_tar())
    parent, _ = build_rootfs(store, "sha256:" + "1" * 64, [base], compressed_bytes=1 << 20)
    size = derive.image_stats(parent).used_bytes + BLOCK  # a step larger than its parent
    big = [UpperEntry(("big",), meta(Kind.FILE), size=size, content=io.BytesIO(bytes(size)))]
    (tmp_path / "layer.tar").write_bytes(exporter_tar(big))
    done = derive_rootfs(store, "sha256:" + "3" * 64, parent, tmp_path / "layer.tar")
    assert done.path is None
    assert "is more than 100% of the image" in done.reason
    assert not (store.root / "rootfs" / f"{'3' * 64}.ext4").exists()


def test_a_hostile_layer_is_refused_as_the_flatten_refuses_it(store: Store, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:  # passes the shape check: its parent is /a
        tf.addfile(_info("a", tarfile.DIRTYPE, 0o755))
        tf.addfile(_info("a/..", tarfile.DIRTYPE, 0o755))
    base = source(tmp_path / "base.tar", base_tar())
    parent, _ = build_rootfs(store, "sha256:" + "1" * 64, [base], compressed_bytes=1 << 20)
    (tmp_path / "layer.tar").write_bytes(buf.getvalue())
    with pytest.raises(IntegrityError, match=r"'\.\.' component"):
        derive_rootfs(store, "sha256:" + "3" * 64, parent, tmp_path / "layer.tar")
    assert not (store.root / "rootfs" / f"{'3' * 64}.ext4").exists()
