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
from typing import TYPE_CHECKING

from microagent import api
from microagent.build.base import BaseImage, pull_base
from microagent.build.setup import BuildContext, BuiltRootfs, ensure_rootfs
from microagent.compiler.files import FileTree
from microagent.compiler.overrides import Overrides, RuntimeEnv
from microagent.compiler.plan import BuildPlan, StepKind, compile_plan
from microagent.compiler.refs import host_platform
from microagent.compiler.spec import Spec
from microagent.errors import BuildError, InvalidInputError
from microagent.ext4.overlay import make_state_disk
from microagent.runtime.supervisor import get_backend
from microagent.settings import extra_ca_bundle, store_dir, workspaces_dir
from microagent.store.content import Store
from microagent.workspace.records import DeclaredFile, Record, Workspace, Workspaces

if TYPE_CHECKING:
    from microagent.kit.guestkit import GuestKit

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
    remote: dict[str, object] | None = None
    published: tuple[dict[str, object], ...] = ()

    def to_json(self) -> dict[str, object]:
        extra: dict[str, object] = {"remote": self.remote} if self.remote else {}
        if self.published:
            extra["published"] = list(self.published)
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
            **extra,
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


@dataclass(frozen=True)
class BuildOutcome:
    """What building a plan did: the plan, its rootfs, setup boots, and remote cache use."""

    plan: BuildPlan
    built: BuiltRootfs
    boots: int
    base: BaseImage
    remote: dict[str, object] | None = None


def _require_buildable(store: Store, plan: BuildPlan, platform: str) -> None:
    """Setup steps only run on the host's platform; other platforms need cache hits."""
    from microagent.build.setup import setup_record

    steps = plan.of_kind(StepKind.SETUP)
    if platform == host_platform() or not steps or setup_record(store, steps[-1].key):
        return
    raise BuildError(
        f"setup steps for {platform} cannot run on this {host_platform()} machine",
        hint="build on a machine of that platform and push (`build --push`), then use "
        "--cache-from here",
    )


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
    cache_from: tuple[str, ...] = ()  # --cache-from flags; empty: the configured default
    cache_to: str | None = None  # --cache-to flag; None: the configured default
    platform: str | None = None

    def store(self) -> Store:
        return Store(store_dir(self.home))

    def build_all(self, spec: Spec, env: RuntimeEnv) -> BuildOutcome:
        """Resolve, plan, take what remote caches have, pull and build the rest."""
        store = self.store()
        image = api.resolve_image(spec, self.platform)
        plan = compile_plan(spec, image, runtime_env_keys=env.names)
        remote = self._restore(store, plan)
        base = self._base(store, spec, plan)
        _require_buildable(store, plan, image.platform)
        ctx = BuildContext(
            store,
            lambda: _kit(store, self.say),
            lambda: get_backend(self.backend_name),
            extra_ca_bundle(),
            self.say,
            self.output,
            self.timeout,
        )
        built = ensure_rootfs(ctx, plan, base)
        return BuildOutcome(plan, built, ctx.boots, base, remote)

    def _restore(self, store: Store, plan: BuildPlan) -> dict[str, object] | None:
        from microagent.remotecache.refs import cache_from_refs, open_source
        from microagent.remotecache.restore import Restorer

        refs = cache_from_refs(self.cache_from)
        restorer = Restorer(store, [open_source(ref) for ref in refs], self.say)
        restorer.restore_plan(plan)
        return {**restorer.stats.to_json(), "warnings": restorer.warnings} if refs else None

    def _base(self, store: Store, spec: Spec, plan: BuildPlan) -> BaseImage:
        from microagent.remotecache.restore import recorded_base

        base = recorded_base(store, plan)
        if base is None:
            base = pull_base(
                store, spec.image, base_dir=spec.base_dir, resolved=plan.image, progress=self.say
            )
        if base.key != plan.steps[0].key:
            raise BuildError(
                "pulled base image does not match the plan (the tag moved?)",
                hint="run `microagent lock --update` and try again",
            )
        self.say(f"[base] {spec.image}  {'CACHED' if base.cached else 'PULLED'}")
        return base

    def publish(self, plan: BuildPlan, *, push: str | None = None) -> list[dict[str, object]]:
        """Send the built steps to ``--cache-to`` (or its default) and the image to ``push``."""
        from microagent.remotecache.publish import prepare, publish, record_files_and_config
        from microagent.remotecache.refs import CacheRef, cache_to_ref, open_target, parse_cache_ref

        targets: list[tuple[CacheRef, str | None]] = []
        cache_to = cache_to_ref(self.cache_to)
        if cache_to is not None:
            targets.append((cache_to, None))
        if push:
            ref = parse_cache_ref(push)
            targets = [t for t in targets if t[0].where != ref.where] + [(ref, ref.tag)]
        if not targets:
            return []
        store = self.store()
        record_files_and_config(store, plan)
        reports = []
        for ref, tag in targets:
            publication = prepare(store, plan.config_step.key, image_tag=tag)
            reports.append(publish(publication, open_target(ref), self.say).to_json())
        return reports

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
            outcome = self.build_all(spec, env)
            plan, built = outcome.plan, outcome.built
            published = self.publish(plan)
            files = _capture_files(self.store(), plan.files)
            parts = _Parts(plan, built, files, outcome.base.env_map())
            record = _record(spec, parts, env, forwards)
            _write_workspace(Workspace(tmp), record)
            ws = spaces.publish(spec.name, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.monotonic() - began
        return CreateReport(
            ws, plan, built, seconds, outcome.boots, outcome.remote, tuple(published)
        )


def _kit(store: Store, say: Say) -> GuestKit:
    from microagent.kit.guestkit import resolve_kit

    return resolve_kit(store, progress=say)


def _write_workspace(ws: Workspace, record: Record) -> Workspace:
    from microagent.workspace.records import State, write_json_atomic

    make_state_disk(ws.state_disk, record.state_size_mib)
    write_json_atomic(ws.record_path, record.to_json(), mode=0o600)
    ws.set_state(State.PREPARED, f"created from {record.spec}")
    return ws
