"""The system-wide stand-in cache: written once by root, only ever read by everyone else.

Root's install step (``scripts/bootstrap.sh`` → ``standin.py share``) builds the stand-ins that
need root (the python one: debootstrap) into ``SHARED_CACHE/layouts/<name>-<key>``, the same
content-addressed layout as a user's own cache (``key`` hashes the recipe, so a changed recipe is
a new entry), with directories 0755 and files 0644, all owned by root.

A normal user never writes there and never uses an entry in place: :func:`copy_verified` copies
one into the user's own cache and treats it as hostile input on the way. Every directory from
``/`` down must be a real directory owned by a trusted uid (root) that nobody else may write
(or sticky, like ``/tmp``); every file is opened without following symlinks and must be a regular
file owned by a trusted uid, not writable by group or others, within a size bound; JSON documents
are bounded before parsing; only the blobs the manifest names are copied, each hashed and counted
while it is copied and compared with its descriptor, so what lands in the user's cache is exactly
what was verified (no check-then-use race). ``index.json`` is rewritten from the checked fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from microagent.errors import BuildError
from testenv.oci import (
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER,
    MEDIA_MANIFEST,
    REF_NAME,
    canonical_json,
    host_arch,
)

SHARED_CACHE = Path("/var/cache/microagent-standin")
TRUSTED_UIDS: tuple[int, ...] = (0,)
METADATA = "microagent-testenv.json"
CHUNK = 1 << 20
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Limits:
    """Bounds on what is read from the shared cache (the python stand-in is ~47 MiB)."""

    json_bytes: int = 64 * 1024
    index_entries: int = 16
    layers: int = 16
    total_bytes: int = 1 << 30


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int


def entry(shared: Path, cache_name: str) -> Path:
    """Where the shared cache keeps the layout ``cache_name`` (it may not exist)."""
    return shared / "layouts" / cache_name


def present(shared: Path, cache_name: str) -> bool:
    """Whether something (valid or not) sits at the entry's path."""
    return os.path.lexists(entry(shared, cache_name))


def copy_verified(
    layout: Path,
    dest: Path | None,
    *,
    tag: str,
    key: str,
    trusted_uids: Collection[int] = TRUSTED_UIDS,
    limits: Limits = Limits(),
) -> str:
    """Check the shared ``layout`` (and copy it into the new layout ``dest``, unless None).

    Returns the manifest digest of the image tagged ``tag``; raises :class:`BuildError` naming
    the first thing that is wrong.
    """
    reader = _Reader(layout, frozenset(trusted_uids), limits)
    try:
        return reader.copy(dest, tag=tag, key=key)
    except BuildError as exc:
        raise BuildError(
            f"refusing the shared stand-in {layout}: {exc.message}",
            hint="rebuild it as root: sudo bash scripts/bootstrap.sh (it replaces a bad entry)",
        ) from exc


