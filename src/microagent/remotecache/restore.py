"""Cache hits from remote caches: find the deepest published step a plan can use, download
its missing layers (verified, in parallel), flatten them once, and record it locally.

No setup VM boots for a remote hit. Only the deepest hit is materialised: for a plan whose
last setup step is published, the store ends up with that step's record and root filesystem,
and the records (not the root filesystems) of the steps before it, base included — enough to
publish the chain again and to read the image environment, without flattening anything
twice (a hit stacked on a local root gives the steps before it their stacks too: they cost
nothing more). Layers are flattened in order as soon as each download finishes, while the
later ones are still downloading.

A hit whose chain reaches a step this store holds with its root (and whose layers after it
are small) is a delta hit (``delta``): only those layers are fetched. With layer disks on,
each one becomes its layer disk (in parallel) and the hit's root is the local root with them
stacked on it — no image of its own; otherwise (a stack that would be too deep, a layer that
makes no disk) the hit's image is derived from a local one as before.

Integrity: every record is verified against its key before anything is downloaded (see
``records``), the chain is verified back to a local step or to the base image's own
documents, every blob against its digest as it is stored, every layer against its diff_id as
it is flattened. A setup step's packed rootfs image is used only when the verified step
record names it (and its artifact agrees, within a size bound); it is checked against its
blob digest, its decoded digest and by ``e2fsck -fn`` before it enters the store. Records
are written last, so an interrupted or refused restore leaves nothing that counts as cached
(verified blobs may stay; they are valid content).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from microagent.compiler.keys import StepKind
from microagent.compiler.plan import BuildPlan, CachedStep, Step, StepCache
from microagent.digests import Digest
from microagent.errors import IntegrityError, MicroagentError, NotFoundError, RegistryError
from microagent.ext4.packed import MEDIA_TYPES as ROOTFS_MEDIA_TYPES
from microagent.oci import documents as oci
from microagent.progress import Meter, TaskKind, megabytes, rate
from microagent.remotecache.delta import (
    Delta,
    TooLarge,
    check_names,
    decompress_layer,
    find_delta,
    worth_it,
)
from microagent.remotecache.records import (
    PublishedStep,
    parse_rootfs_manifest,
    parse_step_manifest,
    rootfs_image_problem,
    rootfs_tag,
    step_tag,
    verify_base,
    verify_chain,
)
from microagent.store.content import Store
from microagent.store.records import (
    MAX_STACK,
    BaseOrigin,
    LayerRef,
    PackedImage,
    RootStack,
    StepRecord,
    layer_disk_entry,
    layers_stored,
    read_record,
    root_of,
    rootfs_entry,
    rootfs_ready,
    write_record,
)

if TYPE_CHECKING:
    from microagent.oci.transport import Repository

Say = Callable[[str], None]
FETCH_WORKERS = 4
DISK_WORKERS = min(4, max(2, os.cpu_count() or 2))  # layer disks built at once (mke2fs)


@dataclass(frozen=True)
class Hit:
    """A verified published step and where it was found."""

    source: Repository
    step: PublishedStep


@dataclass
class RestoreStats:
    """What restoring cost: for the JSON report and the benchmark."""

    steps: list[dict[str, str]] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    ext4_seconds: float = 0.0
    images: int = 0  # rootfs images used instead of a flatten
    derived: list[dict[str, Any]] = field(default_factory=list)  # delta hits (see ``delta``)
    stacked: list[dict[str, Any]] = field(default_factory=list)  # delta hits as layer disks

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "blobsFetched": self.blobs,
            "bytesFetched": self.bytes,
            "seconds": round(self.seconds, 3),
            "ext4Seconds": round(self.ext4_seconds, 3),
            "rootfsImages": self.images,
            "derived": list(self.derived),
            "stacked": list(self.stacked),
        }


def _corrupt(exc: MicroagentError, what: str, where: str) -> IntegrityError:
    return IntegrityError(
        f"{what} from {where} is corrupt: {exc.message}",
        hint="the remote cache entry was damaged or tampered with; nothing was stored. "
        "Re-publish it (`microagent build --push`) or build without --cache-from",
    )


class BrokenChainError(NotFoundError):
    """A published step's parent is missing from its cache (a partly pruned repository)."""


