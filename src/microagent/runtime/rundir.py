"""The run directory of a supervised VM: its state machine and what happened, on disk.

``<run dir>/``::

    boot.json        what the supervisor boots (written by ``start``, mode 0600)
    runtime.json     the current state and facts about the run (the supervisor's pid and
                     identity ``supervisor: {pid, startTime, bootId}``, the VMM's ``vmm`` and
                     the gateway's ``gatewayProcess`` the same way, readiness times,
                     ``startedAt`` of the ``start``, ``restarts`` since then,
                     ``stateDiskDirty`` after a kill)
    runtime.json.corrupt  a runtime.json found unreadable, kept aside (see RunDir.recover)
    .lock, .start.lock    flocks: writers of runtime.json; one ``start`` at a time
    events.jsonl     every transition and event, appended
    result.json      the guest's report once its command ended
    config.tar       the per-boot config disk (mode 0600: it carries the environment); removed
                     once the VMM is gone
    supervisor.log   the supervisor's own output

States: prepared -> starting -> running -> stopping -> stopped | halted | failed; running <->
paused (pause/resume, a snapshot); running -> suspended (suspend) -> running (start).
Writers hold a lock on ``.lock`` so the supervisor and the CLI never interleave updates; it is
a ``flock``, so the kernel drops it with its holder and a writer killed mid-update never
blocks the next one; one that is stopped (SIGSTOP, a debugger) while it holds it does, so a
writer that must not wait for ever gives a bound (``lock_wait``: :class:`LockBusy` after it).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent import runner
from microagent.errors import ConflictError
from microagent.frozen import Frozen
from microagent.fsutil import read_json, write_json_atomic
from microagent.runner import ProcessIdentity

# What boot.json holds (the VM's configuration: the backend's, the spec's and the health
# check's types) is loaded where a boot document is made or read: the supervisor and `start`.
# `cp`, `status`, `list` and `logs` read run directories and never a boot document (a CLI
# start-up that imported these would build some twenty dataclasses it does not use).
if TYPE_CHECKING:
    from microagent.broker.gateway import GatewayConfig
    from microagent.compiler.spec import Restart
    from microagent.runtime.backend import BootConfig
    from microagent.runtime.health import HealthCheck


class State(Enum):
    PREPARED = "prepared"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    HALTED = "halted"
    FAILED = "failed"
    PAUSED = "paused"  # the VMM runs with its vCPUs stopped (pause, or a snapshot being taken)
    SUSPENDED = "suspended"  # no VMM: memory and disk saved in a snapshot; start resumes it

    @property
    def live(self) -> bool:
        return self in (State.STARTING, State.RUNNING, State.STOPPING, State.PAUSED)

    @property
    def terminal(self) -> bool:
        return self in (State.STOPPED, State.HALTED, State.FAILED, State.SUSPENDED)


CORRUPT_RUNTIME = "runtime.json.corrupt"
LOCK_NAME = ".lock"
LOCK_POLL = 0.02  # seconds between tries of a bounded wait for the lock
SUPERVISOR_MARK = "microagent.runtime.supervisor"  # in the supervisor's command line
GATEWAY_MARK = "microagent.broker.gateway"  # in the gateway's


class LockBusy(ConflictError):
    """The run directory's lock stayed held by another process for the whole bounded wait."""

    def __init__(self, lock: Path, waited: float) -> None:
        super().__init__(f"another process held {lock} for {waited:g}s")
        self.lock = lock


def _runs(argv: tuple[str, ...], mark: str, last: str) -> bool:
    """Whether ``argv`` is a microagent program (``mark``) given ``last`` as its argument."""
    return len(argv) >= 2 and argv[-1] == last and any(mark in word for word in argv[:-1])


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _no_restart() -> Restart:
    # deferred: the spec's types, only where a boot document is made (see the imports)
    from microagent.compiler.spec import Restart

    return Restart()


@dataclass(frozen=True, eq=False, repr=False)
class BootDocument(Frozen):
    """``boot.json``: the VM the supervisor boots and the backend it boots it with."""

    config: BootConfig
    backend: str
    probes_dir: Path | None = None  # host probes cached across boots (KVM, TSC)
    fake_outcome: str | None = None  # the fake backend's guest (tests)
    restart: Restart = field(default_factory=_no_restart)  # boots again after the entrypoint exits?
    restart_backoff: float = 1.0  # seconds before the first restart (then doubling)
    health: HealthCheck | None = None  # probed through the guest agent while it runs
    gateway: GatewayConfig | None = None  # credential brokers and egress proxy (no secrets)
    restore: Path | None = None  # a snapshot's VM state: the first boot resumes it (snapshots)

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "probesDir": str(self.probes_dir) if self.probes_dir else None,
            "fakeOutcome": self.fake_outcome,
            "restart": self.restart.text,
            "restartBackoff": self.restart_backoff,
            "health": self.health.to_json() if self.health else None,
            "gateway": self.gateway.to_json() if self.gateway else None,
            "restore": str(self.restore) if self.restore else None,
            **_config_to_json(self.config),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BootDocument:
        # deferred: the spec's and the health check's types (see the imports)
        from microagent.compiler.spec import Restart
        from microagent.runtime.health import HealthCheck

        probes = data.get("probesDir")
        gateway = None
        if data.get("gateway"):
            # Not on the exec and status paths, nor a start without credentials.
            # deferred: the gateway's config (TLS, HTTP parsing), only where boot.json has one
            from microagent.broker.gateway import GatewayConfig

            gateway = GatewayConfig.from_json(data["gateway"])
        return cls(
            _config_from_json(data),
            str(data["backend"]),
            Path(probes) if probes else None,
            data.get("fakeOutcome"),
            Restart.parse(data.get("restart", "never")),
            float(data.get("restartBackoff", 1.0)),
            HealthCheck.from_json(data["health"]) if data.get("health") else None,
            gateway,
            Path(data["restore"]) if data.get("restore") else None,
        )


