"""Publish built steps as OCI manifests: one per step key, plus the image, to a registry or a
layout folder.

Everything is derived from local step records (``keys/<key>.json``), so the same function
serves ``build --push``, ``--cache-to`` and ``cache export``. Per step (see ``steprecord``):

* ``base``  — the image's own config and layers; the record carries the image documents;
* ``setup`` — a runnable image of that step's root filesystem (base config, diff_ids and
  history extended): ``skopeo copy docker://REF:step-<hex> ...`` works; the last one also
  sends its packed rootfs (``rootfs-<hex>``), named in its record — unless the step was
  restored from a cache, whose image is never passed on;
* ``files`` — an artifact with the files layer; ``config`` — an artifact with no layers whose
  record holds only the digest of the inputs and the *names* of environment variables.

The image (tag) is base + setup + files layers with a config that runs what a microVM boot
runs: ``Entrypoint`` the spec's argv (``Cmd`` cleared, so a base image's ``Cmd`` is never
appended to it), ``Env`` the base image's ``Env`` with the spec's ``env`` over it, ``WorkingDir``
the spec's ``workdir`` or ``/``, and labels for outputs and env names. Runtime values
(``--env``, credentials) never reach a plan, a record or this config. Manifests are canonical
JSON with fixed times, so publishing the same build twice gives the same digests; blobs the
target already has are skipped (one HEAD each), the rest are uploaded in parallel before any
manifest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from microagent.compiler.keys import BaseInputs, SetupInputs, StepKind, inputs_digest
from microagent.compiler.plan import BuildPlan
from microagent.compiler.refs import parse_any_ref
from microagent.digests import canonical_json
from microagent.errors import IntegrityError, MicroagentError, NotFoundError
from microagent.ext4 import packed as packing
from microagent.layers.fileslayer import store_files_layer
from microagent.layers.tarwrite import source_date_epoch
from microagent.oci import documents as oci
from microagent.oci.registry import RegistryClient
from microagent.oci.transport import Repository, open_repository
from microagent.progress import Sent, upload
from microagent.remotecache.records import (
    ARTIFACT_TYPE,
    EMPTY_JSON,
    EMPTY_MEDIA_TYPE,
    ROOTFS_ANNOTATION,
    STEP_ANNOTATION,
    BaseDocs,
    PublishedStep,
    layer_descriptor,
    oci_layers,
    rootfs_tag,
    step_tag,
)
from microagent.store.content import Store
from microagent.store.records import (
    LayerRef,
    PackedImage,
    StepRecord,
    layers_stored,
    read_record,
    write_record,
)

Say = Callable[[str], None]
LABEL = "io.microagent."
ROOTFS_ARTIFACT_TYPE = "application/vnd.microagent.rootfs.v1"
UPLOAD_WORKERS = 4


def _epoch_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(source_date_epoch()))


# -- local records for the files and config steps ------------------------------------------


def record_files_and_config(store: Store, plan: BuildPlan) -> None:
    """Write the files layer and the ``files``/``config`` step records if they are missing."""
    files, config = plan.of_kind(StepKind.FILES)[0], plan.config_step
    record = read_record(store, files.key)
    if record is None or not layers_stored(store, record):
        layer = store_files_layer(store, plan.files)
        write_record(
            store, StepRecord(StepKind.FILES, files.key, files.parent, files.inputs, (layer,))
        )
    if read_record(store, config.key) is None:
        write_record(store, StepRecord(StepKind.CONFIG, config.key, config.parent, config.inputs))


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
        descriptors = [layer_descriptor(layer) for layer in layers]
        for descriptor in descriptors:
            self.blob(descriptor["digest"], descriptor["mediaType"])
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": config,
            "layers": descriptors,
            "annotations": dict(annotations),
        }
        if artifact:
            doc["artifactType"] = artifact
        self.manifests.append(ManifestOut(tag, canonical_json(doc)))


def local_chain(store: Store, leaf: str) -> list[StepRecord]:
    """The local records from the base step down to ``leaf``."""
    chain: list[StepRecord] = []
    current: str | None = leaf
    while current:
        record = read_record(store, current)
        if record is None:
            raise NotFoundError(
                f"step {current[:19]}… is not built in the local store",
                hint="run `microagent build --file SPEC` first",
            )
        chain.append(record)
        current = record.parent
    chain.reverse()
    if chain[0].kind is not StepKind.BASE:
        raise IntegrityError(f"the chain of {leaf[:19]}… does not start at a base step")
    return chain


def prepare(
    store: Store,
    leaf: str,
    *,
    image_tag: str | None = None,
    client: RegistryClient | None = None,
    packed_images: bool = True,
    ram: bool = True,
) -> Publication:
    """Manifests for every step from the base down to ``leaf``; with ``image_tag`` (and a
    ``config`` leaf) the image as well, otherwise the leaf's own manifest under that tag.

    ``client`` fetches a base image document the store lacks (an index); ``packed_images``
    adds the packed rootfs of the last setup step (see ``ext4.packed``), flattened first
    when the step's root is a stack (``ram``: the flatten may stage in RAM)."""
    chain = local_chain(store, leaf)
    pub = Publication(store)
    builder = _ManifestBuilder(pub, _base_config(store, chain[0]), client or RegistryClient())
    at = max(i for i, r in enumerate(chain) if r.kind.in_rootfs)
    image: PackedImage | None = None
    if packed_images:  # the chain then holds the step's record as packing left it
        chain[at], image = _with_rootfs_image(store, chain[at], ram=ram)
    rootfs = chain[at]
    for record in chain:  # the step record names the image it is published with
        builder.add_step(record, image if record.key == rootfs.key else None)
    if image is not None:
        builder.add_rootfs_image(rootfs.key, image)
    if image_tag:
        if chain[-1].kind is StepKind.CONFIG:
            builder.add_image(image_tag, chain)
        else:
            last = pub.manifests[-1]
            pub.manifests.append(ManifestOut(image_tag, last.data, last.media_type))
    return pub


