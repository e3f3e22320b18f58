"""Workspace records on disk: what a workspace boots, and its lifecycle state.

Layout under ``<home>/workspaces/<name>/``::

    workspace.json   the record (mode 0600: it holds the --env values, nothing else does)
    state.ext4       the workspace's own writable disk (overlay upper), kept until delete
    runtime/         runtime.json (current state), events.jsonl, serial.log, result.json,
                     config.tar (regenerated every start), supervisor.log, vm/ (the VMM's
                     sockets and serial.log; elsewhere if the path is too long for sockets)

The shared root filesystem lives in the store and is only referenced here. The runtime never
sees YAML: a record is plain data written by ``create``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from microagent.errors import ConflictError, InvalidInputError, NotFoundError

RECORD_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class State(Enum):
    PREPARED = "prepared"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    HALTED = "halted"
    FAILED = "failed"

    @property
    def live(self) -> bool:
        return self in (State.STARTING, State.RUNNING, State.STOPPING)

    @property
    def terminal(self) -> bool:
        return self in (State.STOPPED, State.HALTED, State.FAILED)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class DeclaredFile:
    """A file delivered on every boot; its content is a blob in the store."""

    path: str
    mode: int
    blob: str
    kind: str = "file"
    target: str = ""


@dataclass(frozen=True)
class Record:
    """Everything ``start`` needs, captured at create time."""

    name: str
    rootfs: str
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
    spec: str = ""
    files_key: str = ""
    config_key: str = ""
    created_at: str = field(default_factory=now)
    runtime_env: Mapping[str, str] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = RECORD_VERSION
        data["command"] = list(self.command)
        data["outputs"] = [list(o) for o in self.outputs]
        data["host_forwards"] = [list(f) for f in self.host_forwards]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Record:
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        values["command"] = tuple(data.get("command") or ())
        values["outputs"] = tuple(tuple(o) for o in data.get("outputs") or ())
        values["files"] = tuple(DeclaredFile(**f) for f in data.get("files") or ())
        values["host_forwards"] = tuple(
            (int(g), int(h)) for g, h in data.get("host_forwards") or ()
        )
        return cls(**values)

    def __repr__(self) -> str:  # never show runtime env values
        return f"Record(name={self.name!r}, rootfs_key={self.rootfs_key!r})"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidInputError(
            f"invalid workspace name {name!r}",
            hint="letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return name


def write_json_atomic(path: Path, data: Mapping[str, Any], mode: int = 0o644) -> None:
    """Temp file + fsync + rename, so readers never see half a document."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Workspace:
    """Paths and state of one workspace directory."""

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

    @property
    def run_dir(self) -> Path:
        return self.root / "runtime"

    @property
    def runtime_path(self) -> Path:
        return self.run_dir / "runtime.json"

    @property
    def events_path(self) -> Path:
        return self.run_dir / "events.jsonl"

    @property
    def result_path(self) -> Path:
        return self.run_dir / "result.json"

    @property
    def serial_log(self) -> Path:
        """The guest console log (in the VM directory recorded at start)."""
        vm_dir = self.runtime().get("vmDir")
        return Path(vm_dir) / "serial.log" if vm_dir else self.run_dir / "vm" / "serial.log"

    def record(self) -> Record:
        data = read_json(self.record_path)
        if data is None:
            raise NotFoundError(f"workspace {self.name!r} has no readable record")
        return Record.from_json(data)

    def runtime(self) -> dict[str, Any]:
        return read_json(self.runtime_path) or {"state": State.PREPARED.value}

    def state(self) -> State:
        try:
            return State(self.runtime().get("state", "prepared"))
        except ValueError:
            return State.FAILED

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def set_state(self, state: State, detail: str = "", **extra: Any) -> dict[str, Any]:
        """Record a transition in runtime.json and append it to events.jsonl."""
        with self._locked():
            current = self.runtime()
            current.update(extra)
            current.update(state=state.value, detail=detail, observedAt=now())
            write_json_atomic(self.runtime_path, current)
            self.event(state.value, detail)
        return current

    def update(self, **fields: Any) -> None:
        """Add fields to runtime.json without changing the state."""
        with self._locked():
            current = self.runtime()
            current.update(fields)
            write_json_atomic(self.runtime_path, current)

    def event(self, kind: str, detail: str = "", **extra: Any) -> None:
        line = {"observedAt": now(), "event": kind, "detail": detail, **extra}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.events_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = self.events_path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


class Workspaces:
    """The folder of all workspaces."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Workspace:
        return Workspace(self.root / check_name(name))

    def get(self, name: str) -> Workspace:
        ws = self.path(name)
        if not ws.record_path.is_file():
            raise NotFoundError(
                f"workspace {name!r} not found", hint="see `microagent list` for what exists"
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
        return Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))

    def publish(self, name: str, tmp: Path) -> Workspace:
        """Make a fully written temp folder the workspace (atomic rename)."""
        final = self.path(name).root
        try:
            tmp.rename(final)
        except OSError as exc:
            raise ConflictError(f"workspace {name!r} already exists") from exc
        return Workspace(final)
