"""Setup steps: run the missing ones in VMs and cache what each one changed as a layer.

Each missing ``setup`` step boots the previous step's root read-only as the overlay lower
with an empty writable disk as the upper, runs the command as ``sh -eu`` with network, and
turns the upper directory into an ordinary OCI layer (zstd, stored by digest). The step's
root is then its parent's root with that layer's disk stacked on top (``ext4.layerdisk``,
one read-only ext4 per layer, keyed by its diff_id): a step costs its boot and its own
change, never the image. A stack is at most :data:`~microagent.store.records.MAX_STACK`
layer disks deep; the step that would pass it gets its whole chain as one image (flattened,
``ext4.rootfs.build_rootfs``), and the steps after it stack on that. With layer disks off
(``BuildContext.layered``), or for a layer a disk of its own cannot say, the step's image is
its parent's image with the layer applied in place (``ext4.derive``) or the flattened chain.
A step that fails leaves nothing in the cache; the next build resumes from the last good step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from microagent.build.base import BaseImage
from microagent.compiler.keys import SetupInputs, StepKind
from microagent.compiler.plan import BuildPlan, Step
from microagent.digests import key_hex
from microagent.errors import BuildError
from microagent.frozen import Frozen
from microagent.fsutil import flocked
from microagent.progress import Meter, TaskKind, report_cached
from microagent.runtime.machine import Accel
from microagent.store.content import Store
from microagent.store.records import (
    MAX_STACK,
    LayerRef,
    Root,
    RootStack,
    StepRecord,
    layer_disk_entry,
    read_record,
    root_of,
    rootfs_entry,
    rootfs_ready,
    whole_root,
    write_record,
)

if TYPE_CHECKING:
    from microagent.kit.guestkit import GuestKit
    from microagent.runtime.backend import Backend, GuestResult

SETUP_DISK_MIB = 16384
SETUP_MEMORY_MIB = 2048
BUILD_HOSTNAME = "microagent-build"
# Written by the guest init into every boot's root; never part of a layer (as in docker).
RUNTIME_FILES = ("/upper/etc/hostname", "/upper/etc/hosts", "/upper/etc/resolv.conf")

Say = Callable[[str], None]
Sink = Callable[[bytes], None]


@dataclass
class BuildContext:
    """What building setup steps needs; the guest kit and backend are fetched only if used."""

    store: Store
    kit_factory: Callable[[], GuestKit]
    backend_factory: Callable[[], Backend]
    extra_ca: bytes | None = None
    say: Say = field(default=lambda _m: None)
    output: Sink | None = None
    timeout: float | None = None
    accel: Accel = Accel.AUTO
    ram: bool = True  # flatten in RAM when there is room
    boots: int = 0
    # --no-cache / --no-cache-from N: the first setup step (1-based) built even if cached
    rebuild_from: int | None = None
    timings: list[StepTimings] = field(default_factory=list)  # one per step built
    derive: bool = True  # a step's rootfs from its parent's image when it can (see below)
    layered: bool = True  # a step's root as its parent's root + its own layer disk

    @cached_property
    def kit(self) -> GuestKit:
        return self.kit_factory()

    @cached_property
    def backend(self) -> Backend:
        return self.backend_factory()


@dataclass
class StepTimings:
    """Where one built setup step's time went, in seconds (``bench/bench_setup.py``)."""

    key: str
    boot: float = 0.0  # make the upper disk, boot, run the command, power off
    check: float = 0.0  # e2fsck of the guest's disk, drop the runtime files
    export: float = 0.0  # the upper dir as a layer tar
    store: float = 0.0  # zstd + store the blob
    rootfs: float = 0.0  # the step's root: its layer disk, or its image
    how: str = ""  # how the root was made

    @property
    def total(self) -> float:
        return self.boot + self.check + self.export + self.store + self.rootfs

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "how": self.how,
            **{k: round(getattr(self, k), 3) for k in ("boot", "check", "export", "store")},
            "rootfs": round(self.rootfs, 3),
            "total": round(self.total, 3),
        }


class _Clock:
    """Adds the time since the last lap to a field of a :class:`StepTimings`."""

    def __init__(self, timings: StepTimings) -> None:
        self.timings = timings
        self.last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        setattr(self.timings, name, getattr(self.timings, name) + now - self.last)
        self.last = now


@dataclass(frozen=True, eq=False, repr=False)
class BuiltRootfs(Frozen):
    key: str
    root: Root
    layers: tuple[LayerRef, ...]
    built: int
    cached: int
    timings: tuple[StepTimings, ...] = ()  # of the steps built

    @property
    def path(self) -> Path:
        """The root's bottom image (the whole root when no layer disks are stacked on it)."""
        return self.root.image


def image_env(base: BaseImage) -> dict[str, str]:
    """What setup commands see: the base image's ``Env`` (plus HOME)."""
    env = base.env_map()
    env.setdefault("HOME", "/root")
    return env


def setup_ready(store: Store, key: str) -> StepRecord | None:
    """The record of a setup step whose root filesystem is built."""
    return rootfs_ready(store, key, (StepKind.SETUP,))