def ensure_rootfs_image(
    store: Store, record: StepRecord, *, ram: bool = True
) -> PackedImage | None:
    """The zstd image of a setup step's built rootfs (made once, kept as a blob).

    A step whose root is a stack (no image of its own) gets its chain flattened into one
    image first (``ext4.rootfs.materialise``), so remote hits take the image instead of each
    flattening the layers. None when the step's layers are not all stored.

    None for a step restored from a remote cache (``source`` set): its rootfs may be the
    image another publisher pushed, and passing that on would let one cache's pusher choose
    what boots from every cache this machine publishes to. Its layers are published as
    usual, so consumers flatten them (verified against their digests and diff_ids).
    """
    return _with_rootfs_image(store, record, ram=ram)[1]


def _with_rootfs_image(
    store: Store, record: StepRecord, *, ram: bool
) -> tuple[StepRecord, PackedImage | None]:
    """``ensure_rootfs_image``, and the step's record as it is now in the store (its image
    named, its packed image recorded)."""
    if record.kind is not StepKind.SETUP or record.source is not None:
        return record, None
    packed = record.packed
    if packed is not None and packed.format in packing.MEDIA_TYPES and store.has_blob(packed.blob):
        return record, packed  # packed once (a format this version cannot publish is packed anew)
    if record.rootfs is None or not store.has_entry(record.rootfs):
        if not layers_stored(store, record):
            return record, None
        # deferred: flattening (layers, mke2fs) runs only to publish a stacked step's image
        from microagent.ext4.rootfs import materialise

        record = materialise(store, record, ram=ram)
    assert record.rootfs is not None  # materialise names the image it built
    with store.scratch_dir() as work:
        path = work / "rootfs.ext4.zst"
        with path.open("wb") as fh:
            image = packing.pack(store.entry_path(record.rootfs), fh)
        store.put_blob_file(path, image.blob, expected_size=image.blob_size)
    record = record.with_packed(image)
    write_record(store, record)
    return record, image


