"""The detached per-VM supervisor: boots one VM and records what happens in its run dir.

``start`` prepares the disks and writes ``boot.json`` into the run directory (see
:mod:`~microagent.runtime.rundir`), then runs :func:`main` with ``RUN_DIR`` in an isolated
Python (``python -I``: no current directory, user site or ``PYTHON*`` variables on the import
path; see ``workspace.lifecycle.supervisor_argv``), in a new session, from the run directory.
This process owns the VMM: it records its identity (``vmm`` in runtime.json, so the lifecycle
can make sure no VMM outlives its owner), moves the state machine (starting -> running ->
stopped | halted | failed), writes ``result.json`` from the guest's report, turns SIGTERM into
a graceful guest shutdown, and removes the config disk (it carries the environment) once the
VMM is gone. Everything it needs is in ``boot.json``; it reads no environment variables.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from microagent import runner
from microagent.errors import MicroagentError
from microagent.fsutil import write_json_atomic
from microagent.runtime.backend import GuestResult, Machine
from microagent.runtime.backends import get_backend
from microagent.runtime.rundir import RunDir, State, now

SHUTDOWN_GRACE = 15.0
EVENT_POLL = 0.5


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
        boot = self.run_dir.read_boot()
        config = boot.config
        backend = get_backend(
            boot.backend, probes_dir=boot.probes_dir, fake_outcome=boot.fake_outcome
        )
        try:
            with backend.boot(config) as machine:
                self.machine = machine
                self._started(machine)
                result = self._wait(machine)
        except MicroagentError as exc:
            return self._failed(exc.message)
        except Exception as exc:  # the supervisor must always leave a final state
            return self._failed(f"supervisor error: {exc!r}")
        finally:  # the VMM is gone: the environment it was given leaves the disk too
            self.run_dir.config_disk.unlink(missing_ok=True)
        return self._finished(result)

    def _started(self, machine: Machine) -> None:
        pid = machine.pid
        vmm = runner.process_identity(pid) if pid is not None else None
        self.run_dir.set_state(
            State.RUNNING,
            "vm started",
            vmmArgv=list(machine.argv()),
            vmm=vmm.to_json() if vmm else None,
        )

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
