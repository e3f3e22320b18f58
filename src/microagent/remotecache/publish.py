"""Publish built steps as OCI manifests: one per step key, plus the image, to a registry or a
layout folder.

Everything is derived from local step records (``keys/<key>.json``), so the same function
serves ``build --push``, ``--cache-to`` and ``cache export``. Per step (see ``steprecord``):

* ``base``  — the image's own config and layers; the record carries the image documents;
* ``setup`` — a runnable image of that step's root filesystem (base config, diff_ids and
  history extended): ``skopeo copy docker://REF:step-<hex> ...`` works;
* ``files`` — an artifact with the files layer; ``config`` — an artifact with no layers whose
  record holds only the digest of the inputs and the *names* of environment variables.

The image (tag) is base + setup + files layers with a config holding the entrypoint, working
directory and labels for outputs and env names. Manifests are canonical JSON with fixed times,
so publishing the same build twice gives the same digests; blobs the target already has are
skipped (one HEAD each), the rest are uploaded in parallel before any manifest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from microagent.compiler.plan import BuildPlan, StepKind
from microagent.digests import canonical_json
from microagent.errors import IntegrityError, MicroagentError, NotFoundError
from microagent.ext4 import packed as rootfsimage
from microagent.ext4.packed import Packed
from microagent.layers.fileslayer import store_files_layer
from microagent.layers.tarwrite import source_date_epoch
from microagent.oci import documents as oci
from microagent.remotecache.records import (
    ARTIFACT_TYPE,
    EMPTY_JSON,
    EMPTY_MEDIA_TYPE,
    ROOTFS_ANNOTATION,
    STEP_ANNOTATION,
    BaseDocs,
    LayerRef,
    PublishedStep,
    inputs_digest,
    layers_of,
    rootfs_tag,
    step_tag,
)
from microagent.store.content import Store

Say = Callable[[str], None]
LABEL = "io.microagent."
ROOTFS_ARTIFACT_TYPE = "application/vnd.microagent.rootfs.v1"
UPLOAD_WORKERS = 4


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _epoch_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(source_date_epoch()))


# -- local records for the files and config steps ------------------------------------------


def record_files_and_config(store: Store, plan: BuildPlan) -> None:
    """Write the files layer and the ``files``/``config`` step records if they are missing."""
    files, config = plan.of_kind(StepKind.FILES)[0], plan.config_step
    record = store.get_key(files.key)
    if record is None or not _layers_present(store, record):
        layer = store_files_layer(store, plan.files)
        store.put_key(
            files.key,
            {
                "kind": "files",
                "key": files.key,
                "parent": files.parent,
                "inputs": dict(files.inputs),
                "layer": layer.to_json(),
                "layers": [layer.to_json()],
                "createdAt": _now(),
            },
        )
    if store.get_key(config.key) is None:
        store.put_key(
            config.key,
            {
                "kind": "config",
                "key": config.key,
                "parent": config.parent,
                "inputs": dict(config.inputs),
                "createdAt": _now(),
            },
        )


def _layers_present(store: Store, record: Mapping[str, Any]) -> bool:
    return all(store.has_blob(layer.digest) for layer in layers_of(record))


# -- what to publish ------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    path: Path


@dataclass(frozen=True)
class ManifestOut:
    tag: str
    data: bytes
    media_type: str = oci.OCI_MANIFEST


@dataclass
class Publication:
    """Blobs (all in the local store) and manifests to send, steps before the image."""

    store: Store
    blobs: dict[str, Blob] = field(default_factory=dict)
    manifests: list[ManifestOut] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    def blob(self, digest: str, media_type: str) -> dict[str, Any]:
        path = self.store.blob_path(digest)
        if not path.is_file():
            raise NotFoundError(
                f"blob {digest} is not in the local store (pruned?)",
                hint="build again (`microagent build`) and retry",
            )
        size = path.stat().st_size
        self.blobs[digest] = Blob(digest, size, path)
        return {"mediaType": media_type, "digest": digest, "size": size}

    def data(self, data: bytes, media_type: str) -> dict[str, Any]:
        return self.blob(str(self.store.put_blob_bytes(data)), media_type)

    def manifest(
        self,
        tag: str,
        config: dict[str, Any],
        layers: Sequence[LayerRef],
        annotations: Mapping[str, str],
        artifact: str | None = None,
    ) -> None:
        for layer in layers:
            self.blob(layer.digest, layer.descriptor()["mediaType"])
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": config,
            "layers": [layer.descriptor() for layer in layers],
            "annotations": dict(annotations),
        }
        if artifact:
            doc["artifactType"] = artifact
        self.manifests.append(ManifestOut(tag, canonical_json(doc)))


def local_chain(store: Store, leaf: str) -> list[dict[str, Any]]:
    """The local records from the base step down to ``leaf``."""
    chain: list[dict[str, Any]] = []
    current: str | None = leaf
    while current:
        record = store.get_key(current)
        if record is None:
            raise NotFoundError(
                f"step {current[:19]}… is not built in the local store",
                hint="run `microagent build --file SPEC` first",
            )
        chain.append(record)
        parent = record.get("parent")
        current = str(parent) if parent else None
    chain.reverse()
    if chain[0].get("kind") != StepKind.BASE.value:
        raise IntegrityError(f"the chain of {leaf[:19]}… does not start at a base step")
    return chain


def prepare(store: Store, leaf: str, *, image_tag: str | None = None) -> Publication:
    """Manifests for every step from the base down to ``leaf``; with ``image_tag`` (and a
    ``config`` leaf) the image as well, otherwise the leaf's own manifest under that tag."""
    chain = local_chain(store, leaf)
    pub = Publication(store)
    builder = _ManifestBuilder(pub, _base_config(store, chain[0]))
    for record in chain:
        builder.add_step(record)
    rootfs = [r for r in chain if r["kind"] in (StepKind.BASE.value, StepKind.SETUP.value)][-1]
    packed = ensure_rootfs_image(store, rootfs)
    if packed is not None:
        builder.add_rootfs_image(str(rootfs["key"]), packed)
    if image_tag:
        if chain[-1]["kind"] == StepKind.CONFIG.value:
            builder.add_image(image_tag, chain)
        else:
            last = pub.manifests[-1]
            pub.manifests.append(ManifestOut(image_tag, last.data, last.media_type))
    return pub


