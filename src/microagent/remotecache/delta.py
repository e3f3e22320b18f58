"""Delta hits: a remote hit's root filesystem derived from a local ancestor's image.

A team changes one late setup step, CI pushes, and a developer who built (or took) the chain
before it takes the hit. Downloading the hit's whole packed image (or flattening every layer)
costs the size of the image; this costs the size of the change. When the verified chain of a
hit reaches a step this store holds with its root filesystem (the step the chain stopped at, or
an ancestor of it whose image is there; a step whose root is a stack of layer disks is passed
over for the one below it), the layers published after that ancestor are fetched
(verified against their digests as ever) and applied in order onto a copy of the ancestor's
image with ``ext4.rootfs.derive_rootfs`` — the same in-place derive a locally built step gets.
Intermediate images are temporary: only the hit's root filesystem is kept.

With layer disks on, the nearest ancestor with a whole root (one image, or a stack of layer
disks) is taken instead, and the hit's root becomes that root with the missing layers' disks
stacked on it (:func:`find_delta` with ``stacked``; the restorer builds the disks in parallel
and falls back to the derive when the stack would be deeper than
:data:`~microagent.store.records.MAX_STACK`).

The rule (:func:`worth_it`): at most :data:`MAX_DELTA_LAYERS` layers, whose compressed sizes
sum to at most :data:`DELTA_FRACTION` of what the full hit would read — the packed image's
blob when the step record names one (and images are taken), else every layer of the chain
(the flatten's input).

Each layer blob comes from a hostile registry. It is decompressed into the store's scratch
space, hashed on the way and checked against its ``diff_id`` (a mismatch is an error, as in a
flatten), bounded by what a derive would take (:data:`ext4.derive.MAX_CHANGE_FRACTION` of the
image it goes onto; beyond that the hit is not derived), its members' names and hard-link
targets are checked for ``..`` (refused, as the extractor refuses them), and the derive
unpacks it with the hardened extractor (``layers.apply``), whose refusals are errors too. A
layer of a shape the derive does not take (``NotDerivable``) is no error: the hit falls back
to the packed image or the flatten.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from microagent.compiler.keys import StepKind
from microagent.digests import Digest
from microagent.errors import IntegrityError
from microagent.remotecache.records import PublishedStep
from microagent.store.content import Store
from microagent.store.records import (
    MAX_STACK,
    LayerRef,
    RootStack,
    read_record,
    rootfs_ready,
    whole_root,
)

__all__ = [
    "DELTA_FRACTION",
    "MAX_DELTA_LAYERS",
    "Delta",
    "TooLarge",
    "check_names",
    "decompress_layer",
    "find_delta",
    "worth_it",
]

DELTA_FRACTION = 0.5  # of the full hit's bytes (the packed image's blob, else every layer)
MAX_DELTA_LAYERS = 8  # each one copies the image it goes onto once
CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class Delta:
    """A local step whose root is present (``image``: its bottom image, the whole root when
    ``below`` stacks no layer disks on it), and the steps after it (each with the layer it
    added), in order; the last one is the hit."""

    ancestor: str
    image: Path
    steps: tuple[tuple[str, LayerRef], ...]
    below: RootStack | None = None  # the ancestor's root as store entries

    @property
    def layers(self) -> tuple[LayerRef, ...]:
        return tuple(layer for _key, layer in self.steps)

    @property
    def stack_depth(self) -> int:
        """How many layer disks the hit's root would stack: the ancestor's and the delta's."""
        return len(self.below.layers if self.below is not None else ()) + len(self.steps)

    def stacks(self, disks: Sequence[str]) -> tuple[tuple[str, RootStack], ...]:
        """Each step's root as the ancestor's with ``disks`` (the delta's layer disks, in
        order) stacked on it up to its own."""
        below = self.below
        assert below is not None, "a delta from find_delta names the ancestor's root"
        return tuple(
            (key, RootStack(below.image, (*below.layers, *disks[: i + 1])))
            for i, (key, _layer) in enumerate(self.steps)
        )

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)


class TooLarge(Exception):
    """A layer decompresses to more than a derive would take: the hit is not derived."""


