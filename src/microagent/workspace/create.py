"""``create``: build (or reuse) every step of a spec, then write the workspace.

On a cache hit this boots nothing: the pipeline looks every step up, and creating the
workspace is writing its record and an empty state disk. The workspace is assembled in a
private temp folder and renamed into place, so a failure at any point leaves nothing behind.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from microagent.build.pipeline import Pipeline
from microagent.build.setup import BuiltRootfs, fit_root
from microagent.compiler.keys import StepKind
from microagent.compiler.overrides import RuntimeEnv, check_runtime_env
from microagent.compiler.plan import BuildPlan
from microagent.compiler.spec import Spec
from microagent.errors import InvalidInputError
from microagent.ext4.mkfs import make_state_disk
from microagent.frozen import Frozen
from microagent.fsutil import write_json_atomic
from microagent.runtime.rundir import State
from microagent.store.content import Store
from microagent.store.retention import builds_in_flight
from microagent.workspace.disks import capture_disks
from microagent.workspace.records import (
    AttachedDisk,
    DeclaredFile,
    Record,
    Workspace,
    Workspaces,
    published_ports,
)

if TYPE_CHECKING:
    from microagent.runtime.backend import Forward
    from microagent.workspace.templates import WarmReport

HostForwards = tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False, repr=False)
class CreateReport(Frozen):
    workspace: Workspace
    plan: BuildPlan
    rootfs: BuiltRootfs
    seconds: float
    boots: int
    remote: dict[str, object] | None = None
    published: tuple[dict[str, object], ...] = ()
    warm: WarmReport | None = None  # create --warm: the template made or forked

    def to_json(self) -> dict[str, object]:
        extra: dict[str, object] = {"remote": self.remote} if self.remote else {}
        if self.published:
            extra["published"] = list(self.published)
        if self.warm is not None:
            extra["template"] = self.warm.to_json()
        return {
            "ok": True,
            "workspace": self.workspace.name,
            "state": self.workspace.run.state().value,
            "rootfsKey": self.rootfs.key,
            "rootfs": str(self.rootfs.path),
            "rootfsLayers": [str(p) for p in self.rootfs.root.layers],
            "stepsBuilt": self.rootfs.built,
            "stepsCached": self.rootfs.cached,
            "setupBoots": self.boots,
            "seconds": round(self.seconds, 3),
            "steps": [
                {"kind": s.kind.value, "key": s.key, "label": s.label} for s in self.plan.steps
            ],
            **extra,
        }


def port_forwards(forwards: tuple[Forward, ...]) -> HostForwards:
    """Guest->host forwards a workspace keeps: host TCP ports (unix sockets are for `run`)."""
    out = []
    for forward in forwards:
        if forward.host_port is None:
            raise InvalidInputError(
                f"--host-forward {forward.describe()}: a workspace forwards to a host TCP port",
                hint="use GUEST_PORT=HOST_PORT, e.g. --host-forward 8080=18080",
            )
        out.append((forward.guest_port, forward.host_port))
    return tuple(out)


def _capture_files(store: Store, plan: BuildPlan) -> tuple[DeclaredFile, ...]:
    """Declared files go into the store (by content), so later host edits need a new create."""
    out = []
    for item in plan.files.items:
        blob = ""
        if item.kind == "file" and item.src is not None:
            blob = str(store.put_blob_file(item.src, "sha256:" + item.sha256))
        out.append(DeclaredFile(item.dst, item.mode, blob, item.kind, item.target))
    return tuple(out)


def _record(
    spec: Spec,
    *,
    plan: BuildPlan,
    built: BuiltRootfs,
    files: tuple[DeclaredFile, ...],
    base_env: dict[str, str],
    env: RuntimeEnv,
    forwards: HostForwards,
    disks: tuple[AttachedDisk, ...] = (),
) -> Record:
    res = spec.effective_resources()
    return Record(
        name=spec.name or "",
        rootfs=str(built.path),
        rootfs_layers=tuple(str(p) for p in built.root.layers),
        rootfs_key=built.key,
        image={
            "reference": plan.image.reference,
            "digest": plan.image.digest,
            "platform": plan.image.platform,
        },
        command=spec.command() or (),
        workdir=spec.workdir or "/",
        hostname=spec.effective_hostname(),
        env={**base_env, **spec.env},
        outputs=tuple((o.name, o.path) for o in spec.outputs),
        memory_mib=res.memory_mib,
        cpus=res.cpu_count,
        state_size_mib=res.size_mib,
        network=spec.network.mode.value,
        published=published_ports(spec.network.forwards),
        restart=spec.restart.text,
        files=files,
        spec=str(spec.source),
        files_key=plan.of_kind(StepKind.FILES)[0].key,
        config_key=plan.config_step.key,
        runtime_env=dict(env.values),
        host_forwards=forwards,
        disks=disks,
        mediation=spec.mediation,
        health=spec.health,
        credentials=spec.credentials,
        egress_allow=spec.network.allow,
    )


def create(
    pipeline: Pipeline, spaces: Workspaces, spec: Spec, env: RuntimeEnv, forwards: HostForwards
) -> CreateReport:
    """Build the spec's steps and make the workspace ``spec.name`` (nothing left on failure)."""
    began = time.monotonic()
    if not spec.name:
        raise InvalidInputError("the workspace needs a name", hint="set `name:` or --name")
    if forwards and not spec.network.mode.has_nic:
        raise InvalidInputError(
            "--host-forward needs a network, but the workspace is isolated",
            hint="drop --host-forward or use --network user",
        )
    check_runtime_env(spec.credentials, env.values)
    with builds_in_flight(pipeline.store):  # a concurrent prune waits until it is recorded
        return _create(pipeline, spaces, spec, env, forwards, name=spec.name, began=began)