def ensure_rootfs_image(store: Store, record: Mapping[str, Any]) -> Packed | None:
    """The zstd image of a setup step's built rootfs (made once, kept as a blob)."""
    if not rootfsimage.enabled() or record.get("kind") != StepKind.SETUP.value:
        return None
    known = record.get("rootfsImage")
    if isinstance(known, Mapping) and store.has_blob(str(known.get("blob"))):
        return Packed(
            str(known["blob"]), int(known["blobSize"]), str(known["digest"]), int(known["size"])
        )
    rootfs = record.get("rootfs")
    if not isinstance(rootfs, str) or not store.has_entry(rootfs):
        return None
    with store.scratch_dir() as work:
        path = work / "rootfs.ext4.zst"
        with path.open("wb") as fh:
            packed = rootfsimage.pack(store.entry_path(rootfs), fh)
        store.put_blob_file(path, packed.blob, expected_size=packed.blob_size)
    store.put_key(str(record["key"]), {**record, "rootfsImage": packed.to_json()})
    return packed


def _base_config(store: Store, record: Mapping[str, Any]) -> dict[str, Any]:
    with store.open_blob(str(record["config"])) as fh:
        return dict(oci.load_document(fh.read(), "base image config"))


def _base_documents(store: Store, record: Mapping[str, Any]) -> dict[str, bytes]:
    """The platform manifest and, when the key names an index, the index itself."""
    wanted = {str(record["manifest"]), str(record["inputs"]["digest"])}
    docs: dict[str, bytes] = {}
    for digest in sorted(wanted):
        if not store.has_blob(digest):
            _fetch_document(store, str(record["reference"]), digest)
        with store.open_blob(digest) as fh:
            docs[digest] = fh.read()
    return docs


