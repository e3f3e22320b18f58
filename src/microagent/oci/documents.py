"""OCI and Docker image documents: media types, parsing, platform selection (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from microagent.digests import is_digest
from microagent.errors import IntegrityError, RegistryError
from microagent.frozen import Frozen

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP})
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
MAX_DOCUMENT_BYTES = 4 << 20


@dataclass(frozen=True, eq=False, repr=False)
class Descriptor(Frozen):
    media_type: str
    digest: str
    size: int
    platform: str | None = None
    annotations: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True, eq=False, repr=False)
class Fetched(Frozen):
    """A manifest or index exactly as its source sent it, with its verified digest."""

    data: bytes
    digest: str
    media_type: str  # from the transport (HTTP header, index entry); may be ""
    where: str

    def document(self) -> Mapping[str, Any]:
        return load_document(self.data, f"manifest {self.digest}")

    def kind(self) -> str:
        """The media type, from the document itself first (see :func:`media_type_of`)."""
        return media_type_of(self.document(), self.media_type or None)


@dataclass(frozen=True, eq=False, repr=False)
class Manifest(Frozen):
    """A single-platform image manifest."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, eq=False, repr=False)
class Index(Frozen):
    """A multi-platform index (OCI index or Docker manifest list)."""

    media_type: str
    manifests: tuple[Descriptor, ...]


def _platform(raw: object) -> str | None:
    if not isinstance(raw, Mapping):
        return None
    text = f"{raw.get('os', '')}/{raw.get('architecture', '')}"
    return f"{text}/{raw['variant']}" if raw.get("variant") else text


def descriptor(raw: object, what: str) -> Descriptor:
    """Parse one descriptor (digest, size, type, platform, annotations), strictly."""
    return _descriptor(raw, what)


def _descriptor(raw: object, what: str) -> Descriptor:
    if not isinstance(raw, Mapping):
        raise IntegrityError(f"malformed {what}: not an object")
    digest, size = raw.get("digest"), raw.get("size")
    if not is_digest(digest):
        raise IntegrityError(f"malformed {what}: bad digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise IntegrityError(f"malformed {what}: bad size {size!r}")
    annotations = raw.get("annotations")
    return Descriptor(
        media_type=str(raw.get("mediaType", "")),
        digest=digest,
        size=size,
        platform=_platform(raw.get("platform")),
        annotations=dict(annotations) if isinstance(annotations, Mapping) else None,
    )


def load_document(data: bytes, what: str) -> Mapping[str, Any]:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise IntegrityError(f"{what} is larger than 4 MiB")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # json's C parser gives up on very deep nesting
        raise IntegrityError(f"{what} is nested too deeply") from exc
    if not isinstance(doc, dict):
        raise IntegrityError(f"{what} is not a JSON object")
    return doc


def media_type_of(doc: Mapping[str, Any], header: str | None) -> str:
    """The document's media type: its own field, else the HTTP header, else by shape."""
    declared = doc.get("mediaType") or header or ""
    if isinstance(declared, str) and declared in INDEX_TYPES | MANIFEST_TYPES:
        return str(declared)
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc:
        return OCI_MANIFEST
    raise RegistryError(f"unsupported manifest media type {declared!r}")


def parse_index(doc: Mapping[str, Any], media_type: str) -> Index:
    items = doc.get("manifests")
    if not isinstance(items, list):
        raise IntegrityError("malformed index: `manifests` is not a list")
    return Index(media_type, tuple(_descriptor(m, "index entry") for m in items))


def parse_manifest(doc: Mapping[str, Any], media_type: str) -> Manifest:
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise IntegrityError("malformed manifest: `layers` is not a list")
    parsed = tuple(_descriptor(layer, "layer descriptor") for layer in layers)
    for layer in parsed:
        if layer.media_type not in LAYER_TYPES:
            raise RegistryError(f"unsupported layer media type {layer.media_type!r}")
    return Manifest(media_type, _descriptor(doc.get("config"), "config descriptor"), parsed)


def select_platform(index: Index, platform: str) -> Descriptor:
    """The entry for ``linux/<arch>`` (variant-less match allowed), else a clear error."""
    wanted = platform.split("/")
    for entry in index.manifests:
        got = (entry.platform or "").split("/")
        if got[:2] == wanted[:2] and (len(wanted) < 3 or got[2:] == wanted[2:]):
            return entry
    available: Sequence[str] = sorted({m.platform or "?" for m in index.manifests})
    raise RegistryError(
        f"image has no manifest for {platform}",
        hint=f"available platforms: {', '.join(available) or 'none'}",
    )