def _base_config(store: Store, record: StepRecord) -> dict[str, Any]:
    assert record.origin is not None
    with store.open_blob(record.origin.config) as fh:
        return dict(oci.load_document(fh.read(), "base image config"))


def _base_documents(store: Store, record: StepRecord, client: RegistryClient) -> dict[str, bytes]:
    """The platform manifest and, when the key names an index, the index itself."""
    assert record.origin is not None
    wanted = {record.origin.manifest, BaseInputs.of(record.inputs).digest}
    docs: dict[str, bytes] = {}
    for digest in sorted(wanted):
        if not store.has_blob(digest):
            _fetch_document(store, record.origin.reference, digest, client)
        with store.open_blob(digest) as fh:
            docs[digest] = fh.read()
    return docs


def _fetch_document(store: Store, reference: str, digest: str, client: RegistryClient) -> None:
    try:
        repo = open_repository(parse_any_ref(reference, Path.cwd()), client)
        data = repo.manifest(digest).data
    except MicroagentError as exc:
        raise NotFoundError(
            f"the base image index {digest[:19]}… is needed to publish, but: {exc.message}",
            hint="it is fetched once from the image's registry and then kept in the store",
        ) from exc
    store.put_blob_bytes(data, digest)


class _ManifestBuilder:
    def __init__(self, pub: Publication, base_config: dict[str, Any], client: RegistryClient):
        self.pub = pub
        self.client = client
        self.base_config = base_config
        self.history: list[dict[str, Any]] | None = _history(base_config)
        self.files_layer: LayerRef | None = None
        self.rootfs_layers: tuple[LayerRef, ...] = ()

    def add_step(self, record: StepRecord, image: PackedImage | None = None) -> None:
        kind = record.kind
        layers = oci_layers(record.layers)
        summary = None
        if kind is StepKind.BASE:
            assert record.origin is not None
            config = self.pub.blob(record.origin.config, oci.OCI_CONFIG)
            self.rootfs_layers = layers
        elif kind is StepKind.SETUP:
            self._note_history(f"microagent setup: {SetupInputs.of(record.inputs).run}")
            config = self.pub.data(self._image_config(layers, {}), oci.OCI_CONFIG)
            self.rootfs_layers = layers
        else:
            config = self.pub.data(EMPTY_JSON, EMPTY_MEDIA_TYPE)
            if kind is StepKind.FILES:
                self.files_layer = layers[-1]
            else:
                summary = _summary(record.inputs)
        step = replace(self._published(record, layers, summary), rootfs_image=image)
        annotations = {STEP_ANNOTATION: canonical_json(step.to_json()).decode()}
        artifact = ARTIFACT_TYPE if kind in (StepKind.FILES, StepKind.CONFIG) else None
        self.pub.manifest(step_tag(step.key), config, layers, annotations, artifact)
        self.pub.keys.append(step.key)

    def _published(
        self,
        record: StepRecord,
        layers: tuple[LayerRef, ...],
        summary: Mapping[str, Any] | None,
    ) -> PublishedStep:
        base = None
        if record.origin is not None:
            docs = _base_documents(self.pub.store, record, self.client)
            origin = record.origin
            base = BaseDocs(origin.reference, origin.manifest, origin.config, docs)
        return PublishedStep(
            key=record.key,
            kind=record.kind,
            parent=record.parent,
            inputs=None if record.kind is StepKind.CONFIG else dict(record.inputs),
            inputs_digest=inputs_digest(record.inputs),
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
            config["config"] = _overlay_runtime(config.get("config") or {}, extra)
        return canonical_json(config)

    def add_rootfs_image(self, key: str, image: PackedImage) -> None:
        """An artifact ``rootfs-<hex>`` holding the step's built ext4 (zstd)."""
        media_type = packing.MEDIA_TYPES[image.format]
        blob = LayerRef(media_type, image.blob, image.blob_size, image.digest)
        info = {"key": key, "digest": image.digest, "size": image.size}
        config = self.pub.data(EMPTY_JSON, EMPTY_MEDIA_TYPE)
        annotations = {ROOTFS_ANNOTATION: canonical_json(info).decode()}
        tag = rootfs_tag(key, image.format)
        self.pub.manifest(tag, config, [blob], annotations, ROOTFS_ARTIFACT_TYPE)

    def add_image(self, tag: str, chain: Sequence[StepRecord]) -> None:
        """The complete image: rootfs layers + files layer, config from the config step."""
        if self.files_layer is None:
            raise IntegrityError("the chain has no files step")
        inputs = chain[-1].inputs
        layers = (*self.rootfs_layers, self.files_layer)
        self._note_history("microagent files")
        runtime = _runtime_config(inputs, chain, self.base_config.get("config") or {})
        config = self.pub.data(self._image_config(layers, runtime), oci.OCI_CONFIG)
        annotations = {
            "org.opencontainers.image.title": str(inputs.get("hostname", "")),
            LABEL + "config-key": chain[-1].key,
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


def _overlay_runtime(runtime: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """The base image's runtime config with ``extra`` over it: labels merged, and a field
    ``extra`` sets to None removed (a base ``Cmd`` must not outlive a new ``Entrypoint``)."""
    labels = {**dict(runtime.get("Labels") or {}), **dict(extra.get("Labels") or {})}
    merged = {**dict(runtime), **dict(extra), "Labels": labels}
    return {name: value for name, value in merged.items() if value is not None}


def _image_env(base_env: Any, spec_env: Mapping[str, Any]) -> list[str]:
    """``Env`` as a boot sees it: the base image's entries (later ones win) with the spec's
    ``env`` over them, base order first."""
    entries = base_env if isinstance(base_env, list) else []
    env = dict(str(item).partition("=")[::2] for item in entries)
    env.update({str(name): str(value) for name, value in spec_env.items()})
    return [f"{name}={value}" for name, value in env.items()]


def _runtime_config(
    inputs: Mapping[str, Any], chain: Sequence[StepRecord], base_runtime: Mapping[str, Any]
) -> dict[str, Any]:
    """The image's runtime config: what ``workspace.create`` gives a boot (argv, ``Env`` =
    base + spec ``env``, workdir or ``/``); runtime ``--env`` values are not in ``inputs``."""
    summary = _summary(inputs)
    rootfs = [r for r in chain if r.kind.in_rootfs][-1]
    labels = {
        LABEL + "rootfs-key": rootfs.key,
        LABEL + "config-key": chain[-1].key,
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
        "Env": _image_env(base_runtime.get("Env"), inputs.get("env") or {}),
        "WorkingDir": str(inputs.get("workdir") or "/"),
        "Labels": labels,
    }


# -- sending --------------------------------------------------------------------------------


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


def _sender(target: Repository, blob: Blob) -> Callable[[Sent], bool]:
    return lambda sent: target.put_blob(blob.digest, blob.size, blob.path, sent)


def publish(pub: Publication, target: Repository, say: Say | None = None) -> PublishReport:
    """Send every blob the target lacks (in parallel), then the manifests in order."""
    began = time.monotonic()
    blobs = sorted(pub.blobs.values(), key=lambda b: b.digest)
    with ThreadPoolExecutor(UPLOAD_WORKERS) as pool:
        sent = list(pool.map(lambda b: upload(say, b.digest, b.size, _sender(target, b)), blobs))
    for manifest in pub.manifests:
        target.put_manifest(manifest.tag, manifest.data, manifest.media_type)
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
