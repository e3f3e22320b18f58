"""The build pipeline ``create`` and ``build`` share: resolve, plan, take remote hits, pull
the base, run the missing setup steps, and publish to ``--cache-to`` / ``--push``.

On a full cache hit this boots nothing: resolve the image (lock or registry), look every step
up, and return. Every collaborator (settings, registry client, backend, guest kit) is passed
in, so tests run the same pipeline with a fake backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from microagent.build.base import BaseImage, pull_base, ready_base, recorded_base
from microagent.build.setup import BuildContext, BuiltRootfs, ensure_rootfs, setup_ready
from microagent.compiler.cachecontrol import CacheControl
from microagent.compiler.keys import StepKind
from microagent.compiler.overrides import RuntimeEnv
from microagent.compiler.plan import BuildPlan, compile_plan
from microagent.compiler.refs import host_platform, portable_ref
from microagent.compiler.spec import Spec
from microagent.errors import BuildError
from microagent.frozen import Frozen
from microagent.oci.resolve import Resolutions, resolve_image
from microagent.remotecache.refs import (
    CacheRef,
    cache_to_ref,
    open_cache,
    parse_cache_ref,
    remote_sources,
)
from microagent.runtime.machine import Accel
from microagent.settings import Settings
from microagent.store.content import Store
from microagent.store.records import rootfs_ready

if TYPE_CHECKING:
    from microagent.kit.guestkit import GuestKit
    from microagent.oci.registry import RegistryClient
    from microagent.oci.transport import Repository
    from microagent.remotecache.restore import Restorer
    from microagent.runtime.backend import Backend

Say = Callable[[str], None]
Sink = Callable[[bytes], None]


@dataclass(frozen=True, eq=False, repr=False)
class BuildOutcome(Frozen):
    """What building a plan did: the plan, its rootfs, setup boots, and remote cache use."""

    plan: BuildPlan
    built: BuiltRootfs
    boots: int
    base: BaseImage
    remote: dict[str, object] | None = None


@dataclass
class Pipeline:
    """Builds plans into the store of ``settings`` (see the module docstring)."""

    settings: Settings
    registry: Callable[[], RegistryClient]  # made on first use: a cache hit may need none
    backend: Callable[[], Backend]
    kit: Callable[[], GuestKit]
    say: Say = field(default=lambda _m: None)
    output: Sink | None = None
    timeout: float | None = None
    cache_from: tuple[str, ...] = ()  # --cache-from flags; empty: the settings' default
    cache_to: str | None = None  # --cache-to flag; None: the settings' default
    platform: str | None = None
    control: CacheControl = field(default_factory=CacheControl)  # --no-cache, --refresh

    @property
    def store(self) -> Store:
        return Store(self.settings.store_dir)

    @cached_property
    def client(self) -> RegistryClient:
        return self.registry()

    def build(self, spec: Spec, env: RuntimeEnv) -> BuildOutcome:
        """Resolve, plan, take what remote caches have, pull and build the rest."""
        store = self.store
        recent = Resolutions.of(self.settings, refresh=self.control.refresh)
        image = resolve_image(spec, lambda: self.client, self.platform, recent=recent)
        plan = compile_plan(spec, image, runtime_env_keys=env.names)
        rebuild_from = self.control.rebuild_from(len(plan.of_kind(StepKind.SETUP)))
        remote = self._restore(store, plan)
        base = self._base(store, spec, plan)
        _require_buildable(store, plan, image.platform, forced=rebuild_from is not None)
        ctx = BuildContext(
            store,
            self.kit,
            self.backend,
            self.settings.extra_ca_bundle(),
            self.say,
            self.output,
            self.timeout,
            Accel.parse(self.settings.accel),
            self.settings.ram_stage,
            rebuild_from=rebuild_from,
            layered=self.settings.layer_disks,
        )
        built = ensure_rootfs(ctx, plan, base)
        return BuildOutcome(plan, built, ctx.boots, base, remote)

    def restorer(self, store: Store, sources: list[Repository] | None = None) -> Restorer:
        """A restorer over the remote caches (flags, else settings; maybe none at all)."""
        # deferred: restoring (downloads, flattening, packed images) is off a local hit's path
        from microagent.remotecache.restore import Restorer

        if sources is None:
            sources = remote_sources(self.cache_from, self.settings, lambda: self.client)
        return Restorer(
            store,
            sources,
            self.say,
            ram=self.settings.ram_stage,
            packed_images=self.settings.cache_rootfs,
            layered=self.settings.layer_disks,
        )

    def _restore(self, store: Store, plan: BuildPlan) -> dict[str, object] | None:
        sources = remote_sources(self.cache_from, self.settings, lambda: self.client)
        if not sources and rootfs_ready(store, plan.rootfs_step.key) is not None:
            return None  # a local hit: restore_plan would stop at its first check
        restorer = self.restorer(store, sources)
        restorer.restore_plan(plan)  # also rebuilds pruned root filesystems from local layers
        if not restorer.sources:
            return None
        return {**restorer.stats.to_json(), "warnings": restorer.warnings}

    def _base(self, store: Store, spec: Spec, plan: BuildPlan) -> BaseImage:
        base = recorded_base(store, plan) or ready_base(store, plan)  # no source to open
        if base is None:
            base = pull_base(
                store,
                spec.image,
                client=self.client,
                base_dir=spec.base_dir,
                resolved=plan.image,
                progress=self.say,
                ram=self.settings.ram_stage,
            )
        if base.key != plan.steps[0].key:
            raise BuildError(
                "pulled base image does not match the plan (the tag moved?)",
                hint="run `microagent lock --update` and try again",
            )
        self.say(f"[base] {portable_ref(spec.image)}  {'CACHED' if base.cached else 'PULLED'}")
        return base

    def publish(self, plan: BuildPlan, *, push: str | None = None) -> list[dict[str, Any]]:
        """Send the built steps to ``--cache-to`` (or its default) and the image to ``push``."""
        targets: list[tuple[CacheRef, str | None]] = []
        cache_to = cache_to_ref(self.cache_to, self.settings)
        if cache_to is not None:
            targets.append((cache_to, None))
        if push:
            ref = parse_cache_ref(push)
            targets = [t for t in targets if t[0].where != ref.where] + [(ref, ref.tag)]
        if not targets:
            return []
        # deferred: publishing (packing root filesystems, zstd) is not on a plain create's path
        from microagent.remotecache.publish import prepare, publish, record_files_and_config

        store = self.store
        record_files_and_config(store, plan)
        reports = []
        for ref, tag in targets:
            publication = prepare(
                store,
                plan.config_step.key,
                image_tag=tag,
                client=self.client,
                packed_images=self.settings.cache_rootfs,
                ram=self.settings.ram_stage,
            )
            target = open_cache(ref, self.client, write=True)
            reports.append(publish(publication, target, self.say).to_json())
        return reports


def _require_buildable(
    store: Store, plan: BuildPlan, platform: str, *, forced: bool = False
) -> None:
    """Setup steps only run on the host's platform; other platforms need cache hits (and
    ``forced``, a --no-cache rebuild, takes none)."""
    steps = plan.of_kind(StepKind.SETUP)
    if platform == host_platform() or not steps:
        return
    if not forced and setup_ready(store, steps[-1].key):
        return
    raise BuildError(
        f"setup steps for {platform} cannot run on this {host_platform()} machine",
        hint="build on a machine of that platform and push (`build --push`), then use "
        "--cache-from here",
    )
