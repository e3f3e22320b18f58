"""Write a directory tree into an OCI image layout, deterministically.

The same tree (names, modes, owners, contents, link targets and — unless overridden — mtimes)
always gives the same layer, config and manifest digests: entries are sorted, owner names are
dropped (numeric ids only), the gzip header carries no name or time, and JSON is canonical.

Only regular files, directories, symlinks, hard links and FIFOs are written. Device nodes and
sockets are skipped (an image must not carry them), as is everything below the paths given in
``empty_dirs`` (e.g. ``dev``, ``proc``, ``sys``: the directory itself is kept, empty).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
GZIP_LEVEL = 6
CHUNK = 1 << 20

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def canonical_json(value: object) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace (CONVENTIONS §9)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def host_arch() -> str:
    """The OCI architecture name of this machine (``amd64``, ``arm64``)."""
    machine = platform.machine().lower()
    return _ARCH.get(machine, machine)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Layer:
    """A written layer blob: its descriptor and the digest of the uncompressed tar."""

    descriptor: Descriptor
    diff_id: str


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an OCI image config that the stand-ins set."""

    env: Sequence[str] = ()
    cmd: Sequence[str] = ()
    created: str = "1970-01-01T00:00:00Z"
    created_by: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, sink: IO[bytes]) -> None:
        self._sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self._sink.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._sink.flush()


class LayoutWriter:
    """Adds blobs to an OCI image layout directory (``oci-layout``, ``blobs/sha256``)."""

    def __init__(self, layout: Path) -> None:
        self.layout = layout
        self.blobs = layout / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (layout / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))

    def add_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = hashlib.sha256(data).hexdigest()
        target = self.blobs / digest
        if not target.exists():
            temp = self.blobs / f".tmp-{digest}"
            temp.write_bytes(data)
            temp.rename(target)
        return Descriptor(media_type, f"sha256:{digest}", len(data))

    def add_tree(
        self,
        root: Path,
        *,
        mtime: int | None = None,
        owner: tuple[int, int] | None = None,
        empty_dirs: Sequence[str] = (),
    ) -> Layer:
        """Write ``root`` as one gzip layer; return its descriptor and diff_id.

        ``mtime`` / ``owner`` (uid, gid) override every entry's when given.
        """
        temp = self.blobs / f".tmp-layer-{os.getpid()}"
        with temp.open("wb") as sink:
            compressed = _HashingWriter(sink)
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0
            ) as gz:
                plain = _HashingWriter(gz)  # type: ignore[arg-type]
                _write_tar(plain, root, _Overrides(mtime, owner), empty_dirs)
        digest = compressed.hash.hexdigest()
        temp.rename(self.blobs / digest)
        return Layer(
            Descriptor(MEDIA_LAYER, f"sha256:{digest}", compressed.size),
            f"sha256:{plain.hash.hexdigest()}",
        )

    def add_image(self, tag: str, layers: Sequence[Layer], config: ImageConfig) -> Descriptor:
        """Write config + manifest and (re)write ``index.json`` naming the manifest ``tag``."""
        config_desc = self.add_bytes(canonical_json(_config_json(layers, config)), MEDIA_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [layer.descriptor.to_json() for layer in layers],
        }
        manifest_desc = self.add_bytes(canonical_json(manifest), MEDIA_MANIFEST)
        entry = manifest_desc.to_json()
        entry["annotations"] = {REF_NAME: tag}
        entry["platform"] = {"architecture": host_arch(), "os": "linux"}
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [entry]}
        (self.layout / "index.json").write_bytes(canonical_json(index))
        return manifest_desc


def _config_json(layers: Sequence[Layer], config: ImageConfig) -> dict[str, object]:
    runtime: dict[str, object] = {"Env": list(config.env), "Cmd": list(config.cmd)}
    if config.labels:
        runtime["Labels"] = dict(config.labels)
    return {
        "architecture": host_arch(),
        "os": "linux",
        "created": config.created,
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": config.created, "created_by": config.created_by}],
    }


def _walk(root: Path, empty_dirs: Sequence[str]) -> Iterator[tuple[Path, str]]:
    """Yield (path, archive name) for every entry below ``root``, sorted, parents first."""
    pruned = {name.strip("/") for name in empty_dirs}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        if rel in pruned:
            dirnames.clear()
            continue
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            arcname = name if rel == "." else f"{rel}/{name}"
            yield Path(dirpath) / name, arcname


@dataclass(frozen=True)
class _Overrides:
    mtime: int | None
    owner: tuple[int, int] | None


def _write_tar(
    sink: _HashingWriter, root: Path, overrides: _Overrides, empty_dirs: Sequence[str]
) -> None:
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for path, arcname in _walk(root, empty_dirs):
            info = tar.gettarinfo(str(path), arcname)
            if info is None or info.ischr() or info.isblk():
                continue
            info.uname = info.gname = ""
            # Whole seconds, rounded down: .pyc headers record int(st_mtime) of their source.
            info.mtime = int(path.lstat().st_mtime) if overrides.mtime is None else overrides.mtime
            if overrides.owner is not None:
                info.uid, info.gid = overrides.owner
            if info.isreg():
                with path.open("rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)
