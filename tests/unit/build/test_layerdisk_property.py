"""Property: for any chain of layers of the shape image builders write (every parent named
before its children), the stack of their layer disks, read through ``ext4.overlay``, holds the
flattened image's tree; and a layer disk refuses only what the flatten refuses too.

Each example builds real images (``mke2fs``, ``debugfs``): ``LAYERDISK_EXAMPLES`` (default 15)
sets how many.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from layer_kit import source, tar_info, tar_of
from test_layerdisk import same, stack_view

from microagent.errors import BuildError, IntegrityError
from microagent.ext4.layerdisk import build_layer_disk
from microagent.ext4.mkfs import make_state_disk
from microagent.ext4.rootfs import build_rootfs
from microagent.layers.apply import LayerSource
from microagent.store.content import Store
from testenv.tree_kit import image_tree

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")

NAMES = ["a", "b", "a/b", "a/c", "b/a", "a/b/c"]
DIRS = ["a", "b", "a/b"]
Op = tuple[str, str, int]  # (what, name, a small number: content, mode or link choice)

ops = st.one_of(
    st.tuples(st.just("file"), st.sampled_from(NAMES), st.integers(0, 3)),
    st.tuples(st.just("dir"), st.sampled_from(NAMES), st.integers(0, 3)),
    st.tuples(st.just("sym"), st.sampled_from(NAMES), st.integers(0, 3)),
    st.tuples(st.just("fifo"), st.sampled_from(NAMES), st.integers(0, 3)),
    st.tuples(st.just("hard"), st.sampled_from(NAMES), st.integers(0, 3)),
    st.tuples(st.just("whiteout"), st.sampled_from(NAMES), st.integers(0, 3)),
    st.tuples(st.just("opaque"), st.sampled_from(DIRS), st.integers(0, 3)),
)
chains = st.lists(st.lists(ops, min_size=1, max_size=6), min_size=2, max_size=3)
MODES = (0o755, 0o700, 0o750, 0o711)


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def layer_tar(layer: list[Op], index: int) -> bytes:
    """The ops as tar members, each preceded by entries for its parents (as builders write)."""
    mtime = 1_600_000_000 + index * 1000
    files: list[str] = []
    out: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for what, name, n in layer:
        base = name if what == "opaque" else name.rpartition("/")[0]
        for parent in _parents(name) + ([name] if what == "opaque" else []):
            out.append((tar_info(parent, tarfile.DIRTYPE, MODES[n], mtime=mtime, uid=n), None))
        del base
        if what == "file":
            out.append((tar_info(name, tarfile.REGTYPE, 0o644, mtime=mtime), b"c%d" % n))
            files.append(name)
        elif what == "dir":
            out.append((tar_info(name, tarfile.DIRTYPE, MODES[n], mtime=mtime, gid=n), None))
        elif what == "sym":
            target = ["a", "/b", "a/b", "../" * 3 + "x"][n]
            out.append((tar_info(name, tarfile.SYMTYPE, 0o777, mtime=mtime, linkname=target), None))
        elif what == "fifo":
            out.append((tar_info(name, tarfile.FIFOTYPE, 0o600, mtime=mtime), None))
        elif what == "hard" and files:  # within the layer only: a layer disk holds one layer
            target = files[n % len(files)]
            out.append((tar_info(name, tarfile.LNKTYPE, 0o644, mtime=mtime, linkname=target), None))
        elif what == "whiteout":
            head, _, leaf = name.rpartition("/")
            wh = f"{head}/.wh.{leaf}" if head else f".wh.{leaf}"
            out.append((tar_info(wh, tarfile.REGTYPE, 0o600, mtime=mtime, uid=n), b""))
        elif what == "opaque":
            out.append((tar_info(f"{name}/.wh..wh..opq", tarfile.REGTYPE, 0o600), b""))
    return tar_of(out)


def _flatten(tmp: Path, layers: list[LayerSource]) -> Path | None:
    try:
        flat, _ = build_rootfs(Store(tmp / "store"), "sha256:" + "f" * 64, layers,
                               compressed_bytes=1 << 20)  # fmt: skip
    except IntegrityError:
        return None
    return flat


def _disks(tmp: Path, layers: list[LayerSource]) -> list[Path] | None:
    try:
        return [build_layer_disk(s, tmp / f"l{i}.ext4").path for i, s in enumerate(layers)]
    except (IntegrityError, BuildError):
        return None


@settings(
    max_examples=int(os.environ.get("LAYERDISK_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(chains)
def test_a_stack_of_layer_disks_is_the_flattened_tree(chain: list[list[Op]]) -> None:
    with tempfile.TemporaryDirectory() as text:
        tmp = Path(text)
        layers = [source(tmp / f"l{i}.tar", layer_tar(ops, i)) for i, ops in enumerate(chain)]
        flat, disks = _flatten(tmp, layers), _disks(tmp, layers)
        if disks is None:
            event("a layer disk refused")
            assert flat is None, "a layer disk refused what the flatten accepts"
            return
        if flat is None:
            event("the flatten refused (a lower layer's entry in the way)")
            return
        event("built")
        trees = [image_tree(d) for d in disks]
        state = make_state_disk(tmp / "state.ext4", 16)
        view = stack_view(state, disks[::-1], trees)
        want = {p: same(r) for p, r in image_tree(flat).items() if p != "/"}
        assert {p: r[:9] for p, r in view.items() if r[:9] != want.get(p)} == {}
        assert set(view) == set(want)
