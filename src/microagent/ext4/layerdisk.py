"""One OCI layer as a read-only ext4 image in overlayfs form: a layer disk.

A root built as a stack of these (overlay lowers, top first) costs each layer once, keyed
by its diff_id, instead of flattening the whole chain again for every step. The image holds
the layer alone: its entries as the flattened image would hold them (owner, mode, the four
times, hard links within the layer, symlinks, devices, FIFOs), each ``.wh.NAME`` as what
overlayfs itself writes for a deletion (a character device 0/0 named NAME, owner, mode and
times from the tar) and each ``.wh..wh..opq`` as the xattr ``trusted.overlay.opaque=y`` on
its directory. A name the layer both whites out and makes a directory is that directory,
opaque (the whiteout is about the lower layers, OCI says); one it whites out and makes
anything else is that entry (it hides the lower one by itself).

The layer is unpacked by the hardened extractor (``layers.apply`` with
:class:`~microagent.layers.apply.OverlayMarks`), so every bound and refusal of a flatten
holds here too; ``mke2fs -d`` copies the stage without root, and one ``debugfs -w`` script
then makes the whiteouts and device nodes, sets every owner, mode and time and the opaque
xattrs. Reproducible as the flattened rootfs is (UUID and hash seed from the diff_id, frozen
time). No journal and no reserved blocks: the image is only ever mounted read-only.

What a layer alone cannot say: an opaque root (overlayfs ignores the xattr on a layer's
root) raises :class:`NotLayerable`; a hard link to a file of a lower layer is refused by the
extractor (its target is not in the layer). A directory the layer needs but does not name (a
parent of one of its entries) is made as the extractor makes it (root, 0755, time 0) and, in
a stack, its attributes hide the lower directory's; image builders name every parent.

A whiteout below an opaque directory hides nothing and is left out: the kernel lists a
directory that merges with no lower one as it is, whiteouts included (``ls`` would show a
name that cannot be opened). One whose directory merges with nothing for another reason (the
lower layers hold no directory there) cannot be known from the layer alone and is kept;
builders write whiteouts only for names the lower layers hold.
"""

from __future__ import annotations

import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from microagent.errors import BuildError, InvalidInputError
from microagent.ext4.debugfs import fix_ownership_script, quote, run_debugfs
from microagent.ext4.mkfs import BLOCK, FIXED_TIME, MIB, content_bytes, key_uuid, run_mke2fs
from microagent.frozen import Frozen
from microagent.fsutil import no_space, says_no_space
from microagent.layers.apply import LayerSource, Limits, OverlayMarks, apply_layer, finish_stage
from microagent.layers.stagemeta import Kind, PathMeta, StageMetadata

__all__ = [
    "OPAQUE_XATTR",
    "LayerDisk",
    "NotLayerable",
    "Unpacked",
    "allocated_bytes",
    "build_layer_disk",
    "unpack_layer",
]

OPAQUE_XATTR = "trusted.overlay.opaque"
INODE_SIZE = 256
SLACK = 4 * MIB  # superblock, group descriptors, bitmaps, lost+found
DEFAULT_LIMITS = Limits()
ENV = {"E2FSPROGS_FAKE_TIME": str(FIXED_TIME), "SOURCE_DATE_EPOCH": str(FIXED_TIME)}


class NotLayerable(BuildError):
    """The layer means something a disk of its own cannot say; merge it with its parents."""


@dataclass(frozen=True, eq=False, repr=False)
class LayerDisk(Frozen):
    """A built layer disk and what it holds."""

    path: Path
    size_bytes: int  # the image's length (sparse: see the file's allocated blocks)
    content_bytes: int
    entries: int  # paths, whiteouts included (the root too)
    whiteouts: int
    opaque_dirs: int
    uuid: str


@dataclass(frozen=True, eq=False, repr=False)
class Unpacked(Frozen):
    """A layer in a stage: its metadata and what its whiteouts say, in overlayfs form."""

    meta: StageMetadata
    whiteouts: frozenset[str]
    opaque: frozenset[str]


def build_layer_disk(
    source: LayerSource,
    out: Path,
    *,
    limits: Limits = DEFAULT_LIMITS,
    work: Path | None = None,
) -> LayerDisk:
    """Write the layer disk of ``source`` (its diff_id checked) at ``out`` (a temporary name
    beside it, renamed when complete). The stage is made in ``work`` (default: beside
    ``out``; a RAM directory makes it faster) and removed."""
    if source.diff_id is None:
        raise InvalidInputError(f"layer {source.name}: a layer disk is keyed by its diff_id")
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(6)}")
    with tempfile.TemporaryDirectory(dir=work or out.parent, prefix=".layerdisk-") as where:
        stage = Path(where) / "stage"
        stage.mkdir()
        layer = unpack_layer(source, stage, limits=limits)
        try:
            disk = _make_image(stage, layer, tmp, key=str(source.diff_id))
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
    counts = (len(layer.meta), len(layer.whiteouts), len(layer.opaque))
    return LayerDisk(out, disk.size_bytes, disk.content_bytes, *counts, disk.uuid)


