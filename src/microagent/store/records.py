"""Typed step records: what the store knows about each built step key.

``keys/<hex>.json`` holds one :class:`StepRecord` per step key: the step's kind, parent and
inputs (so the key can be recomputed), its layer chain, and for ``base``/``setup`` steps the
name of the built root filesystem (``rootfs/<hex>.ext4``), or for a setup step its root as a
stack (:class:`RootStack`: an ancestor's image under layer disks, ``layerdisks/<hex>.ext4``
keyed by each layer's diff_id). A stacked record has no ``rootfs`` field, so a version that
does not know stacks sees the step as not built and builds it again.

Every writer (pull, setup build, remote restore, files layer) and every reader goes through
this module; a record that does not parse is a cache miss, never a crash.

A record is written last, after everything it names exists, so its presence means "built".
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from microagent.compiler.keys import StepKind
from microagent.digests import is_digest, key_hex
from microagent.errors import IntegrityError
from microagent.frozen import Frozen
from microagent.store.content import Store

LAYER_DISK_KIND = "layerdisks"
MAX_STACK = 8  # layer disks in a stacked root; leaves the VM room for a spec's disks
_ROOTFS_NAME = re.compile(r"rootfs/[0-9a-f]{64}\.ext4")
_LAYER_DISK_NAME = re.compile(LAYER_DISK_KIND + r"/[0-9a-f]{64}\.ext4")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def rootfs_entry(key: str) -> str:
    """The store entry name of a step's built root filesystem."""
    return f"rootfs/{key_hex(key)}.ext4"


def layer_disk_entry(diff_id: str) -> str:
    """The store entry name of a layer's disk (``ext4.layerdisk``), keyed by its diff_id."""
    return f"{LAYER_DISK_KIND}/{key_hex(diff_id)}.ext4"


def _bad(what: str) -> IntegrityError:
    return IntegrityError(f"step record: {what}")


def _digest(raw: Mapping[str, Any], name: str, what: str) -> str:
    value = raw.get(name)
    if not is_digest(value):
        raise _bad(f"bad {what} {name} {value!r}")
    return value


def _size(raw: Mapping[str, Any], name: str, what: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(f"bad {what} {name} {value!r}")
    return value


@dataclass(frozen=True, eq=False, repr=False)
class LayerRef(Frozen):
    """One layer of a step: the blob (media type, digest, size) and its diff_id."""

    media_type: str
    digest: str
    size: int
    diff_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "diffId": self.diff_id,
        }

    @classmethod
    def from_json(cls, raw: object) -> LayerRef:
        if not isinstance(raw, Mapping):
            raise _bad("a layer is not an object")
        digest, size = _digest(raw, "digest", "layer"), _size(raw, "size", "layer")
        diff_id, media_type = _digest(raw, "diffId", "layer"), raw.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise _bad(f"layer: bad mediaType {media_type!r}")
        return cls(media_type, digest, size, diff_id)


def layers_from_json(raw: object) -> tuple[LayerRef, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _bad("`layers` is not a list")
    return tuple(LayerRef.from_json(item) for item in raw)


@dataclass(frozen=True, eq=False, repr=False)
class BaseOrigin(Frozen):
    """Where a base step's content came from: the image reference and its documents."""

    reference: str
    manifest: str  # the platform manifest's digest (a blob in the store)
    config: str  # the image config's digest (a blob in the store)


@dataclass(frozen=True, eq=False, repr=False)
class PackedImage(Frozen):
    """A step's built root filesystem as one blob (``blob``) of an image (``digest``).

    ``format`` says how the blob and ``digest`` are made (``ext4.packed``): 1, one zstd frame
    of the whole image and its sha256 (records without the field); 2, the data runs only and
    a sparse digest. A format this version does not know is kept, and not unpacked."""

    blob: str
    blob_size: int
    digest: str
    size: int
    format: int = 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "blob": self.blob,
            "blobSize": self.blob_size,
            "digest": self.digest,
            "size": self.size,
        }
        if self.format != 1:  # format 1 records stay as older versions wrote them
            out["format"] = self.format
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PackedImage:
        return cls(
            _digest(raw, "blob", "rootfs image"),
            _size(raw, "blobSize", "rootfs image"),
            _digest(raw, "digest", "rootfs image"),
            _size(raw, "size", "rootfs image"),
            _size(raw, "format", "rootfs image") if "format" in raw else 1,
        )


