"""Snapshots of a VM on disk: memory and device state plus point-in-time disk copies.

A snapshot is a folder ``<root>/snapshots/<tag>``, where ``<tag>`` is a symlink to a version
folder ``.v-<tag>-<random>`` holding::

    manifest.json   what a restore must match (Identity), the files and their digests
    verified.json   stamps: the digests already verified, per file version (runtime.stamps)
    vmstate         the VMM's migration stream (QEMU ``migrate`` to a file descriptor)
    disk-<name>     a copy of each disk the VM writes, as of the moment it was stopped
                    (``cp --reflink=auto --sparse=always``: shared extents or holes kept)

A new snapshot is written into a private temp folder (``.tmp-*``), renamed to its version
folder, and published by replacing the tag's symlink with ``rename(2)``: a crash at any point
leaves either the previous snapshot of the tag or the new one, never a mix; what a crash
leaves behind (temp folders, versions no tag names) is removed by :func:`collect_garbage`.

Nothing in a snapshot is trusted on the way back: the manifest is bounded and checked field
by field, the tag and file names must match their patterns, and every file's size and sha256
(disks: a digest that reads holes as zeros, so a sparse or dense copy of the same bytes
agree) must match before a VMM is given the stream. A file is hashed once per version of it:
the folder's ``verified.json`` remembers the digest of a file for its exact ``stat`` version
(inode, size, mtime, ctime), under the rule :mod:`~microagent.runtime.stamps` sets out, so a
restore of a file unchanged since it was written or last verified reads no bytes of it.

Secrets: the memory image holds whatever the guest held, the ``--env`` values included. A
snapshot therefore lives only in the workspace's own folder (mode 0700, files 0600) and is
removed with it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import secrets
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from microagent import runner
from microagent.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    VMError,
)
from microagent.fsutil import fsync_dir, fsync_tree, load_json_bounded, remove_any
from microagent.runtime import stamps
from microagent.runtime.agentproto import ExecRequest
from microagent.runtime.backend import BeforeRun, BootConfig, Machine

SNAPSHOTS_DIR = "snapshots"
MANIFEST = "manifest.json"
STATE_FILE = "vmstate"
FORMAT = 1
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
DISK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MANIFEST_MAX = 64 * 1024  # bytes
MANIFEST_DEPTH = 16  # a manifest nests three levels; room, no more
MAX_DISKS = 32
PLAIN, SPARSE = "sha256", "sparse-sha256"  # the digests of a VM state and of a disk copy
# argv options whose values a restore must match (the device state must be the same shape)
SHAPE_OPTIONS = ("-M", "-accel", "-cpu", "-m", "-smp")
GUEST_BUSYBOX = "/run/microagent/busybox"  # the init binds its busybox there in every root


def check_tag(tag: str) -> str:
    """``tag`` when it is a valid snapshot tag; InvalidInputError otherwise."""
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        shown = repr(tag)[:70]
        raise InvalidInputError(
            f"invalid snapshot tag {shown}",
            hint="1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return tag


def default_tag(now: float | None = None) -> str:
    """``snap-YYYYMMDD-HHMMSS`` (UTC), as the reference implementation names them."""
    return time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime(now))


# -- what a restore must match ------------------------------------------------------------------


def argv_shape(argv: Sequence[str]) -> dict[str, Any]:
    """The parts of a VMM command line that fix the device state: machine, accelerator,
    CPU model, memory, vCPUs, every ``-device`` (they carry no host paths), whether each
    drive is read-only, the network backend, and whether an incoming state is awaited
    (ignored: that is how a restore differs). Host paths and wrappers are left out."""
    options: dict[str, str] = {}
    devices: list[str] = []
    drives: list[str] = []
    netdevs: list[str] = []
    for word, value in itertools.pairwise(argv):
        if word in SHAPE_OPTIONS:
            options[word] = value
        elif word == "-device":
            devices.append(value)
        elif word == "-drive":
            drives.append("ro" if "readonly=on" in value.split(",") else "rw")
        elif word == "-netdev":
            netdevs.append(value.split(",", 1)[0])
    return {"options": options, "devices": devices, "drives": drives, "netdevs": netdevs}


def file_sha256(path: Path, book: stamps.Book | None = None) -> str:
    """sha256 of ``path``; from ``book`` when it has a stamp for the file as it is now."""
    return stamps.digest(path, PLAIN, book)


@dataclass(frozen=True)
class Identity:
    """What a restore must match: the VMM and its version, the device shape of its command
    line, the guest kernel and initramfs (sha256), the root filesystem's key."""

    vmm: str
    shape: Mapping[str, Any]
    kernel: str
    initrd: str
    rootfs_key: str

    def to_json(self) -> dict[str, Any]:
        return {
            "vmm": self.vmm,
            "shape": dict(self.shape),
            "kernel": self.kernel,
            "initrd": self.initrd,
            "rootfsKey": self.rootfs_key,
        }

    @classmethod
    def from_json(cls, data: Any) -> Identity:
        if not isinstance(data, Mapping) or not isinstance(data.get("shape"), Mapping):
            raise ValueError("identity: expected an object with a shape")
        text = {k: data.get(k) for k in ("vmm", "kernel", "initrd", "rootfsKey")}
        if not all(isinstance(v, str) and len(v) <= 200 for v in text.values()):
            raise ValueError("identity: vmm, kernel, initrd and rootfsKey must be short strings")
        return cls(
            str(text["vmm"]),
            dict(data["shape"]),
            str(text["kernel"]),
            str(text["initrd"]),
            str(text["rootfsKey"]),
        )

    def differences(self, other: Identity) -> list[str]:
        """What differs between this (the snapshot's) identity and ``other`` (now), in words."""
        out = []
        for label, mine, theirs in (
            ("VMM", self.vmm, other.vmm),
            ("guest kernel", self.kernel[:12], other.kernel[:12]),
            ("guest initramfs", self.initrd[:12], other.initrd[:12]),
            ("root filesystem", self.rootfs_key[:19], other.rootfs_key[:19]),
        ):
            if mine != theirs:
                out.append(f"{label}: {mine or '?'} in the snapshot, {theirs or '?'} now")
        for key in ("options", "devices", "drives", "netdevs"):
            mine_v, theirs_v = self.shape.get(key), other.shape.get(key)
            if mine_v != theirs_v:
                out.append(f"VM {key}: {_short(mine_v)} in the snapshot, {_short(theirs_v)} now")
        return out


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def make_identity(
    vmm: str,
    argv: Sequence[str],
    kernel: Path,
    initrd: Path,
    key: str,
    *,
    book: stamps.Book | None = None,
) -> Identity:
    """The identity of a VM booting ``kernel`` and ``initrd`` with ``argv``; the two files'
    digests come from ``book`` (the home's) while they are unchanged."""
    return Identity(
        vmm, argv_shape(argv), file_sha256(kernel, book), file_sha256(initrd, book), key
    )


