"""OCI image layout folders (``oci:PATH[:TAG]``): the air-gapped image source and cache.

A layout is ``oci-layout``, ``index.json`` and ``blobs/sha256/``; entries of the index are
named by the standard ``org.opencontainers.image.ref.name`` annotation. Every document read is
checked against its digest; every file written goes to a temp name and is renamed into place,
and the index is rewritten on :meth:`Layout.close`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from microagent.digests import is_digest, sha256_digest
from microagent.errors import IntegrityError, InvalidInputError, NotFoundError, RegistryError
from microagent.fsutil import atomic_write, is_no_space, no_space, temp_sibling
from microagent.oci import documents as oci
from microagent.oci.documents import Fetched
from microagent.progress import Sent

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


class Layout:
    """An OCI image layout folder as a :class:`~microagent.oci.transport.Repository`."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        self.where = f"oci:{path}"
        self._written: dict[str, dict[str, Any]] | None = None
        if create:
            self._prepare()
        elif not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
            raise NotFoundError(
                f"{path} is not an OCI image layout (no oci-layout / index.json)",
                hint="create one with `skopeo copy ... oci:DIR:TAG` or `microagent cache export`",
            )

    # -- reading ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise IntegrityError(f"bad digest {digest!r} in layout {self.path}")
        return self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def read_verified(self, digest: str) -> bytes:
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is missing from layout {self.path}") from None
        if sha256_digest(data) != digest:
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
        try:
            doc = oci.load_document((self.path / "index.json").read_bytes(), "index.json")
        except FileNotFoundError:
            return ()
        except OSError as exc:
            raise RegistryError(f"cannot read {self.path}/index.json: {exc.strerror}") from exc
        return oci.parse_index(doc, oci.OCI_INDEX).manifests

    def tags(self) -> list[str]:
        return sorted({tag for e in self.entries() if (tag := (e.annotations or {}).get(REF_NAME))})

    def _find(self, reference: str | None) -> oci.Descriptor | None:
        """The index entry for a digest, a tag, or (no reference) the only entry."""
        entries = self.entries()
        if reference is None:
            matches = list(entries) if len(entries) == 1 else []
        elif is_digest(reference):
            matches = [e for e in entries if e.digest == reference]
        else:
            matches = [e for e in entries if (e.annotations or {}).get(REF_NAME) == reference]
        return matches[0] if matches else None

    def find_manifest(self, reference: str | None) -> Fetched | None:
        """The manifest a tag or digest names (a digest may be any manifest in the layout)."""
        entry = self._find(reference)
        if entry is None and is_digest(reference) and self.blob_path(reference).is_file():
            return Fetched(self.read_verified(reference), reference, "", self.where)
        if entry is None:
            return None
        return Fetched(self.read_verified(entry.digest), entry.digest, entry.media_type, self.where)

    def manifest(self, reference: str | None) -> Fetched:
        found = self.find_manifest(reference)
        if found is None:
            shown = f"{self.where}:{reference}" if reference else self.where
            raise NotFoundError(
                f"{shown} not found in layout",
                hint=f"tags in it: {', '.join(self.tags()) or 'none'}",
            )
        return found

    # -- writing ------------------------------------------------------------------------------

    def _prepare(self) -> None:
        path = self.path
        if path.exists() and any(path.iterdir()) and not (path / "oci-layout").is_file():
            raise InvalidInputError(
                f"{path} is not empty and not an OCI image layout",
                hint="export into a new folder or an existing layout",
            )
        path.mkdir(parents=True, exist_ok=True)
        if not (path / "oci-layout").is_file():  # first: an export cut short can be resumed
            atomic_write(path / "oci-layout", LAYOUT_VERSION)
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def _index_entries(self) -> dict[str, dict[str, Any]]:
        """The index entries by name, as they are (kept verbatim when rewriting)."""
        if self._written is None:
            self._written = {}
            index = self.path / "index.json"
            doc = oci.load_document(index.read_bytes(), str(index)) if index.is_file() else {}
            for entry in doc.get("manifests") or []:
                if isinstance(entry, dict):
                    tag = str((entry.get("annotations") or {}).get(REF_NAME, entry.get("digest")))
                    self._written[tag] = entry
        return self._written

    def put_blob(self, digest: str, size: int, path: Path, sent: Sent | None = None) -> bool:
        final = self.blob_path(digest)
        if final.is_file() and final.stat().st_size == size:
            return False
        tmp = temp_sibling(final)
        try:
            shutil.copyfile(path, tmp)
            tmp.rename(final)
        except OSError as exc:
            if is_no_space(exc):
                raise no_space(final.parent, size) from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)
        if sent is not None:
            sent(size)
        return True

    def put_manifest(self, tag: str, data: bytes, media_type: str) -> None:
        digest = sha256_digest(data)
        final = self.blob_path(digest)
        if not final.is_file():
            atomic_write(final, data)
        self._index_entries()[tag] = {
            "mediaType": media_type,
            "digest": digest,
            "size": len(data),
            "annotations": {REF_NAME: tag},
        }

    def close(self) -> None:
        """Write ``oci-layout`` and ``index.json`` if anything was added."""
        if self._written is None:
            return
        index = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_INDEX,
            "manifests": [self._written[tag] for tag in sorted(self._written)],
        }
        atomic_write(self.path / "oci-layout", LAYOUT_VERSION)
        atomic_write(self.path / "index.json", json.dumps(index, indent=2).encode() + b"\n")