@dataclass(frozen=True, eq=False, repr=False)
class RootStack(Frozen):
    """A setup step's root as a stack: layer disks (bottom first) over the image of an
    ancestor step (the base's rootfs, or a step whose chain was merged into one image)."""

    image: str  # store entry of the bottom image (rootfs/<hex>.ext4)
    layers: tuple[str, ...]  # store entries of the layer disks, bottom first

    @property
    def entries(self) -> tuple[str, ...]:
        return (self.image, *self.layers)

    def on(self, layer_disk: str) -> RootStack:
        """This stack with one more layer disk on top."""
        return RootStack(self.image, (*self.layers, layer_disk))

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "layers": list(self.layers)}

    @classmethod
    def from_json(cls, raw: object) -> RootStack:
        if not isinstance(raw, Mapping):
            raise _bad("`rootStack` is not an object")
        image, layers = raw.get("image"), raw.get("layers")
        if not isinstance(image, str) or not _ROOTFS_NAME.fullmatch(image):
            raise _bad(f"rootStack: bad image {str(image)[:80]!r}")
        if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_STACK:
            raise _bad(f"rootStack: `layers` is not a list of 1 to {MAX_STACK} layer disks")
        for name in layers:
            if not isinstance(name, str) or not _LAYER_DISK_NAME.fullmatch(name):
                raise _bad(f"rootStack: bad layer disk {str(name)[:80]!r}")
        return cls(image, tuple(layers))


@dataclass(frozen=True, eq=False, repr=False)
class StepRecord(Frozen):
    """A built step: enough to find its content and to recompute its key."""

    kind: StepKind
    key: str
    parent: str | None
    inputs: Mapping[str, Any]
    layers: tuple[LayerRef, ...] = ()
    rootfs: str | None = None  # store entry of the built ext4 (base and setup steps)
    stack: RootStack | None = None  # setup steps: the root as layer disks over an image
    origin: BaseOrigin | None = None  # base steps
    packed: PackedImage | None = None  # setup steps whose rootfs was packed for publishing
    created_at: str = field(default_factory=now)
    source: str | None = None  # the remote cache it was restored from

    @property
    def layer(self) -> LayerRef | None:
        """The layer this step added (setup and files steps), else None."""
        return self.layers[-1] if self.kind.adds_layer and self.layers else None

    @property
    def root_entries(self) -> tuple[str, ...]:
        """The store entries the step's root is made of: its one image, else its stack."""
        if self.rootfs is not None:
            return (self.rootfs,)
        return self.stack.entries if self.stack is not None else ()

    def with_packed(self, packed: PackedImage) -> StepRecord:
        return replace(self, packed=packed)

    def with_rootfs(self, rootfs: str) -> StepRecord:
        """The record once its chain is also built as one image (the stack is kept)."""
        return replace(self, rootfs=rootfs)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind.value,
            "key": self.key,
            "parent": self.parent,
            "inputs": dict(self.inputs),
            "createdAt": self.created_at,
        }
        if self.kind is not StepKind.CONFIG:
            out["layers"] = [layer.to_json() for layer in self.layers]
        if self.kind.adds_layer:
            out["layer"] = self.layer.to_json() if self.layer else None
        if self.rootfs is not None:
            out["rootfs"] = self.rootfs
        if self.stack is not None:
            out["rootStack"] = self.stack.to_json()
        if self.origin is not None:
            out.update(
                reference=self.origin.reference,
                manifest=self.origin.manifest,
                config=self.origin.config,
            )
        if self.packed is not None:
            out["rootfsImage"] = self.packed.to_json()
        if self.source is not None:
            out["source"] = self.source
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> StepRecord:
        try:
            kind = StepKind(raw.get("kind"))
        except ValueError:
            raise _bad(f"unknown kind {raw.get('kind')!r}") from None
        parent, inputs, rootfs = raw.get("parent"), raw.get("inputs"), raw.get("rootfs")
        if parent is not None and not is_digest(parent):
            raise _bad(f"bad parent {parent!r}")
        if not isinstance(inputs, Mapping):
            raise _bad("`inputs` is not an object")
        if rootfs is not None and not isinstance(rootfs, str):
            raise _bad("`rootfs` is not a string")
        packed, stack = raw.get("rootfsImage"), raw.get("rootStack")
        if stack is not None and kind is not StepKind.SETUP:
            raise _bad(f"a {kind.value} step has no rootStack")
        return cls(
            kind=kind,
            key=_digest(raw, "key", "record"),
            parent=parent,
            inputs=dict(inputs),
            layers=layers_from_json(raw.get("layers")),
            rootfs=rootfs,
            stack=RootStack.from_json(stack) if stack is not None else None,
            origin=_origin(raw) if kind is StepKind.BASE else None,
            packed=PackedImage.from_json(packed) if isinstance(packed, Mapping) else None,
            created_at=str(raw.get("createdAt", "")),
            source=str(raw["source"]) if raw.get("source") else None,
        )


