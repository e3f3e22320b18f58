"""Base images: pull from a registry or an OCI layout into the store and build their rootfs.

The result of a pull is the ``base`` step of every plan built on that image: a record
``keys/<base key>.json`` (written last — it is what makes the entry count as present) pointing
at verified blobs and at ``rootfs/<base key>.ext4``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.compiler.keys import BaseInputs, StepKind
from microagent.compiler.lock import ResolvedImage
from microagent.compiler.plan import BuildPlan
from microagent.compiler.refs import host_platform, parse_any_ref
from microagent.digests import key_hex
from microagent.errors import ConflictError, IntegrityError, MicroagentError, NotFoundError
from microagent.frozen import Frozen
from microagent.oci import documents as oci
from microagent.progress import Meter, TaskKind
from microagent.store.content import Store
from microagent.store.records import (
    BaseOrigin,
    LayerRef,
    StepRecord,
    all_records,
    read_record,
    rootfs_entry,
    rootfs_ready,
    write_record,
)

if TYPE_CHECKING:
    from microagent.oci.registry import RegistryClient
    from microagent.oci.transport import Repository

Progress = Callable[[str], None]


@dataclass(frozen=True, eq=False, repr=False)
class BaseImage(Frozen):
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


def _config(store: Store, digest: str) -> Mapping[str, Any]:
    with store.open_blob(digest) as fh:
        config = oci.load_document(fh.read(), "image config")
    runtime = config.get("config")
    if runtime is not None and not isinstance(runtime, Mapping):
        raise IntegrityError(f"malformed image config {digest}: `config` is not an object")
    env = (runtime or {}).get("Env")
    if env is not None and not (isinstance(env, list) and all(isinstance(e, str) for e in env)):
        raise IntegrityError(
            f"malformed image config {digest}: `config.Env` is not a list of strings"
        )
    return config


def _image(store: Store, record: StepRecord, cached: bool, seconds: float) -> BaseImage:
    assert record.origin is not None and record.rootfs is not None
    inputs = BaseInputs.of(record.inputs)
    return BaseImage(
        record.key,
        record.origin.reference,
        inputs.digest,
        inputs.platform,
        store.entry_path(record.rootfs),
        _config(store, record.origin.config),
        cached,
        seconds,
    )


def _fetch_blob(store: Store, repo: Repository, desc: oci.Descriptor, say: Progress) -> None:
    if store.has_blob(desc.digest):
        return
    meter = Meter(say, desc.digest, TaskKind.PULL, desc.digest[7:19], desc.size)
    with repo.blob(desc.digest) as stream:
        store.put_blob_file(meter.reader(stream), desc.digest, expected_size=desc.size)
    seconds = max(meter.elapsed, 1e-6)
    meter.finish(
        f"  {desc.digest[7:19]}  {desc.size / 1e6:8.1f} MB  {desc.size / 1e6 / seconds:7.0f} MB/s"
        f"  {seconds:.1f}s"
    )


def _diff_ids(config: Mapping[str, Any], layers: int) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, Mapping) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != layers:
        raise IntegrityError("image config's rootfs.diff_ids does not match the layers")
    return [str(d) for d in diff_ids]


def pull_base(
    store: Store,
    image: str,
    *,
    client: RegistryClient | None = None,
    base_dir: Path = Path(),
    platform: str | None = None,
    progress: Progress | None = None,
    resolved: ResolvedImage | None = None,
    ram: bool = True,
) -> BaseImage:
    """Make sure ``image`` is in the store as a ready base rootfs; return what it is.

    ``resolved`` (from a lock or an earlier lookup) saves asking the source for the digest;
    the source is then contacted only when something must be downloaded.
    """
    # deferred: the registry client and transport are loaded only when a base is pulled
    from microagent.oci.registry import RegistryClient
    from microagent.oci.transport import open_repository, resolve

    say = progress or (lambda _msg: None)
    began = time.monotonic()
    ref = parse_any_ref(image, base_dir)
    repo = open_repository(ref, client or RegistryClient())
    if resolved is None:
        resolved = resolve(repo, ref, platform or host_platform())
    key = BaseInputs(resolved.digest, resolved.platform).key
    record = rootfs_ready(store, key, (StepKind.BASE,))
    cached = record is not None
    if record is None:
        record = _pull(store, repo, resolved, key, say, ram=ram)
    assert record.rootfs is not None
    store.touch(record.rootfs)
    return _image(store, record, cached, time.monotonic() - began)


def _pull(
    store: Store, repo: Repository, resolved: ResolvedImage, key: str, say: Progress, *, ram: bool
) -> StepRecord:
    # deferred: flattening layers into ext4 runs only on a cache miss; a hit never loads it
    from microagent.ext4.rootfs import build_rootfs
    from microagent.layers.apply import stored_layers
    from microagent.oci.transport import platform_manifest

    say(f"pulling {resolved.reference} ({resolved.platform})")
    data, manifest = platform_manifest(repo, resolved)
    manifest_digest = store.put_blob_bytes(data)
    _fetch_blob(store, repo, manifest.config, say)
    for layer in manifest.layers:
        _fetch_blob(store, repo, layer, say)
    diff_ids = _diff_ids(_config(store, manifest.config.digest), len(manifest.layers))
    layers = tuple(
        LayerRef(layer.media_type, layer.digest, layer.size, diff)
        for layer, diff in zip(manifest.layers, diff_ids, strict=True)
    )
    compressed = sum(layer.size for layer in layers)
    build_rootfs(
        store, key, stored_layers(store, layers), compressed_bytes=compressed, ram=ram, say=say
    )
    record = StepRecord(
        StepKind.BASE,
        key,
        None,
        BaseInputs(resolved.digest, resolved.platform).to_json(),
        layers,
        rootfs=rootfs_entry(key),
        origin=BaseOrigin(resolved.reference, str(manifest_digest), manifest.config.digest),
    )
    write_record(store, record)
    return record


def ready_base(store: Store, plan: BuildPlan) -> BaseImage | None:
    """The plan's base image when it is pulled and its root filesystem built (what
    :func:`pull_base` would return as cached, without opening the source), else None."""
    record = rootfs_ready(store, plan.steps[0].key, (StepKind.BASE,))
    if record is None or record.rootfs is None:
        return None
    store.touch(record.rootfs)
    return _image(store, record, True, 0.0)


def recorded_base(store: Store, plan: BuildPlan) -> BaseImage | None:
    """The plan's base image from its record when its root filesystem is not needed.

    After a remote hit on a setup step the base record exists (for its config and
    environment) but its root filesystem was never built; nothing boots from it as long as a
    later setup step is ready. Returns None whenever the normal pull should run instead.
    """
    record = read_record(store, plan.steps[0].key)
    if record is None or record.kind is not StepKind.BASE or record.origin is None:
        return None
    if record.rootfs is None or store.has_entry(record.rootfs):
        return None
    if not any(rootfs_ready(store, s.key) for s in plan.of_kind(StepKind.SETUP)):
        return None
    if not store.has_blob(record.origin.config):
        return None
    return _image(store, record, True, 0.0)


def list_bases(store: Store) -> list[StepRecord]:
    """Records of every pulled base image whose rootfs is present."""
    return [
        record
        for record in all_records(store)
        if record.kind is StepKind.BASE and rootfs_ready(store, record.key) is not None
    ]


def remove_base(
    store: Store, what: str, *, dry_run: bool = False, in_use: Container[str] = ()
) -> list[str]:
    """Forget base images matching a key, digest or reference; return their keys
    (``dry_run``: only return them). One whose image is in ``in_use`` (store entry names a
    workspace boots from: the bottom of a stacked root, or a root without setup steps) is
    refused: nothing is removed."""
    removed: list[StepRecord] = []
    wanted = {what, _normalised(what)}
    for record in list_bases(store):
        assert record.origin is not None and record.rootfs is not None
        reference = record.origin.reference
        names = {
            record.key,
            BaseInputs.of(record.inputs).digest,
            reference,
            reference.split("@")[0],
        }
        short = len(what) >= 6 and record.key.removeprefix("sha256:").startswith(what)
        if not (wanted & names or short):
            continue
        if record.rootfs in in_use:
            raise ConflictError(
                f"image {reference} is the root (or its bottom image) of a workspace",
                hint="delete the workspaces made from it first (`microagent list`)",
            )
        removed.append(record)
    if not removed:
        raise NotFoundError(f"no pulled image matches {what!r}", hint="see `microagent image ls`")
    for record in removed if not dry_run else ():
        store.remove(f"keys/{key_hex(record.key)}.json")
        store.remove(str(record.rootfs))
    return [record.key for record in removed]


def _normalised(text: str) -> str:
    try:
        return str(parse_any_ref(text, Path.cwd()))
    except MicroagentError:
        return text
