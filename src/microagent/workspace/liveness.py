"""A workspace's true state, cheaply: what ``exec``, ``status`` and every verb start from.

Kept apart from :mod:`~microagent.workspace.lifecycle` so the exec path (a CLI process per
command) does not import the boot, disk and spec machinery it never uses.
"""

from __future__ import annotations

from microagent import runner
from microagent.runtime.rundir import State
from microagent.workspace.records import Workspace


def reconcile(ws: Workspace) -> State:
    """The true state: a live-looking state whose supervisor is gone becomes ``failed``."""
    run = ws.run
    state = run.state()
    pid = run.runtime().get("supervisorPid")
    if state is State.STARTING and pid is None:
        return state  # the launcher records the pid right after spawning
    if state.live and not runner.pid_alive(pid):
        detail = "the supervisor process died unexpectedly"
        run.set_state(State.FAILED, detail, stateDiskDirty="its supervisor died")
        run.config_disk.unlink(missing_ok=True)  # its environment outlives no boot
        return State.FAILED
    return state