# -- files and digests --------------------------------------------------------------------------


def sparse_sha256(path: Path, book: stamps.Book | None = None) -> str:
    """sha256 over 1 MiB chunk digests, holes read as zeros (:func:`stamps.sparse_sha256_fd`):
    a sparse and a dense copy of the same bytes agree; from ``book`` when it has a stamp."""
    return stamps.digest(path, SPARSE, book)


@dataclass(frozen=True)
class SavedFile:
    """A file of a snapshot: its name in the folder, size and digest; for a disk, which
    disk it is a copy of (``state`` or a spec disk's name)."""

    file: str
    size: int
    sha256: str
    disk: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "size": self.size, "sha256": self.sha256}
        if self.disk:
            out["disk"] = self.disk
        return out

    @classmethod
    def from_json(cls, data: Any, *, disk: bool) -> SavedFile:
        if not isinstance(data, Mapping):
            raise ValueError("a file entry must be an object")
        name, size, digest = data.get("file"), data.get("size"), data.get("sha256")
        which = data.get("disk", "")
        if not isinstance(name, str) or not (name == STATE_FILE or _disk_file_ok(name)):
            raise ValueError(f"bad file name {str(name)[:70]!r}")
        if type(size) is not int or size < 0:
            raise ValueError(f"{name}: size must be a non-negative integer")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"{name}: sha256 must be 64 hex digits")
        if disk and not (isinstance(which, str) and DISK_NAME_RE.fullmatch(which)):
            raise ValueError(f"{name}: bad disk name")
        return cls(name, size, digest, which if disk else "")


