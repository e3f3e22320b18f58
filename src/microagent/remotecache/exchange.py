"""Offline exchange: write published steps into an OCI image layout, and load one back.

``cache export`` writes the same manifests ``build --push`` sends to a registry into a layout
folder (``oci-layout``, ``index.json``, ``blobs/sha256/``), each named by the standard
``org.opencontainers.image.ref.name`` annotation: ``step-<hex>`` per step and ``latest`` (or
the given tag) for the image. So the folder works as ``image: oci:DIR:latest``, as
``--cache-from oci:DIR``, with ``skopeo copy oci:DIR:latest ...``, and with ``cache import``.

An existing layout is extended (entries with the same name are replaced); anything else that
is not empty is refused. Every file is written under a temp name and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent.compiler.plan import StepKind
from microagent.digests import sha256_digest
from microagent.errors import InvalidInputError
from microagent.fsutil import atomic_write, temp_sibling
from microagent.oci import documents as oci
from microagent.oci.layout import REF_NAME
from microagent.remotecache.publish import Blob, ManifestOut
from microagent.remotecache.records import PublishedStep, key_of_tag, parse_step_manifest
from microagent.remotecache.refs import LayoutCacheSource
from microagent.remotecache.restore import Hit, Restorer, Say, rootfs_ready
from microagent.store.content import Store

LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


class LayoutTarget:
    """Publish into an OCI image layout folder (created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"oci:{path}"
        self.entries: dict[str, dict[str, Any]] = {}
        if path.exists() and any(path.iterdir()) and not (path / "oci-layout").is_file():
            raise InvalidInputError(
                f"{path} is not empty and not an OCI image layout",
                hint="export into a new folder or an existing layout",
            )
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if (path / "index.json").is_file():
            self.entries = _existing_entries(path / "index.json")

    def _blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def put_blob(self, blob: Blob) -> bool:
        final = self._blob_path(blob.digest)
        if final.is_file() and final.stat().st_size == blob.size:
            return False
        tmp = temp_sibling(final)
        try:
            shutil.copyfile(blob.path, tmp)
            tmp.rename(final)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def put_manifest(self, manifest: ManifestOut) -> None:
        digest = sha256_digest(manifest.data)
        final = self._blob_path(digest)
        if not final.is_file():
            atomic_write(final, manifest.data)
        self.entries[manifest.tag] = {
            "mediaType": manifest.media_type,
            "digest": digest,
            "size": len(manifest.data),
            "annotations": {REF_NAME: manifest.tag},
        }

    def close(self) -> None:
        index = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_INDEX,
            "manifests": [self.entries[tag] for tag in sorted(self.entries)],
        }
        atomic_write(self.path / "oci-layout", LAYOUT_VERSION)
        atomic_write(self.path / "index.json", json.dumps(index, indent=2).encode() + b"\n")


def _existing_entries(index: Path) -> dict[str, dict[str, Any]]:
    doc = oci.load_document(index.read_bytes(), str(index))
    entries: dict[str, dict[str, Any]] = {}
    for entry in doc.get("manifests") or []:
        if isinstance(entry, dict):
            tag = str((entry.get("annotations") or {}).get(REF_NAME, entry.get("digest")))
            entries[tag] = entry
    return entries


# -- import -----------------------------------------------------------------------------------


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


def import_layout(store: Store, path: Path, say: Say | None = None) -> ImportReport:
    """Load every published step of a layout into the store, verified like a remote hit.

    Base and setup steps get their record and root filesystem; files steps their layer and
    record; config steps carry no inputs to record and are skipped.
    """
    source = LayoutCacheSource(path)
    steps: list[PublishedStep] = []
    for tag in source.tags():
        key = key_of_tag(tag)
        data = source.step(key) if key else None
        if key and data is not None:
            steps.append(parse_step_manifest(data, key))
    if not steps:
        raise InvalidInputError(
            f"{path} holds no published steps (no step-<key> tags)",
            hint="create one with `microagent cache export --file SPEC DIR`",
        )
    restorer = Restorer(store, [source], say)
    restored, present, skipped = [], [], []
    for step in sorted(steps, key=_depth):
        if step.kind is StepKind.CONFIG:
            skipped.append(step.key)
        elif _is_local(store, step):
            present.append(step.key)
        else:
            restorer.restore(Hit(source, step))
            restored.append(step.key)
    stats = restorer.stats
    return ImportReport(tuple(restored), tuple(present), tuple(skipped), stats.bytes, stats.seconds)


def _is_local(store: Store, step: PublishedStep) -> bool:
    if step.kind.in_rootfs:
        return rootfs_ready(store, step.key) is not None
    return store.get_key(step.key) is not None and all(
        store.has_blob(layer.digest) for layer in step.layers
    )