class Restorer:
    """Looks steps up in remote caches (first hit wins) and restores them into the store.

    ``ram`` lets flattening stage in RAM; ``packed_images`` lets a setup step's published
    rootfs image stand in for a flatten (``Settings.ram_stage`` / ``cache_rootfs``);
    ``derive`` lets a hit whose chain reaches a local image be derived from it (``delta``);
    ``layered`` lets such a hit's root be the local root with the missing layers' disks
    stacked on it instead (``Settings.layer_disks``).
    """

    def __init__(
        self,
        store: Store,
        sources: Sequence[Repository],
        say: Say | None = None,
        *,
        ram: bool = True,
        packed_images: bool = True,
        derive: bool = True,
        layered: bool = True,
    ) -> None:
        self.store = store
        self.sources = tuple(sources)
        self.say: Say = say or (lambda _m: None)
        self.ram = ram
        self.packed_images = packed_images
        self.derive = derive
        self.layered = layered
        self.warnings: list[str] = []
        self.stats = RestoreStats()
        self._hits: dict[str, Hit | None] = {}
        self._lock = threading.Lock()

    # -- lookups ------------------------------------------------------------------------------

    def probe(self, key: str, expected: Step | None = None) -> Hit | None:
        """One request per source until a verified hit; unreachable sources are warnings."""
        if key not in self._hits:
            self._hits[key] = None
            for source in self.sources:
                hit = self._probe_in(source, key, expected)
                if hit is not None:
                    self._hits[key] = hit
                    break
        return self._hits[key]

    def _probe_in(self, source: Repository, key: str, expected: Step | None) -> Hit | None:
        try:
            found = source.find_manifest(step_tag(key))
            if found is None:
                return None
            return Hit(source, parse_step_manifest(found.data, key, expected))
        except IntegrityError as exc:
            raise _corrupt(exc, f"step manifest {key[:19]}…", source.where) from exc
        except (RegistryError, NotFoundError) as exc:
            self._warn(f"remote cache {source.where} not usable: {exc.message}")
            return None

    def _warn(self, message: str) -> None:
        with self._lock:  # layer disks are built in worker threads
            if message in self.warnings:
                return
            self.warnings.append(message)
        self.say(f"warning: {message}")

    # -- restoring ----------------------------------------------------------------------------

    def restore_plan(self, plan: BuildPlan) -> Hit | None:
        """Make the deepest base/setup step of ``plan`` that any cache has local.

        A step recorded locally whose layers are all stored (an intermediate step of an
        earlier hit, or a root filesystem or layer disk that was pruned) is rebuilt without
        a download: a stack's missing layer disks, else its chain flattened.
        """
        steps = [s for s in plan.steps if s.kind.in_rootfs]
        for step in reversed(steps):
            if rootfs_ready(self.store, step.key) is not None:
                return None
            if self._rebuild_local(step.key):
                return None
            hit = self.probe(step.key, step) if self.sources else None
            if hit is None:
                continue
            try:
                self.restore(hit)
            except BrokenChainError as exc:
                self._warn(exc.message)
                continue
            return hit
        return None

    def restore(self, hit: Hit) -> None:
        """Download, verify, materialise and record one hit (and the base record it needs)."""
        began = time.monotonic()
        chain = self._chain(hit)
        base = chain[0] if chain and chain[0].kind is StepKind.BASE else None
        entry = rootfs_entry(hit.step.key)
        existed = self.store.has_entry(entry)
        try:
            how, stacks = self._materialise(hit, base, chain)
        except BaseException:
            if not existed:  # e.g. the image unpacked but a layer was refused
                self.store.remove(entry)
            raise
        if base is not None:
            self._record_base(base, hit.source.where)
        for step in chain:  # intermediate steps too (verified; no rootfs of their own)
            if step.kind is not StepKind.BASE:
                self._record_step(step, hit.source.where, stacks.get(step.key))
        self._done(hit, how, time.monotonic() - began)

    def _materialise(
        self, hit: Hit, base: PublishedStep | None, chain: Sequence[PublishedStep]
    ) -> tuple[str, Mapping[str, RootStack]]:
        """Fetch every missing blob (in parallel) and make the hit's root; say how, and the
        stacks of the steps whose root is stacked on a local one."""
        how, stacks = "records only", {}
        over = self._delta(hit, chain, stacked=True)
        with ThreadPoolExecutor(FETCH_WORKERS) as pool:
            # the base's documents first: small, and checked before any record is written
            documents = pool.submit(self._fetch_base_documents, hit.source, base) if base else None
            pending = self._fetch_layers(pool, hit)
            if over is not None:
                stacks = self._stack(hit, over, pending)
            delta = None if stacks else self._delta(hit, chain)
            if stacks:
                assert over is not None
                how = f"stacked on local {over.ancestor[7:19]} + {len(over.steps)} layer disks"
            elif delta is not None and self._derive(hit, delta, pending):
                how = f"derived from local {delta.ancestor[7:19]} + {len(delta.steps)} layers"
            elif hit.step.kind.in_rootfs:
                how = "rootfs image" if self._unpack_image(hit) else "flattened"
                if how == "flattened":
                    self._build_rootfs(hit.step.key, hit.step.layers, pending)
            for future in [documents, *pending.values()]:
                if future is not None:
                    future.result()
        return how, stacks

    def _done(self, hit: Hit, how: str, seconds: float) -> None:
        self.stats.seconds += seconds
        step = hit.step
        self.stats.steps.append(
            {"key": step.key, "kind": step.kind.value, "where": hit.source.where}
        )
        self.say(
            f"[{step.kind.value}] {step.key[7:19]}  REMOTE HIT from {hit.source.where}: "
            f"{len(step.layers)} layers ({how}), {self.stats.bytes / 1e6:.1f} MB fetched, "
            f"{seconds:.2f}s (no setup VM)"
        )

    def _chain(self, hit: Hit) -> list[PublishedStep]:
        """The published steps from the first one missing locally down to ``hit``, verified."""
        chain = [hit.step]
        while chain[-1].kind is StepKind.SETUP:
            step = chain[-1]
            assert step.parent is not None
            local = read_record(self.store, step.parent)
            if local is not None and local.kind.in_rootfs:
                self._check_local_parent(hit, step, local.layers)
                break
            parent = self._parent_in(hit.source, step.parent)
            if parent is None or not parent.step.kind.in_rootfs:
                raise BrokenChainError(
                    f"{hit.source.where} has step {step.key[:19]}… but not its parent"
                )
            verify_chain(step, parent.step.layers)
            chain.append(parent.step)
        if chain[-1].kind is StepKind.BASE:
            try:
                verify_base(chain[-1])
            except MicroagentError as exc:
                raise _corrupt(exc, "base step", hit.source.where) from exc
        chain.reverse()
        return chain

    def _check_local_parent(
        self, hit: Hit, step: PublishedStep, layers: Sequence[LayerRef]
    ) -> None:
        """A published step built on other layers of its parent than this store's (setup
        steps are not byte-reproducible: the parent was built here) is a miss, not an error:
        taking it would record a chain the local parent's image does not hold."""
        try:
            verify_chain(step, layers)
        except IntegrityError as exc:
            raise BrokenChainError(
                f"{hit.source.where} has step {step.key[:19]}… built on other layers of its "
                f"parent {str(step.parent)[:19]}… than this machine's; building it here"
            ) from exc

    def _parent_in(self, source: Repository, key: str) -> Hit | None:
        """A parent step from ``source``: the hit planning already verified, else a probe."""
        known = self._hits.get(key)
        if known is not None and known.source is source:
            return known
        return self._probe_in(source, key, None)

    def _fetch_layers(self, pool: ThreadPoolExecutor, hit: Hit) -> dict[str, Future[None]]:
        pending: dict[str, Future[None]] = {}
        for layer in hit.step.layers:
            if not self.store.has_blob(layer.digest) and layer.digest not in pending:
                pending[layer.digest] = pool.submit(
                    self._fetch_blob, hit.source, layer.digest, layer.size, "layer"
                )
        return pending

    def _fetch_blob(self, source: Repository, digest: str, size: int, what: str) -> None:
        meter = Meter(self.say, digest, TaskKind.PULL, digest[7:19], size)
        try:
            with source.blob(digest) as stream:
                self.store.put_blob_file(meter.reader(stream), digest, expected_size=size)
        except IntegrityError as exc:
            raise _corrupt(exc, f"{what} {digest[:19]}…", source.where) from exc
        except MicroagentError:
            raise
        except Exception as exc:  # the transport broke mid-stream (urllib3, OSError)
            raise RegistryError(
                f"downloading {what} {digest[:19]}… from {source.where} failed: {exc}",
                hint="nothing was stored; retry",
            ) from exc
        meter.finish(f"  {digest[7:19]}  {megabytes(size)}  {rate(size, meter.elapsed)}")
        with self._lock:
            self.stats.blobs += 1
            self.stats.bytes += size

    def _fetch_base_documents(self, source: Repository, base: PublishedStep) -> None:
        assert base.base is not None
        for digest, data in base.base.documents.items():
            self.store.put_blob_bytes(data, digest)
        manifest = verify_base(base)
        if not self.store.has_blob(manifest.config.digest):
            self._fetch_blob(source, manifest.config.digest, manifest.config.size, "config")
        with self.store.open_blob(manifest.config.digest) as fh:
            config = oci.load_document(fh.read(), "base image config")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        if diff_ids != [layer.diff_id for layer in base.layers]:
            raise _corrupt(
                IntegrityError("config diff_ids differ from the layers"), "base step", source.where
            )

    def _unpack_image(self, hit: Hit) -> bool:
        """Take a setup step's published rootfs image instead of flattening; False if none."""
        image = self._usable_image(hit)
        if image is None:
            return False
        where, key = hit.source.where, hit.step.key

        # deferred: unpacking a published rootfs image (zstd) happens only on a remote hit
        from microagent.ext4 import packed

        def unpack(tmp: Path) -> None:
            try:
                with hit.source.blob(image.blob) as stream:
                    label = f"rootfs image {image.blob[7:19]}"
                    meter = Meter(self.say, image.blob, TaskKind.PULL, label, image.blob_size)
                    packed.unpack(meter.reader(stream), tmp, image)
                took = meter.elapsed
                size = image.blob_size
                meter.finish(f"  {label}  {megabytes(size)}  {rate(size, took)}  {took:.1f}s")
            except IntegrityError as exc:
                raise _corrupt(exc, f"rootfs image {image.blob[:19]}…", where) from exc

        try:
            self.store.build_once(rootfs_entry(key), unpack)
        except (RegistryError, NotFoundError) as exc:  # e.g. the blob was garbage-collected
            self._warn(f"rootfs image of {key[:19]}… not usable ({exc.message}); flattening")
            return False
        with self._lock:
            self.stats.blobs += 1
            self.stats.bytes += image.blob_size
            self.stats.images += 1
        return True

    # -- delta hits (see ``delta``) -----------------------------------------------------------

    def _delta(
        self, hit: Hit, chain: Sequence[PublishedStep], *, stacked: bool = False
    ) -> Delta | None:
        """The local ancestor to derive the hit from (with ``stacked``: to stack the missing
        layers' disks on, within :data:`MAX_STACK`), if there is one and the rule holds."""
        if not (self.layered if stacked else self.derive) or not chain:
            return None
        if not hit.step.kind.in_rootfs:
            return None
        found = find_delta(self.store, chain, stacked=stacked)
        if found is None or not worth_it(found, hit.step, images=self.packed_images):
            return None
        return None if stacked and found.stack_depth > MAX_STACK else found

    def _stack(
        self, hit: Hit, delta: Delta, pending: Mapping[str, Future[None]]
    ) -> dict[str, RootStack]:
        """Build the delta's layer disks (in parallel, each once its download is done); each
        step's root as the ancestor's with them stacked on it, or nothing (the caller falls
        back) when a layer makes no disk or building one failed."""
        began, layers = time.monotonic(), delta.layers
        first = len(hit.step.layers) - len(layers)  # the index of the delta's first layer
        with ThreadPoolExecutor(min(DISK_WORKERS, len(layers))) as pool:
            jobs = [pool.submit(self._layer_disk, layer, first + i, pending)
                    for i, layer in enumerate(layers)]  # fmt: skip
            failed = [why for why in (job.result() for job in jobs) if why is not None]
        below = delta.below
        if failed or below is None or not all(map(self.store.has_entry, below.entries)):
            why = failed[0] if failed else "the local root is gone"
            self.say(f"  {hit.step.key[7:19]}: not stacked ({why}); taking the hit as before")
            return {}
        seconds = time.monotonic() - began
        with self._lock:
            self.stats.ext4_seconds += seconds
            self.stats.stacked.append(
                {"key": hit.step.key, "from": delta.ancestor, "layers": len(layers),
                 "seconds": round(seconds, 3)}
            )  # fmt: skip
        return dict(delta.stacks([layer_disk_entry(layer.diff_id) for layer in layers]))

    def _layer_disk(
        self, layer: LayerRef, index: int, pending: Mapping[str, Future[None]]
    ) -> str | None:
        """Build ``layer``'s disk unless it exists; why not, when it makes none. A download
        that failed is an error. A layer the disk's extractor refuses is not (the full hit
        checks it as ever): a flatten also takes a hard link into a lower layer."""
        # deferred: building layer disks (mke2fs, debugfs) runs only on a delta hit
        from microagent.ext4.layerdisk import NotLayerable
        from microagent.ext4.rootfs import ensure_layer_disk
        from microagent.layers.apply import LayerSource

        if layer.digest in pending:
            pending[layer.digest].result()
        source = LayerSource.stored(self.store, layer, index)
        try:
            ensure_layer_disk(self.store, source, size_hint=layer.size, ram=self.ram)
        except (NotLayerable, IntegrityError) as exc:
            return exc.message
        except (MicroagentError, OSError) as exc:  # mke2fs, debugfs or the disk failed
            why = exc.message if isinstance(exc, MicroagentError) else str(exc)
            self._warn(f"building the layer disk of {layer.digest[:19]}… failed ({why})")
            return why
        return None

    def _derive(self, hit: Hit, delta: Delta, pending: Mapping[str, Future[None]]) -> bool:
        """Apply the delta's layers in order onto a copy of the ancestor's image; False (the
        caller falls back) when a layer is not derivable or the derive failed. A layer that
        does not match its diff_id or that the extractor refuses is an error."""
        began = time.monotonic()
        image, made = delta.image, []
        try:
            for key, layer in delta.steps:
                if layer.digest in pending:
                    pending[layer.digest].result()
                existed = self.store.has_entry(rootfs_entry(key))
                derived = self._derive_one(hit, key, layer, image)
                if derived is None:
                    return False
                if not existed and key != hit.step.key:
                    made.append(rootfs_entry(key))  # an intermediate image: temporary
                image = derived
        finally:
            for entry in made:
                self.store.remove(entry)
        seconds = time.monotonic() - began
        with self._lock:
            self.stats.ext4_seconds += seconds
            self.stats.derived.append(
                {"key": hit.step.key, "from": delta.ancestor, "layers": len(delta.steps),
                 "seconds": round(seconds, 3)}
            )  # fmt: skip
        return True

    def _derive_one(self, hit: Hit, key: str, layer: LayerRef, parent: Path) -> Path | None:
        """``rootfs/<key>.ext4`` as ``parent`` plus ``layer``; None if not derived."""
        # deferred: deriving (debugfs, zstd) happens only on a delta hit
        from microagent.ext4.derive import MAX_CHANGE_FRACTION
        from microagent.ext4.rootfs import derive_rootfs

        where, what = hit.source.where, f"layer {layer.digest[:19]}…"
        with self.store.scratch_dir() as work:
            tar = work / "layer.tar"
            try:
                limit = int(MAX_CHANGE_FRACTION * parent.stat().st_size)  # derive's own bound
                decompress_layer(self.store.blob_path(layer.digest), layer, tar, limit=limit)
                check_names(tar)
                done = derive_rootfs(self.store, key, parent, tar, ram=self.ram)
            except TooLarge as exc:
                self.say(f"  {key[7:19]}: not derived ({exc}); taking the full hit")
                return None
            except IntegrityError as exc:
                raise _corrupt(exc, what, where) from exc
            except (MicroagentError, OSError) as exc:  # debugfs or the disk failed
                why = exc.message if isinstance(exc, MicroagentError) else str(exc)
                self._warn(f"deriving {key[:19]}… failed ({why}); taking the full hit")
                return None
        if done.path is None:
            self.say(f"  {key[7:19]}: not derived ({done.reason}); taking the full hit")
        return done.path

    def _usable_image(self, hit: Hit) -> PackedImage | None:
        """The image the verified step record names, if its ``rootfs-<hex>`` artifact is
        published, matches it and is within bounds (else the layers are flattened)."""
        step = hit.step
        if step.kind is not StepKind.SETUP or not self.packed_images or not step.rootfs_image:
            return None  # an older record without image fields: flatten
        where, key, image_format = hit.source.where, step.key, step.rootfs_image.format
        if image_format not in ROOTFS_MEDIA_TYPES:
            self._warn(f"rootfs image of {key[:19]}… from {where} has format {image_format}, "
                       "which this version cannot read; flattening")  # fmt: skip
            return None
        try:
            found = hit.source.find_manifest(rootfs_tag(key, image_format))
            published = (
                None if found is None else parse_rootfs_manifest(found.data, key, image_format)
            )
        except IntegrityError as exc:
            raise _corrupt(exc, f"rootfs manifest {key[:19]}…", where) from exc
        except (RegistryError, NotFoundError):
            return None
        if published is None:
            return None
        problem = rootfs_image_problem(step, published)
        if problem is not None:
            self._warn(f"rootfs image of {key[:19]}… from {where} not used ({problem}); flattening")
            return None
        return step.rootfs_image

    def _rebuild_local(self, key: str) -> bool:
        """Make a recorded step's root again from its stored layers, no VM: a stack's missing
        entries at their own paths when it can (see :meth:`_rebuild_stack`), else the
        flattened chain as one image (named in the record); False if a layer is missing."""
        record = read_record(self.store, key)
        if record is None or not record.kind.in_rootfs or not layers_stored(self.store, record):
            return False
        began = time.monotonic()
        stacked = self._rebuild_stack(record)
        if not stacked:
            self._build_rootfs(key, record.layers, {})
            if record.rootfs != rootfs_entry(key):  # a stack: the record names its image now
                write_record(self.store, record.with_rootfs(rootfs_entry(key)))
        how = "stack rebuilt in place" if stacked else "rebuilt"
        self.say(f"[{record.kind.value}] {key[7:19]}  {how} from stored layers "
                 f"in {time.monotonic() - began:.2f}s (no setup VM)")  # fmt: skip
        return True

    def _rebuild_stack(self, record: StepRecord) -> bool:
        """Build the missing entries of a stacked record at their own paths (a workspace may
        boot from them): its bottom image (see :meth:`_rebuild_image`), then its layer disks;
        False (flatten instead) when it has no stack, its image cannot be put back, or a
        layer does not make a disk."""
        stack = record.stack
        if stack is None:
            return False
        if not self.store.has_entry(stack.image) and not self._rebuild_image(stack.image, record):
            return False
        # deferred: building a layer disk (mke2fs) runs only when one was pruned
        from microagent.ext4.layerdisk import NotLayerable
        from microagent.ext4.rootfs import ensure_layer_disk
        from microagent.layers.apply import LayerSource

        for i, layer in enumerate(record.layers):
            entry = layer_disk_entry(layer.diff_id)
            if entry not in stack.layers or self.store.has_entry(entry):
                continue
            source = LayerSource.stored(self.store, layer, i)
            try:
                ensure_layer_disk(self.store, source, size_hint=layer.size, ram=self.ram)
            except NotLayerable:
                return False
        return root_of(self.store, record) is not None

    def _rebuild_image(self, entry: str, record: StepRecord) -> bool:
        """Put a stack's missing bottom image back where it was: it is the image of a step up
        the chain (the base, or a step whose chain was merged), named by that step's key and
        flattened again from that step's layers, which begin ``record``'s (all stored)."""
        below = read_record(self.store, "sha256:" + PurePosixPath(entry).stem)
        if below is None or below.rootfs != entry or not below.kind.in_rootfs:
            return False
        if below.layers != record.layers[: len(below.layers)]:
            return False
        self._build_rootfs(below.key, below.layers, {})
        return self.store.has_entry(entry)

    def _build_rootfs(
        self, key: str, layers: Sequence[LayerRef], pending: Mapping[str, Future[None]]
    ) -> None:
        """Flatten ``layers`` in order, each as soon as its download is done."""
        # deferred: flattening layers into ext4 runs only on a cache miss; a hit never loads it
        from microagent.ext4.rootfs import build_rootfs
        from microagent.layers.apply import LayerSource

        sources = [
            LayerSource(
                f"layer {i} ({layer.digest[:19]})",
                self._opener(layer, pending),
                Digest.parse(layer.diff_id),
            )
            for i, layer in enumerate(layers)
        ]
        compressed = sum(layer.size for layer in layers)
        _path, timings = build_rootfs(
            self.store, key, sources, compressed_bytes=compressed, ram=self.ram
        )
        self.stats.ext4_seconds += timings.ext4_seconds

    def _opener(
        self, layer: LayerRef, pending: Mapping[str, Future[None]]
    ) -> Callable[[], BinaryIO]:
        def open_layer() -> BinaryIO:
            if layer.digest in pending:
                pending[layer.digest].result()
            return self.store.blob_path(layer.digest).open("rb")

        return open_layer

    def _record_base(self, base: PublishedStep, where: str) -> None:
        assert base.base is not None and base.inputs is not None
        if rootfs_ready(self.store, base.key) is not None:
            return
        origin = BaseOrigin(base.base.reference, base.base.manifest, base.base.config)
        write_record(self.store, base.to_local(where, origin=origin))

    def _record_step(self, step: PublishedStep, where: str, stack: RootStack | None) -> None:
        """The step's local record; with ``stack``, its root is that stack (no image)."""
        record = step.to_local(where)
        if stack is not None:
            record = replace(record, rootfs=None, stack=stack)
        write_record(self.store, record)


# -- planning with remote caches ---------------------------------------------------------------


class RemoteStepCache:
    """The local cache first, then the remote ones (``where`` names the cache of a hit)."""

    def __init__(self, local: StepCache, restorer: Restorer) -> None:
        self.local = local
        self.restorer = restorer

    def lookup(self, key: str) -> CachedStep | None:
        found = self.local.lookup(key)
        if found is not None:
            return found
        hit = self.restorer.probe(key)
        if hit is None:
            return None
        step = hit.step
        return CachedStep(
            step.key, step.kind, step.parent, dict(step.inputs or {}), hit.source.where
        )

    def children(self, parent: str | None, kind: StepKind) -> Sequence[CachedStep]:
        return self.local.children(parent, kind)


def is_local(store: Store, step: PublishedStep) -> bool:
    """Whether a published step is already usable from the local store."""
    if step.kind.in_rootfs:
        return rootfs_ready(store, step.key) is not None
    record = read_record(store, step.key)
    return record is not None and layers_stored(store, record)
