"""The library API the CLI is a thin layer over: load, resolve, plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from microagent.compiler.loader import load_spec
from microagent.compiler.lock import (
    LockEntry,
    LockFile,
    ResolvedImage,
    lock_path_for,
    read_lock,
    write_lock,
)
from microagent.compiler.overrides import Overrides, RuntimeEnv, apply_overrides
from microagent.compiler.plan import (
    BuildPlan,
    CachedStep,
    StepCache,
    StepKind,
    StepStatus,
    compile_plan,
    plan_status,
)
from microagent.compiler.refs import ImageRef, LayoutRef, host_platform, parse_any_ref
from microagent.compiler.spec import Spec
from microagent.errors import InvalidInputError


def load(path: Path | str, overrides: Overrides | None = None) -> Spec:
    """Load a spec and apply command-line overrides."""
    spec = load_spec(path)
    return apply_overrides(spec, overrides) if overrides else spec


class EmptyCache:
    """A cache with nothing in it (no store yet, or a dry look)."""

    def lookup(self, key: str) -> CachedStep | None:
        return None

    def children(self, parent: str | None, kind: StepKind) -> Sequence[CachedStep]:
        return ()


def _pinned(
    image: str, ref: ImageRef | LayoutRef, lock: LockFile | None, platform: str
) -> ResolvedImage | None:
    if ref.digest:
        return ResolvedImage(str(ref), ref.digest, platform)
    return lock.lookup(image, platform) if lock else None


def _resolve_remote(ref: ImageRef | LayoutRef, platform: str) -> ResolvedImage:
    if isinstance(ref, LayoutRef):
        from microagent.oci.layout import Layout

        return Layout(ref.path).resolve(ref, platform)
    from microagent.oci.registry import RegistryClient

    return RegistryClient().resolve(ref, platform)


def resolve_image(
    spec: Spec, platform: str | None = None, *, offline: bool = False
) -> ResolvedImage:
    """Pin the spec's image: a digest in the spec, else ``microagent.lock``, else the source.

    With ``offline`` an unpinned tag is an error instead of a registry round trip.
    """
    target = platform or host_platform()
    ref = parse_any_ref(spec.image, spec.base_dir)
    lock = read_lock(lock_path_for(spec.source))
    pinned = _pinned(spec.image, ref, lock, target)
    if pinned is not None:
        return pinned
    if offline:
        raise InvalidInputError(
            f"image {spec.image!r} is a tag with no pinned digest",
            hint="pin it as NAME@sha256:<digest> or run `microagent lock --file SPEC`",
        )
    return _resolve_remote(ref, target)


def lock(path: Path | str, *, update: bool = False) -> tuple[LockFile, bool]:
    """Write (or refresh) ``microagent.lock`` beside the spec; return it and whether it changed."""
    spec = load(path)
    ref = parse_any_ref(spec.image, spec.base_dir)
    lock_file = read_lock(lock_path_for(spec.source)) or LockFile(lock_path_for(spec.source))
    if spec.image in lock_file.images and not update:
        return lock_file, False
    if ref.digest:
        entry = LockEntry(str(ref), ref.digest, {})
    elif isinstance(ref, LayoutRef):
        from microagent.oci.layout import Layout

        entry = Layout(ref.path).lock_entry(ref, host_platform())
    else:
        from microagent.oci.registry import RegistryClient

        entry = RegistryClient().lock_entry(ref)
    changed = lock_file.images.get(spec.image) != entry
    updated = lock_file.with_entry(spec.image, entry)
    if changed:
        write_lock(updated)
    return updated, changed


@dataclass(frozen=True)
class PlanReport:
    spec: Spec
    plan: BuildPlan
    status: list[StepStatus]

    def to_json(self) -> dict[str, object]:
        return {
            "ok": True,
            "name": self.spec.name,
            "spec": str(self.spec.source),
            "image": self.plan.image.to_json(),
            "steps": [
                {
                    "kind": s.step.kind.value,
                    "key": s.step.key,
                    "parent": s.step.parent,
                    "label": s.step.label,
                    "inputs": dict(s.step.inputs),
                    "cached": s.cached,
                    "where": s.where,
                    "reason": s.reason,
                }
                for s in self.status
            ],
        }


def plan(
    path: Path | str,
    overrides: Overrides | None = None,
    env: RuntimeEnv | None = None,
    cache: StepCache | None = None,
    *,
    offline: bool = False,
) -> PlanReport:
    """Load, resolve and plan a spec, and look every step up in ``cache``."""
    spec = load(path, overrides)
    image = resolve_image(spec, offline=offline)
    built = compile_plan(spec, image, runtime_env_keys=env.names if env else ())
    return PlanReport(spec, built, plan_status(built, cache or EmptyCache()))