def _seconds(value: object) -> float:
    """A manifest's ``seconds`` (0 when absent or not a number); ValueError for an integer
    too large for a float (valid JSON: ``float()`` would overflow, not refuse)."""
    if not isinstance(value, int | float):
        return 0.0
    try:
        return float(value)
    except OverflowError:
        raise ValueError("seconds: not a number of seconds") from None


def _disk_file_ok(name: str) -> bool:
    return name.startswith("disk-") and bool(DISK_NAME_RE.fullmatch(name[5:]))


def disk_file(disk: str) -> str:
    return f"disk-{disk}"


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of one snapshot."""

    tag: str
    created_at: str
    identity: Identity
    state: SavedFile
    disks: tuple[SavedFile, ...]
    seconds: float = 0.0  # how long the save took (the VM was stopped that long)
    was_paused: bool = False  # the VM was paused by the user when the snapshot was taken

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "tag": self.tag,
            "createdAt": self.created_at,
            "identity": self.identity.to_json(),
            "state": self.state.to_json(),
            "disks": [d.to_json() for d in self.disks],
            "seconds": round(self.seconds, 3),
            "wasPaused": self.was_paused,
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"not a format {FORMAT} snapshot manifest")
        disks = data.get("disks")
        if not isinstance(disks, list) or len(disks) > MAX_DISKS:
            raise ValueError(f"disks must be a list of at most {MAX_DISKS}")
        seconds = data.get("seconds", 0.0)
        created = data.get("createdAt")
        return cls(
            check_tag(str(data.get("tag"))),
            created if isinstance(created, str) else "",
            Identity.from_json(data.get("identity")),
            SavedFile.from_json(data.get("state"), disk=False),
            tuple(SavedFile.from_json(d, disk=True) for d in disks),
            _seconds(seconds),
            data.get("wasPaused") is True,
        )

    @property
    def size(self) -> int:
        return self.state.size + sum(d.size for d in self.disks)


# -- the folder ---------------------------------------------------------------------------------


def snapshots_dir(root: Path) -> Path:
    return root / SNAPSHOTS_DIR


def snapshot_path(root: Path, tag: str) -> Path:
    return snapshots_dir(root) / check_tag(tag)


def begin(root: Path, tag: str) -> Path:
    """A private temp folder (0700) to write snapshot ``tag`` into."""
    folder = snapshots_dir(root)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{check_tag(tag)}-", dir=folder))


def copy_disk(source: Path, target: Path) -> None:
    """A point-in-time copy of a disk image: shared extents where the filesystem can
    (reflink), holes kept where it cannot."""
    runner.run(["cp", "--reflink=auto", "--sparse=always", str(source), str(target)])
    target.chmod(0o600)


def publish(root: Path, tag: str, tmp: Path, manifest: Manifest) -> Path:
    """Write the manifest into ``tmp``, make it durable and the tag's snapshot, atomically
    replacing any earlier snapshot of the tag (removed afterwards)."""
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    (tmp / MANIFEST).write_text(text, encoding="utf-8")
    (tmp / MANIFEST).chmod(0o600)
    fsync_tree(tmp)
    folder = snapshots_dir(root)
    version = folder / f".v-{check_tag(tag)}-{secrets.token_hex(6)}"
    tmp.rename(version)
    link = folder / f".link-{tag}-{secrets.token_hex(6)}"
    link.symlink_to(version.name)
    final = folder / tag
    old = _version_of(final)
    if final.exists() and not final.is_symlink():
        remove_any(final)  # not ours (a folder put there by hand): replaced
    link.replace(final)
    fsync_dir(folder)
    if old is not None and old != version:
        remove_any(old)
    return final


def _version_of(link: Path) -> Path | None:
    """The version folder a tag's symlink names (None when it is no such symlink)."""
    try:
        target = str(link.readlink())
    except OSError:
        return None
    if "/" in target or not target.startswith(".v-"):
        return None
    return link.parent / target


