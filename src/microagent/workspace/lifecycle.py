"""Workspace lifecycle verbs: start, wait, status, result, halt, delete.

Everything here works from workspace records and the store; the VM itself is owned by the
detached supervisor (see :mod:`microagent.runtime.supervisor`), which records the state
machine in the workspace's run directory, and the VMM's identity. The VMM gets SIGKILL when its
supervisor dies (parent-death signal); on top of that, killing a supervisor here kills its
recorded VMM too, and nothing touches the disks (``start``, ``cp``) while a VMM of the
workspace still runs, whatever the recorded state says.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent import runner
from microagent.errors import ConflictError, InvalidInputError, NotFoundError, VMError
from microagent.fsutil import read_json
from microagent.runtime.backend import Accel, Forward, NetworkConfig
from microagent.runtime.boot import BootFiles, RunRequest, prepare, vm_dir_for
from microagent.runtime.configdisk import GuestFile, NetworkMode, Output
from microagent.runtime.control import parse_output
from microagent.runtime.rundir import BootDocument, State
from microagent.settings import Settings
from microagent.store.content import Store
from microagent.workspace.records import Record, Workspace

START_TIMEOUT = 60.0
HALT_TIMEOUT = 30.0
POLL = 0.2


@dataclass
class Runtime:
    """What starting a workspace needs: the settings (store, backend, accelerator, extra CA)
    and a way to get the guest kit (fetched only when a start needs it)."""

    settings: Settings
    kit: Callable[[], BootFiles]

    @property
    def store(self) -> Store:
        return Store(self.settings.store_dir)


# -- liveness ----------------------------------------------------------------------------------


def reconcile(ws: Workspace) -> State:
    """The true state: a live-looking state whose supervisor is gone becomes ``failed``."""
    run = ws.run
    state = run.state()
    pid = run.runtime().get("supervisorPid")
    if state is State.STARTING and pid is None:
        return state  # the launcher records the pid right after spawning
    if state.live and not runner.pid_alive(pid):
        run.set_state(State.FAILED, "the supervisor process died unexpectedly")
        run.config_disk.unlink(missing_ok=True)  # its environment outlives no boot
        return State.FAILED
    return state


def vmm_running(ws: Workspace) -> bool:
    """Whether the VMM the supervisor recorded still runs (a reused pid does not count)."""
    vmm = ws.run.vmm()
    return vmm is not None and runner.is_running(vmm)


def _refuse_running_vmm(ws: Workspace, verb: str) -> None:
    vmm = ws.run.vmm()
    if vmm is not None and runner.is_running(vmm):
        raise ConflictError(
            f"cannot {verb}: a VM of workspace {ws.name!r} is still running (pid {vmm.pid}) "
            "although its supervisor is gone",
            hint=f"`microagent halt {ws.name}` stops it",
        )


def _kill_vmm(ws: Workspace) -> bool:
    """SIGKILL the recorded VMM if it is still that process; True if one was killed."""
    vmm = ws.run.vmm()
    return vmm is not None and runner.kill_process(vmm)


def _kill(ws: Workspace, supervisor: object) -> None:
    """The last resort: SIGKILL the supervisor's process group and the VMM it recorded."""
    if isinstance(supervisor, int):
        _signal_group(supervisor, signal.SIGKILL)
    _kill_vmm(ws)
    ws.run.config_disk.unlink(missing_ok=True)


# -- start -------------------------------------------------------------------------------------


def _guest_files(store: Store, record: Record) -> tuple[GuestFile, ...]:
    files = []
    for item in record.files:
        if item.kind != "file":
            continue
        with store.open_blob(item.blob) as fh:
            files.append(GuestFile(item.path, fh.read(), item.mode))
    return tuple(files)