def _create(
    pipeline: Pipeline,
    spaces: Workspaces,
    spec: Spec,
    env: RuntimeEnv,
    forwards: HostForwards,
    *,
    name: str,
    began: float,
) -> CreateReport:
    tmp = spaces.reserve(name)
    try:
        disks = capture_disks(pipeline.store, spec, Workspace(tmp))  # a bad one fails fast
        outcome = pipeline.build(spec, env)
        built = _fit_root(pipeline, outcome.built, disks)
        published = pipeline.publish(outcome.plan)
        files = _capture_files(pipeline.store, outcome.plan)
        base_env = outcome.base.env_map()
        record = _record(
            spec,
            plan=outcome.plan,
            built=built,
            files=files,
            base_env=base_env,
            env=env,
            forwards=forwards,
            disks=disks,
        )
        _write_workspace(Workspace(tmp), record)
        ws = spaces.install(name, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        spaces.release(tmp)
        raise
    seconds = time.monotonic() - began
    return CreateReport(
        ws, outcome.plan, built, seconds, outcome.boots, outcome.remote, tuple(published)
    )


def _fit_root(
    pipeline: Pipeline, built: BuiltRootfs, disks: tuple[AttachedDisk, ...]
) -> BuiltRootfs:
    """``built`` as the workspace's VM can attach it beside its ``disks``: a stack with more
    layer disks than the devices left becomes one image."""
    if not disks or not built.root.layers:
        return built
    from microagent.runtime.boot import MAX_EXTRA_DISKS  # deferred: as in workspace.disks

    room, ram = MAX_EXTRA_DISKS - len(disks), pipeline.settings.ram_stage
    return fit_root(pipeline.store, built, room, ram=ram, say=pipeline.say)


def _write_workspace(ws: Workspace, record: Record) -> None:
    make_state_disk(ws.state_disk, record.state_size_mib)
    write_json_atomic(ws.record_path, record.to_json(), mode=0o600)
    ws.run.set_state(State.PREPARED, f"created from {record.spec}")