def unpack_layer(source: LayerSource, stage: Path, *, limits: Limits = DEFAULT_LIMITS) -> Unpacked:
    """Unpack ``source`` alone into the empty directory ``stage`` by the hardened extractor,
    keeping its whiteouts and opaque markers in overlayfs form."""
    meta, marks = StageMetadata(), OverlayMarks()
    with source.open() as fh:
        apply_layer(
            stage,
            fh,
            layer_name=source.name,
            meta=meta,
            limits=limits,
            diff_id=source.diff_id,
            marks=marks,
        )
    finish_stage(stage, meta)
    opaque = frozenset(p for p in marks.opaque | marks.hidden if _is_dir(meta.get(p)))
    whiteouts = set()
    for path in sorted(p for p in marks.hidden if _is_whiteout(meta.get(p))):
        if _below(path, opaque):  # nothing of a lower layer is there to hide
            meta.discard(path)
        else:
            whiteouts.add(path)
    if "/" in opaque:
        raise NotLayerable(
            f"layer {source.name}: an opaque marker at the root hides every lower layer; "
            "overlayfs ignores it on a layer's root",
            hint="build the root from this layer's chain flattened instead",
        )
    return Unpacked(meta, frozenset(whiteouts), opaque)


def _below(path: str, dirs: frozenset[str]) -> bool:
    """Whether one of ``dirs`` is an ancestor of ``path``."""
    parent = path.rpartition("/")[0]
    while parent:
        if parent in dirs:
            return True
        parent = parent.rpartition("/")[0]
    return False


def _is_whiteout(m: PathMeta | None) -> bool:
    return m is not None and m.kind is Kind.CHAR and (m.major, m.minor) == (0, 0)


def _is_dir(m: PathMeta | None) -> bool:
    return m is not None and m.kind is Kind.DIR


# -- the image -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class _Image(Frozen):
    size_bytes: int
    content_bytes: int
    uuid: str


def image_size_mib(data: int, inodes: int) -> int:
    """Room for ``data`` bytes (files in whole blocks) and ``inodes`` inodes: a read-only
    image needs no headroom, only metadata (extent and directory blocks, inode tables)."""
    need = data + data // 16 + inodes * (INODE_SIZE + 64) + SLACK
    return -(-need // MIB)


def _make_image(stage: Path, layer: Unpacked, out: Path, *, key: str) -> _Image:
    data = content_bytes(stage)
    inodes = len(layer.meta) + 32  # the reserved inodes and lost+found
    size = image_size_mib(data, inodes)
    fs_uuid = key_uuid(key)
    argv = [
        "mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-L", "layer", "-U", fs_uuid,
        "-E", f"hash_seed={fs_uuid},root_owner=0:0,lazy_itable_init=0,nodiscard",
        "-O", "^has_journal", "-m", "0", "-N", str(inodes), "-I", str(INODE_SIZE),
        "-d", str(stage), str(out), f"{size}M",
    ]  # fmt: skip
    run_mke2fs(argv, ENV, out, size, "the layer disk")
    _finish(out, layer, stage)
    return _Image(size * MIB, data, fs_uuid)


def finish_script(layer: Unpacked, stage: Path | None = None) -> list[str]:
    """debugfs commands giving an ``mke2fs -d`` image of the stage its whiteouts and devices,
    owners and modes, opaque xattrs and every inode's four times (last: making a node or an
    xattr may touch its directory's). With ``stage``, owners and modes the stage has already
    (unpacked as root) are not set again: the tree is the same, only the superblock's count
    of bytes written differs from an image built by another user."""
    lines = fix_ownership_script(layer.meta, stage=stage).removesuffix("\n").split("\n")
    for path in sorted(layer.opaque):
        lines.append(f"ea_set {quote(path, raw_bytes=True)} {OPAQUE_XATTR} y")
    for path, m in layer.meta:
        q = quote(path, raw_bytes=True)
        lines += [f"sif {q} {field} @{m.mtime}" for field in ("mtime", "atime", "ctime", "crtime")]
    lines += [
        f"ssv {field} @{FIXED_TIME}" for field in ("mkfs_time", "lastcheck", "mtime", "wtime")
    ]
    return [line for line in lines if line]


def _finish(image: Path, layer: Unpacked, stage: Path) -> None:
    # Lines end at "\n" only: splitlines() would also break a name at U+0085 or U+2028.
    done = run_debugfs(image, finish_script(layer, stage), write=True, env=ENV, split=False)
    if any(says_no_space(e) for e in done.errors):
        raise no_space(image.parent)
    if done.errors:
        raise BuildError("finishing the layer disk failed:\n" + "\n".join(done.errors[:10]))


def allocated_bytes(path: Path) -> int:
    """What a (sparse) image takes on the host's disk."""
    return path.stat().st_blocks * 512