def run_request(rt: Runtime, ws: Workspace, record: Record) -> RunRequest:
    """What a start of the workspace boots: its entrypoint on its own state disk."""
    mode = NetworkMode(record.network)
    forwards = tuple(Forward(guest, host_port=host) for guest, host in record.host_forwards)
    return RunRequest(
        rootfs=Path(record.rootfs),
        command=record.command,
        env={**record.env, **record.runtime_env},
        network=NetworkConfig(mode, forwards),
        memory_mib=record.memory_mib,
        cpus=record.cpus,
        files=_guest_files(rt.store, record),
        outputs=tuple(Output(n, p) for n, p in record.outputs),
        hostname=record.hostname,
        workdir=record.workdir,
        extra_ca=rt.settings.extra_ca_bundle(),
        state_disk=ws.state_disk,
        accel=Accel.parse(rt.settings.accel),
        name=record.name,
        die_with_parent=True,  # the supervisor owns the VMM: no VM outlives it
    )


def start(rt: Runtime, ws: Workspace, *, timeout: float = START_TIMEOUT) -> dict[str, Any]:
    """Boot the workspace in a detached supervisor; return once it is running (or failed)."""
    state = reconcile(ws)
    if state.live:
        raise ConflictError(
            f"workspace {ws.name!r} is already {state.value}",
            hint="`microagent halt` it first, or wait for it to finish",
        )
    _refuse_running_vmm(ws, "start")
    record = ws.record()
    if not Path(record.rootfs).is_file():
        raise NotFoundError(
            f"the root filesystem of {ws.name!r} is gone from the cache",
            hint="create the workspace again (a `cache prune` removed it)",
        )
    run = ws.run
    run.result_path.unlink(missing_ok=True)
    run.path.mkdir(parents=True, exist_ok=True)
    vm_dir = vm_dir_for(run.path, ws.name)
    boot = prepare(run_request(rt, ws, record), rt.kit(), vm_dir, work_dir=run.path)
    settings = rt.settings
    run.write_boot(BootDocument(boot, settings.backend, settings.probes_dir, settings.fake_outcome))
    run.set_state(
        State.STARTING, "starting the VM", supervisorPid=None, vmm=None, vmDir=str(vm_dir)
    )
    proc = runner.spawn(
        supervisor_argv(run.path),
        stdout=run.supervisor_log,
        cwd=run.path,
        new_session=True,
        env=_supervisor_env(),
    )
    run.update(supervisorPid=proc.pid)
    return _await_running(ws, timeout)


# Runs the supervisor of the microagent this process runs. The package root is put on the path
# only when the interpreter's own path (site-packages and its .pth files) lacks it.
SUPERVISOR_BOOTSTRAP = (
    "import sys; root = sys.argv[1]; root in sys.path or sys.path.insert(0, root); "
    "from microagent.runtime.supervisor import main; sys.exit(main(sys.argv[2:]))"
)


def supervisor_argv(run_dir: Path) -> list[str]:
    """The supervisor's command line: an isolated Python (``-I``: neither the current
    directory nor the user site nor ``PYTHON*`` variables reach its import path), so a
    ``microagent/`` folder where the caller stands is never imported in its place."""
    package_root = Path(__file__).resolve().parents[2]
    return [sys.executable, "-I", "-c", SUPERVISOR_BOOTSTRAP, str(package_root), str(run_dir)]


