"""Local OCI image layouts (``image: oci:PATH[:TAG]``): the air-gapped image source."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from microagent.compiler.lock import LockEntry, ResolvedImage
from microagent.compiler.refs import DIGEST_RE, LayoutRef
from microagent.errors import IntegrityError, NotFoundError, RegistryError
from microagent.oci import documents as oci

REF_NAME = "org.opencontainers.image.ref.name"


class Layout:
    """Read-only access to an OCI image layout folder, every document digest-checked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
            raise NotFoundError(
                f"{path} is not an OCI image layout (no oci-layout / index.json)",
                hint="create one with `skopeo copy ... oci:DIR:TAG` or `microagent cache export`",
            )

    def blob_path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise IntegrityError(f"bad digest {digest!r} in layout {self.path}")
        return self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def read_verified(self, digest: str) -> bytes:
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is missing from layout {self.path}") from None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"blob {digest} in layout {self.path} does not match its digest")
        return data

    @contextmanager
    def blob(self, digest: str) -> Iterator[BinaryIO]:
        """A stream of a blob; the caller verifies the digest while consuming it."""
        try:
            handle = self.blob_path(digest).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is missing from layout {self.path}") from None
        with handle:
            yield handle

    def entries(self) -> tuple[oci.Descriptor, ...]:
        """Every entry of index.json (tags in their ``org.opencontainers.image.ref.name``)."""
        return self._index().manifests

    def _index(self) -> oci.Index:
        try:
            doc = oci.load_document((self.path / "index.json").read_bytes(), "index.json")
        except OSError as exc:
            raise RegistryError(f"cannot read {self.path}/index.json: {exc.strerror}") from exc
        return oci.parse_index(doc, oci.OCI_INDEX)

    def find(self, ref: LayoutRef) -> oci.Descriptor:
        """The index entry for the ref's digest, tag, or the only entry."""
        entries = self._index().manifests
        if ref.digest:
            matches = [e for e in entries if e.digest == ref.digest]
        elif ref.tag:
            matches = [e for e in entries if (e.annotations or {}).get(REF_NAME) == ref.tag]
        else:
            matches = list(entries) if len(entries) == 1 else []
        if not matches:
            tags = sorted({(e.annotations or {}).get(REF_NAME, "?") for e in entries})
            raise NotFoundError(
                f"{ref} not found in layout", hint=f"tags in it: {', '.join(tags) or 'none'}"
            )
        return matches[0]

    def resolve(self, ref: LayoutRef, platform: str) -> ResolvedImage:
        entry = self.find(ref)
        digest = entry.digest
        doc = oci.load_document(self.read_verified(digest), f"manifest {digest}")
        kind = oci.media_type_of(doc, entry.media_type)
        if kind in oci.INDEX_TYPES:
            digest = oci.select_platform(oci.parse_index(doc, kind), platform).digest
        return ResolvedImage(str(ref), entry.digest, platform, digest)

    def lock_entry(self, ref: LayoutRef, platform: str) -> LockEntry:
        resolved = self.resolve(ref, platform)
        return LockEntry(str(ref), resolved.digest, {platform: resolved.platform_digest or ""})
