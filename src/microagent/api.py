"""The library API the CLI is a thin layer over: load, resolve, plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from microagent.compiler._loader import load_spec
from microagent.compiler.image import ImageRef, LayoutRef, host_platform, parse_any_ref
from microagent.compiler.lock import LockFile, ResolvedImage, lock_path_for, read_lock
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


@dataclass(frozen=True)
class StaticResolver:
    """Resolves what needs no network: pinned digests and ``microagent.lock`` entries."""

    lock: LockFile | None

    def resolve(self, image: str, ref: ImageRef | LayoutRef, platform: str) -> ResolvedImage:
        if ref.digest:
            return ResolvedImage(str(ref), ref.digest, platform)
        locked = self.lock.lookup(image, platform) if self.lock else None
        if locked is not None:
            return locked
        where = f" in {self.lock.path}" if self.lock else ""
        raise InvalidInputError(
            f"image {image!r} is a tag with no pinned digest{where}",
            hint=f"pin it in the spec as {image}@sha256:<digest>, or add it to microagent.lock",
        )


def resolve_image(spec: Spec, platform: str | None = None) -> ResolvedImage:
    """Pin the spec's image to a digest without touching the network."""
    target = platform or host_platform()
    ref = parse_any_ref(spec.image, spec.base_dir)
    lock = read_lock(lock_path_for(spec.source))
    return StaticResolver(lock).resolve(spec.image, ref, target)


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
) -> PlanReport:
    """Load, resolve and plan a spec, and look every step up in ``cache``."""
    spec = load(path, overrides)
    image = resolve_image(spec)
    built = compile_plan(spec, image, runtime_env_keys=env.names if env else ())
    return PlanReport(spec, built, plan_status(built, cache or EmptyCache()))
