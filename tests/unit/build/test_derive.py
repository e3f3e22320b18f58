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
from layer_kit import base_tar, exporter_tar, meta, source, step_entries, tar_info

from microagent.errors import IntegrityError
from microagent.ext4 import derive
from microagent.ext4.debugfs import check_image
from microagent.ext4.mkfs import BLOCK
from microagent.ext4.rootfs import DeriveOutcome, build_rootfs, derive_rootfs
from microagent.layers.stagemeta import Kind
from microagent.layers.tarwrite import UpperEntry
from microagent.store.content import Store
from testenv.tree_kit import image_tree

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck", "resize2fs")

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
        tf.addfile(tar_info("etc/new", tarfile.REGTYPE, 0o644, size=1), io.BytesIO(b"n"))
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
        tf.addfile(tar_info("a", tarfile.DIRTYPE, 0o755))
        tf.addfile(tar_info("a/..", tarfile.DIRTYPE, 0o755))
    base = source(tmp_path / "base.tar", base_tar())
    parent, _ = build_rootfs(store, "sha256:" + "1" * 64, [base], compressed_bytes=1 << 20)
    (tmp_path / "layer.tar").write_bytes(buf.getvalue())
    with pytest.raises(IntegrityError, match=r"'\.\.' component"):
        derive_rootfs(store, "sha256:" + "3" * 64, parent, tmp_path / "layer.tar")
    assert not (store.root / "rootfs" / f"{'3' * 64}.ext4").exists()
