"""Workspace records on disk: what a workspace boots, and its lifecycle state.

Layout under ``<home>/workspaces/<name>/``::

    workspace.json   the record (mode 0600: it holds the --env values, nothing else does)
    state.ext4       the workspace's own writable disk (overlay upper), kept until delete
    disks/<name>.ext4  its own copy of each rw disk or bundle (ro ones are shared in the store)
    runtime/         runtime.json (current state), events.jsonl, serial.log, result.json,
                     config.tar (regenerated every start), supervisor.log, vm/ (the VMM's
                     sockets and serial.log; elsewhere if the path is too long for sockets)

The shared root filesystem lives in the store and is only referenced here. The runtime never
sees YAML: a record is plain data written by ``create``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError
from microagent.frozen import Frozen
from microagent.fsutil import read_json
from microagent.runtime.rundir import RunDir, now

# The spec's, the credentials' and the backend's types are loaded where a record holds them
# (or one is made, at create): `cp`, `status`, `list` and `logs` of a workspace without
# credentials, mediation, health checks, egress rules or published ports need none of them.
if TYPE_CHECKING:
    from microagent.compiler.credentials import Credential
    from microagent.compiler.spec import Forward, Health, Mediation
    from microagent.runtime.backend import PublishedPort

RECORD_VERSION = 1
# layer disks a root may stack: no more than a VM's extra disks (runtime.boot.MAX_EXTRA_DISKS;
# not imported: `cp` reads records and loads no store or boot modules)
MAX_ROOT_LAYERS = 16
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # fullmatch: ``$`` accepts "x\n"


@dataclass(frozen=True, eq=False, repr=False)
class DeclaredFile(Frozen):
    """A file delivered on every boot; its content is a blob in the store."""

    path: str
    mode: int
    blob: str
    kind: str = "file"
    target: str = ""


@dataclass(frozen=True, eq=False, repr=False)
class AttachedDisk(Frozen):
    """A spec disk or bundle as the workspace keeps it.

    ``entry`` names the shared, read-only image in the store (a ro disk or bundle, reused by
    every workspace with the same content); empty for the workspace's own copy in
    ``disks/<name>.ext4`` (every rw disk or bundle). ``digest`` is the source's sha256.
    """

    name: str
    mountpoint: str
    mode: str  # "ro" | "rw"
    kind: str  # "disk" | "bundle"
    source: str
    digest: str
    entry: str = ""

    @property
    def readonly(self) -> bool:
        return self.mode == "ro"


@dataclass(frozen=True, eq=False, repr=False)
class Record(Frozen):
    """Everything ``start`` needs, captured at create time."""

    name: str
    rootfs: str  # the root's image (its bottom one when layer disks are stacked on it)
    rootfs_key: str
    image: Mapping[str, str]
    command: tuple[str, ...]
    workdir: str
    hostname: str
    env: Mapping[str, str]
    outputs: tuple[tuple[str, str], ...]
    memory_mib: int
    cpus: int
    state_size_mib: int
    network: str
    restart: str
    files: tuple[DeclaredFile, ...] = ()
    host_forwards: tuple[tuple[int, int], ...] = ()
    disks: tuple[AttachedDisk, ...] = ()
    published: tuple[PublishedPort, ...] = ()  # host->guest ports (network.forwards, --publish)
    spec: str = ""
    files_key: str = ""
    config_key: str = ""
    created_at: str = field(default_factory=now)
    runtime_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    mediation: Mediation | None = None
    health: Health | None = None
    credentials: tuple[Credential, ...] = ()  # references only: never a value
    egress_allow: tuple[str, ...] = ()  # network.allow: default-deny egress when set
    template: str = ""  # the warm template (key) this workspace was made from or made
    rootfs_layers: tuple[str, ...] = ()  # layer disks stacked on ``rootfs``, bottom first

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = RECORD_VERSION
        data["command"] = list(self.command)
        data["outputs"] = [list(o) for o in self.outputs]
        data["host_forwards"] = [list(f) for f in self.host_forwards]
        data["published"] = [p.to_json() for p in self.published]
        data["credentials"] = [c.to_json() for c in self.credentials]
        data["egress_allow"] = list(self.egress_allow)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Record:
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        values["command"] = tuple(data.get("command") or ())
        values["outputs"] = tuple(tuple(o) for o in data.get("outputs") or ())
        values["files"] = tuple(DeclaredFile(**f) for f in data.get("files") or ())
        values["disks"] = tuple(AttachedDisk(**d) for d in data.get("disks") or ())
        values["host_forwards"] = tuple(
            (int(g), int(h)) for g, h in data.get("host_forwards") or ()
        )
        values["published"] = _published(data.get("published") or ())
        if data.get("mediation") or data.get("health"):
            # deferred: the spec's types, only for a record that holds them (see the imports)
            from microagent.compiler.spec import Health, Mediation

            if data.get("mediation"):
                values["mediation"] = Mediation(**data["mediation"])
            if data.get("health"):
                health = data["health"]
                values["health"] = Health(**{**health, "exec": tuple(health["exec"])})
        values["credentials"] = _credentials(data.get("credentials") or [])
        values["egress_allow"] = _egress_allow(data.get("egress_allow") or [])
        values["rootfs_layers"] = _rootfs_layers(data.get("rootfs_layers") or [])
        return cls(**values)

    @property
    def root_images(self) -> tuple[Path, ...]:
        """The root's images: its layer disks top first, then its bottom image."""
        return (*(Path(p) for p in reversed(self.rootfs_layers)), Path(self.rootfs))

    def __repr__(self) -> str:  # never show runtime env values
        return f"Record(name={self.name!r}, rootfs_key={self.rootfs_key!r})"