def setup_lock(store: Store, key: str) -> Path:
    """The flock held while a setup step is built: a second build of the same step (another
    ``create`` of the spec) waits for it and reuses its record instead of booting again."""
    return store.root / "locks" / "setup" / f"{key_hex(key)}.lock"


def _resume_point(store: Store, steps: Sequence[Step]) -> int:
    """How many leading setup steps the deepest cached one covers (its record holds the
    whole layer chain, so earlier steps need no record or rootfs of their own)."""
    for index in range(len(steps), 0, -1):
        if setup_ready(store, steps[index - 1].key) is not None:
            return index
    return 0


def ensure_rootfs(ctx: BuildContext, plan: BuildPlan, base: BaseImage) -> BuiltRootfs:
    """The plan's root filesystem, building the setup steps after the deepest cached one."""
    parent = read_record(ctx.store, base.key)
    layers = parent.layers if parent is not None else ()
    root, built = Root(base.rootfs), 0
    steps = plan.of_kind(StepKind.SETUP)
    env = image_env(base)
    rebuild = len(steps) + 1 if ctx.rebuild_from is None else ctx.rebuild_from
    cached = _resume_point(ctx.store, steps[: rebuild - 1])
    for index, step in enumerate(steps, start=1):
        label = f"[{index}/{len(steps)}] setup {step.label}"
        if index < cached:
            report_cached(ctx.say, step.key, TaskKind.STEP, label, f"{label}  CACHED")
            continue
        with flocked(setup_lock(ctx.store, step.key)):  # concurrent builds boot once
            forced = index >= rebuild  # replaces what is cached under the key
            record = None if forced else setup_ready(ctx.store, step.key)
            if record is None:
                note = "  (rebuilt: cache not used)" if forced else ""
                meter = Meter(ctx.say, step.key, TaskKind.STEP, label, line=label + note)
                record = build_setup_step(ctx, step, root, parent, env, replace=forced)
                meter.finish(f"{label}  DONE {meter.elapsed:.1f}s")
                built += 1
            else:
                report_cached(ctx.say, step.key, TaskKind.STEP, label, f"{label}  CACHED")
        found = root_of(ctx.store, record)
        if found is None:  # removed since it was looked up (outside microagent: prune waits)
            raise BuildError(f"the root of {step.label} is gone", hint="run the command again")
        root, parent, layers = found, record, record.layers
    key = steps[-1].key if steps else base.key
    return BuiltRootfs(key, root, layers, built, cached, tuple(ctx.timings))


def fit_root(store: Store, built: BuiltRootfs, room: int, *, ram: bool, say: Say) -> BuiltRootfs:
    """``built`` as a VM with ``room`` disks to spare can boot it: a stacked root with more
    layer disks than that becomes one image (its chain flattened once, named in its record)."""
    if len(built.root.layers) <= room:
        return built
    from microagent.ext4.rootfs import materialise  # deferred: as in run_setup_vm

    record = read_record(store, built.key)
    if record is None:
        raise BuildError(f"the record of {built.key[:19]}… is gone", hint="run create again")
    say(f"[rootfs] {len(built.root.layers)} layer disks leave too few disks: one image")
    merged = materialise(store, record, ram=ram, say=say)
    assert merged.rootfs is not None
    return replace(built, root=Root(store.entry_path(merged.rootfs)))


def run_setup_vm(
    ctx: BuildContext, step: Step, root: Root, upper: Path, env: Mapping[str, str]
) -> GuestResult:
    """Boot once with the step's command; the writes land in the state disk ``upper``."""
    # deferred: booting, ext4 and layer tools load only when a step is built, not on a hit
    from microagent.ext4.mkfs import make_state_disk
    from microagent.runtime.backend import NetworkConfig
    from microagent.runtime.boot import SETUP_BOOT, RunRequest, run_once
    from microagent.runtime.configdisk import NetworkMode

    make_state_disk(upper, SETUP_DISK_MIB)
    request = RunRequest(
        rootfs=root.image,
        layers=root.layers,
        command=SetupInputs.of(step.inputs).argv,
        env=dict(env),
        network=NetworkConfig(NetworkMode.USER),
        timeout=ctx.timeout,
        memory_mib=SETUP_MEMORY_MIB,
        hostname=BUILD_HOSTNAME,
        extra_ca=ctx.extra_ca,
        state_disk=upper,
        accel=ctx.accel,
        name=SETUP_BOOT,
    )
    ctx.boots += 1
    return run_once(request, backend=ctx.backend, kit=ctx.kit, on_output=ctx.output)


def _failure(step: Step, result: GuestResult) -> BuildError:
    tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
    why = result.error or f"exit code {result.exit_code}"
    return BuildError(
        f"setup step failed ({why}): {step.label}" + (f"\n{tail}" if tail else ""),
        hint="fix the command in the spec and run create again; earlier steps stay cached",
    )


