"""A workspace's true state, cheaply: what ``exec``, ``status`` and every verb start from.

Kept apart from :mod:`~microagent.workspace.lifecycle` so the exec path (a CLI process per
command) does not import the boot, disk and spec machinery it never uses.

The state in runtime.json is what the supervisor last wrote; a supervisor that died without
writing (kill -9, the OOM killer, a host restart) leaves a live-looking state behind.
:func:`reconcile` heals it: a live state whose supervisor no longer runs becomes ``failed``
with the reason, and its state disk is marked for a check before the next start. A process
counts as the supervisor only by its identity (pid, start time, boot id), so a pid reused by
another process after a long time or a reboot never keeps a workspace "running". A start
whose launcher died before it recorded the supervisor is found by the supervisor's command
line, or fails once the launcher (recorded as ``launcher``) is gone, or at the latest once
:data:`STARTING_GRACE` has passed. An unreadable runtime.json is moved aside and the state
recovered from the processes that run (:meth:`RunDir.recover`). A gateway left by a dead
supervisor is killed: it holds the credentials in memory.

A supervisor that runs but is stopped (SIGSTOP/SIGTSTP, state ``T`` in /proc/PID/stat) or held
by a debugger (``t``) keeps its workspace live, but nothing answers for it: no exec, no probe,
no mediation relay, no shutdown. :func:`supervisor_state` tells such a supervisor (a zombie is
not one: it has exited, and :func:`reconcile` reports it dead).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent import runner
from microagent.errors import VMError
from microagent.frozen import Frozen
from microagent.runner import ProcessIdentity
from microagent.runtime.rundir import RunDir, State
from microagent.workspace.records import Workspace

STARTING_GRACE = 30.0  # seconds a start may take to launch and record its supervisor
LOG_TAIL_CHARS = 200
LOG_TAIL_BYTES = 4096
_HALTED = {"T": "stopped", "t": "traced"}  # /proc/PID/stat: alive, but not running


def reconcile(ws: Workspace) -> State:
    """The true state: a live-looking state whose supervisor is gone becomes ``failed``."""
    run = ws.run
    if run.runtime_unreadable():
        recovered = run.recover()  # None: somebody else did meanwhile
        if recovered is State.FAILED:
            run.config_disk.unlink(missing_ok=True)
        return recovered if recovered is not None else reconcile_run(run)
    runtime = run.runtime()
    state = _state(runtime)
    if not state.live:
        return state
    why = death(run, state, runtime)
    if why is None:
        return state
    return _record_death(run, runtime, why)


def _state(runtime: Mapping[str, Any]) -> State:
    try:
        return State(runtime.get("state", "prepared"))
    except ValueError:
        return State.FAILED


def death(run: RunDir, state: State, runtime: Mapping[str, Any]) -> str | None:
    """Why the live-looking ``state`` is not live (None while its supervisor runs)."""
    recorded = ProcessIdentity.from_json(runtime.get("supervisor"))
    if recorded is not None:
        if runner.is_running(recorded):
            return None
        if recorded.boot_id and runner.boot_id() and recorded.boot_id != runner.boot_id():
            return f"the host restarted while it was {state.value} (its supervisor is gone)"
        return _died(run, recorded.pid, runtime.get("supervisorLogOffset"))
    pid = runtime.get("supervisorPid")
    if isinstance(pid, int):  # recorded before identities were: its command line must match
        return None if run.is_supervisor(pid) else _died(run, pid, None)
    return _never_recorded(run, runtime)


def _never_recorded(run: RunDir, runtime: Mapping[str, Any]) -> str | None:
    """A start that recorded no supervisor: one found by its command line is recorded now
    (the launcher died right after spawning it); none at all is failed once the launcher is
    gone, or after the grace (a launcher that lives on, or was not recorded)."""
    found = run.find_supervisor()
    if found is not None:
        run.update(supervisorPid=found.pid, supervisor=found.to_json())
        return None
    launcher = ProcessIdentity.from_json(runtime.get("launcher"))
    if launcher is not None and not runner.is_running(launcher):
        return (
            f"the start was interrupted: the command that started it (pid {launcher.pid}) "
            "ended before it launched the supervisor"
        )
    age = seconds_since(runtime.get("startedAt"))
    if age is None or age > STARTING_GRACE:
        return (
            f"the start was interrupted: no supervisor was running {STARTING_GRACE:g}s after "
            "it began (the command that started it died?)"
        )
    return None


def _died(run: RunDir, pid: int, log_offset: object) -> str:
    why = f"the supervisor process died unexpectedly (pid {pid}; killed, or out of memory?)"
    last = _last_line(run.supervisor_log, log_offset if isinstance(log_offset, int) else 0)
    return f"{why}; its log ends: {last}" if last else why


def _last_line(path: Path, offset: int) -> str:
    """The last line ``path`` got after ``offset`` (what this start's supervisor wrote: the
    log is appended to by every start), bounded; '' when there is none."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, offset, os.fstat(fh.fileno()).st_size - LOG_TAIL_BYTES))
            data = fh.read(LOG_TAIL_BYTES)
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").replace("\r", "").strip().splitlines()
    return lines[-1].strip()[-LOG_TAIL_CHARS:] if lines else ""


