"""``exec``: a command in a running workspace, through its supervisor's guest-agent link.

The supervisor records its exec socket (``execSocket``) and the guest agent's readiness
(``execReadyAt``) in runtime.json (see :mod:`microagent.runtime.agentlink`); this module finds
them for a workspace, waiting a while for a workspace that is still starting, and runs the
command with :mod:`microagent.runtime.execclient`.
"""

from __future__ import annotations

import time
from pathlib import Path

from microagent.errors import ConflictError, VMError
from microagent.runtime.agentproto import ExecRequest
from microagent.runtime.execclient import ExecIO, ExecResult, Input, collect, stream
from microagent.runtime.rundir import State
from microagent.workspace.liveness import reconcile, supervisor_state
from microagent.workspace.records import Workspace

READY_WAIT = 30.0  # how long exec waits for the guest agent of a starting workspace
POLL = 0.1


def exec_socket(ws: Workspace, *, wait: float = READY_WAIT) -> Path:
    """The exec socket of ``ws`` once its guest agent is ready, waiting up to ``wait``
    seconds while it starts; ConflictError when it is not running."""
    deadline = time.monotonic() + wait
    while True:
        state = reconcile(ws)
        runtime = ws.run.runtime()
        path = runtime.get("execSocket")
        if state is State.RUNNING and runtime.get("execReadyAt") and isinstance(path, str):
            _require_responsive(ws)
            return Path(path)
        if state not in (State.STARTING, State.RUNNING):
            verb = "resume" if state is State.PAUSED else "start"
            raise ConflictError(
                f"workspace {ws.name!r} is not running (state: {state.value})",
                hint=f"{verb} it first: microagent {verb} {ws.name}",
            )
        if time.monotonic() >= deadline:
            raise VMError(
                f"the guest agent of workspace {ws.name!r} did not answer within {wait:g}s",
                hint=f"see `microagent logs {ws.name}`; a guest kit older than exec needs "
                "`microagent kernel install`",
            )
        time.sleep(POLL)


def _require_responsive(ws: Workspace) -> None:
    """A stopped or traced supervisor accepts on the exec socket and never answers: refuse
    instead of hanging (one stopped after this check still hangs the call until it resumes,
    or until the caller's ``--timeout``)."""
    supervisor = supervisor_state(ws.name, ws.run)
    if supervisor is not None and not supervisor.responsive:
        raise ConflictError(
            f"workspace {ws.name!r} cannot run a command now: {supervisor.detail}",
            hint=f"see `microagent status {ws.name}`",
        )


def run_exec(
    ws: Workspace,
    request: ExecRequest,
    *,
    io: ExecIO | None = None,
    stdin: Input = None,
    timeout: float | None = None,
    wait: float = READY_WAIT,
) -> ExecResult:
    """Run ``request`` in ``ws``: streamed to ``io``, or collected (bounded) without."""
    path = exec_socket(ws, wait=wait)
    if io is None:
        return collect(path, request, stdin=stdin, timeout=timeout)
    return stream(path, request, io, stdin=stdin, timeout=timeout)