def _config_to_json(config: BootConfig) -> dict[str, Any]:
    return {
        "kernel": str(config.kernel),
        "initrd": str(config.initrd),
        "disks": [
            {"path": str(d.path), "readonly": d.readonly, "serial": d.serial} for d in config.disks
        ],
        "stateDir": str(config.state_dir),
        "memoryMiB": config.memory_mib,
        "cpus": config.cpus,
        "network": {
            "mode": config.network.mode.value,
            "forwards": [
                {
                    "guestPort": f.guest_port,
                    "hostPort": f.host_port,
                    "unixSocket": str(f.unix_socket) if f.unix_socket else None,
                }
                for f in config.network.forwards
            ],
            "published": [p.to_json() for p in config.network.published],
            "directEgress": config.network.direct_egress,
        },
        "machine": config.machine.value,
        "accel": config.accel.value,
        "timeout": config.timeout,
        "name": config.name,
        "dieWithParent": config.die_with_parent,
        "mediation": config.mediation.to_json() if config.mediation else None,
        "services": [s.to_json() for s in config.services],
    }


def _config_from_json(data: Mapping[str, Any]) -> BootConfig:
    # deferred: the backend's types (see the imports)
    from microagent.runtime.backend import (
        Accel,
        BootConfig,
        Disk,
        Forward,
        MachineType,
        Mediation,
        NetworkConfig,
        PublishedPort,
        ServiceChannel,
    )
    from microagent.runtime.configdisk import NetworkMode  # deferred: as the backend's

    net = data.get("network") or {}
    forwards = tuple(
        Forward(
            f["guestPort"],
            f.get("hostPort"),
            Path(f["unixSocket"]) if f.get("unixSocket") else None,
        )
        for f in net.get("forwards") or []
    )
    return BootConfig(
        kernel=Path(data["kernel"]),
        initrd=Path(data["initrd"]),
        disks=tuple(
            Disk(Path(d["path"]), d["readonly"], d.get("serial", "")) for d in data["disks"]
        ),
        state_dir=Path(data["stateDir"]),
        memory_mib=int(data["memoryMiB"]),
        cpus=int(data["cpus"]),
        network=NetworkConfig(
            NetworkMode(net.get("mode", "isolated")),
            forwards,
            tuple(PublishedPort.from_json(p) for p in net.get("published") or []),
            direct_egress=net.get("directEgress", True) is not False,
        ),
        machine=MachineType(data.get("machine", "microvm")),
        accel=Accel(data.get("accel", "auto")),
        timeout=data.get("timeout"),
        name=str(data.get("name", "microagent")),
        die_with_parent=bool(data.get("dieWithParent", False)),
        mediation=Mediation.from_json(data["mediation"]) if data.get("mediation") else None,
        services=tuple(ServiceChannel.from_json(s) for s in data.get("services") or []),
    )


