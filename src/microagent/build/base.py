"""Base images: pull from a registry or an OCI layout into the store, flatten, build the rootfs.

The result of a pull is the ``base`` step of every plan built on that image: a key record
``keys/<base key>.json`` (written last — it is what makes the entry count as present) pointing
at verified blobs and at ``rootfs/<base key>.ext4``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from microagent.compiler.lock import ResolvedImage
from microagent.compiler.plan import StepKind, step_key
from microagent.compiler.refs import ImageRef, LayoutRef, host_platform, parse_any_ref
from microagent.errors import IntegrityError, MicroagentError, NotFoundError
from microagent.ext4.mkfs import build_ext4
from microagent.layers.apply import LayerSource, flatten
from microagent.oci import documents as oci
from microagent.oci.layout import Layout
from microagent.oci.registry import RegistryClient
from microagent.store.content import Digest, Store, key_hex

Progress = Callable[[str], None]


class ImageSource(Protocol):
    """Where an image's documents and blobs come from."""

    def resolve(self, platform: str) -> ResolvedImage: ...

    def document(self, digest: str) -> bytes: ...

    def blob(self, digest: str) -> AbstractContextManager[BinaryIO]: ...


@dataclass
class RegistrySource:
    client: RegistryClient
    ref: ImageRef

    def resolve(self, platform: str) -> ResolvedImage:
        return self.client.resolve(self.ref, platform)

    def document(self, digest: str) -> bytes:
        return self.client.manifest(self.ref, digest).data

    def blob(self, digest: str) -> AbstractContextManager[BinaryIO]:
        return self.client.blob(self.ref, digest)


@dataclass
class LayoutSource:
    layout: Layout
    ref: LayoutRef

    def resolve(self, platform: str) -> ResolvedImage:
        return self.layout.resolve(self.ref, platform)

    def document(self, digest: str) -> bytes:
        return self.layout.read_verified(digest)

    def blob(self, digest: str) -> AbstractContextManager[BinaryIO]:
        return self.layout.blob(digest)


def source_for(image: str, base_dir: Path, client: RegistryClient | None = None) -> ImageSource:
    ref = parse_any_ref(image, base_dir)
    if isinstance(ref, LayoutRef):
        return LayoutSource(Layout(ref.path), ref)
    return RegistrySource(client or RegistryClient(), ref)


def base_key(resolved: ResolvedImage) -> str:
    """The plan's ``base`` step key for this image (see compiler.plan)."""
    return step_key(None, StepKind.BASE, {"digest": resolved.digest, "platform": resolved.platform})


def rootfs_entry(key: str) -> str:
    return f"rootfs/{key_hex(key)}.ext4"


@dataclass(frozen=True)
class BaseImage:
    key: str
    reference: str
    digest: str
    platform: str
    rootfs: Path
    config: Mapping[str, Any]
    cached: bool
    seconds: float

    @property
    def env(self) -> list[str]:
        return list((self.config.get("config") or {}).get("Env") or [])

    def env_map(self) -> dict[str, str]:
        """The image's ``Env`` as a mapping (later entries win)."""
        return dict(str(item).partition("=")[::2] for item in self.env)


def _record_of(store: Store, key: str) -> dict[str, Any] | None:
    record = store.get_key(key)
    if record is None or record.get("kind") != "base":
        return None
    if not store.has_entry(str(record.get("rootfs", ""))):
        return None
    return record


def _platform_manifest(source: ImageSource, resolved: ResolvedImage) -> tuple[bytes, oci.Manifest]:
    digest = resolved.platform_digest or resolved.digest
    data = source.document(digest)
    doc = oci.load_document(data, f"manifest {digest}")
    kind = oci.media_type_of(doc, None)
    if kind in oci.INDEX_TYPES:
        entry = oci.select_platform(oci.parse_index(doc, kind), resolved.platform)
        data = source.document(entry.digest)
        doc = oci.load_document(data, f"manifest {entry.digest}")
        kind = oci.media_type_of(doc, None)
    return data, oci.parse_manifest(doc, kind)


def _fetch_blob(store: Store, source: ImageSource, desc: oci.Descriptor, say: Progress) -> None:
    if store.has_blob(desc.digest):
        return
    began = time.monotonic()
    with source.blob(desc.digest) as stream:
        store.put_blob_file(stream, desc.digest, expected_size=desc.size)
    seconds = max(time.monotonic() - began, 1e-6)
    say(f"  {desc.digest[7:19]}  {desc.size / 1e6:8.1f} MB  {desc.size / 1e6 / seconds:7.0f} MB/s")


def _config(store: Store, digest: str) -> Mapping[str, Any]:
    with store.open_blob(digest) as fh:
        return oci.load_document(fh.read(), "image config")


def _diff_ids(config: Mapping[str, Any], layers: int) -> list[str]:
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != layers:
        raise IntegrityError("image config's rootfs.diff_ids does not match the layers")
    return [str(d) for d in diff_ids]


