"""A step's root filesystem from its layer chain: flatten, then one reproducible ext4.

The one place layers become a bootable image, for every caller (a pulled base, a built setup
step, a remote-cache hit, a pruned rootfs rebuilt from stored layers). The stage goes to RAM
when there is room (see ``ramstage``); the image is built once per key under the store's lock
and published atomically, so concurrent builders build it once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from microagent.errors import BuildError, InvalidInputError, ToolError
from microagent.ext4.layerdisk import build_layer_disk
from microagent.ext4.mkfs import build_ext4
from microagent.ext4.ramstage import stage_dir
from microagent.layers.apply import LayerSource, flatten, stored_layers
from microagent.progress import Meter, TaskKind
from microagent.store.content import Store
from microagent.store.records import StepRecord, layer_disk_entry, rootfs_entry, write_record

Say = Callable[[str], None]


@dataclass
class RootfsTimings:
    """Where building the image went (zero when it was already there)."""

    flatten_seconds: float = 0.0
    ext4_seconds: float = 0.0


def build_rootfs(
    store: Store,
    key: str,
    layers: Sequence[LayerSource],
    *,
    compressed_bytes: int,
    ram: bool = True,
    say: Say | None = None,
    replace: bool = False,
) -> tuple[Path, RootfsTimings]:
    """``rootfs/<key>.ext4`` from ``layers`` (applied in order), built unless it exists (with
    ``replace``: built anew and renamed over the old one)."""
    timings = RootfsTimings()

    def build(tmp: Path) -> None:
        with stage_dir(store, compressed_bytes, ram=ram) as stage:
            began = time.monotonic()
            label = f"{len(layers)} layer(s) to ext4"  # bytes: the compressed layers read
            meter = Meter(say, key, TaskKind.CONVERT, label, compressed_bytes)
            meta = flatten(stage, [dataclasses.replace(s, open=_counted(s, meter)) for s in layers])
            timings.flatten_seconds = time.monotonic() - began
            meter.note(f"  flattened {len(layers)} layer(s) in {timings.flatten_seconds:.1f}s")
            began = time.monotonic()
            build_ext4(stage, meta, tmp, key=key)
            timings.ext4_seconds = time.monotonic() - began
            meter.note(f"  built ext4 in {timings.ext4_seconds:.1f}s")
            meter.finish("")

    return store.build_once(rootfs_entry(key), build, replace=replace), timings


def ensure_layer_disk(
    store: Store, source: LayerSource, *, size_hint: int, ram: bool = True
) -> Path:
    """``layerdisks/<diff_id>.ext4``: the layer ``source`` alone as a read-only disk in
    overlayfs form (``ext4.layerdisk``), built unless it exists. ``size_hint``: the bytes of
    ``source`` as stored, for choosing where to stage it."""
    if source.diff_id is None:
        raise InvalidInputError(f"{source.name}: a layer disk is keyed by its diff_id")

    def build(tmp: Path) -> None:
        with stage_dir(store, size_hint, ram=ram) as work:
            work.mkdir()
            build_layer_disk(source, tmp, work=work)

    return store.build_once(layer_disk_entry(str(source.diff_id)), build)


def materialise(
    store: Store, record: StepRecord, *, ram: bool = True, say: Say | None = None
) -> StepRecord:
    """The step's whole chain as one image too (``rootfs/<key>.ext4``, flattened from its
    stored layers), named in its record; the record as it is when the image exists. For a
    stack too deep for a VM's disks, and for publishing the image remote hits take."""
    if record.rootfs is not None and store.has_entry(record.rootfs):
        return record
    compressed = sum(layer.size for layer in record.layers)
    layers = stored_layers(store, record.layers)
    build_rootfs(store, record.key, layers, compressed_bytes=compressed, ram=ram, say=say)
    merged = record.with_rootfs(rootfs_entry(record.key))
    write_record(store, merged)
    return merged


def _counted(source: LayerSource, meter: Meter) -> Callable[[], BinaryIO]:
    return lambda: meter.reader(source.open())


@dataclass(frozen=True)
class DeriveOutcome:
    """A derived rootfs, or why the caller must flatten instead (``path`` None)."""

    path: Path | None
    reason: str = ""
    commands: int = 0
    grew: bool = False


def derive_rootfs(
    store: Store,
    key: str,
    parent: Path,
    layer_tar: Path,
    *,
    ram: bool = True,
    replace: bool = False,
    max_fraction: float | None = None,
) -> DeriveOutcome:
    """``rootfs/<key>.ext4`` as ``parent`` (the previous step's image) plus the step's layer
    (an uncompressed tar), without flattening the layers below it (see ``ext4.derive``).

    Returns a reason instead when the layer is not of a shape that is safe to apply in place
    or the change is large (more than :data:`derive.MAX_CHANGE_FRACTION` of the image); the
    caller then flattens. A derived image holds the same tree as the flattened one.
    """
    from microagent.ext4 import derive  # deferred: only a built setup step derives

    try:
        members = derive.read_members(layer_tar)
        derive.check_shape(members)
        stats = derive.image_stats(parent)
    except derive.NotDerivable as exc:
        return DeriveOutcome(None, str(exc))
    change_bytes = layer_tar.stat().st_size
    fraction = derive.MAX_CHANGE_FRACTION if max_fraction is None else max_fraction
    if change_bytes > fraction * stats.used_bytes:
        return DeriveOutcome(
            None,
            f"the change ({change_bytes >> 20} MiB) is more than "
            f"{fraction:.0%} of the image ({stats.used_bytes >> 20} MiB)",
        )
    result: list[derive.Derived] = []

    def build(tmp: Path) -> None:
        # Everything is read from the private copy, so a parent replaced meanwhile (a
        # --no-cache rebuild elsewhere) cannot mix two images.
        derive.copy_image(parent, tmp)
        with stage_dir(store, change_bytes, ram=ram) as stage:
            meta = derive.unpack_layer(layer_tar, stage, layer_tar.name)
            change = derive.plan_change(tmp, members, meta)
            result.append(derive.apply_change(tmp, change, stage))

    try:
        path = store.build_once(rootfs_entry(key), build, replace=replace)
    except derive.NotDerivable as exc:
        return DeriveOutcome(None, str(exc))
    except (BuildError, ToolError) as exc:  # debugfs or resize2fs failed: flatten instead
        return DeriveOutcome(None, f"applying the layer failed: {exc.message}")
    done = result[0] if result else derive.Derived(0, False)  # empty: built by another process
    return DeriveOutcome(path, commands=done.commands, grew=done.grew)
