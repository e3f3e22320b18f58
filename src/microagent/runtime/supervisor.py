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

The restart policy (``restart`` in boot.json) is applied here: when a boot ends and no halt
was asked for, the policy may boot the VM again after a back-off (:class:`Backoff`), in state
``starting``; each restart is an event (``restart``) and counted in runtime.json
(``restarts``). The config disk is kept in this process's memory meanwhile and written back
(mode 0600) for the next boot only. A halt during the back-off ends it: ``halted``.

Snapshots (see :mod:`~microagent.runtime.snapshot`): when boot.json names a saved state
(``restore``), the first boot starts the VMM waiting for it and loads it instead of booting
the guest (event ``restored``); once the guest agent answers, the guest's clock is set to
the host's (event ``clock``). A VMM that ends while runtime.json says ``suspending`` (a
``suspend`` saved it and told it to quit) ends the run in state ``suspended``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent import runner
from microagent.errors import MicroagentError
from microagent.ext4.debugfs import repair_image
from microagent.fsutil import atomic_write, write_json_atomic
from microagent.runtime.agentlink import AgentHello, AgentLink, MediationTarget, exec_socket_path
from microagent.runtime.agentproto import ExecRequest
from microagent.runtime.backend import (
    BOOT_ATTEMPTS,
    Backend,
    BootConfig,
    BootStalled,
    GuestResult,
    Machine,
)
from microagent.runtime.backends import get_backend
from microagent.runtime.health import HealthCheck, HealthProber, ProbeOutcome
from microagent.runtime.rundir import BootDocument, RunDir, State, now
from microagent.runtime.snapshot import GUEST_BUSYBOX, clock_request, restoring

if TYPE_CHECKING:
    from microagent.runtime.gatewayproc import GatewayProcess

SHUTDOWN_GRACE = 15.0
HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")  # what a restore may set
EVENT_POLL = 0.5
LINK_CONNECT_WAIT = 10.0  # seconds a restore waits for the agent link before the guest runs
BACKOFF_CAP = 30.0  # seconds: the longest wait before a restart
STABLE_RUN = 60.0  # seconds: a run at least this long starts the back-off over


class Backoff:
    """Waits before restarts: ``first``, doubling up to :data:`BACKOFF_CAP`; after a run of
    :data:`STABLE_RUN` seconds or more it starts over at ``first``."""

    def __init__(self, first: float) -> None:
        self.first = first
        self._next = first

    def after(self, ran: float) -> float:
        """The wait before the next boot, after a run of ``ran`` seconds."""
        if ran >= STABLE_RUN:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, max(BACKOFF_CAP, self.first))
        return delay


@dataclass(frozen=True)
class Ended:
    """How one boot ended: the guest's report, or why there is none."""

    result: GuestResult | None
    error: str = ""
    seconds: float = 0.0
    stalled: bool = False  # the guest never booted (BootStalled): nothing of it ran

    @property
    def failed(self) -> bool:
        return self.result is None or self.result.exit_code != 0

    @property
    def reason(self) -> str:
        if self.result is None:
            return self.error
        if self.result.exit_code == 0:
            return "entrypoint exited 0"
        return self.result.error or f"entrypoint exited with code {self.result.exit_code}"


def _not_paused(runtime: Mapping[str, Any]) -> bool:
    return runtime.get("state") != State.PAUSED.value


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
                    stamp = "guestReadyAt" if kind == "booted" else "commandStartedAt"
                    field: dict[str, Any] = {stamp: now()}
                    if (
                        self.run_dir.set_state_if(
                            _not_paused, State.RUNNING, f"guest {kind}", **field
                        )
                        is None
                    ):
                        self.run_dir.update(**field)  # paused meanwhile: it stays paused


def resync_clock(run: RunDir, link: AgentLink) -> None:
    """Set the guest's clock to the host's through the agent (after a restore); event
    ``clock``. A guest that cannot costs only its clock."""
    try:
        done = link.run(clock_request(), timeout=15.0)
    except MicroagentError as exc:
        run.event("clock", f"the guest clock was not set: {exc.message}")
        return
    if done.exit_code == 0:
        run.event("clock", "guest clock set to the host's")
    else:
        why = done.stderr.decode("utf-8", "replace").strip()[:200]
        run.event("clock", f"the guest clock was not set (exit code {done.exit_code}): {why}")
    set_hostname(run, link)