def _fetch_document(store: Store, reference: str, digest: str) -> None:
    from microagent.build.base import source_for

    try:
        data = source_for(reference, Path.cwd()).document(digest)
    except MicroagentError as exc:
        raise NotFoundError(
            f"the base image index {digest[:19]}… is needed to publish, but: {exc.message}",
            hint="it is fetched once from the image's registry and then kept in the store",
        ) from exc
    store.put_blob_bytes(data, digest)


class _ManifestBuilder:
    def __init__(self, pub: Publication, base_config: dict[str, Any]) -> None:
        self.pub = pub
        self.base_config = base_config
        self.history: list[dict[str, Any]] | None = _history(base_config)
        self.files_layer: LayerRef | None = None
        self.rootfs_layers: tuple[LayerRef, ...] = ()

    def add_step(self, record: Mapping[str, Any]) -> None:
        kind = StepKind(record["kind"])
        layers = layers_of(record)
        summary = None
        if kind is StepKind.BASE:
            config = self.pub.blob(str(record["config"]), oci.OCI_CONFIG)
            self.rootfs_layers = layers
        elif kind is StepKind.SETUP:
            self._note_history(f"microagent setup: {record['inputs'].get('run', '')}")
            config = self.pub.data(self._image_config(layers, {}), oci.OCI_CONFIG)
            self.rootfs_layers = layers
        else:
            config = self.pub.data(EMPTY_JSON, EMPTY_MEDIA_TYPE)
            if kind is StepKind.FILES:
                self.files_layer = layers[-1]
            else:
                summary = _summary(record["inputs"])
        step = self._published(record, kind, layers, summary)
        annotations = {STEP_ANNOTATION: canonical_json(step.to_json()).decode()}
        artifact = ARTIFACT_TYPE if kind in (StepKind.FILES, StepKind.CONFIG) else None
        self.pub.manifest(step_tag(step.key), config, layers, annotations, artifact)
        self.pub.keys.append(step.key)

    def _published(
        self,
        record: Mapping[str, Any],
        kind: StepKind,
        layers: tuple[LayerRef, ...],
        summary: Mapping[str, Any] | None,
    ) -> PublishedStep:
        inputs = dict(record["inputs"])
        base = None
        if kind is StepKind.BASE:
            docs = _base_documents(self.pub.store, record)
            base = BaseDocs(
                str(record["reference"]), str(record["manifest"]), str(record["config"]), docs
            )
        return PublishedStep(
            key=str(record["key"]),
            kind=kind,
            parent=record.get("parent"),
            inputs=None if kind is StepKind.CONFIG else inputs,
            inputs_digest=inputs_digest(inputs),
            layers=layers,
            base=base,
            summary=summary,
        )

    def _note_history(self, created_by: str) -> None:
        if self.history is not None:
            self.history.append({"created": _epoch_iso(), "created_by": created_by})

    def _image_config(self, layers: Sequence[LayerRef], extra: Mapping[str, Any]) -> bytes:
        config = dict(self.base_config)
        config["created"] = _epoch_iso()
        config["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
        if self.history is not None:
            config["history"] = list(self.history)
        else:
            config.pop("history", None)
        if extra:
            runtime = dict(config.get("config") or {})
            labels = {**dict(runtime.get("Labels") or {}), **dict(extra.get("Labels") or {})}
            config["config"] = {**runtime, **extra, "Labels": labels}
        return canonical_json(config)

    def add_rootfs_image(self, key: str, packed: Packed) -> None:
        """An artifact ``rootfs-<hex>`` holding the step's built ext4 (zstd)."""
        blob = LayerRef(rootfsimage.MEDIA_TYPE, packed.blob, packed.blob_size, packed.digest)
        info = {"key": key, "digest": packed.digest, "size": packed.size}
        config = self.pub.data(EMPTY_JSON, EMPTY_MEDIA_TYPE)
        annotations = {ROOTFS_ANNOTATION: canonical_json(info).decode()}
        self.pub.manifest(rootfs_tag(key), config, [blob], annotations, ROOTFS_ARTIFACT_TYPE)

    def add_image(self, tag: str, chain: Sequence[Mapping[str, Any]]) -> None:
        """The complete image: rootfs layers + files layer, config from the config step."""
        if self.files_layer is None:
            raise IntegrityError("the chain has no files step")
        inputs = chain[-1]["inputs"]
        layers = (*self.rootfs_layers, self.files_layer)
        self._note_history("microagent files")
        config = self.pub.data(
            self._image_config(layers, _runtime_config(inputs, chain)), oci.OCI_CONFIG
        )
        annotations = {
            "org.opencontainers.image.title": str(inputs.get("hostname", "")),
            LABEL + "config-key": str(chain[-1]["key"]),
        }
        self.pub.manifest(tag, config, layers, annotations)


def _history(config: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The base history if it is consistent with the layer count (else drop it)."""
    history = config.get("history")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        return None
    layers = sum(1 for h in history if not h.get("empty_layer"))
    return [dict(h) for h in history] if layers == len(diff_ids) else None


def _summary(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What a config step may tell the world: names, never environment values."""
    return {
        "entrypoint": list(inputs.get("entrypoint") or []),
        "envKeys": sorted(inputs.get("env") or {}),
        "runtimeEnvKeys": list(inputs.get("runtimeEnvKeys") or []),
        "outputs": list(inputs.get("outputs") or []),
    }


def _runtime_config(
    inputs: Mapping[str, Any], chain: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    summary = _summary(inputs)
    rootfs = [r for r in chain if r["kind"] in (StepKind.BASE.value, StepKind.SETUP.value)][-1]
    labels = {
        LABEL + "rootfs-key": str(rootfs["key"]),
        LABEL + "config-key": str(chain[-1]["key"]),
        LABEL + "env-keys": ",".join(summary["envKeys"]),
        LABEL + "runtime-env-keys": ",".join(summary["runtimeEnvKeys"]),
        LABEL + "outputs": json.dumps(summary["outputs"], sort_keys=True),
        LABEL + "hostname": str(inputs.get("hostname", "")),
        LABEL + "resources": json.dumps(inputs.get("resources") or {}, sort_keys=True),
        LABEL + "network": str((inputs.get("network") or {}).get("mode", "")),
    }
    return {
        "Entrypoint": summary["entrypoint"] or None,
        "Cmd": None,
        "WorkingDir": str(inputs.get("workdir") or "/"),
        "Labels": labels,
    }


# -- where to publish -----------------------------------------------------------------------


class Target(Protocol):
    """A registry repository or an OCI layout folder."""

    where: str

    def put_blob(self, blob: Blob) -> bool: ...  # True when it had to be sent

    def put_manifest(self, manifest: ManifestOut) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PublishReport:
    where: str
    uploaded: int
    uploaded_bytes: int
    skipped: int
    manifests: tuple[str, ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "blobsUploaded": self.uploaded,
            "bytesUploaded": self.uploaded_bytes,
            "blobsSkipped": self.skipped,
            "tags": list(self.manifests),
            "seconds": round(self.seconds, 3),
        }


def publish(pub: Publication, target: Target, say: Say | None = None) -> PublishReport:
    """Send every blob the target lacks (in parallel), then the manifests in order."""
    began = time.monotonic()
    blobs = sorted(pub.blobs.values(), key=lambda b: b.digest)
    with ThreadPoolExecutor(UPLOAD_WORKERS) as pool:
        sent = list(pool.map(target.put_blob, blobs))
    for manifest in pub.manifests:
        target.put_manifest(manifest)
    target.close()
    uploaded = [b for b, was_sent in zip(blobs, sent, strict=True) if was_sent]
    report = PublishReport(
        target.where,
        len(uploaded),
        sum(b.size for b in uploaded),
        len(blobs) - len(uploaded),
        tuple(m.tag for m in pub.manifests),
        time.monotonic() - began,
    )
    if say is not None:
        say(
            f"published {len(pub.manifests)} manifests to {target.where}: "
            f"{report.uploaded} blobs sent ({report.uploaded_bytes / 1e6:.1f} MB), "
            f"{report.skipped} already there"
        )
    return report
