"""Layer disks: one read-only ext4 image per layer, whiteouts in overlayfs form.

Real layers (``layer_kit``: a base written with tarfile, the setup exporter's own step, two
crafted layers above them), real images (``mke2fs``, ``debugfs``, ``e2fsck``). The stack of
the four layer disks, read through ``ext4.overlay`` as the guest's overlay would merge them,
holds the tree the flattened image of the same chain holds, entry by entry (type, mode,
owner, times, size, content, symlink target, device numbers, hard link groups); every name
any layer disk holds is either visible as the flatten has it or hidden as the flatten
deleted it.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from layer_kit import T2, chain, source, tar_info, tar_of

from microagent.errors import IntegrityError, InvalidInputError
from microagent.ext4.debugfs import check_image, parse_xattrs, run_debugfs
from microagent.ext4.layerdisk import NotLayerable, build_layer_disk
from microagent.ext4.mkfs import make_state_disk
from microagent.ext4.overlay import lookup, read_bytes
from microagent.ext4.rootfs import build_rootfs
from microagent.layers.apply import LayerSource, Limits
from microagent.layers.stagemeta import Kind
from microagent.store.content import Store
from testenv import nobody
from testenv.tree_kit import image_tree

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")

Row = tuple[object, ...]


@pytest.fixture
def layers(tmp_path: Path) -> list[LayerSource]:
    return chain(tmp_path)


def disks_of(layers: list[LayerSource], where: Path) -> list[Path]:
    """One layer disk per layer, bottom first."""
    where.mkdir(exist_ok=True)
    return [build_layer_disk(s, where / f"layer{i}.ext4").path for i, s in enumerate(layers)]


def flattened(tmp_path: Path, layers: list[LayerSource]) -> Path:
    store = Store(tmp_path / "store")
    flat, _ = build_rootfs(store, "sha256:" + "f" * 64, layers, compressed_bytes=1 << 20)
    return flat


def same(row: Row) -> Row:
    """What must agree between the stack and the flatten: all but a directory's size (its
    blocks depend on how many names it held) and the hard link bookkeeping (compared as
    groups)."""
    kind, mode, uid, gid, times, size, digest, target, dev = row[:9]
    return (kind, mode, uid, gid, times, None if kind is Kind.DIR else size, digest, target, dev)


def stack_view(state: Path, lowers: list[Path], trees: list[dict[str, Row]]) -> dict[str, Row]:
    """Every name any layer disk holds, as the merged view shows it (hidden ones left out),
    with the (layer, inode) it is read from in place of the link bookkeeping. A name is
    looked up only below a directory of the view (so no symlink is followed on the way)."""
    out: dict[str, Row] = {}
    for path in sorted(set().union(*trees) - {"/"}):  # parents first
        parent = path.rpartition("/")[0]
        if parent and (parent not in out or out[parent][0] is not Kind.DIR):
            continue
        found = lookup(state, lowers, path)
        if found is not None:
            row = trees[len(trees) - found.layer][path]  # lowers are top first
            assert row[9] is not None
            out[path] = (*same(row), (found.layer, found.inode.ino))
    return out


def link_groups(rows: dict[str, Row], key: Callable[[Row], object]) -> set[frozenset[str]]:
    groups: dict[object, set[str]] = {}
    for path, row in rows.items():
        if row[0] is Kind.FILE:
            groups.setdefault(key(row), set()).add(path)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def test_the_stack_of_layer_disks_holds_the_flattened_tree(
    tmp_path: Path, layers: list[LayerSource]
) -> None:
    flat = image_tree(flattened(tmp_path, layers))
    disks = disks_of(layers, tmp_path / "disks")
    for disk in disks:
        check_image(disk, "layer disk")
    trees = [image_tree(d) for d in disks]
    state = make_state_disk(tmp_path / "state.ext4", 16)
    view = stack_view(state, disks[::-1], trees)
    want = {p: same(r) for p, r in flat.items() if p != "/"}
    assert {p: r[:9] for p, r in view.items() if r[:9] != want.get(p)} == {}
    assert set(view) == set(want)
    assert link_groups(view, lambda r: r[9]) == link_groups(flat, lambda r: r[9])
    assert link_groups(view, lambda r: r[9]) == {frozenset({"/data/a", "/data/b"})}
    for path, row in view.items():  # and the bytes, read through the stack
        if row[0] is Kind.FILE:
            data = read_bytes(state, disks[::-1], path)
            assert hashlib.sha256(data).hexdigest() == row[6], path
    # the cases the chain was written for
    assert "/x/twin" not in view and view["/x/hello"][6] is not None
    assert "/var/log" not in view and "/opt/gone" not in view and "/usr/lib/b/new" in view
    assert "/srv/was-file/pipe" not in view and view["/srv/was-file"][0] is Kind.FILE
    assert view["/etc/passwd"][0] is Kind.DIR and view["/usr/lib/link"][0] is Kind.FILE
    assert view["/usr/lib"][1:4] == (0o751, 9, 9)  # the topmost layer's directory
    assert view["/usr/lib/a/new.py"][9][0] == 3 and "/usr/lib/a/one.py" not in view


def ea_list(image: Path, path: str) -> dict[str, str]:
    done = run_debugfs(image, [f'ea_list "{path}"'])
    return parse_xattrs(done.outputs[0])


def test_whiteouts_and_opaque_dirs_are_in_overlayfs_form(
    tmp_path: Path, layers: list[LayerSource]
) -> None:
    step = image_tree(build_layer_disk(layers[1], tmp_path / "step.ext4").path)
    third = build_layer_disk(layers[2], tmp_path / "third.ext4")
    tree = image_tree(third.path)
    for path in ("/usr/lib/b", "/bin/tool2", "/var/log/old.log"):  # the exporter's whiteouts
        assert step[path][0] is Kind.CHAR and step[path][8] == (0, 0), path
    twin = tree["/x/twin"]  # ".wh.twin": owner, mode and times as the tar said
    assert (twin[0], twin[1], twin[2], twin[3], twin[8]) == (Kind.CHAR, 0o600, 7, 8, (0, 0))
    assert twin[4] == tree["/opt"][4] and f"0x{T2:08x}" in str(twin[4])
    assert tree["/var/log"][0] is Kind.CHAR and "/etc/nothing-here" in tree
    assert ea_list(tmp_path / "step.ext4", "/usr/lib/a") == {"trusted.overlay.opaque": '"y"'}
    assert ea_list(third.path, "/srv/was-file") == {"trusted.overlay.opaque": '"y"'}
    # a whiteout then a directory of the same name: the directory, opaque
    assert tree["/opt"][0] is Kind.DIR and "/opt/fresh" in tree
    assert ea_list(third.path, "/opt") == {"trusted.overlay.opaque": '"y"'}
    assert ea_list(third.path, "/usr/lib/b") == {}  # made where no whiteout of its own was
    assert (third.whiteouts, third.opaque_dirs) == (3, 2)  # /opt is a directory now
    assert third.path.stat().st_size == third.size_bytes


def test_a_layer_disk_is_reproducible(tmp_path: Path, layers: list[LayerSource]) -> None:
    one = build_layer_disk(layers[1], tmp_path / "one.ext4").path
    two = build_layer_disk(layers[1], tmp_path / "two.ext4").path
    assert one.read_bytes() == two.read_bytes()


# -- refusals ---------------------------------------------------------------------------------


def hostile(tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> LayerSource:
    return source(tmp_path / "hostile.tar", tar_of(entries))


def symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return tar_info(name, tarfile.SYMTYPE, 0o777, linkname=target), None


def hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return tar_info(name, tarfile.LNKTYPE, 0o644, linkname=target), None


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tar_info(name, tarfile.REGTYPE, 0o644), data


REFUSED = {
    "dotdot": ([regular("a/../../escape", b"x")], r"'\.\.' component"),
    "below-a-symlink": (
        [symlink("etc", "/tmp"), regular("etc/passwd", b"x")],
        r"parent /etc is a symlink",
    ),
    "link-to-a-lower-layer": ([hardlink("bin/sh2", "bin/sh")], r"target 'bin/sh' does not exist"),
    "link-to-a-whiteout": (
        [regular("a", b"x"), regular(".wh.gone", b""), hardlink("b", "gone")],
        r"target 'gone' does not exist",
    ),
    "too-large": ([regular("big", b"b" * 5000)], r"layer content exceeds 4096 bytes"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_extractors_refusals_hold(tmp_path: Path, case: str) -> None:
    entries, message = REFUSED[case]
    out = tmp_path / "out" / "layer.ext4"
    out.parent.mkdir()
    with pytest.raises(IntegrityError, match=message):
        build_layer_disk(hostile(tmp_path, entries), out, limits=Limits(max_bytes=4096))
    assert list(out.parent.iterdir()) == []  # no image, no temporary left behind


def test_a_layer_whose_content_is_not_its_diff_id_is_refused(tmp_path: Path) -> None:
    good = hostile(tmp_path, [regular("a", b"x")])
    (tmp_path / "hostile.tar").write_bytes(tar_of([regular("a", b"y")]))
    with pytest.raises(IntegrityError, match="diff_id"):
        build_layer_disk(good, tmp_path / "layer.ext4")
    with pytest.raises(InvalidInputError, match="diff_id"):
        build_layer_disk(LayerSource.from_path(tmp_path / "hostile.tar"), tmp_path / "l.ext4")
    assert not (tmp_path / "layer.ext4").exists() and not (tmp_path / "l.ext4").exists()


def test_an_opaque_root_cannot_be_a_layer_disk(tmp_path: Path) -> None:
    layer = hostile(tmp_path, [regular(".wh..wh..opq", b""), regular("a", b"x")])
    with pytest.raises(NotLayerable, match="opaque marker at the root"):
        build_layer_disk(layer, tmp_path / "layer.ext4")


# -- without root -----------------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory nobody can write (pytest's tmp_path is private to root)."""
    with nobody.shared_dir("microagent-layerdisk-") as path:
        yield path