def _published(items: Iterable[Any]) -> tuple[PublishedPort, ...]:
    if not items:
        return ()
    # deferred: the backend's types, only for a record that publishes ports (see the imports)
    from microagent.runtime.backend import PublishedPort

    return tuple(PublishedPort.from_json(p) for p in items)


def _credentials(items: object) -> tuple[Credential, ...]:
    """A record's credentials, checked as strictly as a spec's (a record is a file on disk)."""
    if items == []:
        return ()
    # deferred: the credentials' types, only for a record that names some (see the imports)
    from microagent.compiler.credentials import MAX_CREDENTIALS, Credential

    if not isinstance(items, list) or len(items) > MAX_CREDENTIALS:
        raise InvalidInputError(f"record: credentials must be a list of at most {MAX_CREDENTIALS}")
    creds = tuple(Credential.from_json(item) for item in items)
    if len({c.name for c in creds}) != len(creds):
        raise InvalidInputError("record: a credential name is used twice")
    return creds


def _rootfs_layers(items: object) -> tuple[str, ...]:
    if items == []:
        return ()
    if not isinstance(items, list) or len(items) > MAX_ROOT_LAYERS:
        raise InvalidInputError(
            f"record: rootfs_layers must be a list of at most {MAX_ROOT_LAYERS}"
        )
    if not all(isinstance(item, str) and item.startswith("/") for item in items):
        raise InvalidInputError("record: rootfs_layers must hold absolute paths")
    return tuple(items)


def _egress_allow(items: object) -> tuple[str, ...]:
    if items == []:
        return ()
    # deferred: the spec's host-name check, only for a record with egress rules (see above)
    from microagent.compiler.spec import MAX_ALLOW, check_allow_entry

    if not isinstance(items, list) or len(items) > MAX_ALLOW:
        raise InvalidInputError(f"record: egress_allow must be a list of at most {MAX_ALLOW}")
    if not all(isinstance(item, str) for item in items):
        raise InvalidInputError("record: egress_allow must hold host names")
    return tuple(check_allow_entry(item) for item in items)


