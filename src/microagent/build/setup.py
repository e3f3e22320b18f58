"""Build the root filesystem a plan needs: reuse cached steps, run missing setup steps in VMs.

Each missing ``setup`` step boots the previous step's root filesystem read-only as the overlay
lower with an empty writable disk as the upper, runs the command as ``sh -eu`` with network,
and turns the upper directory into an ordinary OCI layer (zstd, stored by digest). The step's
root filesystem is the flattened base + setup layers as one ext4, cached under the step key.
A step that fails leaves nothing in the cache; the next build resumes from the last good step.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.build.base import BaseImage, rootfs_entry
from microagent.compiler.plan import BuildPlan, Step, StepKind
from microagent.errors import BuildError
from microagent.ext4.debugfs import export_upper_image, replay_journal
from microagent.ext4.mkfs import build_ext4
from microagent.ext4.overlay import make_state_disk
from microagent.layers.apply import LayerSource, compress_zstd, flatten
from microagent.runner import run
from microagent.runtime.backend import Backend, BootConfig, Disk, GuestResult, NetworkConfig
from microagent.runtime.configdisk import GuestNetwork, NetworkMode, RunConfig, write_config_disk
from microagent.store.content import Digest, Store

if TYPE_CHECKING:
    from microagent.kit.guestkit import GuestKit

SETUP_DISK_MIB = 16384
SETUP_MEMORY_MIB = 2048
BUILD_HOSTNAME = "microagent-build"
# Written by the guest init into every boot's root; never part of a layer (as in docker).
RUNTIME_FILES = ("/upper/etc/hostname", "/upper/etc/hosts", "/upper/etc/resolv.conf")
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"

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
    boots: int = 0

    @cached_property
    def kit(self) -> GuestKit:
        return self.kit_factory()

    @cached_property
    def backend(self) -> Backend:
        return self.backend_factory()


@dataclass(frozen=True)
class BuiltRootfs:
    key: str
    path: Path
    layers: tuple[Mapping[str, Any], ...]
    built: int
    cached: int


def image_env(base: BaseImage) -> dict[str, str]:
    """What setup commands see: the base image's ``Env`` (plus HOME)."""
    env = base.env_map()
    env.setdefault("HOME", "/root")
    return env


def setup_record(store: Store, key: str) -> dict[str, Any] | None:
    record = store.get_key(key)
    if record is None or record.get("kind") != "setup":
        return None
    return record if store.has_entry(str(record.get("rootfs", ""))) else None


def _resume_point(store: Store, steps: Sequence[Step]) -> int:
    """How many leading setup steps the deepest cached one covers (its record holds the
    whole layer chain, so earlier steps need no record or rootfs of their own)."""
    for index in range(len(steps), 0, -1):
        if setup_record(store, steps[index - 1].key) is not None:
            return index
    return 0


def ensure_rootfs(ctx: BuildContext, plan: BuildPlan, base: BaseImage) -> BuiltRootfs:
    """The plan's root filesystem, building the setup steps after the deepest cached one."""
    base_record = ctx.store.get_key(base.key) or {}
    layers: list[Mapping[str, Any]] = list(base_record.get("layers") or [])  # type: ignore[call-overload]
    rootfs, built = base.rootfs, 0
    steps = plan.of_kind(StepKind.SETUP)
    env = image_env(base)
    cached = _resume_point(ctx.store, steps)
    for index, step in enumerate(steps, start=1):
        label = f"[{index}/{len(steps)}] setup {step.label}"
        if index < cached:
            ctx.say(f"{label}  CACHED")
            continue
        record = setup_record(ctx.store, step.key)
        if record is None:
            ctx.say(f"{label}")
            began = time.monotonic()
            record = build_setup_step(ctx, step, rootfs, layers, env)
            ctx.say(f"{label}  DONE {time.monotonic() - began:.1f}s")
            built += 1
        else:
            ctx.say(f"{label}  CACHED")
        layers = list(record["layers"])
        rootfs = ctx.store.entry_path(str(record["rootfs"]))
    key = steps[-1].key if steps else base.key
    return BuiltRootfs(key, rootfs, tuple(layers), built, cached)