def find_delta(
    store: Store, chain: Sequence[PublishedStep], *, stacked: bool = False
) -> Delta | None:
    """The delta for a verified ``chain`` (first missing published step .. the hit), or None
    when no local ancestor within :data:`MAX_DELTA_LAYERS` steps has its image (with
    ``stacked``: its whole root, one image or a stack, within :data:`MAX_STACK` steps)."""
    first, hit = chain[0], chain[-1]
    if first.kind is not StepKind.SETUP or first.parent is None or hit.kind is not StepKind.SETUP:
        return None
    steps = [(step.key, step.layers[-1]) for step in chain]
    key: str | None = first.parent
    most = min(MAX_DELTA_LAYERS, MAX_STACK) if stacked else MAX_DELTA_LAYERS
    while key is not None and len(steps) <= most:
        ready = rootfs_ready(store, key)
        below = None if ready is None else whole_root(store, ready)
        if ready is not None and below is not None and (stacked or not below.layers):
            delta = Delta(key, store.entry_path(below.image), tuple(steps), below)
            return delta if _extends(ready.layers, delta, hit.layers) else None
        # a step recorded without its root (an earlier hit's), or whose root is a stack
        record = read_record(store, key)
        if record is None or record.kind is not StepKind.SETUP or not record.layers:
            return None
        steps.insert(0, (record.key, record.layers[-1]))
        key = record.parent
    return None


def _extends(ancestor: Sequence[LayerRef], delta: Delta, layers: Sequence[LayerRef]) -> bool:
    """Whether the ancestor's layers plus the delta's are exactly the hit's verified chain."""
    ours = [(layer.digest, layer.diff_id) for layer in (*ancestor, *delta.layers)]
    return ours == [(layer.digest, layer.diff_id) for layer in layers]


def worth_it(delta: Delta, hit: PublishedStep, *, images: bool) -> bool:
    """The rule: the delta's layers are at most :data:`DELTA_FRACTION` of the full hit's
    bytes — the packed image's blob if the record names one (and ``images`` are taken),
    else every layer of the hit's chain."""
    if images and hit.rootfs_image is not None:
        full = hit.rootfs_image.blob_size
    else:
        full = sum(layer.size for layer in hit.layers)
    return len(delta.steps) <= MAX_DELTA_LAYERS and delta.compressed_bytes <= DELTA_FRACTION * full


class _Reads(Protocol):
    def read(self, size: int, /) -> bytes: ...


def decompress_layer(blob: Path, layer: LayerRef, out: Path, *, limit: int) -> None:
    """The uncompressed tar of a stored layer blob (zstd, gzip or plain, by magic bytes) into
    ``out``, checked against the layer's ``diff_id`` (IntegrityError); TooLarge past ``limit``
    bytes (``out`` is then partial)."""
    import gzip  # deferred: only a delta hit decompresses here (restore loads this module)

    import zstandard  # deferred: ~10 ms to import, as above

    hasher = Digest.parse(layer.diff_id).hasher()
    written = 0
    try:
        with blob.open("rb") as raw, out.open("wb") as dst:
            head = raw.read(4)
            raw.seek(0)
            stream: _Reads = cast(BinaryIO, raw)
            if head.startswith(_ZSTD_MAGIC):
                stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            elif head.startswith(_GZIP_MAGIC):
                stream = gzip.GzipFile(fileobj=raw, mode="rb")
            while chunk := stream.read(CHUNK):
                written += len(chunk)
                if written > limit:
                    raise TooLarge(f"the layer is larger than {limit >> 20} MiB uncompressed")
                hasher.update(chunk)
                dst.write(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as exc:
        raise IntegrityError(f"corrupt or truncated layer: {exc}") from exc
    got = Digest.from_hasher(hasher)
    if str(got) != layer.diff_id:
        raise IntegrityError(
            f"uncompressed content is {got}, but the step record says its diff_id is "
            f"{layer.diff_id}"
        )


def check_names(tar: Path) -> None:
    """Refuse (IntegrityError) a member whose name or hard-link target has a ``..``
    component or a NUL, as the extractor does; a tar that does not parse is corrupt."""
    import tarfile  # deferred: only a delta hit reads a tar here (restore loads this module)

    try:
        with tarfile.open(tar, "r:", errors="surrogateescape") as tf:
            for info in tf:
                for name in (info.name, info.linkname if info.islnk() else ""):
                    if "\x00" in name or ".." in name.split("/"):
                        raise IntegrityError(
                            f"entry {info.name[:200]!r}: '..' component or NUL "
                            "(would escape the root)"
                        )
    except tarfile.TarError as exc:
        raise IntegrityError(f"corrupt or truncated layer: {exc}") from exc
