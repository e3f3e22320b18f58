"""The store seen as a build cache for planning: which step keys are built, and siblings."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from microagent.compiler.keys import StepKind
from microagent.compiler.plan import CachedStep
from microagent.store.content import Store
from microagent.store.records import StepRecord, all_records, read_record, usable


def _step(record: StepRecord) -> CachedStep:
    return CachedStep(record.key, record.kind, record.parent, dict(record.inputs))


class StoreStepCache:
    """Answers the planner from the step records; a step counts only if it is usable."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def lookup(self, key: str) -> CachedStep | None:
        record = read_record(self.store, key)
        if record is None or not usable(self.store, record):
            return None
        return _step(record)

    @cached_property
    def _all(self) -> list[CachedStep]:
        return [_step(record) for record in all_records(self.store)]

    def children(self, parent: str | None, kind: StepKind) -> Sequence[CachedStep]:
        return [s for s in self._all if s.parent == parent and s.kind is kind]