def collect_garbage(root: Path) -> None:
    """Remove what interrupted writes left: temp folders and links, and version folders no
    tag names. Call it only while no snapshot of ``root`` is being written."""
    folder = snapshots_dir(root)
    if not folder.is_dir():
        return
    named = {_version_of(entry) for entry in folder.iterdir() if not entry.name.startswith(".")}
    for entry in folder.iterdir():
        stale = entry.name.startswith((".tmp-", ".link-"))
        if stale or (entry.name.startswith(".v-") and entry not in named):
            remove_any(entry)


def read_manifest(root: Path, tag: str) -> Manifest:
    """The manifest of snapshot ``tag``: NotFoundError when there is none, IntegrityError
    when it is unreadable or malformed."""
    path = snapshot_path(root, tag)
    if not path.exists():
        raise NotFoundError(
            f"no snapshot {tag!r}",
            hint="`microagent snapshot ls NAME` lists the snapshots of a workspace",
        )
    try:
        manifest = Manifest.from_json(read_json_file(path / MANIFEST))
    except (OSError, ValueError, InvalidInputError) as exc:
        why = exc.message if isinstance(exc, InvalidInputError) else str(exc)
        raise _damaged(tag, f"its manifest is unreadable ({why[:200]})") from exc
    if manifest.tag != tag:
        raise _damaged(tag, f"its manifest names another tag ({manifest.tag!r})")
    return manifest


def _damaged(tag: str, why: str) -> IntegrityError:
    return IntegrityError(
        f"snapshot {tag!r} cannot be restored: {why}",
        hint=f"remove it (`microagent snapshot rm NAME {tag}`); the workspace still starts "
        "cold from its disk (`microagent start NAME`; a suspended one once the snapshot "
        "is removed)",
    )


def verify(root: Path, manifest: Manifest, *, trust_stamps: bool = True) -> tuple[str, ...]:
    """Every file of the snapshot has the size and digest its manifest says; IntegrityError
    naming the first that does not. A file unchanged since it was last verified is not hashed
    again (its stamp in the folder's book, see :mod:`~microagent.runtime.stamps`) unless
    ``trust_stamps`` is False (``cache verify``); the files whose stamps were used."""
    folder = snapshot_path(root, manifest.tag).resolve()
    book = stamps.Book.of_folder(folder) if trust_stamps else None
    trusted = []
    for saved in (manifest.state, *manifest.disks):
        path = folder / saved.file
        try:
            size = path.stat().st_size
            if size != saved.size:
                raise _damaged(manifest.tag, f"{saved.file} has {size} bytes, not {saved.size}")
            digest, stamped = stamps.take(path, SPARSE if saved.disk else PLAIN, book)
        except OSError as exc:
            raise _damaged(manifest.tag, f"{saved.file}: {exc.strerror or exc}") from exc
        if digest != saved.sha256:
            raise _damaged(manifest.tag, f"{saved.file} does not match its digest (corrupt)")
        if stamped:
            trusted.append(saved.file)
    return tuple(trusted)