def set_hostname(run: RunDir, link: AgentLink) -> None:
    """After the restore of a warm template made under another name: set the workspace's
    own hostname (``restoreHostname`` in runtime.json, written by the start); event
    ``hostname``."""
    hostname = run.runtime().get("restoreHostname")
    if not isinstance(hostname, str) or not HOSTNAME_RE.fullmatch(hostname):
        return
    request = ExecRequest(argv=(GUEST_BUSYBOX, "hostname", hostname), timeout_ms=10_000)
    try:
        done = link.run(request, timeout=15.0)
    except MicroagentError as exc:
        run.event("hostname", f"the guest hostname was not set: {exc.message}")
        return
    if done.exit_code == 0:
        run.event("hostname", f"guest hostname set to {hostname}")
    else:
        run.event("hostname", f"the guest hostname was not set (exit code {done.exit_code})")


def _start_link(run: RunDir, config: BootConfig, *, resync: bool = False) -> AgentLink | None:
    """Relay exec clients to the guest agent while the machine runs (see agentlink); its
    socket goes into runtime.json (``execSocket``), its readiness too (``execReadyAt``).
    A link that cannot start costs exec only, never the boot. ``resync``: the machine was
    restored, so the guest's clock is set once the agent answers."""
    pending = threading.Event()
    if resync:
        pending.set()

    def ready(hello: AgentHello) -> None:
        run.update(execReadyAt=now())
        run.event("exec-ready", f"guest agent {hello.agent} {hello.version}".strip())
        if pending.is_set():  # not on the link's thread: run() is a client of the link
            pending.clear()
            threading.Thread(target=resync_clock, args=(run, link), daemon=True).start()

    def lost(why: str) -> None:
        run.update(execReadyAt=None)
        run.event("exec-lost", why)

    def held(port: int) -> None:
        run.event(
            "mediation-held",
            f"a guest connection to port {port} is held by the host (the template's boot: "
            "no target is contacted)",
        )

    med = config.mediation
    target = MediationTarget(med.host, med.port, med.guest_port, med.hold) if med else None
    link = AgentLink(
        config.agent_socket,
        exec_socket_path(config.state_dir),
        mediation=target,
        services=config.services,
        on_ready=ready,
        on_lost=lost,
        on_held=held,
        restored=resync,
    )
    try:
        link.start()
    except MicroagentError as exc:
        run.event("exec-unavailable", exc.message)
        return None
    run.update(execSocket=str(link.exec_socket), execReadyAt=None)
    return link


def _report_held(run: RunDir, link: AgentLink) -> None:
    """What a held mediation target took during the boot (none: nothing to say)."""
    held = link.held
    if held.connections or held.refused:
        run.event(
            "mediation-released",
            f"the host held {held.connections} mediation connection(s) and dropped "
            f"{held.bytes} bytes from them; {held.refused} refused",
            connections=held.connections,
            bytes=held.bytes,
            refused=held.refused,
        )


def _start_health(
    run: RunDir, link: AgentLink | None, check: HealthCheck | None
) -> HealthProber | None:
    """Probe ``check`` through the guest agent; verdict changes go to runtime.json
    (``health``) and the event log. Before the agent answers, a probe fails (and counts only
    after the start period)."""
    if link is None or check is None:
        return None

    def probe(c: HealthCheck) -> ProbeOutcome:
        try:
            done = link.run(ExecRequest(argv=c.exec), timeout=c.timeout_seconds)
        except MicroagentError as exc:
            return ProbeOutcome(None, exc.message)
        text = (done.stderr or done.stdout).decode("utf-8", "replace")
        return ProbeOutcome(done.exit_code, text)

    def report(verdict: dict[str, Any]) -> None:
        run.update(health=verdict)
        run.event("health", str(verdict["detail"]), healthy=verdict["ready"])

    prober = HealthProber(check, probe, report)
    prober.start()
    return prober


