"""Workspace lifecycle verbs: start, wait, status, result, halt, kill, delete, ps.

Everything here works from workspace records and the store; the VM itself is owned by the
detached supervisor (see :mod:`microagent.runtime.supervisor`), which records the state
machine in the workspace's run directory, and the VMM's identity. The VMM gets SIGKILL when its
supervisor dies (parent-death signal); on top of that, killing a supervisor here kills its
recorded VMM too, and nothing touches the disks (``start``, ``cp``) while a VMM of the
workspace still runs, whatever the recorded state says.

A VMM that was killed (``kill``, a halt that had to escalate, a supervisor that died) may
have left the state disk mid-write: runtime.json then says ``stateDiskDirty`` (why), and the
next ``start`` or ``cp`` first runs a repairing ``e2fsck -fy`` on it (event ``fsck``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent import runner
from microagent.compiler.spec import Mediation as MediationSpec
from microagent.compiler.spec import Restart
from microagent.errors import (
    ConflictError,
    HostIOError,
    IntegrityError,
    InvalidInputError,
    MicroagentError,
    NotFoundError,
    VMError,
)
from microagent.fsutil import flocked, read_json, remove_any
from microagent.runner import ProcessIdentity
from microagent.runtime import network
from microagent.runtime.backend import (
    Accel,
    BootConfig,
    Forward,
    Mediation,
    NetworkConfig,
    PublishedPort,
)
from microagent.runtime.boot import BootFiles, RunRequest, prepare, vm_dir_for
from microagent.runtime.configdisk import GuestFile, NetworkMode, Output
from microagent.runtime.control import parse_output
from microagent.runtime.health import HealthCheck
from microagent.runtime.probe import tcp_reachable
from microagent.runtime.rundir import BootDocument, LockBusy, RunDir, State, now
from microagent.runtime.snapshot import Manifest
from microagent.runtime.snapshot import remove as snapshot_remove
from microagent.runtime.snapshot import tags as snapshot_tags
from microagent.settings import Settings
from microagent.store.content import Store
from microagent.workspace import audit, snapshots
from microagent.workspace.disks import boot_disks
from microagent.workspace.liveness import (
    SupervisorState,
    reconcile,
    running_supervisor,
    seconds_since,
    supervisor_state,
)
from microagent.workspace.offline import refuse_running_vmm, repair_state_disk
from microagent.workspace.records import Record, Workspace
from microagent.workspace.services import (
    Services,
    plan_services,
    resolve_secrets,
    secrets_pipe,
)

HELD_DETAIL = (
    "held by the host while a warm template is made: the guest's connections are accepted "
    "and kept silent, the target is not contacted"
)
NETNS_ETC = Path("/etc/netns")  # per-namespace resolv.conf folders (see runtime.network)
VM_DIR_NAME = re.compile(r".{1,40}-[0-9a-f]{12}")  # runtime.boot.vm_dir_for's outside ones
START_LOCK = ".start.lock"
START_TIMEOUT = 60.0
HALT_TIMEOUT = 30.0
EXIT_GRACE = 10.0  # seconds a supervisor may take to exit after writing its final state
ORPHAN_GRACE = 2.0  # seconds a dead supervisor's processes get to follow it
POLL = 0.2
START_POLL = 0.05  # a start's wait for the supervisor to report running (a restore: ~1 s)


@dataclass
class Runtime:
    """What starting a workspace needs: the settings (store, backend, accelerator, extra CA)
    and a way to get the guest kit (fetched only when a start needs it)."""

    settings: Settings
    kit: Callable[[], BootFiles]
    notice: Callable[[str], None] = lambda _message: None  # what the user should see

    @property
    def store(self) -> Store:
        return Store(self.settings.store_dir)


# -- liveness ----------------------------------------------------------------------------------


def vmm_running(ws: Workspace) -> bool:
    """Whether the VMM the supervisor recorded still runs (a reused pid does not count)."""
    vmm = ws.run.vmm()
    return vmm is not None and runner.is_running(vmm)


def _kill_vmm(ws: Workspace) -> bool:
    """SIGKILL the recorded VMM if it is still that process; True if one was killed."""
    vmm = ws.run.vmm()
    return vmm is not None and runner.kill_process(vmm)


def _kill(ws: Workspace) -> ProcessIdentity | None:
    """The last resort: SIGKILL the supervisor's process group (only while the recorded pid
    is still that supervisor) and the VMM it recorded; the supervisor that was killed."""
    supervisor = running_supervisor(ws.run)
    if supervisor is not None:
        _signal_group(supervisor.pid, signal.SIGKILL)
    _kill_vmm(ws)
    ws.run.config_disk.unlink(missing_ok=True)
    return supervisor


def _await_dead(process: ProcessIdentity | None, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while process is not None and runner.is_running(process) and time.monotonic() < deadline:
        time.sleep(0.02)


# -- start -------------------------------------------------------------------------------------


def _guest_files(store: Store, record: Record) -> tuple[GuestFile, ...]:
    files = []
    for item in record.files:
        if item.kind != "file":
            continue
        with store.open_blob(item.blob) as fh:
            files.append(GuestFile(item.path, fh.read(), item.mode))
    return tuple(files)


def run_request(
    rt: Runtime,
    ws: Workspace,
    record: Record,
    services: Services | None = None,
    *,
    hold_mediation: bool = False,
) -> RunRequest:
    """What a start of the workspace boots: its entrypoint on its own state disk, with the
    environment and channels of its host ``services`` (credential brokers, egress proxy).
    ``hold_mediation``: the host holds the mediation channel itself (a warm template's boot)."""
    services = services or Services()
    mode = NetworkMode(record.network)
    forwards = tuple(Forward(guest, host_port=host) for guest, host in record.host_forwards)
    published = record.published if mode is NetworkMode.USER else ()
    direct = not record.egress_allow
    return RunRequest(
        rootfs=Path(record.rootfs),
        layers=tuple(Path(p) for p in record.rootfs_layers),
        command=record.command,
        env={**record.env, **record.runtime_env, **services.env},
        network=NetworkConfig(mode, forwards, published, direct_egress=direct),
        memory_mib=record.memory_mib,
        cpus=record.cpus,
        files=_guest_files(rt.store, record),
        outputs=tuple(Output(n, p) for n, p in record.outputs),
        hostname=record.hostname,
        workdir=record.workdir,
        extra_ca=rt.settings.extra_ca_bundle(),
        state_disk=ws.state_disk,
        disks=boot_disks(rt.store, ws, record),
        accel=Accel.parse(rt.settings.accel),
        name=record.name,
        die_with_parent=True,  # the supervisor owns the VMM: no VM outlives it
        mediation=_mediation(record, hold=hold_mediation),
        services=services.channels,
    )


def _services(rt: Runtime, ws: Workspace, record: Record, vm_dir: Path) -> Services:
    return plan_services(
        record.credentials,
        record.egress_allow,
        vm_dir=vm_dir,
        run_dir=ws.run.path,
        port_base=rt.settings.service_port_base,
        mediation_port=record.mediation.port if record.mediation else None,
        cafile=rt.settings.extra_ca_file(),
    )


def _mediation(record: Record, *, hold: bool = False) -> Mediation | None:
    m = record.mediation
    if m is None:
        return None
    return Mediation(m.port, m.target_host, m.target_port, m.required, hold=hold)


def _health(record: Record) -> HealthCheck | None:
    h = record.health
    if h is None:
        return None
    return HealthCheck(
        h.exec, h.interval_seconds, h.timeout_seconds, h.retries, h.start_period_seconds
    )


def _check_mediation(record: Record) -> None:
    """A required mediation target must answer before the VM boots: fail closed."""
    m = record.mediation
    if m is None or not m.required:
        return
    why = tcp_reachable(m.target_host, m.target_port)
    if why is not None:
        raise ConflictError(
            f"required mediation target {m.target} is unreachable ({why})",
            hint="start the service that listens there first (e.g. scripts/dispatch.py), "
            "or declare the mediation with `required: false`",
        )


def _restart_policy(ws: Workspace, record: Record) -> Restart:
    try:
        return Restart.parse(record.restart)
    except ValueError as exc:
        raise InvalidInputError(
            f"workspace {ws.name!r}: {exc}", hint="create the workspace again"
        ) from exc


def start(
    rt: Runtime,
    ws: Workspace,
    *,
    timeout: float = START_TIMEOUT,
    from_tag: str | None = None,
    hold_mediation: bool = False,
) -> dict[str, Any]:
    """Boot the workspace in a detached supervisor; return once it is running (or failed).
    A suspended workspace, or any with ``from_tag``, resumes from that snapshot instead (see
    :mod:`~microagent.workspace.snapshots`). ``hold_mediation`` (a warm template's boot):
    the host holds the guest's mediation connections itself and never contacts the target,
    so its reachability is not checked either (see :mod:`~microagent.runtime.agentlink`).

    One start at a time: it holds a ``flock`` on ``runtime/.start.lock`` until then (the
    kernel drops it with a start that was killed, so it never blocks the next one)."""
    with flocked(ws.run.path / START_LOCK, blocking=False) as mine:
        if not mine:
            raise ConflictError(
                f"workspace {ws.name!r} is being started by another command",
                hint=f"`microagent wait {ws.name}` or `microagent status {ws.name}` to follow it",
            )
        return _start(rt, ws, timeout, from_tag, hold_mediation)


def _check_root(name: str, record: Record) -> None:
    """Every image of the workspace's root is in the cache, or a hint that keeps its disk."""
    gone = [path for path in record.root_images if not path.is_file()]
    if not gone:
        return
    spec = f" -f {shlex.quote(record.spec)}" if record.spec else ""
    raise NotFoundError(
        f"the root filesystem of {name!r} is incomplete: {gone[0]} is gone from the cache"
        + (f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""),
        hint=f"`microagent build{spec}` puts it back at the same path while the spec is as it "
        "was (from the cached layers when they are there; the workspace's own disk is kept), "
        f"then start {name!r} again",
    )


def _start(
    rt: Runtime, ws: Workspace, timeout: float, from_tag: str | None, hold_mediation: bool
) -> dict[str, Any]:
    state = reconcile(ws)
    if state.live:
        raise ConflictError(
            f"workspace {ws.name!r} is already {state.value}",
            hint=f"`microagent halt {ws.name}` first, or `microagent wait {ws.name}` until it "
            "finishes",
        )
    refuse_running_vmm(ws, "start")
    record = ws.record()
    network.check_published(record.published)  # a taken host port: refused before boot
    if not hold_mediation:
        _check_mediation(record)
    _check_root(ws.name, record)
    restart = _restart_policy(ws, record)
    secrets = resolve_secrets(record.credentials)  # a missing value fails before anything
    tag = snapshots.restore_tag(ws, state, from_tag)
    warm = _warm(record, tag, from_tag)
    manifest = _restorable(rt, ws, tag, warm)  # before any change
    if manifest is None:
        repair_state_disk(ws, f"start workspace {ws.name!r}")
    run = ws.run
    run.result_path.unlink(missing_ok=True)
    run.path.mkdir(parents=True, exist_ok=True)
    vm_dir = vm_dir_for(run.path, ws.name)
    services = _services(rt, ws, record, vm_dir)
    request = run_request(rt, ws, record, services, hold_mediation=hold_mediation)
    boot = prepare(request, rt.kit(), vm_dir, work_dir=run.path)
    restore = _restore(rt, ws, manifest, boot, warm) if manifest else None
    settings = rt.settings
    backend, probes, fake = settings.backend, settings.probes_dir, settings.fake_outcome
    health = _health(record)
    run.write_boot(
        BootDocument(
            boot, backend, probes, fake, restart, settings.restart_backoff, health,
            services.gateway, restore,
        )
    )  # fmt: skip
    run.set_state(
        State.STARTING,
        "starting the VM",
        supervisorPid=None,
        supervisor=None,
        launcher=_this_process(),
        supervisorLogOffset=_size(run.supervisor_log),
        vmm=None,
        gatewayPid=None,
        gatewayProcess=None,
        vmDir=str(vm_dir),
        startedAt=now(),
        restarts=0,
        suspendedTag=None,
        pausedAt=None,
        restoreHostname=_restore_hostname(ws, record) if warm and restore else None,
    )
    proc = _launch(run, secrets if services.gateway is not None else None)
    identity = runner.process_identity(proc.pid)  # None: it is gone already
    run.update(supervisorPid=proc.pid, supervisor=identity and identity.to_json())
    return _await_running(ws, timeout)


def _restore_hostname(ws: Workspace, record: Record) -> str | None:
    """The hostname the supervisor sets after resuming a warm template made under another
    name (the template's key leaves a hostname made from the name out)."""
    made_as = ws.run.runtime().get("templateHostname")
    return record.hostname if made_as and made_as != record.hostname else None


def _warm(record: Record, tag: str | None, from_tag: str | None) -> bool:
    """Whether this start resumes the workspace's warm template (refused: boot cold)."""
    return bool(record.template) and from_tag is None and tag == snapshots.TEMPLATE_TAG


def _restorable(rt: Runtime, ws: Workspace, tag: str | None, warm: bool) -> Manifest | None:
    """The snapshot ``tag``'s checked manifest; for a warm template one that fails its
    digests is refused and the start boots cold (None)."""
    if tag is None:
        return None
    if not warm:
        return snapshots.check_restorable(ws, tag)
    try:
        manifest = snapshots.check_restorable(ws, tag)
    except (IntegrityError, NotFoundError) as exc:
        _refuse_template(rt, ws, exc, corrupt=True)
        return None
    ws.run.event("warm-start", f"resuming template {ws.record().template[7:19]}")
    return manifest


def _refuse_template(rt: Runtime, ws: Workspace, exc: MicroagentError, *, corrupt: bool) -> None:
    """A warm template that cannot be restored: say why (event, notice), drop the
    workspace's copy (and a corrupt store template), and let the start boot cold."""
    key = ws.record().template
    why = f"template {key[7:19]} refused: {exc.message}; booting cold"
    ws.run.event("warm-start-refused", why, template=key)
    rt.notice(why)
    snapshot_remove(ws.root, snapshots.TEMPLATE_TAG)
    if corrupt:
        snapshots.forget_corrupt(rt.store, key)
    ws.run.event("cold", "the workspace boots afresh from its own disk")


def _restore(
    rt: Runtime, ws: Workspace, manifest: Manifest, boot: BootConfig, warm: bool = False
) -> Path | None:
    """Check the snapshot against the VM ``boot`` describes and put its disks back; the
    config disk (it carries the environment) goes when the snapshot is refused, unless it
    was a warm template: then the start boots cold (None)."""
    try:
        return snapshots.apply(rt.settings, ws, manifest, boot)
    except MicroagentError as exc:
        if not warm:
            ws.run.config_disk.unlink(missing_ok=True)
            raise
        _refuse_template(rt, ws, exc, corrupt=False)
        return None
    except BaseException:
        ws.run.config_disk.unlink(missing_ok=True)
        raise


def _launch(run: RunDir, secrets: Mapping[str, str] | None) -> subprocess.Popen[bytes]:
    """Spawn the supervisor (``secrets`` on its stdin, for the gateway); a launch that
    fails, or is interrupted, leaves the workspace ``failed`` with the reason."""
    try:
        stdin = secrets_pipe(secrets) if secrets is not None else None
        try:
            return runner.spawn(
                supervisor_argv(run.path),
                stdout=run.supervisor_log,
                cwd=run.path,
                new_session=True,
                env=_supervisor_env(),
                stdin=stdin,
            )
        finally:
            if stdin is not None:
                os.close(stdin)
    except OSError as exc:  # its log or the pipe: the host refused
        why = f"the supervisor could not be launched: {exc.strerror or exc}"
        run.set_state(State.FAILED, why)
        raise HostIOError(why, hint=f"see that {run.path} is writable") from exc
    except BaseException as exc:
        why = exc.message if isinstance(exc, MicroagentError) else type(exc).__name__
        run.set_state(State.FAILED, f"the supervisor could not be launched: {why}")
        raise


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _this_process() -> dict[str, int | str] | None:
    """This process's identity: until the supervisor is recorded, its death means the start
    was interrupted (see liveness)."""
    me = runner.process_identity(os.getpid())
    return me.to_json() if me is not None else None


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
        runtime = ws.run.runtime()
        if state is State.RUNNING or state.terminal or runtime.get("restarts"):
            return runtime  # a restart's back-off: it ran, and is about to run again
        time.sleep(START_POLL)
    raise VMError(
        f"workspace {ws.name!r} did not start within {timeout:.0f}s",
        hint=f"see {ws.run.supervisor_log}",
    )


def wait_until(ws: Workspace, timeout: float | None = None) -> tuple[State, bool]:
    """Block until the workspace is stopped, halted, failed (or was never started); return
    that state and True, or its state and False once ``timeout`` seconds passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = reconcile(ws)
        if state.terminal or state is State.PREPARED:
            return state, True
        if deadline is not None and time.monotonic() > deadline:
            return state, False
        time.sleep(POLL)


def wait(ws: Workspace, timeout: float | None = None) -> State:
    """Block until the workspace reaches a terminal state; VMError after ``timeout``."""
    state, done = wait_until(ws, timeout)
    if not done:
        raise VMError(f"workspace {ws.name!r} is still {state.value} after {timeout:.0f}s")
    return state


# -- halt / delete -----------------------------------------------------------------------------


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def halt(ws: Workspace, *, timeout: float = HALT_TIMEOUT) -> State:
    """Graceful stop (guest shutdown over the control port), then escalate. Disk is kept.

    A VMM left running by a supervisor that died is killed. A stopped supervisor is resumed
    first (it may hold the run dir's lock, which the halt takes). ``timeout`` bounds the
    whole halt: the wait for that lock (see :func:`_halt_without_lock`) and the guest's
    clean shutdown share it, and what is left of it after the lock is the shutdown's; then
    the kill (its own bounded wait to record the state).
    """
    deadline = time.monotonic() + timeout
    state = reconcile(ws)
    if not state.live:
        if _kill_vmm(ws):
            ws.run.event("vmm-killed", "the VM of a dead supervisor was killed")
            ws.run.update(stateDiskDirty="a kill of a VM its supervisor left")
        return state
    supervisor = running_supervisor(ws.run)
    _resume_if_stopped(ws)  # before the lock: stopped while holding it, it never lets go
    if state is State.PAUSED:  # a guest with its vCPUs stopped cannot shut down
        snapshots.thaw(ws)
    try:
        remaining = round(max(deadline - time.monotonic(), 0.0), 1)  # said in a refusal
        ws.run.set_state(State.STOPPING, "halt requested", lock_wait=remaining)
    except LockBusy as busy:
        return _halt_without_lock(ws, busy, timeout)
    if supervisor is not None:
        _signal_group(supervisor.pid, signal.SIGTERM)
        _resume_if_stopped(ws)  # stopped again meanwhile: SIGCONT after the SIGTERM
    try:
        state = wait(ws, max(deadline - time.monotonic(), 0.0))
    except VMError:
        return _escalate(ws, f"killed after {timeout:g}s without a clean shutdown")
    _await_dead(supervisor, EXIT_GRACE)  # it stops its gateway after the final state
    return state


def _resume_if_stopped(ws: Workspace) -> None:
    """A stopped supervisor can neither act on the halt's SIGTERM nor let go of the run dir's
    lock it may hold: it gets a SIGCONT (the recorded identity is checked first, so a reused
    pid is never signalled), and the halt is a clean one, not a kill after the timeout. (A
    traced one stays with its debugger: that halt ends in the kill.)"""
    supervisor = supervisor_state(ws.name, ws.run)
    if supervisor is not None and supervisor.state == "stopped":
        _signal_group(supervisor.pid, signal.SIGCONT)
        why = f"the supervisor (pid {supervisor.pid}) was stopped: SIGCONT so it can halt"
        ws.run.event("supervisor-resumed", why)


def _halt_without_lock(ws: Workspace, busy: LockBusy, timeout: float) -> State:
    """The run dir's lock stayed busy for the halt's ``timeout``. A supervisor that does not
    run (traced, or stopped again) is the holder nothing else frees: it is killed, which
    drops the lock, as a halt it cannot answer ends anyway. A running one waits for that
    lock too: its holder is no process of the workspace, and the halt gives up (conflict)."""
    supervisor = supervisor_state(ws.name, ws.run)
    if supervisor is None or supervisor.responsive:
        raise ConflictError(
            f"cannot halt workspace {ws.name!r}: {busy.message}",
            hint=(
                f"`fuser -v {busy.lock}` names the process that holds it (a stopped "
                "microagent command?); resume or end it, then halt again"
            ),
        )
    why = f"its supervisor (pid {supervisor.pid}) was {supervisor.state}"
    return _escalate(ws, f"killed: {why} and held the run dir's lock for {timeout:g}s")


def _escalate(ws: Workspace, detail: str) -> State:
    """Kill the supervisor and its VMM and record ``halted`` (the lock a killed supervisor
    held is dropped once it is gone: waited for that long, and no longer)."""
    _kill(ws)
    _record_killed(ws, State.HALTED, detail, "a halt that had to kill the VM")
    return State.HALTED


def _record_killed(ws: Workspace, state: State, detail: str, dirty: str) -> None:
    """Record ``state`` after a kill (the lock a killed supervisor held is dropped once it
    is gone: waited for that long, and no longer; a holder that is no process of the
    workspace is a conflict, the kill itself done)."""
    try:
        ws.run.set_state(state, detail, lock_wait=EXIT_GRACE, stateDiskDirty=dirty)
    except LockBusy as busy:
        raise ConflictError(
            f"workspace {ws.name!r} was killed, but its state could not be recorded: "
            f"{busy.message}",
            hint=f"`fuser -v {busy.lock}` names the process that holds it; resume or end it",
        ) from busy


def kill(ws: Workspace) -> bool:
    """Stop the workspace now: SIGKILL its supervisor and the VMM it recorded, no guest
    shutdown. The state becomes ``stopped`` (detail ``killed``) and the state disk is marked
    for a repairing check on the next start. False when nothing of it was running."""
    state = reconcile(ws)
    runtime = ws.run.runtime()
    if not state.live:
        if not _kill_vmm(ws):
            return False
        ws.run.event("killed", "the VM of a dead supervisor was killed", vmm=runtime.get("vmm"))
        ws.run.update(stateDiskDirty="a kill")
        return True
    pid = runtime.get("supervisorPid")
    _await_dead(_kill(ws))
    ws.run.event(
        "killed", f"SIGKILL while {state.value}", supervisorPid=pid, vmm=runtime.get("vmm")
    )
    _record_killed(ws, State.STOPPED, "killed", "a kill")
    return True


def delete(ws: Workspace, *, force: bool = False) -> bool:
    """Remove the workspace (record, disks, logs). A live one needs ``force``, which kills
    every process of it (supervisor, VMM, gateway and whatever runs in their sessions, found
    from runtime.json and from the process table alike), deletes the network namespaces of
    its supervisors and every file, even when its record or runtime.json is unreadable."""
    if not ws.root.exists() and not ws.root.is_symlink():
        return False
    state = _state_for_delete(ws)
    running = leftovers(ws) if state.live or force else _exited(ws, EXIT_GRACE)
    if state.live or running:
        if not force:
            what = state.value if state.live else "running processes without its supervisor"
            raise ConflictError(
                f"workspace {ws.name!r} is {what}",
                hint="halt it first, or pass --force to kill it",
            )
        _kill_all(ws, running)
    supervisors = _recorded_supervisor_pids(ws) | {p.pid for p in running}
    _remove_namespaces(supervisors)
    _remove_external_vm_dir(ws)
    remove_any(ws.root)
    return True


def _state_for_delete(ws: Workspace) -> State:
    """The reconciled state; ``failed`` when even that cannot be written (a damaged run dir
    never stands in the way of its removal)."""
    try:
        return reconcile(ws)
    except OSError:
        return State.FAILED


def leftovers(ws: Workspace) -> list[ProcessIdentity]:
    """Every running process of the workspace: its recorded supervisor, VMM and gateway,
    any supervisor or gateway of its run dir by command line, whatever descends from those,
    and every member of a session one of its supervisors led (a helper stays in it when the
    supervisor dies)."""
    run = ws.run
    found = {p.pid: p for p in run.processes()}
    for process in (running_supervisor(run), run.vmm(), run.gateway_process()):
        if process is not None and runner.is_running(process):
            found[process.pid] = process
    sessions = {
        pid
        for pid in _recorded_supervisor_pids(ws) | set(found)
        if pid in found or not runner.pid_alive(pid)  # a pid now of another is not ours
    }
    _add_descendants(found, sessions, ws.root.resolve())
    return list(found.values())


def _add_descendants(found: dict[int, ProcessIdentity], sessions: set[int], root: Path) -> None:
    """Add to ``found`` every process a process in it started, and every member of
    ``sessions`` working in ``root`` (the supervisor's helpers inherit its run dir; a
    stranger that got a dead supervisor's pid as its session id does not), generation by
    generation."""
    table = {pid: runner.lineage(pid) for pid in runner.processes() if pid != os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, lineage in table.items():
            if pid in found or lineage is None:
                continue
            parent, session = lineage
            ours = parent in found or (session in sessions and _works_in(pid, root))
            member = runner.process_identity(pid) if ours else None
            if member is not None:
                found[pid] = member
                grew = True


def _works_in(pid: int, root: Path) -> bool:
    cwd = runner.working_dir(pid)
    return cwd is not None and cwd.is_relative_to(root)


def _exited(ws: Workspace, timeout: float) -> list[ProcessIdentity]:
    """The processes of a workspace in a final state, after waiting for them to end: up to
    ``timeout`` while a supervisor of it runs (it stops its gateway after writing the final
    state), and :data:`ORPHAN_GRACE` once none does (a dead supervisor's VMM and gateway
    follow it by their parent-death signal at once; what is still there after that stays,
    and waiting longer would only delay the refusal)."""
    deadline = time.monotonic() + timeout
    running = leftovers(ws)
    while running and time.monotonic() < deadline:
        if next(ws.run.processes(gateways=False), None) is None:
            deadline = min(deadline, time.monotonic() + ORPHAN_GRACE)
        time.sleep(POLL / 4)
        running = leftovers(ws)
    return running


def _recorded_supervisor_pids(ws: Workspace) -> set[int]:
    runtime = ws.run.runtime()
    pids = {runtime.get("supervisorPid")}
    recorded = ProcessIdentity.from_json(runtime.get("supervisor"))
    if recorded is not None:
        pids.add(recorded.pid)
    return {pid for pid in pids if isinstance(pid, int) and pid > 0}


def _kill_all(ws: Workspace, running: list[ProcessIdentity], rounds: int = 3) -> None:
    """SIGKILL ``running`` (supervisors first: nothing new is spawned after), then whatever
    appeared meanwhile; VMError when a process survives."""
    for _ in range(rounds):
        if not running:
            return
        supervisors = {p.pid for p in ws.run.processes(gateways=False)}
        for process in sorted(running, key=lambda p: p.pid not in supervisors):
            runner.kill_process(process)
        running = leftovers(ws)
    if running:
        pids = ", ".join(str(p.pid) for p in running)
        raise VMError(f"workspace {ws.name!r}: processes keep appearing ({pids})")


def _remove_namespaces(supervisors: set[int]) -> None:
    """The network namespaces the (now dead) supervisors ``supervisors`` made, and their
    resolv.conf folders (see runtime.network: a namespace name carries its maker's pid)."""
    try:
        names = [p.name for p in network.NETNS_DIR.iterdir()]
    except OSError:
        return
    for pid in supervisors:
        if runner.pid_alive(pid):
            continue  # not ours any more (or not dead): leave its namespaces alone
        for name in names:
            if name.startswith(f"{network.NETNS_PREFIX}{pid}-"):
                runner.run(["ip", "netns", "del", name], check=False)
                remove_any(NETNS_ETC / name)


def _remove_external_vm_dir(ws: Workspace) -> None:
    """The VM directory ``start`` made outside the workspace when its path was too long for
    sockets (see runtime.boot.vm_dir_for); only one named the way it names them."""
    vm_dir = ws.run.runtime().get("vmDir")
    if not isinstance(vm_dir, str):
        return
    path = Path(vm_dir)
    if path.is_relative_to(ws.root) or not VM_DIR_NAME.fullmatch(path.name):
        return
    if path.name.startswith(f"{ws.name[:40]}-"):
        remove_any(path)


# -- status / result ---------------------------------------------------------------------------


def _readiness(
    ws: Workspace, state: State, runtime: Mapping[str, Any], stalled: str = ""
) -> dict[str, Any]:
    """``stalled``: why the supervisor does not answer ('' while it does); what it serves
    (exec, probes, the mediation relay) is not ready then."""
    live = state.live
    record = ws.record()
    held = live and record.mediation is not None and _mediation_held(ws.run)
    guest = bool(runtime.get("guestReadyAt")) and live
    execs = {  # the supervisor's link saw the guest agent's HELLO (see execs)
        "ready": bool(runtime.get("execReadyAt")) and state is State.RUNNING,
        "observedAt": runtime.get("execReadyAt"),
    }
    out = {
        "guestReady": {"ready": guest, "observedAt": runtime.get("guestReadyAt")},
        "execReady": execs,
        "resultReady": {"ready": ws.run.result_path.is_file()},
        **_channel_readiness(record, live, runtime, stalled, held),
    }
    if stalled:
        for key in ("execReady", "mediationReady", "healthy"):
            if key in out and out[key].get("ready") is not False:
                out[key] = {**out[key], "ready": False, "error": stalled}
    return out


def _channel_readiness(
    record: Record,
    live: bool,
    runtime: Mapping[str, Any],
    stalled: str = "",
    held: bool = False,
) -> dict[str, Any]:
    """``mediationReady`` (a bounded connect to the target, as the reference does; none while
    the supervisor does not answer or the host holds the channel) and ``healthy`` (the
    supervisor's last probe outcome), for workspaces that declare them."""
    out: dict[str, Any] = {}
    if record.mediation is not None:
        out["mediationReady"] = _mediation_readiness(record.mediation, live, stalled, held)
    if record.credentials or record.egress_allow:
        out["brokerReady"] = _broker_readiness(live, runtime)
    if record.health is not None:
        health = runtime.get("health") if live else None
        out["healthy"] = {"ready": False, "detail": "no probe has run yet"}
        if isinstance(health, Mapping):
            out["healthy"] = {k: health.get(k) for k in ("ready", "observedAt", "detail")}
    return out


def _mediation_readiness(m: MediationSpec, live: bool, stalled: str, held: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"target": m.target, "required": m.required}
    if stalled:  # (its relay is in the supervisor: no connect tells anything)
        return {"ready": False, **out, "error": stalled}
    if held:  # the target is none of this boot's business: it is never contacted
        return {"ready": False, "held": True, **out, "detail": HELD_DETAIL}
    why = tcp_reachable(m.target_host, m.target_port) if live else "not running"
    out = {"ready": why is None, **out}
    if why is not None:
        out["error"] = (
            f"mediation required={str(m.required).lower()} target {m.target} unreachable: {why}"
            if live
            else "live readiness unavailable: not running"
        )
    return out


def _mediation_held(run: RunDir) -> bool:
    """Whether the host holds this boot's mediation channel itself (a warm template's boot:
    ``start(hold_mediation=True)``), as the boot document the supervisor runs says."""
    boot = read_json(run.boot_path)
    mediation = boot.get("mediation") if boot is not None else None
    return isinstance(mediation, Mapping) and mediation.get("hold") is True


def _broker_readiness(live: bool, runtime: Mapping[str, Any]) -> dict[str, Any]:
    """The gateway (credential brokers, egress proxy) runs: its identity, from the supervisor."""
    gateway = ProcessIdentity.from_json(runtime.get("gatewayProcess"))
    if not live:
        return {"ready": False, "error": "not running"}
    if gateway is None or not runner.is_running(gateway):
        return {"ready": False, "error": "the credential gateway is not running"}
    return {"ready": True, "observedAt": runtime.get("gatewayStartedAt")}


def _network_status(record: Record, state: State, runtime: Mapping[str, Any]) -> dict[str, Any]:
    """The mode and the published ports, each ``live`` when slirp4netns listens for it now."""
    live: tuple[PublishedPort, ...] = ()
    vm_dir = runtime.get("vmDir")
    if state.live and record.published and isinstance(vm_dir, str):
        live = network.live_published(network.api_socket_path(Path(vm_dir)))
    ports = [{**p.to_json(), "live": p in live} for p in record.published]
    return {"mode": record.network, "ports": ports}


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
    """The JSON envelope for ``status``. A live workspace whose supervisor is stopped (or
    traced) says so in ``supervisor`` and as its detail, and what the supervisor serves is
    not ready."""
    state = reconcile(ws)
    runtime = ws.run.runtime()
    record = ws.record()
    failed = state is State.FAILED
    supervisor = supervisor_state(ws.name, ws.run) if state.live else None
    stalled = supervisor.detail if supervisor is not None else ""
    return {
        "ok": not failed,
        "backend": backend,
        "event": {
            "identity": {"name": ws.name, "rootfsKey": record.rootfs_key},
            "state": state.value,
            "detail": stalled or runtime.get("detail", ""),
            "observedAt": runtime.get("observedAt"),
        },
        "readiness": _readiness(ws, state, runtime, stalled),
        "supervisor": _supervisor_json(supervisor),
        "restartPolicy": record.restart,
        "restarts": int(runtime.get("restarts") or 0),
        "snapshots": snapshot_tags(ws.root),
        "template": record.template or None,
        "network": _network_status(record, state, runtime),
        "artifacts": {"outputs": [{"name": n, "path": p} for n, p in record.outputs]},
        "result": result_payload(ws),
        "audit": _audit(ws, record),
        "error": {"message": runtime.get("detail", "")} if failed else None,
    }


def _supervisor_json(supervisor: SupervisorState | None) -> dict[str, Any] | None:
    return supervisor.to_json() if supervisor is not None else None


def _audit(ws: Workspace, record: Record) -> dict[str, int] | None:
    """Counts from the audit log of a workspace with credentials or an allow-list."""
    if not record.credentials and not record.egress_allow:
        return None
    return audit.summary(audit.audit_path(ws.run))


def result(ws: Workspace) -> dict[str, Any]:
    payload = result_payload(ws)
    if payload is None:
        state = reconcile(ws)
        raise NotFoundError(
            f"workspace {ws.name!r} has no result yet (state: {state.value})",
            hint="start it and wait until it stops (`microagent start --wait`)",
        )
    return payload


# -- ps ----------------------------------------------------------------------------------------


def live_row(ws: Workspace) -> dict[str, Any] | None:
    """The ``ps`` row of a live workspace (starting, running, stopping), after reconciling;
    None for any other. ``pid`` is the VMM's while it runs (None between boots)."""
    state = reconcile(ws)
    if not state.live:
        return None
    runtime = ws.run.runtime()
    vmm = ws.run.vmm()
    return {
        "name": ws.name,
        "state": state.value,
        "pid": vmm.pid if vmm is not None and runner.is_running(vmm) else None,
        "supervisorPid": runtime.get("supervisorPid"),
        "startedAt": runtime.get("startedAt"),
        "uptimeSeconds": seconds_since(runtime.get("startedAt")),
        "restarts": int(runtime.get("restarts") or 0),
    }