def _origin(raw: Mapping[str, Any]) -> BaseOrigin:
    return BaseOrigin(
        str(raw.get("reference", "")),
        _digest(raw, "manifest", "base record"),
        _digest(raw, "config", "base record"),
    )


# -- the store's records --------------------------------------------------------------------


def read_record(store: Store, key: str) -> StepRecord | None:
    """The record of ``key``; None when missing, unreadable or malformed (a miss)."""
    raw = store.get_key(key)
    if raw is None:
        return None
    try:
        record = StepRecord.from_json(raw)
    except IntegrityError:
        return None
    return record if record.key == key else None


def write_record(store: Store, record: StepRecord) -> None:
    """Write (or replace) a record; call it last, once everything it names exists."""
    store.put_key(record.key, record.to_json())


def all_records(store: Store) -> Iterator[StepRecord]:
    """Every readable record in the store, in key order."""
    keys = store.root / "keys"
    for path in sorted(keys.glob("*.json")) if keys.is_dir() else []:
        record = read_record(store, "sha256:" + path.stem)
        if record is not None:
            yield record


def rootfs_ready(
    store: Store, key: str, kinds: Sequence[StepKind] = (StepKind.BASE, StepKind.SETUP)
) -> StepRecord | None:
    """The record of a base/setup step (of ``kinds``) whose root filesystem exists (its one
    image, or every entry of its stack)."""
    record = read_record(store, key)
    if record is None or record.kind not in kinds:
        return None
    return record if root_of(store, record) is not None else None


@dataclass(frozen=True, eq=False, repr=False)
class Root(Frozen):
    """A built root on disk: one image, with layer disks (bottom first) stacked over it."""

    image: Path
    layers: tuple[Path, ...] = ()

    @property
    def top_first(self) -> tuple[Path, ...]:
        """The lowers in overlayfs' order (what ``ext4.overlay`` takes)."""
        return (*reversed(self.layers), self.image)


def whole_root(store: Store, record: StepRecord) -> RootStack | None:
    """The step's root as store entries: its one image if it exists (no layer disks), else
    its stack if every entry exists; None when neither is whole. What a stack over the step
    starts from."""
    if record.rootfs is not None and store.has_entry(record.rootfs):
        return RootStack(record.rootfs, ())
    stack = record.stack
    if stack is None or not all(store.has_entry(name) for name in stack.entries):
        return None
    return stack


def root_of(store: Store, record: StepRecord) -> Root | None:
    """Where the step's root is on disk (see :func:`whole_root`); None when it is not whole."""
    found = whole_root(store, record)
    if found is None:
        return None
    return Root(store.entry_path(found.image), tuple(map(store.entry_path, found.layers)))


def layers_stored(store: Store, record: StepRecord) -> bool:
    """Whether every layer blob of ``record`` is in the store."""
    return all(store.has_blob(layer.digest) for layer in record.layers)


def usable(store: Store, record: StepRecord) -> bool:
    """Whether a record counts as built: it has no root (files and config steps), or its
    root exists, or it can be flattened from stored layers (no VM)."""
    if not record.root_entries or root_of(store, record) is not None:
        return True
    return layers_stored(store, record)
