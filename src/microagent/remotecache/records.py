"""The published form of a build step: one tag per step key, one OCI manifest, one record.

A cache repository holds, for every step key ``K``, the tag ``step-<64 hex of K>`` pointing at
an OCI image manifest whose annotation ``io.microagent.step.v1`` is the step's record (canonical
JSON) and whose layers are the step's layer chain. "Is K built?" is one GET of that tag.

Nothing in a record is trusted until it is verified here (pure, no I/O):

* the record names ``K`` and, with its inputs, hashes back to ``K`` (``compiler.keys.step_key``);
  against a local plan step, kind, parent and the digest of the inputs must match as well;
* the manifest's layers are the record's layers, and a setup step's chain is its parent's
  chain plus one layer;
* a base step carries the original image documents (index and/or manifest, base64): they must
  hash to the image digest in the key and name exactly the record's config and layers, so base
  layers from a cache are as trustworthy as the image they claim to be.

Layer *contents* are verified later, by digest as they are stored and by diff_id as they are
flattened. ``config`` steps publish only the digest of their inputs and a summary with the
*names* of environment variables: values never leave the machine.

A setup step's record may name its packed root filesystem (``rootfsImage``: blob digest and
size, image digest and size). A ``rootfs-<hex>`` artifact stands in for flattening only if it
describes exactly that image and the image is within :func:`image_size_limit` of the step's
layers (:func:`rootfs_image_problem`); its bytes are checked as they are unpacked.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from microagent.compiler.keys import StepKind, inputs_digest, step_key
from microagent.compiler.plan import Step
from microagent.digests import is_digest, key_hex, sha256_digest
from microagent.errors import IntegrityError
from microagent.ext4.packed import FORMAT as ROOTFS_FORMAT
from microagent.ext4.packed import MEDIA_TYPES as ROOTFS_MEDIA_TYPES
from microagent.oci import documents as oci
from microagent.store.records import (
    BaseOrigin,
    LayerRef,
    PackedImage,
    StepRecord,
    layers_from_json,
    rootfs_entry,
)

STEP_ANNOTATION = "io.microagent.step.v1"
STEP_TAG_PREFIX = "step-"
ARTIFACT_TYPE = "application/vnd.microagent.step.v1"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
RECORD_VERSION = 1
# A rootfs image may decode to at most IMAGE_SLACK + IMAGE_EXPANSION x the compressed layers.
IMAGE_SLACK = 256 << 20
IMAGE_EXPANSION = 16
_OCI_LAYER_TYPE = {oci.DOCKER_LAYER_GZIP: oci.OCI_LAYER_GZIP}


def step_tag(key: str) -> str:
    """The tag of a step key: ``step-<64 hex>`` (valid tag syntax, one per key)."""
    return STEP_TAG_PREFIX + key_hex(key)


def key_of_tag(tag: str) -> str | None:
    """The step key a ``step-<hex>`` tag stands for, else None."""
    if not tag.startswith(STEP_TAG_PREFIX):
        return None
    key = "sha256:" + tag.removeprefix(STEP_TAG_PREFIX)
    return key if is_digest(key) else None


def oci_layer_type(media_type: str) -> str:
    """Docker's gzip layer type spelled the OCI way (same bytes), others unchanged."""
    return _OCI_LAYER_TYPE.get(media_type, media_type)


def _bad(what: str) -> IntegrityError:
    return IntegrityError(
        f"remote step record: {what}",
        hint="the cache entry is damaged or was not written by microagent; nothing was stored",
    )


def layer_descriptor(layer: LayerRef) -> dict[str, Any]:
    """The OCI descriptor of a layer (Docker's gzip type spelled the OCI way)."""
    return {
        "mediaType": oci_layer_type(layer.media_type),
        "digest": layer.digest,
        "size": layer.size,
    }


def oci_layers(layers: Sequence[LayerRef]) -> tuple[LayerRef, ...]:
    """Layers as they are published: media types in OCI spelling."""
    return tuple(replace(layer, media_type=oci_layer_type(layer.media_type)) for layer in layers)


