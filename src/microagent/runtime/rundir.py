"""The run directory of a supervised VM: its state machine and what happened, on disk.

``<run dir>/``::

    boot.json        what the supervisor boots (written by ``start``, mode 0600)
    runtime.json     the current state and facts about the run (pids, readiness times)
    events.jsonl     every transition and event, appended
    result.json      the guest's report once its command ended
    config.tar       the per-boot config disk (mode 0600: it carries the environment)
    supervisor.log   the supervisor's own output

States: prepared -> starting -> running -> stopping -> stopped | halted | failed. Writers hold a
lock on ``.lock`` so the supervisor and the CLI never interleave updates.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from microagent.fsutil import read_json, write_json_atomic


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
class RunDir:
    """Paths and state of one run directory."""

    path: Path

    @property
    def boot_path(self) -> Path:
        return self.path / "boot.json"

    @property
    def runtime_path(self) -> Path:
        return self.path / "runtime.json"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    @property
    def config_disk(self) -> Path:
        return self.path / "config.tar"

    @property
    def supervisor_log(self) -> Path:
        return self.path / "supervisor.log"

    @property
    def serial_log(self) -> Path:
        """The guest console log (in the VM directory recorded at start)."""
        vm_dir = self.runtime().get("vmDir")
        return Path(vm_dir) / "serial.log" if vm_dir else self.path / "vm" / "serial.log"

    def runtime(self) -> dict[str, Any]:
        return read_json(self.runtime_path) or {"state": State.PREPARED.value}

    def state(self) -> State:
        try:
            return State(self.runtime().get("state", "prepared"))
        except ValueError:
            return State.FAILED

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / ".lock").open("a") as fh:
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
        self.path.mkdir(parents=True, exist_ok=True)
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
