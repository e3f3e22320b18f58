"""What ``plan`` and ``lock`` report (:meth:`microagent.api.Microagent.plan`, ``.lock``).

Kept out of :mod:`microagent.api`, as the other operations' reports are (in
:mod:`microagent.workspace.reports`): every frozen dataclass costs its module's import a
fraction of a millisecond, so a command builds only the report types it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from microagent.compiler.refs import portable_ref
from microagent.frozen import Frozen

if TYPE_CHECKING:
    from microagent.compiler.lock import LockEntry, LockFile, ResolvedImage
    from microagent.compiler.plan import BuildPlan, StepStatus
    from microagent.compiler.spec import Spec


def image_json(image: ResolvedImage, written: str) -> dict[str, str | None]:
    """A resolved image as output shows it: a local layout as the spec wrote it, normalised
    and relative to the spec's folder (the store keeps the absolute path it was read from)."""
    out = image.to_json()
    if written.startswith("oci:"):
        out["reference"] = portable_ref(written)
    return out


@dataclass(frozen=True, eq=False, repr=False)
class PlanReport(Frozen):
    spec: Spec
    plan: BuildPlan
    status: list[StepStatus]
    cache_from: tuple[str, ...] | None = None  # remote caches asked (None: none configured)
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "ok": True,
            "name": self.spec.name,
            "spec": str(self.spec.source),
            "image": image_json(self.plan.image, self.spec.image),
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
        if self.cache_from is not None:
            out["cacheFrom"] = list(self.cache_from)
            out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True, eq=False, repr=False)
class LockReport(Frozen):
    lock: LockFile
    image: str
    changed: bool

    @property
    def entry(self) -> LockEntry:
        return self.lock.images[self.image]

    def to_json(self) -> dict[str, object]:
        return {
            "ok": True,
            "lock": str(self.lock.path),
            "changed": self.changed,
            **self.lock.to_json(),
        }