def layers_of(raw: object) -> tuple[LayerRef, ...]:
    """The ``layers`` of a published record, media types in OCI spelling."""
    try:
        return oci_layers(layers_from_json(raw))
    except IntegrityError as exc:
        raise _bad(exc.message) from exc


@dataclass(frozen=True)
class BaseDocs:
    """What a base step publishes besides its layers: the image's own documents."""

    reference: str
    manifest: str
    config: str
    documents: Mapping[str, bytes]

    def to_json(self) -> dict[str, Any]:
        docs = {d: base64.b64encode(data).decode() for d, data in sorted(self.documents.items())}
        return {
            "reference": self.reference,
            "manifest": self.manifest,
            "config": self.config,
            "documents": docs,
        }

    @classmethod
    def from_json(cls, raw: object) -> BaseDocs:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("documents"), Mapping):
            raise _bad("`base` is not an object with `documents`")
        docs: dict[str, bytes] = {}
        for digest, text in raw["documents"].items():
            try:
                data = base64.b64decode(str(text), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise _bad(f"document {digest} is not base64") from exc
            if sha256_digest(data) != digest:
                raise _bad(f"document {str(digest)[:19]}… does not match its digest")
            docs[str(digest)] = data
        manifest, config = raw.get("manifest"), raw.get("config")
        if not all(is_digest(d) for d in (manifest, config)):
            raise _bad("`base` needs manifest and config digests")
        return cls(str(raw.get("reference", "")), str(manifest), str(config), docs)


@dataclass(frozen=True)
class PublishedStep:
    """A step record as it travels in a manifest annotation."""

    key: str
    kind: StepKind
    parent: str | None
    inputs: Mapping[str, Any] | None  # None for config steps: only the digest travels
    inputs_digest: str
    layers: tuple[LayerRef, ...]
    base: BaseDocs | None = None
    summary: Mapping[str, Any] | None = None
    rootfs_image: PackedImage | None = None  # setup steps: the packed rootfs published with it

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": RECORD_VERSION,
            "key": self.key,
            "kind": self.kind.value,
            "parent": self.parent,
            "inputsDigest": self.inputs_digest,
            "layers": [layer.to_json() for layer in self.layers],
        }
        if self.inputs is not None:
            out["inputs"] = dict(self.inputs)
        if self.base is not None:
            out["base"] = self.base.to_json()
        if self.summary is not None:
            out["summary"] = dict(self.summary)
        if self.rootfs_image is not None:
            out["rootfsImage"] = self.rootfs_image.to_json()
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PublishedStep:
        if raw.get("version") != RECORD_VERSION:
            raise _bad(f"unsupported record version {raw.get('version')!r}")
        try:
            kind = StepKind(raw.get("kind"))
        except ValueError:
            raise _bad(f"unknown step kind {raw.get('kind')!r}") from None
        key, parent, digest = raw.get("key"), raw.get("parent"), raw.get("inputsDigest")
        if not (is_digest(key)):
            raise _bad(f"bad key {key!r}")
        if parent is not None and not (is_digest(parent)):
            raise _bad(f"bad parent {parent!r}")
        if not (is_digest(digest)):
            raise _bad(f"bad inputsDigest {digest!r}")
        inputs = raw.get("inputs")
        if inputs is not None and not isinstance(inputs, Mapping):
            raise _bad("`inputs` is not an object")
        base = BaseDocs.from_json(raw["base"]) if kind is StepKind.BASE else None
        summary = raw.get("summary")
        summary = summary if isinstance(summary, Mapping) else None
        layers, image = layers_of(raw.get("layers")), _rootfs_image(raw.get("rootfsImage"), kind)
        return cls(key, kind, parent, inputs, digest, layers, base, summary, image)

    def verify(self, key: str, expected: Step | None = None) -> None:
        """The record is for ``key`` (and for the local plan step ``expected``, if given)."""
        if self.key != key:
            raise _bad(f"asked for {key[:19]}…, the record is for {self.key[:19]}…")
        if self.inputs is not None:
            if inputs_digest(self.inputs) != self.inputs_digest:
                raise _bad("inputs do not match inputsDigest")
            if step_key(self.parent, self.kind, self.inputs) != key:
                raise _bad(f"inputs do not hash to the key {key[:19]}…")
        elif self.kind is not StepKind.CONFIG:
            raise _bad(f"a {self.kind.value} step must carry its inputs")
        if expected is not None:
            _match_plan_step(self, expected)

    @property
    def layer(self) -> LayerRef | None:
        """The layer this step added (setup, files), else None."""
        return self.layers[-1] if self.kind.adds_layer and self.layers else None

    def to_local(self, where: str, *, origin: BaseOrigin | None = None) -> StepRecord:
        """The local record of this (verified) step, restored from ``where``."""
        if self.inputs is None:
            raise _bad(f"a {self.kind.value} step without inputs cannot be recorded locally")
        rootfs = rootfs_entry(self.key) if self.kind.in_rootfs else None
        return StepRecord(
            self.kind,
            self.key,
            self.parent,
            dict(self.inputs),
            self.layers,
            rootfs=rootfs,
            origin=origin,
            source=where,
        )


