"""Pinning a spec's image to a digest: the spec itself, ``microagent.lock``, or the source.

A registry tag's answer is kept for a short while (:class:`Resolutions`): the staleness rule is
that a tag resolved less than ``ttl`` seconds ago (``$MICROAGENT_RESOLVE_TTL``, default 300) by
the same registry (or mirrors) is not asked again, so a tag moved on the registry is seen at
most ``ttl`` seconds late; ``--refresh`` (or a ``ttl`` of 0) always asks. Digests in the spec
and ``microagent.lock`` pins never expire and are never cached here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.compiler.lock import ResolvedImage, lock_path_for, read_lock
from microagent.compiler.refs import ImageRef, LayoutRef, host_platform, parse_any_ref
from microagent.compiler.spec import Spec
from microagent.digests import canonical_json, is_digest, sha256_digest
from microagent.errors import HostIOError, InvalidInputError
from microagent.frozen import Frozen
from microagent.fsutil import read_json, write_json_atomic
from microagent.settings import Settings

if TYPE_CHECKING:
    from microagent.oci.registry import RegistryClient


@dataclass(frozen=True, eq=False, repr=False)
class Resolutions(Frozen):
    """Recent answers of registries to "which digest is this tag?" (see the module docstring),
    one small JSON file each under ``directory``, keyed by the reference, the platform and
    where the registry is reached (its mirrors, plain HTTP or not)."""

    directory: Path
    ttl: float
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    insecure: frozenset[str] = frozenset()
    refresh: bool = False  # --refresh: ask the registry, then remember its answer
    clock: Callable[[], float] = time.time

    @classmethod
    def of(cls, settings: Settings, *, refresh: bool = False) -> Resolutions:
        return cls(
            settings.store_dir / "resolved",
            settings.resolve_ttl,
            settings.registry_mirrors,
            settings.insecure_registries,
            refresh,
        )

    def _path(self, ref: ImageRef, platform: str) -> Path:
        source = {
            "reference": str(ref),
            "platform": platform,
            "mirrors": list(self.mirrors.get(ref.registry, ())),
            "insecure": ref.registry in self.insecure,
        }
        return self.directory / f"{sha256_digest(canonical_json(source))[7:]}.json"

    def lookup(self, ref: ImageRef, platform: str) -> ResolvedImage | None:
        """The answer recorded less than ``ttl`` seconds ago, if any (never with refresh)."""
        if self.refresh or self.ttl <= 0:
            return None
        data = read_json(self._path(ref, platform)) or {}
        at = data.get("resolvedAt")
        if not isinstance(at, (int, float)) or isinstance(at, bool):
            return None
        fresh = 0 <= self.clock() - at <= self.ttl  # a clock set back: not fresh
        return _recorded(data, str(ref), platform) if fresh else None

    def record(self, ref: ImageRef, platform: str, image: ResolvedImage) -> None:
        """Remember an answer; best effort: a store that cannot take it just asks next time."""
        if self.ttl <= 0:
            return
        path = self._path(ref, platform)
        document = {"source": str(ref), "resolvedAt": self.clock(), "image": image.to_json()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, document)
        except (OSError, HostIOError):
            return


def _recorded(data: Mapping[str, Any], source: str, platform: str) -> ResolvedImage | None:
    """The image in a resolution record, or None when it is not a well-formed one for
    ``source`` on ``platform`` (a damaged file is a miss, never an answer)."""
    image = data.get("image")
    if data.get("source") != source or not isinstance(image, dict):
        return None
    reference, digest = image.get("reference"), image.get("digest")
    platform_digest = image.get("platformDigest")
    if not isinstance(reference, str) or not is_digest(digest) or image.get("platform") != platform:
        return None
    if platform_digest is not None and not is_digest(platform_digest):
        return None
    return ResolvedImage(reference, digest, platform, platform_digest)


def resolve_image(
    spec: Spec,
    client: Callable[[], RegistryClient],
    platform: str | None = None,
    *,
    offline: bool = False,
    recent: Resolutions | None = None,
) -> ResolvedImage:
    """Pin the spec's image: a digest in the spec, else ``microagent.lock``, else the source.

    ``client`` is called only when a registry must be asked. With ``offline`` an unpinned
    registry tag is an error instead of a registry round trip; a local layout (``oci:``) is
    read from disk, lock or not. ``recent`` answers a registry tag it resolved lately (and
    learns each new answer).
    """
    target = platform or host_platform()
    ref = parse_any_ref(spec.image, spec.base_dir)
    if ref.digest:
        return ResolvedImage(str(ref), ref.digest, target)
    lock = read_lock(lock_path_for(spec.source))
    pinned = lock.lookup(spec.image, target) if lock else None
    if pinned is not None:
        return pinned
    if isinstance(ref, LayoutRef):  # on disk: no network, offline or not
        # deferred: a pinned image (the common case) needs no registry code at all
        from microagent.oci.layout import Layout
        from microagent.oci.transport import resolve

        return resolve(Layout(ref.path), ref, target)
    if offline:
        raise InvalidInputError(
            f"image {spec.image!r} is a tag with no pinned digest",
            hint="pin it as NAME@sha256:<digest> or run `microagent lock --file SPEC`",
        )
    known = recent.lookup(ref, target) if recent is not None else None
    return known or _ask_registry(ref, target, client, recent)


def _ask_registry(
    ref: ImageRef, target: str, client: Callable[[], RegistryClient], recent: Resolutions | None
) -> ResolvedImage:
    # deferred: as in resolve_image; a recently resolved tag needs no registry code either
    from microagent.oci.transport import open_repository, resolve

    image = resolve(open_repository(ref, client()), ref, target)
    if recent is not None:
        recent.record(ref, target, image)
    return image