def _layer_sources(store: Store, manifest: oci.Manifest, diff_ids: list[str]) -> list[LayerSource]:
    return [
        LayerSource.from_path(
            store.blob_path(layer.digest), f"layer {i} ({layer.digest[:19]})", Digest.parse(diff)
        )
        for i, (layer, diff) in enumerate(zip(manifest.layers, diff_ids, strict=True))
    ]


@contextmanager
def _scratch(store: Store) -> Iterator[Path]:
    parent = store.root / "tmp"
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".tmp-stage-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _build_rootfs(store: Store, key: str, layers: list[LayerSource], say: Progress) -> Path:
    def build(tmp: Path) -> None:
        with _scratch(store) as work:
            began = time.monotonic()
            meta = flatten(work / "stage", layers)
            say(f"  flattened {len(layers)} layer(s) in {time.monotonic() - began:.1f}s")
            began = time.monotonic()
            build_ext4(work / "stage", meta, tmp, key=key)
            say(f"  built ext4 in {time.monotonic() - began:.1f}s")

    return store.build_once(rootfs_entry(key), build)


def pull_base(
    store: Store,
    image: str,
    *,
    base_dir: Path = Path(),
    platform: str | None = None,
    progress: Progress | None = None,
    client: RegistryClient | None = None,
    resolved: ResolvedImage | None = None,
) -> BaseImage:
    """Make sure ``image`` is in the store as a ready base rootfs; return what it is.

    ``resolved`` (from a lock or an earlier lookup) saves asking the source for the digest;
    the source is then contacted only when something must be downloaded.
    """
    say = progress or (lambda _msg: None)
    began = time.monotonic()
    source = source_for(image, base_dir, client)
    if resolved is None:
        resolved = source.resolve(platform or host_platform())
    key = base_key(resolved)
    record = _record_of(store, key)
    cached = record is not None
    if record is None:
        record = _pull(store, source, resolved, key, say)
    rootfs = store.entry_path(str(record["rootfs"]))
    store.touch(str(record["rootfs"]))
    config = _config(store, str(record["config"]))
    return BaseImage(
        key,
        resolved.reference,
        resolved.digest,
        resolved.platform,
        rootfs,
        config,
        cached,
        time.monotonic() - began,
    )


def _pull(
    store: Store, source: ImageSource, resolved: ResolvedImage, key: str, say: Progress
) -> dict[str, Any]:
    say(f"pulling {resolved.reference} ({resolved.platform})")
    data, manifest = _platform_manifest(source, resolved)
    manifest_digest = store.put_blob_bytes(data)
    _fetch_blob(store, source, manifest.config, say)
    for layer in manifest.layers:
        _fetch_blob(store, source, layer, say)
    config = _config(store, manifest.config.digest)
    diff_ids = _diff_ids(config, len(manifest.layers))
    _build_rootfs(store, key, _layer_sources(store, manifest, diff_ids), say)
    record: dict[str, Any] = {
        "kind": "base",
        "key": key,
        "parent": None,
        "inputs": {"digest": resolved.digest, "platform": resolved.platform},
        "reference": resolved.reference,
        "manifest": str(manifest_digest),
        "config": manifest.config.digest,
        "layers": [
            {**layer.to_json(), "diffId": diff}
            for layer, diff in zip(manifest.layers, diff_ids, strict=True)
        ],
        "rootfs": rootfs_entry(key),
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.put_key(key, record)
    return record


def list_bases(store: Store) -> list[dict[str, Any]]:
    """Key records of every pulled base image whose rootfs is present."""
    out = []
    keys_dir = store.root / "keys"
    for path in sorted(keys_dir.glob("*.json")) if keys_dir.is_dir() else []:
        record = _record_of(store, "sha256:" + path.stem)
        if record is not None:
            out.append(record)
    return out


def remove_base(store: Store, what: str) -> list[str]:
    """Forget base images matching a key, digest or reference; return their keys."""
    removed = []
    wanted = {what, _normalised(what)}
    for record in list_bases(store):
        names = {
            record["key"],
            record["inputs"]["digest"],
            record["reference"],
            record["reference"].split("@")[0],
        }
        short = len(what) >= 6 and record["key"].removeprefix("sha256:").startswith(what)
        if wanted & names or short:
            store.remove(f"keys/{key_hex(record['key'])}.json")
            store.remove(str(record["rootfs"]))
            removed.append(str(record["key"]))
    if not removed:
        raise NotFoundError(f"no pulled image matches {what!r}", hint="see `microagent image ls`")
    return removed


def _normalised(text: str) -> str:
    try:
        return str(parse_any_ref(text, Path.cwd()))
    except MicroagentError:
        return text


def tty_progress(message: str) -> None:
    """Progress lines on stderr, only for humans at a terminal."""
    if sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)