@pytest.mark.root("dropping to nobody")
def test_a_layer_disk_built_without_root_is_the_same(
    shared_dir: Path, tmp_path: Path, layers: list[LayerSource]
) -> None:
    step = shared_dir / "step.tar"
    shutil.copyfile(tmp_path / "layer1.tar", step)  # (chain() wrote it there)
    step.chmod(0o644)
    layer = LayerSource.from_path(step, "step", layers[1].diff_id)
    nobody.as_nobody(lambda: build_layer_disk(layer, shared_dir / "nobody.ext4"))
    built = build_layer_disk(layer, shared_dir / "root.ext4").path
    assert (shared_dir / "nobody.ext4").stat().st_uid == 65534
    assert image_tree(shared_dir / "nobody.ext4") == image_tree(built)


def test_a_big_directory_and_many_small_files_fit(tmp_path: Path) -> None:
    entries = [(tar_info("many", tarfile.DIRTYPE, 0o755), None)]
    entries += [regular(f"many/{'n' * 200}{i:05d}", b"x" * (i % 7)) for i in range(3000)]
    disk = build_layer_disk(hostile(tmp_path, entries), tmp_path / "many.ext4")
    check_image(disk.path, "layer disk")
    assert disk.entries == 3002


# -- one layer naming a path twice ---------------------------------------------------------------

