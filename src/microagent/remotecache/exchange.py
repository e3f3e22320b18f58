"""Offline exchange: load the published steps of an OCI image layout into the store.

``cache export`` is :func:`~microagent.remotecache.publish.publish` into a layout folder: the
same manifests ``build --push`` sends to a registry, each named by the standard
``org.opencontainers.image.ref.name`` annotation (``step-<hex>`` per step and ``latest``, or
the given tag, for the image). So the folder works as ``image: oci:DIR:latest``, as
``--cache-from oci:DIR``, with ``skopeo copy oci:DIR:latest ...``, and with ``cache import``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent.compiler.keys import StepKind
from microagent.errors import InvalidInputError
from microagent.oci.layout import Layout
from microagent.remotecache.records import PublishedStep, key_of_tag, parse_step_manifest
from microagent.remotecache.restore import Hit, Restorer, Say, is_local
from microagent.store.content import Store


@dataclass(frozen=True)
class ImportReport:
    restored: tuple[str, ...]
    present: tuple[str, ...]
    skipped: tuple[str, ...]
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "restored": list(self.restored),
            "alreadyPresent": list(self.present),
            "skipped": list(self.skipped),
            "bytesFetched": self.bytes,
            "seconds": round(self.seconds, 3),
        }


_ORDER = {StepKind.BASE: 0, StepKind.SETUP: 1, StepKind.FILES: 2, StepKind.CONFIG: 3}


def _depth(step: PublishedStep) -> tuple[int, int]:
    return (_ORDER[step.kind], len(step.layers))


def _published_steps(layout: Layout) -> list[PublishedStep]:
    steps: list[PublishedStep] = []
    for tag in layout.tags():
        key = key_of_tag(tag)
        found = layout.find_manifest(tag) if key else None
        if key and found is not None:
            steps.append(parse_step_manifest(found.data, key))
    return steps


def import_layout(
    store: Store, path: Path, say: Say | None = None, *, ram: bool = True, layered: bool = True
) -> ImportReport:
    """Load every published step of a layout into the store, verified like a remote hit.

    Base and setup steps get their record and root filesystem; files steps their layer and
    record; config steps carry no inputs to record and are skipped.
    """
    layout = Layout(path)
    steps = _published_steps(layout)
    if not steps:
        raise InvalidInputError(
            f"{path} holds no published steps (no step-<key> tags)",
            hint="create one with `microagent cache export --file SPEC DIR`",
        )
    restorer = Restorer(store, [layout], say, ram=ram, layered=layered)
    restored, present, skipped = [], [], []
    for step in sorted(steps, key=_depth):
        if step.kind is StepKind.CONFIG:
            skipped.append(step.key)
        elif is_local(store, step):
            present.append(step.key)
        else:
            restorer.restore(Hit(layout, step))
            restored.append(step.key)
    stats = restorer.stats
    return ImportReport(tuple(restored), tuple(present), tuple(skipped), stats.bytes, stats.seconds)
