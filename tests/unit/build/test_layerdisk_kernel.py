"""The host kernel's own overlayfs over layer disks shows the flattened tree.

The layer disks are mounted read-only (loop), stacked as ``lowerdir=top:...:bottom`` of a real
overlay mount (no upper), and the merged tree, walked with ``lstat``, is compared with the
flattened image of the same chain, mounted too: type, mode, owner, mtime, size, content,
symlink target, device numbers. So the whiteouts and opaque directories are in the form the
kernel reads, not only the form ``ext4.overlay`` reads. Needs root (mounts); where mounting
is not allowed the tests are unavailable (skipped locally, failed under CI).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from layer_kit import chain, source
from test_layerdisk_property import chains, layer_tar

from microagent.errors import BuildError, IntegrityError, ToolError
from microagent.ext4.layerdisk import build_layer_disk
from microagent.ext4.rootfs import build_rootfs
from microagent.layers.apply import LayerSource
from microagent.runner import run
from microagent.store.content import Store
from testenv.prereq import unavailable

pytestmark = [pytest.mark.tools("mke2fs", "debugfs", "mount"), pytest.mark.root("mounts")]

Row = tuple[object, ...]


def _row(path: Path) -> Row:
    st = path.lstat()
    kind = stat.S_IFMT(st.st_mode)
    device = kind in (stat.S_IFCHR, stat.S_IFBLK)
    return (
        kind,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        int(st.st_mtime),
        None if stat.S_ISDIR(st.st_mode) else st.st_size,
        hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None,
        os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
        (os.major(st.st_rdev), os.minor(st.st_rdev)) if device else None,
    )


def mounted_tree(root: Path) -> tuple[dict[str, Row], list[str]]:
    """Every path below a mount point (lost+found aside), by ``lstat``; and the names listed
    but not there: whiteouts in a directory that merges with nothing below (the kernel lists
    such a directory as it is), i.e. whiteouts of names no lower layer holds, which builders
    do not write but random chains do. Lookups are what counts; those are left out."""
    out: dict[str, Row] = {}
    ghosts: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            rel = "/" + str(Path(dirpath, name).relative_to(root))
            if rel == "/lost+found" or rel.startswith("/lost+found/"):
                continue
            try:
                out[rel] = _row(Path(dirpath, name))
            except FileNotFoundError:
                ghosts.append(rel)
    return out, ghosts


def _mount(argv: list[str]) -> None:
    try:
        run(argv)
    except ToolError as exc:
        unavailable(f"cannot mount here: {exc.message.splitlines()[0]}")


@contextlib.contextmanager
def mounts(tmp: Path, flat: Path, disks: list[Path]) -> Iterator[tuple[Path, Path]]:
    """The flattened image and the overlay of the layer disks (given bottom first), both
    read-only."""
    done: list[Path] = []
    try:
        for i, image in enumerate([flat, *disks]):
            where = tmp / f"mnt{i}"
            where.mkdir()
            _mount(["mount", "-t", "ext4", "-o", "loop,ro", str(image), str(where)])
            done.append(where)
        merged = tmp / "merged"
        merged.mkdir()
        lowers = ":".join(str(m) for m in done[1:][::-1])
        opts = f"lowerdir={lowers},redirect_dir=off,metacopy=off"
        _mount(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)])
        done.append(merged)
        yield done[0], merged
    finally:
        for where in reversed(done):
            run(["umount", str(where)])


def _flat(tmp: Path, layers: list[LayerSource]) -> Path:
    store = Store(tmp / "store")
    flat, _ = build_rootfs(store, "sha256:" + "f" * 64, layers, compressed_bytes=1 << 20)
    return flat


def differences(want: dict[str, Row], got: dict[str, Row]) -> dict[str, tuple[object, object]]:
    return {p: (want.get(p), got.get(p)) for p in set(want) | set(got) if want.get(p) != got.get(p)}


def test_the_kernels_overlay_of_layer_disks_is_the_flattened_tree(tmp_path: Path) -> None:
    layers = chain(tmp_path)
    flat = _flat(tmp_path, layers)
    disks = [build_layer_disk(s, tmp_path / f"l{i}.ext4").path for i, s in enumerate(layers)]
    with mounts(tmp_path, flat, disks) as (flat_root, merged):
        (want, _), (got, ghosts) = mounted_tree(flat_root), mounted_tree(merged)
    assert differences(want, got) == {}
    assert ghosts == []
    assert "/opt/fresh" in got and "/opt/gone" not in got and "/x/twin" not in got


@settings(
    max_examples=int(os.environ.get("LAYERDISK_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(chains)
def test_the_kernel_agrees_on_random_chains(chain: list[list[tuple[str, str, int]]]) -> None:
    with tempfile.TemporaryDirectory() as text:
        tmp = Path(text)
        layers = [source(tmp / f"l{i}.tar", layer_tar(ops, i)) for i, ops in enumerate(chain)]
        try:
            flat = _flat(tmp, layers)
            disks = [build_layer_disk(s, tmp / f"l{i}.ext4").path for i, s in enumerate(layers)]
        except (IntegrityError, BuildError):
            return  # refusals: test_layerdisk_property
        with mounts(tmp, flat, disks) as (flat_root, merged):
            (want, _), (got, ghosts) = mounted_tree(flat_root), mounted_tree(merged)
        if ghosts:
            event("a whiteout of nothing listed")
        assert differences(want, got) == {}