def _rootfs_image(raw: object, kind: StepKind) -> PackedImage | None:
    """The ``rootfsImage`` of a record (setup steps only); None when absent (older records)."""
    if raw is None:
        return None
    if kind is not StepKind.SETUP or not isinstance(raw, Mapping):
        raise _bad(f"a {kind.value} step cannot name a rootfs image like {str(raw)[:40]!r}")
    try:
        return PackedImage.from_json(raw)
    except IntegrityError as exc:
        raise _bad(exc.message) from exc


def _match_plan_step(step: PublishedStep, expected: Step) -> None:
    if (step.kind, step.parent) != (expected.kind, expected.parent):
        raise _bad("kind or parent differ from the local plan")
    if step.inputs_digest != inputs_digest(expected.inputs):
        raise _bad("inputs differ from the local plan")


def _annotated(data: bytes, tag: str, annotation: str) -> tuple[Mapping[str, Any], Any]:
    """A manifest and the JSON document in its ``annotation`` (which it must carry)."""
    doc = oci.load_document(data, f"manifest {tag}")
    annotations = doc.get("annotations")
    raw = annotations.get(annotation) if isinstance(annotations, Mapping) else None
    if not isinstance(raw, str):
        raise _bad(f"manifest {tag} has no {annotation} annotation")
    return doc, oci.load_document(raw.encode(), f"{annotation} of {tag}")


def parse_step_manifest(data: bytes, key: str, expected: Step | None = None) -> PublishedStep:
    """Parse and verify the manifest a ``step-<hex>`` tag points at."""
    doc, record = _annotated(data, step_tag(key), STEP_ANNOTATION)
    step = PublishedStep.from_json(record)
    step.verify(key, expected)
    layers = doc.get("layers")
    listed = (
        [(d.get("digest"), d.get("size")) for d in layers if isinstance(d, Mapping)]
        if (isinstance(layers, list))
        else None
    )
    if listed != [(layer.digest, layer.size) for layer in step.layers]:
        raise _bad(f"manifest {step_tag(key)} lists other layers than its record")
    return step


def verify_chain(step: PublishedStep, parent_layers: Sequence[LayerRef]) -> None:
    """A setup step's layers are its parent's layers plus exactly one."""
    if step.kind is not StepKind.SETUP:
        return
    mine = [(layer.digest, layer.diff_id) for layer in step.layers[:-1]]
    theirs = [(layer.digest, layer.diff_id) for layer in parent_layers]
    if len(step.layers) != len(parent_layers) + 1 or mine != theirs:
        raise _bad(f"step {step.key[:19]}… does not extend its parent's layers")


