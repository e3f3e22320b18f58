"""Remote build caches: where they are, the defaults, and how to read and write them.

A cache reference is a registry repository (``registry.example.com/team/agent``, a tag is
ignored for lookups and names the image on push) or an OCI layout folder (``oci:DIR``).
Defaults, when no ``--cache-from``/``--cache-to`` flag is given::

    MICROAGENT_CACHE_FROM="ghcr.io/acme/agent-cache,oci:/mnt/usb/cache"   # comma separated
    MICROAGENT_CACHE_TO="ghcr.io/acme/agent-cache"

or in the user config (``$MICROAGENT_CONFIG``)::

    cache:
      from: [ghcr.io/acme/agent-cache]
      to: ghcr.io/acme/agent-cache        # usually only in CI

An environment variable that is set (even empty) wins over the file. Registry hosts use the
mirror, plain-HTTP and credential settings of ``cache/regconfig.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Protocol

from microagent.compiler.refs import ImageRef, parse_image_ref, parse_layout_ref
from microagent.errors import InvalidInputError
from microagent.oci import documents as oci
from microagent.oci.layout import REF_NAME, Layout
from microagent.oci.registry import RegistryClient
from microagent.remotecache.publish import Blob, ManifestOut, Target
from microagent.remotecache.records import rootfs_tag, step_tag
from microagent.settings import _user_setting

CACHE_FROM_ENV = "MICROAGENT_CACHE_FROM"
CACHE_TO_ENV = "MICROAGENT_CACHE_TO"
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class CacheRef:
    """A registry repository or a layout folder holding published steps."""

    image: ImageRef | None = None
    layout: Path | None = None
    tag: str = DEFAULT_TAG

    @property
    def where(self) -> str:
        if self.layout is not None:
            return f"oci:{self.layout}"
        assert self.image is not None
        return self.image.name

    def __str__(self) -> str:
        return self.where


def parse_cache_ref(text: str, base: Path | None = None) -> CacheRef:
    """``HOST/REPO[:TAG]`` or ``oci:DIR[:TAG]``; a digest makes no sense for a cache."""
    text = text.strip()
    if not text:
        raise InvalidInputError("empty cache reference", hint="e.g. ghcr.io/acme/agent-cache")
    if text.startswith("oci:"):
        ref = parse_layout_ref(text, base or Path.cwd())
        if ref.digest:
            raise InvalidInputError(f"cache reference {text!r} must not name a digest")
        return CacheRef(layout=ref.path, tag=ref.tag or DEFAULT_TAG)
    image = parse_image_ref(text)
    if image.digest:
        raise InvalidInputError(
            f"cache reference {text!r} must not name a digest",
            hint="give a repository, e.g. registry.example.com/team/agent[:tag]",
        )
    return CacheRef(image=ImageRef(image.registry, image.repository), tag=image.tag or DEFAULT_TAG)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def _setting(name: str) -> list[str]:
    value = _user_setting("cache", name)
    if isinstance(value, str):
        return _split(value)
    if isinstance(value, list):
        return [str(v) for v in value if str(v).strip()]
    return []


def cache_from_refs(flags: Sequence[str] = ()) -> tuple[CacheRef, ...]:
    """``--cache-from`` flags, else ``$MICROAGENT_CACHE_FROM``, else ``cache.from``."""
    if flags:
        texts = [t for flag in flags for t in _split(flag)]
    elif CACHE_FROM_ENV in os.environ:
        texts = _split(os.environ[CACHE_FROM_ENV])
    else:
        texts = _setting("from")
    return tuple(parse_cache_ref(t) for t in texts)


def cache_to_ref(flag: str | None = None) -> CacheRef | None:
    """``--cache-to``, else ``$MICROAGENT_CACHE_TO``, else ``cache.to``."""
    if flag:
        return parse_cache_ref(flag)
    texts = _split(os.environ[CACHE_TO_ENV]) if CACHE_TO_ENV in os.environ else _setting("to")
    return parse_cache_ref(texts[0]) if texts else None


# -- reading ---------------------------------------------------------------------------------


class CacheSource(Protocol):
    """Where published steps are read from."""

    where: str

    def step(self, key: str) -> bytes | None:
        """The (transport-verified) manifest of ``step-<key>``, or None on a miss."""
        ...

    def rootfs(self, key: str) -> bytes | None:
        """The manifest of ``rootfs-<key>`` (a setup step's built image), or None."""
        ...

    def blob(self, digest: str) -> AbstractContextManager[BinaryIO]: ...


class RegistryCacheSource:
    def __init__(self, client: RegistryClient, image: ImageRef) -> None:
        self.client = client
        self.image = image
        self.where = image.name

    def step(self, key: str) -> bytes | None:
        return self._manifest(step_tag(key))

    def rootfs(self, key: str) -> bytes | None:
        return self._manifest(rootfs_tag(key))

    def _manifest(self, tag: str) -> bytes | None:
        found = self.client.find_manifest(self.image, tag)
        return None if found is None else found.data

    def blob(self, digest: str) -> AbstractContextManager[BinaryIO]:
        return self.client.blob(self.image, digest)


class LayoutCacheSource:
    def __init__(self, path: Path) -> None:
        self.layout = Layout(path)
        self.where = f"oci:{path}"

    @cached_property
    def _tags(self) -> dict[str, oci.Descriptor]:
        return {
            (entry.annotations or {}).get(REF_NAME, ""): entry for entry in self.layout.entries()
        }

    def tags(self) -> Iterator[str]:
        yield from sorted(self._tags)

    def step(self, key: str) -> bytes | None:
        return self._manifest(step_tag(key))

    def rootfs(self, key: str) -> bytes | None:
        return self._manifest(rootfs_tag(key))

    def _manifest(self, tag: str) -> bytes | None:
        entry = self._tags.get(tag)
        return None if entry is None else self.layout.read_verified(entry.digest)

    def blob(self, digest: str) -> AbstractContextManager[BinaryIO]:
        return self.layout.blob(digest)


def open_source(ref: CacheRef, client: RegistryClient | None = None) -> CacheSource:
    if ref.layout is not None:
        return LayoutCacheSource(ref.layout)
    assert ref.image is not None
    return RegistryCacheSource(client or RegistryClient(), ref.image)


# -- writing ---------------------------------------------------------------------------------


class RegistryTarget:
    """Publish into a registry repository (blobs: HEAD first, skip what exists)."""

    def __init__(self, client: RegistryClient, image: ImageRef) -> None:
        self.client = client
        self.image = image
        self.where = image.name

    def put_blob(self, blob: Blob) -> bool:
        return self.client.push_blob(self.image, blob.digest, blob.size, blob.path)

    def put_manifest(self, manifest: ManifestOut) -> None:
        self.client.push_manifest(self.image, manifest.tag, manifest.data, manifest.media_type)

    def close(self) -> None:
        return None


def open_target(ref: CacheRef, client: RegistryClient | None = None) -> Target:
    if ref.layout is not None:
        from microagent.remotecache.exchange import LayoutTarget

        return LayoutTarget(ref.layout)
    assert ref.image is not None
    return RegistryTarget(client or RegistryClient(), ref.image)