def _boot_config(ctx: BuildContext, rootfs: Path, work: Path, vm_dir: Path) -> BootConfig:
    return BootConfig(
        kernel=ctx.kit.kernel,
        initrd=ctx.kit.initrd,
        disks=(
            Disk(rootfs, readonly=True, serial="rootfs"),
            Disk(work / "upper.ext4", serial="state"),
            Disk(work / "config.tar", readonly=True, serial="config"),
        ),
        state_dir=vm_dir,
        memory_mib=SETUP_MEMORY_MIB,
        network=NetworkConfig(NetworkMode.USER),
        timeout=ctx.timeout,
        name="setup",
    )


def run_setup_vm(
    ctx: BuildContext, step: Step, rootfs: Path, work: Path, env: Mapping[str, str]
) -> GuestResult:
    """Boot once with the step's command; the writes land in ``work/upper.ext4``."""
    make_state_disk(work / "upper.ext4", SETUP_DISK_MIB)
    command = (*step.inputs["interpreter"], step.inputs["run"])
    config = RunConfig(
        command=tuple(command),
        env=dict(env),
        hostname=BUILD_HOSTNAME,
        network=GuestNetwork(mode=NetworkMode.USER),
    )
    write_config_disk(work / "config.tar", config, (), ctx.extra_ca)
    vm_dir = Path(tempfile.mkdtemp(prefix="ma-setup-"))  # short: unix socket path limits
    try:
        ctx.boots += 1
        with ctx.backend.boot(_boot_config(ctx, rootfs, work, vm_dir)) as machine:
            return machine.wait(on_output=ctx.output)
    finally:
        shutil.rmtree(vm_dir, ignore_errors=True)


def _failure(step: Step, result: GuestResult) -> BuildError:
    tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
    why = result.error or f"exit code {result.exit_code}"
    return BuildError(
        f"setup step failed ({why}): {step.label}" + (f"\n{tail}" if tail else ""),
        hint="fix the command in the spec and run create again; earlier steps stay cached",
    )


def _drop_runtime_files(state_disk: Path) -> None:
    replay_journal(state_disk)
    script = "".join(f'rm "{p}"\n' for p in RUNTIME_FILES)
    run(["debugfs", "-w", "-f", "-", str(state_disk)], input=script.encode(), check=False)


def _store_layer(ctx: BuildContext, work: Path) -> dict[str, Any]:
    exported = export_upper_image(work / "upper.ext4", work / "layer.tar")
    with (work / "layer.tar").open("rb") as plain:
        packed = compress_zstd(plain, work / "layer.tar.zst")
    digest = ctx.store.put_blob_file(work / "layer.tar.zst", packed.digest)
    return {
        "mediaType": ZSTD_LAYER,
        "digest": str(digest),
        "size": packed.size,
        "diffId": str(exported.diff_id),
    }


def layer_sources(store: Store, layers: Sequence[Mapping[str, Any]]) -> list[LayerSource]:
    return [
        LayerSource.from_path(
            store.blob_path(str(layer["digest"])),
            f"layer {i} ({str(layer['digest'])[:19]})",
            Digest.parse(str(layer["diffId"])),
        )
        for i, layer in enumerate(layers)
    ]


def build_rootfs(store: Store, key: str, layers: Sequence[Mapping[str, Any]]) -> Path:
    """Flatten ``layers`` into ``rootfs/<key>.ext4`` (built once, atomically)."""

    def build(tmp: Path) -> None:
        with store.scratch_dir() as scratch:
            meta = flatten(scratch / "stage", layer_sources(store, layers))
            build_ext4(scratch / "stage", meta, tmp, key=key)

    return store.build_once(rootfs_entry(key), build)


def build_setup_step(
    ctx: BuildContext,
    step: Step,
    rootfs: Path,
    layers: Sequence[Mapping[str, Any]],
    env: Mapping[str, str],
) -> dict[str, Any]:
    with ctx.store.scratch_dir() as work:
        result = run_setup_vm(ctx, step, rootfs, work, env)
        if result.exit_code != 0 or result.error:
            raise _failure(step, result)
        _drop_runtime_files(work / "upper.ext4")
        layer = _store_layer(ctx, work)
    all_layers = [*layers, layer]
    build_rootfs(ctx.store, step.key, all_layers)
    record = {
        "kind": "setup",
        "key": step.key,
        "parent": step.parent,
        "inputs": dict(step.inputs),
        "layer": layer,
        "layers": all_layers,
        "rootfs": rootfs_entry(step.key),
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    ctx.store.put_key(step.key, record)
    return record