class Supervisor:
    def __init__(self, run: RunDir) -> None:
        self.run_dir = run
        self.halt_requested = threading.Event()
        self.machine: Machine | None = None
        self.link: AgentLink | None = None  # the guest agent while a machine runs (exec)
        self.health: HealthCheck | None = None  # the probe, from boot.json
        self.restored = False  # the running machine was restored from a snapshot

    def _on_term(self, _signum: int, _frame: object) -> None:
        self.halt_requested.set()
        machine = self.machine
        if machine is not None:
            threading.Thread(target=machine.shutdown, args=(SHUTDOWN_GRACE,), daemon=True).start()

    def run(self) -> int:
        """Boot, and boot again while the restart policy says so; return the exit code."""
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        boot = self.run_dir.read_boot()
        self.health = boot.health
        backend = get_backend(
            boot.backend, probes_dir=boot.probes_dir, fake_outcome=boot.fake_outcome
        )
        gateway = self._start_gateway(boot)
        if isinstance(gateway, Ended):
            return self._finished(gateway, 0)
        try:
            return self._boot_loop(boot, backend)
        finally:
            if gateway is not None:
                gateway.stop()
                self.run_dir.update(gatewayPid=None, gatewayProcess=None)

    def _start_gateway(self, boot: BootDocument) -> GatewayProcess | Ended | None:
        """The workspace's credential brokers and egress proxy, before the first boot; it
        reads the secret values from this process's stdin (a pipe this process never reads)."""
        if boot.gateway is None:
            return None
        # Every start without credentials launches its VMM without importing them.
        # deferred: the brokers' modules (TLS, HTTP), for a workspace with credentials
        from microagent.runtime.gatewayproc import GatewayProcess

        gateway = GatewayProcess(boot.gateway, self.run_dir.path)
        try:
            gateway.start(stdin=0)
        except MicroagentError as exc:
            return Ended(None, exc.message)
        except OSError as exc:  # its config or log could not be written: a final state all the same
            return Ended(None, f"cannot start the credential gateway: {exc.strerror or exc}")
        finally:
            _drop_stdin()
        pid = gateway.proc.pid if gateway.proc else None
        ident = runner.process_identity(pid) if pid is not None else None  # for delete --force
        self.run_dir.update(
            gatewayPid=pid, gatewayProcess=ident and ident.to_json(), gatewayStartedAt=now()
        )
        self.run_dir.event("gateway", f"credential gateway started (pid {pid})")
        gateway.watch(self._gateway_restarted, self._gateway_exited)
        return gateway

    def _gateway_restarted(self, line: str) -> None:
        """The gateway's worker died and the gateway serves again with a new one."""
        with contextlib.suppress(OSError):  # a full disk: the line is in gateway.log still
            self.run_dir.event("gateway-restart", line)

    def _gateway_exited(self, code: int, line: str) -> None:
        """The gateway ended on its own (its worker kept dying): every model call and the
        egress proxy fail from now on; status says the gateway is not running."""
        with contextlib.suppress(OSError):
            self.run_dir.update(gatewayPid=None, gatewayProcess=None)
            self.run_dir.event(
                "gateway-exit", f"credential gateway exited ({code}): {line}", exitCode=code
            )

    def _boot_loop(self, boot: BootDocument, backend: Backend) -> int:
        config_disk = self._keep_config_disk(boot)
        backoff = Backoff(boot.restart_backoff)
        restarts = stalls = 0
        restore = boot.restore  # the first boot only: a restart boots the guest afresh
        while True:
            ended = self._boot_once(backend, boot.config, restore)
            restore = None
            if self.run_dir.runtime().get("suspending"):
                return self._suspended(ended)
            if self.halt_requested.is_set():
                return self._halted(ended)
            stalls = stalls + 1 if ended.stalled else 0
            if ended.stalled and stalls < BOOT_ATTEMPTS:
                self.run_dir.event("boot-stall", f"{ended.error}; booting again", attempt=stalls)
                problem = self._boot_again(boot, config_disk)
                if problem:
                    return self._finished(Ended(None, problem), restarts)
                continue
            if not boot.restart.allows(failed=ended.failed, restarts=restarts):
                return self._finished(ended, restarts)
            restarts += 1
            if not self._back_off(ended, restarts, backoff.after(ended.seconds)):
                return self._halted(ended, "during the restart back-off")
            problem = self._boot_again(boot, config_disk)
            if problem:
                return self._finished(Ended(None, problem), restarts)

    def _boot_again(self, boot: BootDocument, config_disk: bytes | None) -> str:
        """Before another boot: the config disk back, the disks a killed VM wrote checked;
        what stops the boot, else ''."""
        if config_disk is not None and not self._restore_config_disk(config_disk):
            return "cannot write the config disk again"
        return self._repair_disks(boot.config)

    def _repair_disks(self, config: BootConfig) -> str:
        """Before a restart after a VMM that died: the disks it wrote get the repairing check
        ``start`` would give them (events ``fsck``); what stops the restart, else ''."""
        why = self.run_dir.runtime().get("stateDiskDirty")
        if not why:
            return ""
        for disk in config.disks:
            if disk.readonly:
                continue
            what = "state disk" if disk.serial == "state" else f"disk {disk.serial[5:]}"
            try:
                code = repair_image(disk.path, f"workspace {what}")
            except MicroagentError as exc:
                self.run_dir.event("fsck", f"{what} checked after {why}: not repairable")
                return f"no restart: {exc.message}"
            outcome = "clean" if code == 0 else "repaired"
            self.run_dir.event("fsck", f"{what} checked after {why}: {outcome}", exitCode=code)
        self.run_dir.update(stateDiskDirty=None)
        return ""

    def _keep_config_disk(self, boot: BootDocument) -> bytes | None:
        """The config disk's bytes, for restarts and a boot tried again after a stall (held
        in memory only; the file goes when each boot ends)."""
        try:
            return self.run_dir.config_disk.read_bytes()
        except OSError:
            return None  # the boot reports the missing disk

    def _restore_config_disk(self, data: bytes) -> bool:
        try:
            atomic_write(self.run_dir.config_disk, data, mode=0o600)
        except OSError as exc:
            self.run_dir.event("restart-failed", f"config disk: {exc.strerror or exc}")
            return False
        return True

    def _boot(self, backend: Backend, config: BootConfig, restore: Path | None) -> Machine:
        """A machine booting ``config``, or waiting for the state ``restore``."""
        self.restored = False
        if restore is None:
            return backend.boot(config)
        return restoring(backend).boot(config, incoming=True)

    def _restore(self, machine: Machine, restore: Path) -> None:
        """Load the saved state; the agent link starts first and is connected before the
        guest runs (see QemuMachine.restore), so the restored guest sees no host change."""
        began = time.monotonic()
        restoring_machine = getattr(machine, "restore", None)
        if restoring_machine is None:
            raise MicroagentError("this machine cannot load a saved state")
        link = self.link = _start_link(self.run_dir, machine.config, resync=True)

        def connect_link() -> None:
            if link is None or not machine.config.agent_socket.exists():
                return  # (a machine without an agent port: nothing to connect)
            if not link.wait_connected(LINK_CONNECT_WAIT):
                self.run_dir.event(
                    "exec-late", "the agent link was not connected before the guest ran"
                )

        restoring_machine(restore, before_run=connect_link)
        self.restored = True
        seconds = round(time.monotonic() - began, 3)
        self.run_dir.event("restored", f"VM state loaded in {seconds}s", seconds=seconds)

    def _boot_once(
        self, backend: Backend, config: BootConfig, restore: Path | None = None
    ) -> Ended:
        """One boot, until the VMM is gone; the guest's report goes to result.json."""
        began = time.monotonic()
        try:
            with self._boot(backend, config, restore) as machine:
                self.machine = machine
                if self.halt_requested.is_set():  # asked before there was a machine to stop
                    self._on_term(signal.SIGTERM, None)
                if restore is not None:
                    self._restore(machine, restore)
                self._started(machine)
                result = self._wait(machine)
        except BootStalled as exc:
            return dataclasses.replace(self._no_report(exc.message, began), stalled=True)
        except MicroagentError as exc:
            return self._no_report(exc.message, began)
        except Exception as exc:  # the supervisor must always leave a final state
            return self._no_report(f"supervisor error: {exc!r}", began)
        finally:  # the VMM is gone: the environment it was given leaves the disk too
            self._end_link()
            self.machine = None
            self.run_dir.config_disk.unlink(missing_ok=True)
        write_json_atomic(self.run_dir.result_path, {"observedAt": now(), **result.to_json()})
        return Ended(result, "", time.monotonic() - began)

    def _no_report(self, error: str, began: float) -> Ended:
        """A boot that ended without the guest's report; when a VMM ran (killed, crashed),
        the state disk is marked for a check before the next start, as after a kill."""
        if self.machine is not None:
            self.run_dir.update(stateDiskDirty="a VM that stopped without a clean shutdown")
        return Ended(None, error, time.monotonic() - began)

    def _back_off(self, ended: Ended, attempt: int, delay: float) -> bool:
        """Record restart ``attempt`` and wait ``delay``; False when a halt came meanwhile."""
        why = ended.reason
        self.run_dir.event("restart", why, attempt=attempt, reason=why, delaySeconds=delay)
        self.run_dir.set_state(
            State.STARTING, f"restart {attempt} in {delay:g}s ({why})", restarts=attempt
        )
        return not self.halt_requested.wait(delay)

    def _started(self, machine: Machine) -> None:
        pid = machine.pid
        vmm = runner.process_identity(pid) if pid is not None else None
        ready: dict[str, Any] = (
            {"guestReadyAt": now(), "commandStartedAt": now()} if self.restored else {}
        )
        if self.link is None:  # a killed run's supervisor never cleared it: this link's says
            ready["execReadyAt"] = None  # (a restore's link started already and may have)
        self.run_dir.set_state(
            State.RUNNING,
            "vm restored from a snapshot" if self.restored else "vm started",
            vmmArgv=list(machine.argv()),
            vmm=vmm.to_json() if vmm else None,
            **ready,
        )

    def _wait(self, machine: Machine) -> GuestResult:
        watcher = _Watcher(self.run_dir, machine)
        watcher.start()
        if self.link is None:  # (a restore started it before the guest ran)
            self.link = _start_link(self.run_dir, machine.config)
        prober = _start_health(self.run_dir, self.link, self.health)
        try:
            return machine.wait(timeout=None)
        finally:
            watcher.stop.set()
            watcher.join(timeout=5)
            if prober is not None:
                prober.stop()
                self.run_dir.update(health=None)
            self._end_link()

    def _end_link(self) -> None:
        """Stop the agent link (if one runs): exec ends with the machine."""
        link, self.link = self.link, None
        if link is not None:
            link.stop()
            _report_held(self.run_dir, link)
            self.run_dir.update(execReadyAt=None)

    def _suspended(self, ended: Ended) -> int:
        """The VMM quit after a ``suspend`` saved it: the run ends ``suspended``."""
        tag = self.run_dir.runtime().get("suspending")
        self.run_dir.set_state(
            State.SUSPENDED,
            f"suspended (snapshot {tag})",
            suspending=None,
            suspendedTag=tag,
            execReadyAt=None,
        )
        del ended  # the VMM quit on purpose: no report, no failure
        return 0

    def _halted(self, ended: Ended, when: str = "") -> int:
        detail = "halted on request" + (f" {when}" if when else "")
        if ended.result is not None:
            self.run_dir.set_state(State.HALTED, detail, exitCode=ended.result.exit_code)
        else:
            self.run_dir.set_state(State.HALTED, f"{detail} ({ended.error})")
        return 0

    def _finished(self, ended: Ended, restarts: int) -> int:
        """The final state once the policy boots no more: stopped, or failed."""
        code = {"exitCode": ended.result.exit_code} if ended.result is not None else {}
        if not ended.failed:
            self.run_dir.set_state(State.STOPPED, ended.reason, **code)
            return 0
        gave_up = f" (after {restarts} restarts)" if restarts else ""
        self.run_dir.set_state(State.FAILED, ended.reason + gave_up, **code)
        return 1


def _drop_stdin() -> None:
    """Point fd 0 at /dev/null: the secrets pipe is the gateway's alone."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(devnull, 0)
    finally:
        os.close(devnull)


def main(argv: list[str]) -> int:
    run = RunDir(Path(argv[0]))
    began = time.monotonic()
    code = Supervisor(run).run()
    run.event("supervisor-exit", f"after {time.monotonic() - began:.1f}s", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