LOWER = [
    (tar_info("a", tarfile.DIRTYPE, 0o755), None),
    regular("a/b", b"lower"),
]
TWICE = {  # what the flatten does, by the order of the members: the layer disk must agree
    "file-then-dir": [regular("a", b"f"), (tar_info("a", tarfile.DIRTYPE, 0o700), None)],
    "dir-then-whiteout": [(tar_info("a", tarfile.DIRTYPE, 0o700), None), regular(".wh.a", b"")],
    "whiteout-then-dir": [regular(".wh.a", b""), (tar_info("a", tarfile.DIRTYPE, 0o700), None)],
    "dir-file-dir": [
        (tar_info("a", tarfile.DIRTYPE, 0o700), None),
        regular("a", b"f"),
        (tar_info("a", tarfile.DIRTYPE, 0o711), None),
    ],
    "whiteout-then-child": [regular(".wh.a", b""), regular("a/new", b"n")],
}


@pytest.mark.parametrize("case", sorted(TWICE))
def test_a_path_named_twice_in_one_layer_stacks_as_it_flattens(tmp_path: Path, case: str) -> None:
    layers = [
        source(tmp_path / "lower.tar", tar_of(LOWER)),
        source(tmp_path / "upper.tar", tar_of(TWICE[case])),
    ]
    disks = disks_of(layers, tmp_path / "disks")
    state = make_state_disk(tmp_path / "state.ext4", 16)
    view = stack_view(state, disks[::-1], [image_tree(d) for d in disks])
    flat = image_tree(flattened(tmp_path, layers))
    want = {p: same(r) for p, r in flat.items() if p != "/"}
    assert {p: r[:9] for p, r in view.items()} == want
    assert ("/a/b" in view) == (case == "dir-then-whiteout")


def test_a_whiteout_below_an_opaque_directory_is_left_out(tmp_path: Path) -> None:
    """It hides nothing, and the kernel would list it (a directory merging with nothing below
    is listed as it is): ``ls`` would show a name that cannot be opened."""
    layer = hostile(
        tmp_path,
        [
            (tar_info("d", tarfile.DIRTYPE, 0o755), None),
            regular("d/.wh..wh..opq", b""),
            (tar_info("d/e", tarfile.DIRTYPE, 0o755), None),
            regular("d/e/.wh.x", b""),
            regular("d/.wh.y", b""),
            regular(".wh.f", b""),
            (tar_info("f", tarfile.DIRTYPE, 0o755), None),
            regular("f/.wh.z", b""),
            regular(".wh.kept", b""),
        ],
    )
    disk = build_layer_disk(layer, tmp_path / "layer.ext4")
    tree = image_tree(disk.path)
    assert "/d/e/x" not in tree and "/d/y" not in tree and "/f/z" not in tree
    assert tree["/kept"][0] is Kind.CHAR and (disk.whiteouts, disk.opaque_dirs) == (1, 2)
    check_image(disk.path, "layer disk")
