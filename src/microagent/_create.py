"""``create``: compile the spec, build (or reuse) every step, and write the workspace.

On a cache hit this boots nothing: resolve the image (lock or registry), look every step up,
write the record and an empty state disk. A failure at any point leaves no workspace behind.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from microagent import api
from microagent.cache.builder import BuildContext, BuiltRootfs, ensure_rootfs
from microagent.cache.images import pull_base
from microagent.cache.store import Store
from microagent.compiler.files import FileTree
from microagent.compiler.overrides import Overrides, RuntimeEnv
from microagent.compiler.plan import BuildPlan, StepKind, compile_plan
from microagent.compiler.spec import Spec
from microagent.config import extra_ca_bundle, store_dir, workspaces_dir
from microagent.errors import BuildError, InvalidInputError
from microagent.runtime.diskcopy import make_state_disk
from microagent.runtime.guestkit import resolve_kit
from microagent.runtime.supervisor import get_backend
from microagent.runtime.workspace import DeclaredFile, Record, Workspace, Workspaces

Say = Callable[[str], None]
HostForwards = tuple[tuple[int, int], ...]


def parse_host_forwards(items: tuple[str, ...]) -> HostForwards:
    """``GUEST_PORT=HOST_PORT``: the guest's 10.0.2.100:GUEST_PORT reaches host 127.0.0.1."""
    out = []
    for item in items:
        guest, sep, host = item.partition("=")
        if not (sep and guest.isdigit() and host.isdigit()) or not (
            0 < int(guest) < 65536 and 0 < int(host) < 65536
        ):
            raise InvalidInputError(
                f"--host-forward {item!r}: expected GUEST_PORT=HOST_PORT",
                hint="e.g. --host-forward 8080=18080 lets the guest reach "
                "127.0.0.1:18080 on the host at http://10.0.2.100:8080",
            )
        out.append((int(guest), int(host)))
    return tuple(out)


@dataclass(frozen=True)
class CreateReport:
    workspace: Workspace
    plan: BuildPlan
    rootfs: BuiltRootfs
    seconds: float
    boots: int

    def to_json(self) -> dict[str, object]:
        return {
            "ok": True,
            "workspace": self.workspace.name,
            "state": self.workspace.state().value,
            "rootfsKey": self.rootfs.key,
            "rootfs": str(self.rootfs.path),
            "stepsBuilt": self.rootfs.built,
            "stepsCached": self.rootfs.cached,
            "setupBoots": self.boots,
            "seconds": round(self.seconds, 3),
            "steps": [
                {"kind": s.kind.value, "key": s.key, "label": s.label} for s in self.plan.steps
            ],
        }


def _capture_files(store: Store, tree: FileTree) -> tuple[DeclaredFile, ...]:
    """Declared files go into the store (by content), so later host edits need a new create."""
    out = []
    for item in tree.items:
        blob = ""
        if item.kind == "file" and item.src is not None:
            blob = str(store.put_blob_file(item.src, "sha256:" + item.sha256))
        out.append(DeclaredFile(item.dst, item.mode, blob, item.kind, item.target))
    return tuple(out)


@dataclass(frozen=True)
class _Parts:
    plan: BuildPlan
    built: BuiltRootfs
    files: tuple[DeclaredFile, ...]
    base_env: dict[str, str]


def _record(spec: Spec, parts: _Parts, env: RuntimeEnv, forwards: HostForwards) -> Record:
    res = spec.effective_resources()
    name = spec.name or ""
    plan = parts.plan
    return Record(
        name=name,
        rootfs=str(parts.built.path),
        rootfs_key=parts.built.key,
        image={
            "reference": plan.image.reference,
            "digest": plan.image.digest,
            "platform": plan.image.platform,
        },
        command=spec.command() or (),
        workdir=spec.workdir or "/",
        hostname=spec.effective_hostname(),
        env={**parts.base_env, **spec.env},
        outputs=tuple((o.name, o.path) for o in spec.outputs),
        memory_mib=res.memory_mib,
        cpus=res.cpu_count,
        state_size_mib=res.size_mib,
        network=spec.network.mode.value,
        restart=spec.restart.value,
        files=parts.files,
        spec=str(spec.source),
        files_key=plan.of_kind(StepKind.FILES)[0].key,
        config_key=plan.config_step.key,
        runtime_env=dict(env.values),
        host_forwards=forwards,
    )


@dataclass
class Creator:
    home: Path
    say: Say
    output: Callable[[bytes], None] | None = None
    backend_name: str = "qemu"
    timeout: float | None = None

    def store(self) -> Store:
        return Store(store_dir(self.home))

    def build(self, spec: Spec, env: RuntimeEnv) -> tuple[BuildPlan, BuiltRootfs, int]:
        store = self.store()
        image = api.resolve_image(spec)
        plan = compile_plan(spec, image, runtime_env_keys=env.names)
        base = pull_base(
            store, spec.image, base_dir=spec.base_dir, resolved=image, progress=self.say
        )
        if base.key != plan.steps[0].key:
            raise BuildError(
                "pulled base image does not match the plan (the tag moved?)",
                hint="run `microagent lock --update` and try again",
            )
        self.say(f"[base] {spec.image}  {'CACHED' if base.cached else 'PULLED'}")
        ctx = BuildContext(
            store,
            lambda: resolve_kit(store, progress=self.say),
            lambda: get_backend(self.backend_name),
            extra_ca_bundle(),
            self.say,
            self.output,
            self.timeout,
        )
        built = ensure_rootfs(ctx, plan, base)
        return plan, built, ctx.boots

    def create(
        self,
        spec_path: Path,
        overrides: Overrides,
        env: RuntimeEnv,
        forwards: HostForwards = (),
    ) -> CreateReport:
        began = time.monotonic()
        spec = api.load(spec_path, overrides)
        if not spec.name:
            raise InvalidInputError("the workspace needs a name", hint="set `name:` or --name")
        if forwards and not spec.network.mode.has_nic:
            raise InvalidInputError(
                "--host-forward needs a network, but the workspace is isolated",
                hint="drop --host-forward or use --network user",
            )
        spaces = Workspaces(workspaces_dir(self.home))
        tmp = spaces.reserve(spec.name)
        try:
            plan, built, boots = self.build(spec, env)
            base_env = _image_env(self.store(), plan)
            files = _capture_files(self.store(), plan.files)
            record = _record(spec, _Parts(plan, built, files, base_env), env, forwards)
            ws = _write_workspace(Workspace(tmp), record)
            ws = spaces.publish(spec.name, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CreateReport(ws, plan, built, time.monotonic() - began, boots)


def _image_env(store: Store, plan: BuildPlan) -> dict[str, str]:
    from microagent.cache.images import base_env

    return base_env(store, plan.steps[0].key)


def _write_workspace(ws: Workspace, record: Record) -> Workspace:
    from microagent.runtime.workspace import State, write_json_atomic

    make_state_disk(ws.state_disk, record.state_size_mib)
    write_json_atomic(ws.record_path, record.to_json(), mode=0o600)
    ws.set_state(State.PREPARED, f"created from {record.spec}")
    return ws