def _supervisor_env() -> dict[str, str]:
    """What the supervisor passes on (it reads no settings; Python ignores PYTHON* under -I)."""
    keep = ("XDG_RUNTIME_DIR", "TMPDIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


def _await_running(ws: Workspace, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = reconcile(ws)
        if state is State.RUNNING or state.terminal:
            return ws.run.runtime()
        time.sleep(POLL)
    raise VMError(
        f"workspace {ws.name!r} did not start within {timeout:.0f}s",
        hint=f"see {ws.run.supervisor_log}",
    )


def wait(ws: Workspace, timeout: float | None = None) -> State:
    """Block until the workspace reaches a terminal state."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = reconcile(ws)
        if state.terminal or state is State.PREPARED:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise VMError(f"workspace {ws.name!r} is still {state.value} after {timeout:.0f}s")
        time.sleep(POLL)


# -- halt / delete -----------------------------------------------------------------------------


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def halt(ws: Workspace, *, timeout: float = HALT_TIMEOUT) -> State:
    """Graceful stop (guest shutdown over the control port), then escalate. Disk is kept.

    A VMM left running by a supervisor that died is killed.
    """
    state = reconcile(ws)
    if not state.live:
        if _kill_vmm(ws):
            ws.run.event("vmm-killed", "the VM of a dead supervisor was killed")
        return state
    pid = ws.run.runtime().get("supervisorPid")
    ws.run.set_state(State.STOPPING, "halt requested")
    if isinstance(pid, int):
        _signal_group(pid, signal.SIGTERM)
    try:
        return wait(ws, timeout)
    except VMError:
        _kill(ws, pid)
        ws.run.set_state(State.HALTED, f"killed after {timeout:.0f}s without a clean shutdown")
        return State.HALTED


def delete(ws: Workspace, *, force: bool = False) -> bool:
    """Remove the workspace (record, disks, logs). A live one needs ``force``."""
    if not ws.root.exists():
        return False
    state = reconcile(ws)
    if state.live or vmm_running(ws):
        if not force:
            what = state.value if state.live else "running a VM without its supervisor"
            raise ConflictError(
                f"workspace {ws.name!r} is {what}",
                hint="halt it first, or pass --force to kill it",
            )
        _kill(ws, ws.run.runtime().get("supervisorPid"))
        time.sleep(0.2)
    shutil.rmtree(ws.root)
    return True


# -- status / result ---------------------------------------------------------------------------


def _readiness(ws: Workspace, state: State, runtime: Mapping[str, Any]) -> dict[str, Any]:
    live = state.live
    guest = bool(runtime.get("guestReadyAt")) and live
    return {
        "guestReady": {"ready": guest, "observedAt": runtime.get("guestReadyAt")},
        "execReady": {"ready": False, "detail": "structured exec is not available yet"},
        "resultReady": {"ready": ws.run.result_path.is_file()},
    }


def _parse_output(name: str, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        return {"name": name, "present": False}
    out: dict[str, Any] = {
        "name": name,
        "path": entry.get("path"),
        "present": True,
        "truncated": bool(entry.get("truncated")),
    }
    content = str(entry.get("content", ""))
    try:
        out["value"] = parse_output(content)  # bounded: size and depth checked first
    except InvalidInputError as exc:
        out["content"] = content
        if name == "result":
            out["error"] = f"the result file is not valid JSON: {exc.message}"
    return out


def result_payload(ws: Workspace) -> dict[str, Any] | None:
    """The guest's report plus the declared outputs (``result`` parsed as JSON)."""
    data = read_json(ws.run.result_path)
    if data is None:
        return None
    outputs = data.get("outputs") or {}
    record = ws.record()
    parsed = [_parse_output(name, outputs.get(name)) for name, _path in record.outputs]
    payload = {k: v for k, v in data.items() if k != "outputs"}
    payload["outputs"] = parsed
    for item in parsed:
        if item["name"] == "result" and "value" in item:
            payload["workResult"] = item["value"]
    return payload


def status(ws: Workspace, backend: str) -> dict[str, Any]:
    """The JSON envelope for ``status``."""
    state = reconcile(ws)
    runtime = ws.run.runtime()
    record = ws.record()
    failed = state is State.FAILED
    return {
        "ok": not failed,
        "backend": backend,
        "event": {
            "identity": {"name": ws.name, "rootfsKey": record.rootfs_key},
            "state": state.value,
            "detail": runtime.get("detail", ""),
            "observedAt": runtime.get("observedAt"),
        },
        "readiness": _readiness(ws, state, runtime),
        "artifacts": {"outputs": [{"name": n, "path": p} for n, p in record.outputs]},
        "result": result_payload(ws),
        "error": {"message": runtime.get("detail", "")} if failed else None,
    }


def result(ws: Workspace) -> dict[str, Any]:
    payload = result_payload(ws)
    if payload is None:
        state = reconcile(ws)
        raise NotFoundError(
            f"workspace {ws.name!r} has no result yet (state: {state.value})",
            hint="start it and wait until it stops (`microagent start --wait`)",
        )
    return payload


def ensure_offline(ws: Workspace, verb: str) -> Record:
    state = reconcile(ws)
    if state.live:
        raise ConflictError(
            f"cannot {verb} while workspace {ws.name!r} is {state.value}",
            hint=f"`microagent halt {ws.name}` first",
        )
    _refuse_running_vmm(ws, verb)
    return ws.record()