def check_identity(manifest: Manifest, now: Identity) -> None:
    """ConflictError listing what differs when the snapshot was made by another VM shape."""
    differences = manifest.identity.differences(now)
    if differences:
        raise ConflictError(
            f"snapshot {manifest.tag!r} does not match this workspace's VM: "
            + "; ".join(differences),
            hint="a snapshot restores only into the VM that made it; `microagent start NAME` "
            "boots it cold from its disk (a suspended one once `microagent snapshot rm NAME "
            f"{manifest.tag}` removed the snapshot)",
        )


def tags(root: Path) -> list[str]:
    """The tags with a snapshot, sorted."""
    folder = snapshots_dir(root)
    if not folder.is_dir():
        return []
    return sorted(e.name for e in folder.iterdir() if TAG_RE.fullmatch(e.name))


def listing(root: Path) -> Iterator[dict[str, Any]]:
    """One row per snapshot: tag, createdAt, size (bytes), files; ``error`` for one whose
    manifest is unreadable."""
    for tag in tags(root):
        try:
            manifest = read_manifest(root, tag)
        except IntegrityError as exc:
            yield {"tag": tag, "error": exc.message}
            continue
        yield {
            "tag": tag,
            "createdAt": manifest.created_at,
            "size": manifest.size,
            "stateBytes": manifest.state.size,
            "disks": [d.disk for d in manifest.disks],
            "saveSeconds": manifest.seconds,
        }


def remove(root: Path, tag: str) -> bool:
    """Remove snapshot ``tag`` (its link first, then its version folder); False if none."""
    final = snapshot_path(root, tag)
    if not final.exists() and not final.is_symlink():
        return False
    version = _version_of(final)
    remove_any(final)
    if version is not None:
        with contextlib.suppress(OSError):
            remove_any(version)
    return True


# -- restoring ----------------------------------------------------------------------------------


class RestoringMachine(Machine, Protocol):
    """A machine that can load a saved state (started with ``incoming``)."""

    def restore(
        self, state: Path, timeout: float = 600.0, *, before_run: BeforeRun | None = None
    ) -> None: ...


class RestoringBackend(Protocol):
    """A backend whose machines can be saved and restored (QEMU, the fake)."""

    name: str
    restores: bool

    def vmm_version(self) -> str: ...

    def command(self, config: BootConfig) -> Sequence[str]: ...

    def boot(self, config: BootConfig, *, incoming: bool = False) -> RestoringMachine: ...


def restoring(backend: object) -> RestoringBackend:
    """``backend`` as one that restores snapshots; VMError for one that cannot."""
    if not getattr(backend, "restores", False):
        name = getattr(backend, "name", type(backend).__name__)
        raise VMError(f"the {name} backend cannot save or restore VM snapshots")
    return cast(RestoringBackend, backend)


def clock_request(now: float | None = None) -> ExecRequest:
    """The guest command that sets its clock to the host's (to the second): after a pause
    or a restore the guest's clock is behind by the time its vCPUs stood still. It runs the
    init's own busybox (every guest root has it at /run/microagent/busybox). Rounded, not
    truncated: the request reaches the guest a moment later, so truncating would leave the
    guest up to a second plus that moment behind."""
    seconds = round(time.time() if now is None else now)
    return ExecRequest(argv=(GUEST_BUSYBOX, "date", "-u", "-s", f"@{seconds}"), timeout_ms=10_000)


def read_json_file(path: Path) -> Any:
    """A snapshot's or template's JSON file, read and parsed within :data:`MANIFEST_MAX`
    bytes and :data:`MANIFEST_DEPTH` levels (InvalidInputError says what is wrong)."""
    with path.open("rb") as fh:
        raw = fh.read(MANIFEST_MAX + 1)
    return load_json_bounded(raw, max_bytes=MANIFEST_MAX, max_depth=MANIFEST_DEPTH)