@dataclass(frozen=True, eq=False, repr=False)
class RunDir(Frozen):
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

    def write_boot(self, boot: BootDocument) -> None:
        """Write ``boot.json`` (private: it names the config disk that carries the env)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.boot_path, boot.to_json(), mode=0o600)

    def read_boot(self) -> BootDocument:
        return BootDocument.from_json(json.loads(self.boot_path.read_text()))

    def runtime(self) -> dict[str, Any]:
        return read_json(self.runtime_path) or {"state": State.PREPARED.value}

    def runtime_unreadable(self) -> bool:
        """Whether runtime.json exists but holds no JSON object (damaged outside microagent:
        every write here is atomic)."""
        return self.runtime_path.exists() and read_json(self.runtime_path) is None

    def recover(self) -> State | None:
        """Heal an unreadable runtime.json (see :meth:`_current`); the state recovered, None
        when it was readable (or gone) by then."""
        with self._locked():
            if not self.runtime_unreadable():
                return None
            recovered = self._current()
            write_json_atomic(self.runtime_path, recovered)
            self.event(str(recovered["state"]), str(recovered["detail"]))
        return State(recovered["state"])

    def _current(self) -> dict[str, Any]:
        """runtime.json as a writer (holding the lock) starts from. An unreadable one is moved
        aside (``runtime.json.corrupt``) and replaced by what the processes say: ``running``
        when a supervisor of this run dir still runs, else ``failed`` (its disk to be checked)."""
        if not self.runtime_unreadable():
            return self.runtime()
        # kept by a second name, not moved: runtime.json never goes missing for a reader that
        # takes no lock (one would read "prepared"); the caller's atomic write replaces it
        aside = self.path / f".{CORRUPT_RUNTIME}.tmp"
        aside.unlink(missing_ok=True)
        os.link(self.runtime_path, aside)
        aside.replace(self.path / CORRUPT_RUNTIME)
        why = f"runtime.json was unreadable (kept as {CORRUPT_RUNTIME})"
        found = self.find_supervisor()
        if found is not None:
            return {
                "state": State.RUNNING.value,
                "detail": f"{why}; its supervisor still runs (pid {found.pid})",
                "observedAt": now(),
                "supervisorPid": found.pid,
                "supervisor": found.to_json(),
            }
        return {
            "state": State.FAILED.value,
            "detail": why,
            "observedAt": now(),
            "stateDiskDirty": "an unreadable runtime.json",
        }

    # -- the processes of the run, by command line -----------------------------------------------

    def is_supervisor(self, pid: int) -> bool:
        """Whether ``pid`` runs the supervisor of this run dir (judged by its command line and
        its user: another user's process that only looks like it never counts)."""
        return _runs(runner.command_line(pid), SUPERVISOR_MARK, str(self.path)) and (
            runner.owned_by_me(pid)
        )

    def find_supervisor(self) -> ProcessIdentity | None:
        """The running supervisor of this run dir (None if there is none)."""
        return next(self.processes(gateways=False), None)

    def processes(self, *, gateways: bool = True) -> Iterator[ProcessIdentity]:
        """Every running supervisor of this run dir (and gateway, with ``gateways``)."""
        gateway_config = str(self.path / "gateway.json")
        for pid in runner.processes():
            argv = runner.command_line(pid)
            ours = (
                _runs(argv, SUPERVISOR_MARK, str(self.path))
                or (gateways and _runs(argv, GATEWAY_MARK, gateway_config))
            ) and runner.owned_by_me(pid)
            identity = runner.process_identity(pid) if ours else None
            if identity is not None:
                yield identity

    def vmm(self) -> ProcessIdentity | None:
        """The VMM process the supervisor recorded (None before it booted one)."""
        return ProcessIdentity.from_json(self.runtime().get("vmm"))

    def gateway_process(self) -> ProcessIdentity | None:
        """The gateway process the supervisor recorded (None when there is none)."""
        return ProcessIdentity.from_json(self.runtime().get("gatewayProcess"))

    def state(self) -> State:
        try:
            return State(self.runtime().get("state", "prepared"))
        except ValueError:
            return State.FAILED

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    @contextmanager
    def _locked(self, wait: float | None = None) -> Iterator[None]:
        """Hold the writers' lock; with ``wait``, :class:`LockBusy` once that many seconds
        passed without it (else the wait is as long as the holder holds it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.lock_path.open("a") as fh:
            if wait is None:
                fcntl.flock(fh, fcntl.LOCK_EX)
            elif not _flock_within(fh.fileno(), wait):
                raise LockBusy(self.lock_path, wait)
            yield

    def set_state(
        self, state: State, detail: str = "", *, lock_wait: float | None = None, **extra: Any
    ) -> dict[str, Any]:
        """Record a transition in runtime.json and append it to events.jsonl (``lock_wait``:
        see :meth:`_locked`)."""
        written = self.set_state_if(
            lambda _current: True, state, detail, lock_wait=lock_wait, **extra
        )
        assert written is not None
        return written

    def set_state_if(
        self,
        only_if: Callable[[Mapping[str, Any]], bool],
        state: State,
        detail: str = "",
        *,
        lock_wait: float | None = None,
        **extra: Any,
    ) -> dict[str, Any] | None:
        """:meth:`set_state`, only when ``only_if`` holds for runtime.json as it is under the
        lock; None when it does not (somebody else moved the state meanwhile)."""
        with self._locked(lock_wait):
            current = self._current()
            if not only_if(current):
                return None
            current.update(extra)
            current.update(state=state.value, detail=detail, observedAt=now())
            write_json_atomic(self.runtime_path, current)
            self.event(state.value, detail)
        return current

    def update(self, **fields: Any) -> None:
        """Add fields to runtime.json without changing the state."""
        with self._locked():
            current = self._current()
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


def _flock_within(fd: int, wait: float) -> bool:
    """Take an exclusive ``flock`` on ``fd``, trying until ``wait`` seconds passed."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL)
        else:
            return True
