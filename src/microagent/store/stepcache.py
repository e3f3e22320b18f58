"""The store seen as a build cache for planning: which step keys are built, and siblings."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from microagent.compiler.plan import CachedStep, StepKind
from microagent.errors import IntegrityError
from microagent.store.content import Store


def _step(record: dict[str, Any]) -> CachedStep | None:
    try:
        return CachedStep(
            key=str(record["key"]),
            kind=StepKind(record["kind"]),
            parent=record.get("parent"),
            inputs=dict(record.get("inputs") or {}),
        )
    except (KeyError, ValueError, TypeError):
        return None


class StoreStepCache:
    """Answers the planner from ``keys/*.json``; an entry counts only if its artifact exists."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _present(self, record: dict[str, Any]) -> bool:
        """Its root filesystem exists, or can be flattened from stored layers (no VM)."""
        artifact = record.get("rootfs")
        if artifact is None or self.store.has_entry(str(artifact)):
            return True
        layers = record.get("layers")
        return isinstance(layers, list) and all(self._stored(layer) for layer in layers)

    def _stored(self, layer: object) -> bool:
        try:
            return isinstance(layer, dict) and self.store.has_blob(str(layer.get("digest")))
        except IntegrityError:
            return False

    def lookup(self, key: str) -> CachedStep | None:
        record = self.store.get_key(key)
        if record is None or not self._present(record):
            return None
        return _step(record)

    @cached_property
    def _all(self) -> list[CachedStep]:
        keys = self.store.root / "keys"
        steps = []
        for path in sorted(keys.glob("*.json")) if keys.is_dir() else []:
            record = self.store.get_key(path.stem)
            step = _step(record) if record else None
            if step is not None:
                steps.append(step)
        return steps

    def children(self, parent: str | None, kind: StepKind) -> Sequence[CachedStep]:
        return [s for s in self._all if s.parent == parent and s.kind is kind]