def verify_base(step: PublishedStep) -> oci.Manifest:
    """A base step's documents hash to the image digest of its key and name its layers."""
    if step.base is None or step.inputs is None:
        raise _bad("a base step must carry the image documents")
    docs = step.base.documents
    top_digest = str(step.inputs.get("digest"))
    if top_digest not in docs:
        raise _bad(f"the image document {top_digest[:19]}… is missing")
    top = oci.load_document(docs[top_digest], "base image document")
    kind = oci.media_type_of(top, None)
    manifest_digest = top_digest
    if kind in oci.INDEX_TYPES:
        platform = str(step.inputs.get("platform"))
        manifest_digest = oci.select_platform(oci.parse_index(top, kind), platform).digest
    if manifest_digest != step.base.manifest or manifest_digest not in docs:
        raise _bad("the base image's platform manifest is missing or differs")
    doc = oci.load_document(docs[manifest_digest], "base image manifest")
    manifest = oci.parse_manifest(doc, oci.media_type_of(doc, None))
    if manifest.config.digest != step.base.config:
        raise _bad("the base image config differs from its manifest")
    if [layer.digest for layer in manifest.layers] != [layer.digest for layer in step.layers]:
        raise _bad("the base layers differ from the image manifest")
    return manifest


# -- rootfs images (a setup step's built ext4, zstd) ------------------------------------------

ROOTFS_TAG_PREFIX = "rootfs-"
ROOTFS_ANNOTATION = "io.microagent.rootfs.v1"


def rootfs_tag(key: str, image_format: int = ROOTFS_FORMAT) -> str:
    """The tag of a step's rootfs image artifact: ``rootfs-<64 hex>`` for format 1,
    ``rootfs-v<format>-<64 hex>`` after it (a version that cannot read a format never finds
    it, and flattens, instead of refusing the cache)."""
    version = "" if image_format == 1 else f"v{image_format}-"
    return ROOTFS_TAG_PREFIX + version + key_hex(key)


def parse_rootfs_manifest(data: bytes, key: str, image_format: int = ROOTFS_FORMAT) -> PackedImage:
    """The image a rootfs artifact of ``image_format`` describes, after checking it is for
    ``key`` and in that format."""
    doc, info = _annotated(data, rootfs_tag(key, image_format), ROOTFS_ANNOTATION)
    if info.get("key") != key:
        raise _bad(f"rootfs image for {str(info.get('key'))[:19]}… under the tag of {key[:19]}…")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1:
        raise _bad("a rootfs manifest has exactly one blob")
    blob = oci.descriptor(layers[0], "rootfs blob")
    if blob.media_type != ROOTFS_MEDIA_TYPES.get(image_format):
        raise _bad(f"unexpected rootfs media type {blob.media_type!r}")
    digest, size = info.get("digest"), info.get("size")
    if not (is_digest(digest)) or not isinstance(size, int):
        raise _bad("the rootfs image record needs digest and size")
    return PackedImage(blob.digest, blob.size, digest, size, image_format)


def image_size_limit(layers: Sequence[LayerRef]) -> int:
    """The largest decoded rootfs image accepted in place of flattening ``layers``.

    An honest image is ``mke2fs`` of the flattened tree: the content (≈ the uncompressed
    layers, files rounded up to 4 KiB blocks) plus 5 % and 64 MiB of headroom, mostly
    holes. The bound is what a hostile record may make the host decode and hash: a constant
    plus :data:`IMAGE_EXPANSION` times the layer bytes it makes the host download anyway.
    An honest image above it (a tree of tiny or zero-filled files) is flattened instead.
    """
    return IMAGE_SLACK + IMAGE_EXPANSION * sum(layer.size for layer in layers)


def rootfs_image_problem(step: PublishedStep, published: PackedImage) -> str | None:
    """Why the ``rootfs-<hex>`` artifact ``published`` cannot stand in for flattening the
    verified ``step``'s layers, or None if it can (its bytes are checked when unpacked)."""
    named = step.rootfs_image
    if named is None:
        return "the step record names no rootfs image"
    if published != named:
        return "the rootfs artifact differs from the image the step record names"
    limit = image_size_limit(step.layers)
    if named.size > limit:
        return f"the image claims {named.size} bytes, more than the {limit} allowed for its layers"
    if named.blob_size > named.size + named.size // 128 + (64 << 10):
        return f"the blob claims {named.blob_size} bytes, more than zstd needs for the image"
    return None
