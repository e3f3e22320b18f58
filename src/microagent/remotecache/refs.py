"""Remote build caches: where they are, the defaults, and how to open them.

A cache reference is a registry repository (``registry.example.com/team/agent``, a tag is
ignored for lookups and names the image on push) or an OCI layout folder (``oci:DIR``).
Without ``--cache-from``/``--cache-to`` flags the settings decide
(``$MICROAGENT_CACHE_FROM``/``_TO`` or ``cache.from``/``cache.to`` in the user config, see
:mod:`microagent.settings`). Registry hosts use the mirror, plain-HTTP and credential
settings like base images do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from microagent.compiler.refs import ImageRef, LayoutRef, parse_image_ref, parse_layout_ref
from microagent.errors import InvalidInputError
from microagent.frozen import Frozen
from microagent.settings import Settings, split_list

if TYPE_CHECKING:
    from microagent.oci.registry import RegistryClient
    from microagent.oci.transport import Repository

DEFAULT_TAG = "latest"


@dataclass(frozen=True, eq=False, repr=False)
class CacheRef(Frozen):
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


def cache_from_refs(flags: Sequence[str], settings: Settings) -> tuple[CacheRef, ...]:
    """``--cache-from`` flags (comma lists allowed), else the settings' ``cache_from``."""
    texts = [t for flag in flags for t in split_list(flag)] if flags else settings.cache_from
    return tuple(parse_cache_ref(t) for t in texts)


def cache_to_ref(flag: str | None, settings: Settings) -> CacheRef | None:
    """``--cache-to``, else the settings' ``cache_to``."""
    text = flag or settings.cache_to
    return parse_cache_ref(text) if text else None


def open_cache(ref: CacheRef, client: RegistryClient, *, write: bool = False) -> Repository:
    """The repository behind a cache reference (a layout is created when writing)."""
    # deferred: the registry transport is loaded only when a cache is actually used
    from microagent.oci.transport import open_repository

    if ref.layout is not None:
        return open_repository(LayoutRef(ref.layout), client, create=write)
    assert ref.image is not None
    return open_repository(ref.image, client)


def remote_sources(
    flags: Sequence[str], settings: Settings, client: Callable[[], RegistryClient]
) -> list[Repository]:
    """The remote caches to read from: ``--cache-from`` flags, else the settings
    (``client`` is called only when there is one)."""
    return [open_cache(ref, client()) for ref in cache_from_refs(flags, settings)]
