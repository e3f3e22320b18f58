"""A spec's ``disks`` and ``bundles``: captured at ``create``, attached at every ``start``.

What a user gets (docs/spec.md, "Disks and bundles"):

- A disk is captured when the workspace is created, like ``files``: later edits to the
  image in the spec's folder change nothing until the next ``create``, and the workspace
  never writes the user's file.
- ``ro``: one shared, read-only copy in the store per distinct content (by sha256), reused
  by every workspace; attached read-only to the VMM and mounted ``ro,noload``.
- ``rw``: the workspace's own copy (``disks/<name>.ext4`` in its folder): writes persist
  across halt/start until ``delete``, and two workspaces never share one.
- A bundle (a tar archive) is unpacked by the layer extractor's rules into an ext4 image
  once per archive content, cached in the store, then attached like a disk (a ``rw`` bundle
  is copied into the workspace).

Every image is checked with ``e2fsck -fn`` after it is copied (what boots is what was
checked). A bad disk or bundle is reported at its line in the spec.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from microagent.compiler.files import hash_file
from microagent.compiler.spec import Disk, DiskMode, Spec
from microagent.digests import canonical_json, key_hex, sha256_digest
from microagent.errors import Diagnostic, IntegrityError, InvalidInputError, SpecError
from microagent.fsutil import write_json_atomic
from microagent.store.content import Store
from microagent.workspace.records import AttachedDisk, Record, Workspace

# A spec without disks or bundles (most creates) needs neither the image tools (tarfile, the
# layer extractor) nor the boot code: they load where a disk is captured or attached.
if TYPE_CHECKING:
    from microagent.runtime.boot import ExtraDisk

IMAGE_FORMAT = 1  # bump when how a stored disk or bundle image is made changes
IMAGE_FILE = "disk.ext4"
MANIFEST_FILE = "manifest.json"
BAD_IMAGE_HINT = "fix the image or archive, or remove it from the spec"


def capture_disks(store: Store, spec: Spec, ws: Workspace) -> tuple[AttachedDisk, ...]:
    """Check and capture every disk and bundle of ``spec`` for ``ws`` (the workspace folder
    being made); SpecError, located at the spec field, for a bad one."""
    wanted = [(d, "disk") for d in spec.disks] + [(b, "bundle") for b in spec.bundles]
    if not wanted:
        return ()
    from microagent.runtime.boot import MAX_EXTRA_DISKS  # deferred: see the imports

    if len(wanted) > MAX_EXTRA_DISKS:
        extra = wanted[MAX_EXTRA_DISKS][0]
        raise _located(
            extra,
            InvalidInputError(
                f"{len(wanted)} disks and bundles, but a VM takes at most {MAX_EXTRA_DISKS}",
                hint="merge some of them into one image or archive",
            ),
        )
    return tuple(_capture(store, ws, disk, kind) for disk, kind in wanted)


def _capture(store: Store, ws: Workspace, disk: Disk, kind: str) -> AttachedDisk:
    try:
        if kind == "bundle":
            return _bundle(store, ws, disk)
        if disk.mode is DiskMode.RW:
            return _own_disk(ws, disk)
        return _shared_disk(store, disk)
    except (IntegrityError, InvalidInputError) as exc:
        raise _located(disk, exc) from exc
    except OSError as exc:
        problem = InvalidInputError(f"cannot read {disk.path}: {exc.strerror or exc}")
        raise _located(disk, problem) from exc


def _located(disk: Disk, exc: InvalidInputError | IntegrityError) -> SpecError:
    where = f"{disk.origin}.path" if disk.origin else ""
    hint = exc.hint or BAD_IMAGE_HINT
    return SpecError([Diagnostic(exc.message, disk.location, where, hint)])


def _attached(disk: Disk, kind: str, digest: str, entry: str = "") -> AttachedDisk:
    return AttachedDisk(
        disk.name, disk.mountpoint, disk.mode.value, kind, str(disk.path), digest, entry
    )


def _own_disk(ws: Workspace, disk: Disk) -> AttachedDisk:
    """A rw disk: the workspace's own checked copy."""
    from microagent.ext4.images import copy_checked  # deferred: see the imports

    target = ws.disk_copy(disk.name)
    target.parent.mkdir(mode=0o700, exist_ok=True)
    digest = copy_checked(disk.path, target, what=f"disk {disk.name!r}")
    return _attached(disk, "disk", "sha256:" + digest)


def _shared_disk(store: Store, disk: Disk) -> AttachedDisk:
    """A ro disk: the store's copy for its content, made (and checked) once."""
    from microagent.ext4.images import copy_checked  # deferred: see the imports

    _, digest = hash_file(disk.path)
    entry = f"disks/{_image_key('disk', digest)}"

    def build(tmp: Path) -> None:
        tmp.mkdir(mode=0o700)
        copy_checked(disk.path, tmp / IMAGE_FILE, expect=digest, what=f"disk {disk.name!r}")
        _write_manifest(tmp, "disk", digest)

    store.build_once(entry, build)
    return _attached(disk, "disk", "sha256:" + digest, entry)