class _Reader:
    def __init__(self, layout: Path, trusted: frozenset[int], limits: Limits) -> None:
        self.layout = layout
        self.blobs = layout / "blobs" / "sha256"
        self.trusted = trusted
        self.limits = limits

    def copy(self, dest: Path | None, *, tag: str, key: str) -> str:
        self._check_dirs()
        meta = self._json(self.layout / METADATA)
        if meta.get("key") != key:
            raise BuildError(f"{METADATA} names key {meta.get('key')!r}, expected {key!r}")
        manifest_blob = self._manifest_entry(self._json(self.layout / "index.json"), tag)
        if dest is not None:
            (dest / "blobs" / "sha256").mkdir(parents=True)
        manifest_bytes = self._copy_blob(manifest_blob, dest, keep=True)
        blobs = self._manifest_blobs(_parse(manifest_bytes, f"manifest {manifest_blob.digest}"))
        for blob in blobs:
            self._copy_blob(blob, dest, keep=False)
        if dest is not None:
            _write_index(dest, manifest_blob, tag)
        return manifest_blob.digest

    # --- trust of the path and of each file ------------------------------------------------

    def _check_dirs(self) -> None:
        """Every directory from / to blobs/sha256: real (no symlink), root's, closed to others."""
        path = Path("/")
        self._check_dir(path)
        for part in Path(os.path.normpath(self.blobs.absolute())).parts[1:]:
            path = path / part
            self._check_dir(path)

    def _check_dir(self, path: Path) -> None:
        try:
            info = os.lstat(path)
        except OSError as exc:
            raise BuildError(f"cannot read {path}: {exc.strerror}") from exc
        if not stat.S_ISDIR(info.st_mode):
            raise BuildError(f"{path} is a symlink or not a directory")
        if info.st_uid not in self.trusted:
            raise BuildError(f"{path} belongs to uid {info.st_uid}, not root")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise BuildError(f"{path} is writable by others (mode {stat.filemode(info.st_mode)})")

    def _open(self, path: Path, limit: int) -> tuple[int, int]:
        """An fd of the trusted regular file ``path`` and its size (at most ``limit``)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise BuildError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BuildError(f"{path} is not a regular file")
            if info.st_uid not in self.trusted:
                raise BuildError(f"{path} belongs to uid {info.st_uid}, not root")
            if info.st_mode & 0o022:
                raise BuildError(f"{path} is writable by others")
            if info.st_size > limit:
                raise BuildError(f"{path} has {info.st_size} bytes, more than {limit}")
        except BuildError:
            os.close(fd)
            raise
        return fd, info.st_size

    def _json(self, path: Path) -> Mapping[str, object]:
        fd, _ = self._open(path, self.limits.json_bytes)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(self.limits.json_bytes + 1)
        if len(data) > self.limits.json_bytes:
            raise BuildError(f"{path} grew past {self.limits.json_bytes} bytes while read")
        return _parse(data, str(path))

    # --- the documents ---------------------------------------------------------------------

    def _manifest_entry(self, index: Mapping[str, object], tag: str) -> _Blob:
        manifests = index.get("manifests")
        if not isinstance(manifests, list) or len(manifests) > self.limits.index_entries:
            raise BuildError(
                f"index.json: manifests is not a list of at most {self.limits.index_entries}"
            )
        for item in manifests:
            if isinstance(item, dict) and _ref_name(item) == tag:
                if item.get("mediaType") != MEDIA_MANIFEST:
                    raise BuildError(f"index.json: {tag!r} is not an OCI image manifest")
                return _descriptor(item, "index.json manifest", self.limits.json_bytes)
        raise BuildError(f"index.json names no image tagged {tag!r}")

    def _manifest_blobs(self, manifest: Mapping[str, object]) -> list[_Blob]:
        if manifest.get("mediaType") != MEDIA_MANIFEST or manifest.get("schemaVersion") != 2:
            raise BuildError("the manifest is not an OCI image manifest (schemaVersion 2)")
        config, layers = manifest.get("config"), manifest.get("layers")
        if not isinstance(config, dict) or config.get("mediaType") != MEDIA_CONFIG:
            raise BuildError("the manifest's config is not an OCI image config")
        if not isinstance(layers, list) or not 0 < len(layers) <= self.limits.layers:
            raise BuildError(f"the manifest has no layers or more than {self.limits.layers}")
        blobs = [_descriptor(config, "config", self.limits.json_bytes)]
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict) or layer.get("mediaType") != MEDIA_LAYER:
                raise BuildError(f"layer {i} is not a gzip OCI layer")
            blobs.append(_descriptor(layer, f"layer {i}", self.limits.total_bytes))
        total = sum(blob.size for blob in blobs)
        if total > self.limits.total_bytes:
            raise BuildError(f"the image has {total} bytes, more than {self.limits.total_bytes}")
        return blobs

    # --- blobs -----------------------------------------------------------------------------

    def _copy_blob(self, blob: _Blob, dest: Path | None, *, keep: bool) -> bytes:
        """Copy (or just read) one blob, checking its size and digest as it streams."""
        hexdigest = blob.digest.removeprefix("sha256:")
        fd, size = self._open(self.blobs / hexdigest, blob.size)
        if size != blob.size:
            os.close(fd)
            raise BuildError(
                f"blob {blob.digest} has {size} bytes, its descriptor says {blob.size}"
            )
        if dest is None:
            with os.fdopen(fd, "rb") as src:
                return _stream(src, None, blob, keep=keep)
        target = dest / "blobs" / "sha256" / hexdigest
        partial = target.with_name(f".{hexdigest}.partial")
        with os.fdopen(fd, "rb") as src, partial.open("xb") as out:
            kept = _stream(src, out, blob, keep=keep)
        partial.rename(target)
        return kept


def _stream(src: IO[bytes], out: IO[bytes] | None, blob: _Blob, *, keep: bool) -> bytes:
    hasher, kept, count = hashlib.sha256(), bytearray(), 0
    while chunk := src.read(min(CHUNK, blob.size - count + 1)):
        count += len(chunk)
        if count > blob.size:
            raise BuildError(f"blob {blob.digest} grew past {blob.size} bytes while read")
        hasher.update(chunk)
        if out is not None:
            out.write(chunk)
        if keep:
            kept += chunk
    if count != blob.size or f"sha256:{hasher.hexdigest()}" != blob.digest:
        raise BuildError(f"blob {blob.digest} does not match its digest (tampered or torn)")
    return bytes(kept)


def _parse(data: bytes, what: str) -> Mapping[str, object]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BuildError(f"{what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise BuildError(f"{what} is not a JSON object")
    return value


def _ref_name(item: Mapping[str, object]) -> object:
    annotations = item.get("annotations")
    return annotations.get(REF_NAME) if isinstance(annotations, dict) else None


def _descriptor(item: Mapping[str, object], what: str, limit: int) -> _Blob:
    digest, size = item.get("digest"), item.get("size")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise BuildError(f"{what}: digest {digest!r} is not sha256:<64 hex>")
    if type(size) is not int or not 0 <= size <= limit:
        raise BuildError(f"{what}: size {size!r} is not a byte count of at most {limit}")
    return _Blob(digest, size)


def _write_index(dest: Path, manifest: _Blob, tag: str) -> None:
    entry = {
        "mediaType": MEDIA_MANIFEST,
        "digest": manifest.digest,
        "size": manifest.size,
        "annotations": {REF_NAME: tag},
        "platform": {"architecture": host_arch(), "os": "linux"},
    }
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [entry]}
    (dest / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_bytes(canonical_json(index))


def seal(shared: Path) -> None:
    """Make the shared cache readable by all and writable by its owner alone (run as root)."""
    shared.chmod(0o755)
    for root, dirs, files in os.walk(shared):
        for name, mode in [(d, 0o755) for d in dirs] + [(f, 0o644) for f in files]:
            path = Path(root) / name
            if not path.is_symlink():
                path.chmod(mode)