def published_ports(forwards: Iterable[Forward]) -> tuple[PublishedPort, ...]:
    """The runtime's published ports for a spec's ``network.forwards`` (checked again)."""
    wanted = tuple(forwards)
    if not wanted:
        return ()
    from microagent.runtime.backend import PublishedPort  # deferred: see the imports

    return tuple(PublishedPort(f.host, f.host_port, f.guest_port, f.protocol) for f in wanted)


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid workspace name {name!r}",
            hint="letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True, eq=False, repr=False)
class Workspace(Frozen):
    """Paths of one workspace directory; its run state lives in :attr:`run`."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def record_path(self) -> Path:
        return self.root / "workspace.json"

    @property
    def state_disk(self) -> Path:
        return self.root / "state.ext4"

    def disk_copy(self, name: str) -> Path:
        """The workspace's own copy of disk ``name`` (rw disks and bundles)."""
        return self.root / "disks" / f"{name}.ext4"

    @property
    def run(self) -> RunDir:
        return RunDir(self.root / "runtime")

    def record(self) -> Record:
        data = read_json(self.record_path)
        if data is None:
            raise NotFoundError(
                f"workspace {self.name!r} has no readable record",
                hint=f"`microagent delete --force {self.name}` removes what is left of it",
            )
        try:
            return Record.from_json(data)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a damaged file
            raise IntegrityError(
                f"workspace {self.name!r}: its record {self.record_path} is damaged ({exc})",
                hint=f"`microagent delete --force {self.name}` removes it; create it again",
            ) from exc


class Workspaces:
    """The folder of all workspaces."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Workspace:
        return Workspace(self.root / check_name(name))

    def get(self, name: str) -> Workspace:
        ws = self.path(name)
        if not ws.record_path.is_file():
            import difflib  # deferred: only a misspelling needs it

            close = difflib.get_close_matches(name, [w.name for w in self], n=3, cutoff=0.6)
            guess = " or ".join(repr(c) for c in close)
            raise NotFoundError(
                f"workspace {name!r} not found",
                hint=f"did you mean {guess}? (`microagent list` shows them all)"
                if close
                else "see `microagent list` for what exists",
            )
        return ws

    def __iter__(self) -> Iterator[Workspace]:
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and (entry / "workspace.json").is_file():
                yield Workspace(entry)

    def reserve(self, name: str) -> Path:
        """A private temp folder for building ``name``; ConflictError if it exists."""
        if self.path(name).root.exists():
            raise ConflictError(
                f"workspace {name!r} already exists",
                hint="pick another --name, or `microagent delete` the old one",
            )
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._collect_staging()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until install or release, or this process dies
        _STAGING[tmp] = fd
        return tmp

    def release(self, tmp: Path) -> None:
        """Drop the lock on a staging folder (after install, or after removing it)."""
        fd = _STAGING.pop(tmp, None)
        if fd is not None:
            os.close(fd)

    def install(self, name: str, tmp: Path) -> Workspace:
        """Make a fully written temp folder the workspace (atomic rename)."""
        final = self.path(name).root
        try:
            tmp.rename(final)
        except OSError as exc:
            raise ConflictError(f"workspace {name!r} already exists") from exc
        self.release(tmp)
        return Workspace(final)

    def _collect_staging(self) -> None:
        """Remove staging folders of creates that died (killed mid-create): unlocked and
        older than a minute (a folder just made is locked a moment later)."""
        cutoff = time.time() - STAGING_GRACE
        for entry in self.root.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if not entry.is_dir() or entry.lstat().st_mtime > cutoff:
                    continue
                fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    shutil.rmtree(entry, ignore_errors=True)
                except BlockingIOError:
                    pass  # a create in progress
                finally:
                    os.close(fd)


STAGING_GRACE = 60.0  # seconds before an unlocked staging folder counts as abandoned
_STAGING: dict[Path, int] = {}  # staging folder -> the fd holding its lock (this process)