def _drop_runtime_files(state_disk: Path) -> None:
    from microagent.ext4.debugfs import check_guest_image, quote, run_debugfs  # deferred: as above

    check_guest_image(state_disk, "setup step disk")  # the guest wrote it: check before debugfs
    run_debugfs(state_disk, [f"rm {quote(p)}" for p in RUNTIME_FILES], write=True)


def _store_layer(store: Store, work: Path, clock: _Clock) -> LayerRef:
    # deferred: as in run_setup_vm
    from microagent.ext4.upper import export_upper_image
    from microagent.layers.tarwrite import compress_zstd
    from microagent.oci.documents import OCI_LAYER_ZSTD

    exported = export_upper_image(work / "upper.ext4", work / "layer.tar")
    clock.lap("export")
    with (work / "layer.tar").open("rb") as plain:
        packed = compress_zstd(plain, work / "layer.tar.zst")
    digest = store.put_blob_file(work / "layer.tar.zst", packed.digest)
    clock.lap("store")
    return LayerRef(OCI_LAYER_ZSTD, str(digest), packed.size, str(exported.diff_id))


def _stack(
    ctx: BuildContext, parent: StepRecord | None, layer_tar: Path, layer: LayerRef
) -> tuple[RootStack | None, str]:
    """The step's root as its parent's root with the step's layer disk on top, and how;
    None (and why) when the step gets an image of its own instead."""
    # deferred: as in run_setup_vm
    from microagent.digests import Digest
    from microagent.ext4.layerdisk import NotLayerable
    from microagent.ext4.rootfs import ensure_layer_disk
    from microagent.layers.apply import LayerSource

    below = whole_root(ctx.store, parent) if parent is not None else None
    if not ctx.layered or below is None:
        return None, "layer disks off" if not ctx.layered else "no parent root"
    if len(below.layers) >= MAX_STACK:
        return None, f"merged: {MAX_STACK} layer disks deep"
    source = LayerSource.from_path(layer_tar, "the step's layer", Digest.parse(layer.diff_id))
    try:
        ensure_layer_disk(ctx.store, source, size_hint=layer_tar.stat().st_size, ram=ctx.ram)
    except NotLayerable as exc:
        return None, f"not layerable: {exc.message}"
    return below.on(layer_disk_entry(layer.diff_id)), f"layer disk ({len(below.layers) + 1} deep)"


def _derive(ctx: BuildContext, step: Step, parent: Root, layer_tar: Path, replace: bool) -> str:
    """Build the step's rootfs from its parent's image and its own layer when that is
    possible (see ``ext4.derive``); how it went, or why the caller must flatten."""
    from microagent.ext4.rootfs import derive_rootfs  # deferred: as in run_setup_vm

    if not ctx.derive:
        return "flatten (derive off)"
    if parent.layers or not parent.image.is_file():
        return "flatten (no parent image)"
    image = parent.image
    done = derive_rootfs(ctx.store, step.key, image, layer_tar, ram=ctx.ram, replace=replace)
    if done.path is None:
        return f"flatten ({done.reason})"
    return f"derived ({done.commands} commands{', grown' if done.grew else ''})"


def build_setup_step(
    ctx: BuildContext,
    step: Step,
    root: Root,
    parent: StepRecord | None,
    env: Mapping[str, str],
    *,
    replace: bool = False,
) -> StepRecord:
    """Boot the step over ``root`` (the root of ``parent``, the step before it), store its
    layer, build its layer disk (or its image) and write its record last.

    With ``replace`` (a forced rebuild) the root filesystem and the record already cached under
    the key are each replaced atomically: a reader sees the old pair or the new one's parts,
    never a missing file, and the record (written last) names the new layer chain. Layer
    disks are named by content, so a rebuilt step's disk never replaces another's.
    """
    # deferred: as in run_setup_vm
    from microagent.ext4.rootfs import build_rootfs
    from microagent.layers.apply import stored_layers

    timings = StepTimings(step.key)
    clock = _Clock(timings)
    with ctx.store.scratch_dir() as work:
        result = run_setup_vm(ctx, step, root, work / "upper.ext4", env)
        clock.lap("boot")
        if result.exit_code != 0 or result.error:
            raise _failure(step, result)
        _drop_runtime_files(work / "upper.ext4")
        clock.lap("check")
        layer = _store_layer(ctx.store, work, clock)
        stack, timings.how = _stack(ctx, parent, work / "layer.tar", layer)
        if stack is None:
            timings.how = f"{_derive(ctx, step, root, work / 'layer.tar', replace)}; {timings.how}"
    chain = (*(parent.layers if parent is not None else ()), layer)
    if stack is None and not timings.how.startswith("derived"):
        build_rootfs(
            ctx.store,
            step.key,
            stored_layers(ctx.store, chain),
            compressed_bytes=sum(item.size for item in chain),
            ram=ctx.ram,
            replace=replace,
        )
    clock.lap("rootfs")
    ctx.timings.append(timings)
    rootfs = None if stack is not None else rootfs_entry(step.key)
    record = StepRecord(
        StepKind.SETUP, step.key, step.parent, step.inputs, chain, rootfs=rootfs, stack=stack
    )
    write_record(ctx.store, record)
    return record
