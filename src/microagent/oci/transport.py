"""One transport protocol for OCI content, whatever holds it.

A :class:`Repository` is a registry repository (:class:`~microagent.oci.registry.
RegistryRepository`), an image layout folder (:class:`~microagent.oci.layout.Layout`) or, in
tests, :class:`MemoryRepository`. Base images, remote caches, ``build --push`` and ``cache
export`` all talk to one through :func:`open_repository`; resolving a tag, writing a lock
entry and finding a platform's manifest are written once, here, against the protocol.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

from microagent.compiler.lock import LockEntry, ResolvedImage
from microagent.compiler.refs import ImageRef, LayoutRef, host_platform
from microagent.digests import sha256_digest
from microagent.errors import NotFoundError
from microagent.oci import documents as oci
from microagent.oci.documents import Fetched
from microagent.oci.layout import Layout
from microagent.oci.registry import RegistryClient, RegistryRepository
from microagent.progress import Sent


class Repository(Protocol):
    """Somewhere OCI manifests and blobs are read from and written to."""

    where: str

    def manifest(self, reference: str | None) -> Fetched:
        """The manifest a tag or digest names, digest-verified; an error when it is missing
        (``None``: the only entry of a layout)."""
        ...

    def find_manifest(self, reference: str) -> Fetched | None:
        """Like :meth:`manifest`, but None when it is simply not there (a cache miss)."""
        ...

    def blob(self, digest: str) -> AbstractContextManager[BinaryIO]:
        """A raw stream of a blob; the caller verifies it while consuming."""
        ...

    def put_blob(self, digest: str, size: int, path: Path, sent: Sent | None = None) -> bool:
        """Store a verified local blob unless it is there already; True when it was sent.
        ``sent``: told the bytes sent so far while it is (progress)."""
        ...

    def put_manifest(self, tag: str, data: bytes, media_type: str) -> None: ...

    def close(self) -> None:
        """Finish writing (a layout writes its index)."""
        ...


def open_repository(
    ref: ImageRef | LayoutRef, client: RegistryClient, *, create: bool = False
) -> Repository:
    """The repository ``ref`` names; ``create`` makes a missing layout folder (for writing)."""
    if isinstance(ref, LayoutRef):
        return Layout(ref.path, create=create)
    return RegistryRepository(client, ref)


def resolve(repo: Repository, ref: ImageRef | LayoutRef, platform: str) -> ResolvedImage:
    """Pin ``ref`` to the digest its tag points at, and to the platform's manifest."""
    top = repo.manifest(ref.reference)
    kind = top.kind()
    platform_digest = top.digest
    if kind in oci.INDEX_TYPES:
        platform_digest = oci.select_platform(
            oci.parse_index(top.document(), kind), platform
        ).digest
    return ResolvedImage(ref.pinned(top.digest), top.digest, platform, platform_digest)


def lock_entry(repo: Repository, ref: ImageRef | LayoutRef) -> LockEntry:
    """What ``microagent.lock`` records for ``ref``: its digest and each platform's."""
    top = repo.manifest(ref.reference)
    kind = top.kind()
    if kind in oci.INDEX_TYPES:
        index = oci.parse_index(top.document(), kind)
        platforms = {
            m.platform: m.digest
            for m in index.manifests
            if m.platform and not m.platform.startswith("unknown")
        }
    else:
        platforms = {host_platform(): top.digest}
    return LockEntry(str(ref), top.digest, platforms)


def platform_manifest(repo: Repository, resolved: ResolvedImage) -> tuple[bytes, oci.Manifest]:
    """The single-platform manifest of a resolved image (through its index if it has one)."""
    top = repo.manifest(resolved.platform_digest or resolved.digest)
    kind = top.kind()
    if kind in oci.INDEX_TYPES:
        entry = oci.select_platform(oci.parse_index(top.document(), kind), resolved.platform)
        top = repo.manifest(entry.digest)
        kind = top.kind()
    return top.data, oci.parse_manifest(top.document(), kind)


class MemoryRepository:
    """A repository held in memory: for tests of everything that publishes or restores."""

    def __init__(self, where: str = "memory:") -> None:
        self.where = where
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[bytes, str]] = {}  # digest -> (data, media type)
        self.tags: dict[str, str] = {}  # tag -> digest
        self.closed = 0

    def find_manifest(self, reference: str) -> Fetched | None:
        digest = self.tags.get(reference, reference)
        if digest not in self.manifests:
            return None
        data, media_type = self.manifests[digest]
        return Fetched(data, digest, media_type, self.where)

    def manifest(self, reference: str | None) -> Fetched:
        found = self.find_manifest(reference or "latest")
        if found is None:
            raise NotFoundError(f"{self.where}: {reference} not found")
        return found

    @contextlib.contextmanager
    def blob(self, digest: str) -> Iterator[BinaryIO]:
        if digest not in self.blobs:
            raise NotFoundError(f"{self.where}: blob {digest} not found")
        yield io.BytesIO(self.blobs[digest])

    def put_blob(self, digest: str, size: int, path: Path, sent: Sent | None = None) -> bool:
        if digest in self.blobs:
            return False
        self.blobs[digest] = path.read_bytes()
        if sent is not None:
            sent(size)
        return True

    def put_manifest(self, tag: str, data: bytes, media_type: str) -> None:
        digest = sha256_digest(data)
        self.manifests[digest] = (data, media_type)
        self.tags[tag] = digest

    def close(self) -> None:
        self.closed += 1