def _bundle(store: Store, ws: Workspace, disk: Disk) -> AttachedDisk:
    """A bundle: the store's image for its archive's content, built once; a rw bundle is
    copied into the workspace."""
    from microagent.ext4.images import copy_sparse  # deferred: see the imports

    _, digest = hash_file(disk.path)
    key = _image_key("bundle", digest)
    entry = f"bundles/{key}"
    path = store.build_once(entry, _bundle_builder(disk, key, digest))
    if disk.mode is DiskMode.RO:
        return _attached(disk, "bundle", "sha256:" + digest, entry)
    target = ws.disk_copy(disk.name)
    target.parent.mkdir(mode=0o700, exist_ok=True)
    copy_sparse(path / IMAGE_FILE, target)
    return _attached(disk, "bundle", "sha256:" + digest)


def _bundle_builder(disk: Disk, key: str, digest: str) -> Callable[[Path], None]:
    from microagent.ext4.images import archive_to_ext4  # deferred: see the imports

    def build(tmp: Path) -> None:
        tmp.mkdir(mode=0o700)
        made = archive_to_ext4(disk.path, tmp / IMAGE_FILE, key=key, name=disk.name)
        if made.archive_sha256 != digest:
            raise IntegrityError(
                f"{disk.path} changed while it was being unpacked",
                hint="run create again once nothing is writing to the archive",
            )
        _write_manifest(tmp, "bundle", digest)

    return build


def _image_key(kind: str, digest: str) -> str:
    """The store name of the image made from content ``digest`` (hex): the sha256 of a
    canonical manifest, so a change in how images are made never reuses an old one."""
    manifest = {"kind": kind, "format": IMAGE_FORMAT, "source": "sha256:" + digest}
    return key_hex(sha256_digest(canonical_json(manifest)))


def _write_manifest(folder: Path, kind: str, digest: str) -> None:
    image = folder / IMAGE_FILE
    write_json_atomic(
        folder / MANIFEST_FILE,
        {
            "kind": kind,
            "format": IMAGE_FORMAT,
            "source": "sha256:" + digest,
            "sizeBytes": image.stat().st_size,
        },
    )


def stored_image_problem(folder: Path, check: Callable[[Path], None]) -> tuple[str, str] | None:
    """What is wrong with the store's image at ``folder`` (``disks/<key>``, ``bundles/<key>``)
    as ``(problem, detail)`` for ``cache verify``, None when nothing: ``orphaned`` when no
    create can name it (its manifest gives another key: another kind or format), ``corrupt``
    when it is not what its manifest says (size; a disk's sha256) or ``check`` (``e2fsck -fn``)
    refuses it."""
    kind = "bundle" if folder.parent.name == "bundles" else "disk"
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_bytes())
        source, size = str(manifest["source"]), manifest["sizeBytes"]
        key = _image_key(str(manifest["kind"]), key_hex(source))
    except (OSError, ValueError, TypeError, KeyError, IntegrityError) as exc:
        return "corrupt", f"{MANIFEST_FILE}: unreadable ({exc})"
    if folder.name != key or manifest.get("kind") != kind:
        return "orphaned", f"{MANIFEST_FILE} gives another key ({kind}, format {IMAGE_FORMAT})"
    problem = _image_mismatch(folder / IMAGE_FILE, size, source if kind == "disk" else "")
    if problem:
        return "corrupt", problem
    try:
        check(folder / IMAGE_FILE)
    except IntegrityError as exc:
        return "corrupt", exc.message
    return None


def _image_mismatch(image: Path, size: object, digest: str) -> str:
    """How ``image`` differs from its manifest's ``size`` (and ``digest`` when given)."""
    try:
        got, hexd = hash_file(image) if digest else (image.stat().st_size, "")
    except OSError as exc:
        return f"{IMAGE_FILE}: {exc.strerror or exc}"
    if got != size:
        return f"{IMAGE_FILE} has {got} bytes, {MANIFEST_FILE} says {size}"
    if digest and "sha256:" + hexd != digest:
        return f"{IMAGE_FILE} hashes to sha256:{hexd}, {MANIFEST_FILE} says {digest}"
    return ""


def store_entries(record: Record) -> set[str]:
    """The store entries a workspace's disks boot from (kept by cache pruning)."""
    return {d.entry for d in record.disks if d.entry}


def boot_disks(store: Store, ws: Workspace, record: Record) -> tuple[ExtraDisk, ...]:
    """The workspace's disks as a boot attaches them, in the spec's order."""
    from microagent.runtime.boot import ExtraDisk  # deferred: see the imports

    out = []
    for disk in record.disks:
        if disk.entry:
            store.touch(disk.entry)
            path = store.entry_path(disk.entry) / IMAGE_FILE
        else:
            path = ws.disk_copy(disk.name)
        out.append(ExtraDisk(path, disk.mountpoint, disk.readonly, disk.name))
    return tuple(out)