def _record_death(run: RunDir, runtime: Mapping[str, Any], why: str) -> State:
    """Write ``failed`` unless somebody moved the state meanwhile; clean what it left."""
    expected = runtime.get("supervisor"), runtime.get("supervisorPid"), runtime.get("state")

    def unchanged(now: Mapping[str, Any]) -> bool:
        return (now.get("supervisor"), now.get("supervisorPid"), now.get("state")) == expected

    written = run.set_state_if(unchanged, State.FAILED, why, stateDiskDirty="its supervisor died")
    if written is None:
        return reconcile_run(run)
    run.config_disk.unlink(missing_ok=True)  # its environment outlives no boot
    _stop_orphaned_gateway(run)
    return State.FAILED


def reconcile_run(run: RunDir) -> State:
    """The state as recorded now (after somebody else wrote it)."""
    return _state(run.runtime())


def _stop_orphaned_gateway(run: RunDir) -> None:
    """The gateway holds the credentials in memory: it never outlives its supervisor (it
    gets SIGTERM from the kernel when it dies; this is the SIGKILL if that did not do)."""
    gateway = run.gateway_process()
    if gateway is None:
        return
    try:
        if runner.kill_process(gateway):
            run.event("gateway-killed", f"the gateway (pid {gateway.pid}) outlived its supervisor")
    except VMError as exc:
        run.event("gateway-orphaned", exc.message)


# -- the processes of a run ---------------------------------------------------------------------


def running_supervisor(run: RunDir) -> ProcessIdentity | None:
    """The supervisor of ``run`` while it runs: the recorded identity, or for a record from
    before identities, the recorded pid if its command line is that supervisor's."""
    runtime = run.runtime()
    recorded = ProcessIdentity.from_json(runtime.get("supervisor"))
    if recorded is not None:
        return recorded if runner.is_running(recorded) else None
    pid = runtime.get("supervisorPid")
    if isinstance(pid, int) and pid > 0 and run.is_supervisor(pid):
        return runner.process_identity(pid)
    return None


def seconds_since(stamp: object) -> int | None:
    """Whole seconds since a ``rundir.now()`` timestamp (None when there is none)."""
    if not isinstance(stamp, str):
        return None
    import calendar  # deferred: status and ps read start times; cp and create do not

    try:
        then = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None
    return max(0, int(time.time()) - then)


# -- a supervisor that runs but does not answer -------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class SupervisorState(Frozen):
    """The supervisor of a live workspace: its pid and how it runs (``running``: as usual,
    ``stopped``: by SIGSTOP or SIGTSTP, ``traced``: stopped by a debugger). ``detail`` says
    what an unresponsive one means and how to go on; '' for one that answers."""

    pid: int
    state: str = "running"
    detail: str = ""

    @property
    def responsive(self) -> bool:
        return self.state == "running"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"pid": self.pid, "state": self.state}
        data["responsive"] = self.responsive
        return {**data, "detail": self.detail} if self.detail else data


def supervisor_state(name: str, run: RunDir) -> SupervisorState | None:
    """How the supervisor of workspace ``name`` runs; None when none runs."""
    identity = running_supervisor(run)
    if identity is None:
        return None
    pid = identity.pid
    state = _HALTED.get(_scheduler_state(pid), "running")
    if state == "stopped":
        why = "is stopped (SIGSTOP or SIGTSTP)"
        how = (
            f"`kill -CONT {pid}` resumes it, `microagent halt {name}` resumes and halts it, "
            f"`microagent kill {name}` stops it now"
        )
    elif state == "traced":
        why = "is stopped by a debugger (traced)"
        how = f"detach the debugger, or `microagent kill {name}` stops the workspace now"
    else:
        return SupervisorState(pid)
    detail = (
        f"the supervisor (pid {pid}) {why}: the workspace runs on, but nothing answers for "
        f"it (exec, health probes, the mediation channel); {how}"
    )
    return SupervisorState(pid, state, detail)


def _scheduler_state(pid: int) -> str:
    """Field 3 of /proc/PID/stat (``R``, ``S``, ``T``...); '' when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] if fields else ""
