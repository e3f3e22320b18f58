"""The detached per-VM supervisor: boots one VM and records what happens in its run dir.

``start`` prepares the disks and writes ``boot.json`` into the run directory (see
:mod:`~microagent.runtime.rundir`), then runs ``python -m microagent.runtime.supervisor
RUN_DIR`` in a new session. This process owns the VMM: it moves the state machine (starting
-> running -> stopped | halted | failed), writes ``result.json`` from the guest's report, and
turns SIGTERM into a graceful guest shutdown. Everything it needs is in ``boot.json``; it
reads no environment variables.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from microagent.errors import MicroagentError
from microagent.fsutil import write_json_atomic
from microagent.runtime.backend import (
    Accel,
    BootConfig,
    Disk,
    Forward,
    GuestResult,
    Machine,
    MachineType,
    NetworkConfig,
)
from microagent.runtime.backends import get_backend
from microagent.runtime.configdisk import NetworkMode
from microagent.runtime.rundir import RunDir, State, now

SHUTDOWN_GRACE = 15.0
EVENT_POLL = 0.5


def boot_to_json(
    config: BootConfig,
    backend: str,
    *,
    probes_dir: Path | None = None,
    fake_outcome: str | None = None,
) -> dict[str, Any]:
    return {
        "backend": backend,
        "probesDir": str(probes_dir) if probes_dir else None,
        "fakeOutcome": fake_outcome,
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
        },
        "machine": config.machine.value,
        "accel": config.accel.value,
        "timeout": config.timeout,
        "name": config.name,
    }


def boot_from_json(data: Mapping[str, Any]) -> BootConfig:
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
        network=NetworkConfig(NetworkMode(net.get("mode", "isolated")), forwards),
        machine=MachineType(data.get("machine", "microvm")),
        accel=Accel(data.get("accel", "auto")),
        timeout=data.get("timeout"),
        name=str(data.get("name", "microagent")),
    )


class _Watcher(threading.Thread):
    """Copies guest readiness (booted, started) from the control channel into runtime.json."""

    def __init__(self, run: RunDir, machine: Machine) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.machine = run, machine
        self.stop = threading.Event()
        self.seen: set[str] = set()

    def run(self) -> None:
        while not self.stop.wait(EVENT_POLL):
            for event in list(self.machine.events()):
                kind = str(event.get("event", ""))
                if kind in ("booted", "started") and kind not in self.seen:
                    self.seen.add(kind)
                    field = "guestReadyAt" if kind == "booted" else "commandStartedAt"
                    self.run_dir.set_state(State.RUNNING, f"guest {kind}", **{field: now()})


class Supervisor:
    def __init__(self, run: RunDir) -> None:
        self.run_dir = run
        self.halt_requested = threading.Event()
        self.machine: Machine | None = None

    def _on_term(self, _signum: int, _frame: object) -> None:
        self.halt_requested.set()
        machine = self.machine
        if machine is not None:
            threading.Thread(target=machine.shutdown, args=(SHUTDOWN_GRACE,), daemon=True).start()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        boot = json.loads(self.run_dir.boot_path.read_text())
        config = boot_from_json(boot)
        probes = Path(boot["probesDir"]) if boot.get("probesDir") else None
        backend = get_backend(
            boot["backend"], probes_dir=probes, fake_outcome=boot.get("fakeOutcome")
        )
        try:
            with backend.boot(config) as machine:
                self.machine = machine
                self.run_dir.set_state(State.RUNNING, "vm started", vmmArgv=list(machine.argv()))
                result = self._wait(machine)
        except MicroagentError as exc:
            return self._failed(exc.message)
        except Exception as exc:  # the supervisor must always leave a final state
            return self._failed(f"supervisor error: {exc!r}")
        return self._finished(result)

    def _wait(self, machine: Machine) -> GuestResult:
        watcher = _Watcher(self.run_dir, machine)
        watcher.start()
        try:
            return machine.wait(timeout=None)
        finally:
            watcher.stop.set()
            watcher.join(timeout=5)

    def _finished(self, result: GuestResult) -> int:
        data = {"observedAt": now(), **result.to_json()}
        write_json_atomic(self.run_dir.result_path, data)
        if self.halt_requested.is_set():
            self.run_dir.set_state(State.HALTED, "halted on request", exitCode=result.exit_code)
            return 0
        if result.exit_code == 0:
            self.run_dir.set_state(State.STOPPED, "entrypoint exited 0", exitCode=0)
            return 0
        why = result.error or f"entrypoint exited with code {result.exit_code}"
        self.run_dir.set_state(State.FAILED, why, exitCode=result.exit_code)
        return 1

    def _failed(self, message: str) -> int:
        if self.halt_requested.is_set():
            self.run_dir.set_state(State.HALTED, f"halted on request ({message})")
            return 0
        self.run_dir.set_state(State.FAILED, message)
        return 1


def main(argv: list[str]) -> int:
    run = RunDir(Path(argv[0]))
    began = time.monotonic()
    code = Supervisor(run).run()
    run.event("supervisor-exit", f"after {time.monotonic() - began:.1f}s", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
