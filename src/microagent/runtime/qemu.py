"""The QEMU backend: ``-M microvm`` (or q35), KVM when a real probe boots, TCG otherwise.

The argv is built by pure functions (golden-tested; ``--print-command`` shows it). A machine
runs QEMU in its own session with the serial console in ``serial.log`` and QEMU's own output
in ``vmm.log``; the guest's control port and its agent port (``agent.sock``, see
:mod:`~microagent.runtime.agentlink`) are unix sockets QEMU serves. What the guest sends is
bounded on the host: the events kept (:class:`~microagent.runtime.control.EventLog`) and the
serial log, which QEMU appends to and the machine cuts back (``rotate_log``) while it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from microagent import runner
from microagent.errors import ToolError, VMError
from microagent.runtime import hostclock, qmp
from microagent.runtime.agentproto import PORT_NAME as AGENT_PORT_NAME
from microagent.runtime.backend import (
    Accel,
    Availability,
    BeforeRun,
    BootConfig,
    BootStalled,
    Disk,
    Forward,
    GuestResult,
    GuestTimeout,
    MachineType,
    OutputSink,
    check_boot_files,
)
from microagent.runtime.configdisk import NetworkMode
from microagent.runtime.control import (
    PORT_NAME,
    PROBE_MARKER,
    ControlChannel,
    EventLog,
    SerialStream,
    rotate_log,
    tail_text,
)
from microagent.runtime.network import (
    NetworkSandbox,
    forward_socket,
    guestfwd_option,
    hostfwd_option,
    netns_ports,
)
from microagent.runtime.qmp import QMP_SOCKET

QEMU_BINARIES = {"x86_64": "qemu-system-x86_64", "amd64": "qemu-system-x86_64"}
# rcu_expedited: module loading and mounts wait on RCU grace periods; expedited ones cut
# ~50 ms of guest module/mount time and ~0.1 s of kernel boot under TCG (measured).
BASE_CMDLINE = ("console=ttyS0", "quiet", "panic=-1", "rcupdate.rcu_expedited=1")
MICROVM_CMDLINE = ("pci=off",)
# TCG only, beside tsc_early_khz: under TCG the guest's TSC is the host's (QEMU reads the host
# TSC), so it runs at the rate we pass and never drifts. Without tsc=reliable the clocksource
# watchdog compares it with jiffies, which lose ticks whenever the vCPU thread waits for a host
# CPU; it marks the TSC unstable within seconds of boot (measured on every busy-host boot) and
# the guest falls back to refined-jiffies: 4 ms clock resolution, clock_gettime as a real
# syscall instead of the vDSO, periodic ticks even when idle, a guest clock that falls behind.
TCG_CLOCK_CMDLINE = ("tsc=reliable",)
# TCG only: the guest kernel's speculative-execution mitigations (retpolines, RSB filling,
# usercopy barriers) protect nothing when its code is translated rather than run by the CPU,
# and cost ~10-12 % of a pip install's VMM CPU time (bench/bench_guest.py, docs/performance.md).
# Under KVM the guest runs on the real CPU: they stay on.
TCG_CMDLINE = ("mitigations=off",)
BOOT_TIMEOUT = 120.0
STALL_FILE = "boot-stall.txt"  # the vCPUs' registers when a boot stalled (VM directory)
STALL_REGISTERS_MAX = 64 << 10  # bytes of QEMU's register dump kept
STALL_QMP_TIMEOUT = 5.0
POWEROFF_GRACE = 15.0
KVM_PROBE_TIMEOUT = 10.0
PROBE_MEMORY_MIB = 256
TCG_CPU = "max"


# -- pure argv construction ---------------------------------------------------------------------


def _escape(value: str | Path) -> str:
    """QEMU option values double their commas."""
    return str(value).replace(",", ",,")


def kernel_cmdline(config: BootConfig, tsc_khz: int | None = None, *, tcg: bool = False) -> str:
    """Kernel command line: console on ttyS0, quiet, panic ends the VM, transport for init.

    Under TCG (``tcg``) it adds the settings that only pay off under emulation
    (``TCG_CMDLINE``) and, given the host's ``tsc_khz``, spares the guest its flaky TSC
    calibration (see hostclock) and keeps the TSC as its clocksource (``TCG_CLOCK_CMDLINE``).
    """
    words = [*BASE_CMDLINE]
    if config.machine is MachineType.MICROVM:
        words += MICROVM_CMDLINE
    if tcg:
        words += TCG_CMDLINE
    if tcg and tsc_khz:
        words += (f"tsc_early_khz={tsc_khz}", *TCG_CLOCK_CMDLINE)
    words.append(f"ma_transport={config.machine.transport}")
    words += config.cmdline_extra
    return " ".join(words)


def machine_args(machine: MachineType, accel: Accel) -> list[str]:
    """``-M``, ``-accel`` and ``-cpu`` (host CPU under KVM, the richest model under TCG)."""
    if accel is Accel.AUTO:
        raise ValueError("resolve Accel.AUTO before building argv")
    cpu = "host" if accel is Accel.KVM else TCG_CPU
    return ["-M", machine.value, "-accel", accel.value, "-cpu", cpu]


def vcpus(requested: int, accel: Accel) -> int:
    """``requested`` or, for 0, one vCPU under TCG (more only compete with QEMU's own threads
    on small hosts) and two under KVM."""
    if requested > 0:
        return requested
    return 2 if accel is Accel.KVM else 1


def _device(machine: MachineType, kind: str) -> str:
    return f"virtio-{kind}-{'device' if machine is MachineType.MICROVM else 'pci'}"


def disk_args(disks: Sequence[Disk], machine: MachineType) -> list[str]:
    """One ``-drive``/``-device`` pair per disk, in order (vda, vdb, ...)."""
    args: list[str] = []
    for index, disk in enumerate(disks):
        drive = f"id=vd{index},file={_escape(disk.path)},format=raw,if=none"
        if disk.readonly:
            drive += ",readonly=on"
        device = f"{_device(machine, 'blk')},drive=vd{index}"
        if disk.serial:
            device += f",serial={_escape(disk.serial)}"
        args += ["-drive", drive, "-device", device]
    return args


def serial_args(log: Path) -> list[str]:
    """The serial console appended to ``log``: ``append=on`` opens it ``O_APPEND`` (and does
    not truncate it: the backend removes it before a boot), so the host can cut the log back
    while QEMU writes (see ``control.rotate_log``) without QEMU leaving a hole."""
    return [
        *("-chardev", f"file,id=serial0,path={_escape(log)},append=on"),
        *("-serial", "chardev:serial0"),
    ]


def control_args(socket_path: Path, machine: MachineType, agent_socket: Path) -> list[str]:
    """Two virtio-serial ports backed by unix sockets QEMU serves: ``microagent.ctl`` (the
    init's JSON-lines events) and ``microagent.agent`` (the guest agent's frames)."""
    return [
        "-device",
        # max_ports=3 (port 0 is reserved for a console): the default 31 ports cost the guest
        # 64 virtqueues and ~50 ms of driver probing under TCG.
        f"{_device(machine, 'serial')},max_ports=3",
        "-chardev",
        f"socket,id=ctl,path={_escape(socket_path)},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=ctl,name={PORT_NAME}",
        "-chardev",
        f"socket,id=agent,path={_escape(agent_socket)},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
    ]


def net_args(config: BootConfig, forwards: Sequence[tuple[Forward, Path]], socat: str) -> list[str]:
    """No NIC when isolated; else slirp (inside our netns) with one guestfwd per forward and
    one hostfwd per published guest port (slirp4netns brings the host's listener to it)."""
    if config.network.mode is NetworkMode.ISOLATED:
        return []
    netdev = ["user", "id=n0", "ipv6=off"]
    netdev += [guestfwd_option(fwd, path, socat) for fwd, path in forwards]
    netdev += [hostfwd_option(port) for port in netns_ports(config.network.published)]
    return ["-netdev", ",".join(netdev), "-device", f"{_device(config.machine, 'net')},netdev=n0"]


def build_argv(
    binary: str,
    config: BootConfig,
    accel: Accel,
    *,
    forwards: Sequence[tuple[Forward, Path]] = (),
    socat: str = "socat",
    tsc_khz: int | None = None,
    incoming: bool = False,
) -> list[str]:
    """The complete QEMU command line for ``config`` (no network namespace wrapper); with
    ``incoming`` it waits for a saved state (``-incoming defer``, then QMP
    ``migrate-incoming``) instead of booting: a restore has the same argv otherwise, so the
    device state it loads fits."""
    restore = ["-incoming", "defer"] if incoming else []
    return [
        binary,
        *machine_args(config.machine, accel),
        *("-m", str(config.memory_mib), "-smp", str(vcpus(config.cpus, accel))),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *serial_args(config.serial_log),
        *("-kernel", str(config.kernel), "-initrd", str(config.initrd)),
        *("-append", kernel_cmdline(config, tsc_khz, tcg=accel is Accel.TCG)),
        *disk_args(config.disks, config.machine),
        *control_args(config.control_socket, config.machine, config.agent_socket),
        *("-qmp", f"unix:{_escape(config.state_dir / QMP_SOCKET)},server=on,wait=off"),
        *net_args(config, forwards, socat),
        *restore,
    ]


def parent_death_prefix(setpriv: str) -> list[str]:
    """Run the VMM with SIGKILL as its parent-death signal (util-linux setpriv)."""
    return [setpriv, "--pdeathsig", "KILL"]


def probe_argv(binary: str, kernel: Path, initrd: Path, serial: Path) -> list[str]:
    """A minimal KVM boot: the kit's init prints a marker and powers off."""
    return [
        binary,
        *machine_args(MachineType.MICROVM, Accel.KVM),
        *("-m", str(PROBE_MEMORY_MIB), "-smp", "1", "-nodefaults", "-no-user-config"),
        *("-display", "none"),
        *("-no-reboot", "-serial", f"file:{serial}", "-kernel", str(kernel)),
        *("-initrd", str(initrd), "-append", " ".join((*BASE_CMDLINE, "ma_mode=probe"))),
    ]


def probe_summary() -> str:
    """The KVM test boot in words (``doctor`` explains a failed one)."""
    return (
        f"qemu -M microvm -accel kvm -cpu host, {PROBE_MEMORY_MIB} MiB, 1 vCPU, "
        f"{KVM_PROBE_TIMEOUT:g}s for the init to print its marker and power off"
    )


# -- tool discovery and the KVM probe ---------------------------------------------------------


def qemu_binary(arch: str | None = None) -> str:
    """Absolute path of the system emulator for ``arch`` (default: this host)."""
    name = QEMU_BINARIES.get(arch or os.uname().machine)
    if name is None:
        raise ToolError(f"the QEMU backend does not support {arch or os.uname().machine} yet")
    return runner.find_tool(name)


@functools.lru_cache(maxsize=8)
def qemu_version(binary: str) -> str:
    """``7.2.22`` from ``qemu-system-x86_64 -version``."""
    first = runner.run([binary, "-version"], timeout=30).stdout.splitlines()[0]
    words = first.split()
    return words[words.index("version") + 1] if "version" in words else first


def kvm_device_problem(path: Path = Path("/dev/kvm")) -> str:
    """Why /dev/kvm cannot be used ('' when it opens read-write)."""
    if not path.exists():
        return f"{path} does not exist (no hardware virtualisation exposed to this host)"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror}"
    os.close(fd)
    return ""


def _probe_boot(binary: str, kernel: Path, initrd: Path) -> Availability:
    with tempfile.TemporaryDirectory(prefix="microagent-kvm-probe-") as tmp:
        serial, log = Path(tmp) / "serial.log", Path(tmp) / "vmm.log"
        proc = runner.spawn(probe_argv(binary, kernel, initrd, serial), stdout=log)
        try:
            code = proc.wait(KVM_PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            why = f"hung (killed after {KVM_PROBE_TIMEOUT:g}s)"
            return Availability(False, f"a KVM test boot {why}; {_probe_tails(serial, log)}")
        if PROBE_MARKER in tail_text(serial, 50):
            return Availability(True, "a KVM test boot succeeded")
        why = f"failed (exit code {code})"
        return Availability(False, f"a KVM test boot {why}; {_probe_tails(serial, log)}")


def _probe_tails(serial: Path, log: Path) -> str:
    """What a failed KVM test boot left: the end of QEMU's output and of the guest console."""
    vmm, console = _last_lines(log), _last_lines(serial)
    return f"qemu: {vmm or '(nothing)'}; console: {console or '(no output)'}"


def _last_lines(path: Path) -> str:
    """A log's last 3 lines on one line, printable (it ends up in messages and tables)."""
    text = " | ".join(line.strip() for line in tail_text(path, 3).splitlines())
    return "".join(c if c.isprintable() else "?" for c in text).strip(" |")


def probe_kvm(binary: str, kernel: Path, initrd: Path, cache_dir: Path | None) -> Availability:
    """Whether KVM really boots a guest here; cached per qemu/host-kernel/kit in ``cache_dir``."""
    problem = kvm_device_problem()
    if problem:
        return Availability(False, problem)
    ident = [binary, qemu_version(binary), os.uname().release, str(kernel), str(initrd)]
    digest = hashlib.sha256("\0".join(ident).encode()).hexdigest()[:32]
    cached = cache_dir / f"kvm-{digest}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        data = json.loads(cached.read_text())
        return Availability(bool(data["ok"]), str(data["reason"]) + " (cached)")
    result = _probe_boot(binary, kernel, initrd)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"ok": result.ok, "reason": result.reason}))
        tmp.replace(cached)
    return result


def choose_accel(requested: Accel, probe: Callable[[], Availability]) -> tuple[Accel, str]:
    """Resolve ``auto`` to KVM (when a test boot works) or TCG, with the reason."""
    if requested is not Accel.AUTO:
        return requested, "requested"
    kvm = probe()
    if kvm.ok:
        return Accel.KVM, kvm.reason
    return Accel.TCG, f"KVM unusable: {kvm.reason}; using TCG (software emulation)"


# -- the machine ----------------------------------------------------------------------------------


class QemuMachine:
    """One running QEMU process and everything it depends on."""

    def __init__(
        self,
        config: BootConfig,
        argv: Sequence[str],
        proc: subprocess.Popen[bytes],
        sandbox: NetworkSandbox,
    ) -> None:
        self.config = config
        self._argv = tuple(argv)
        self._proc = proc
        self._sandbox = sandbox
        self._channel = ControlChannel(config.control_socket)
        self._t0 = time.monotonic()
        self._events = EventLog()
        self._arrivals: dict[str, float] = {}  # first arrival of each kept event's kind
        self._result: GuestResult | None = None
        self._malformed: VMError | None = None  # the guest's exited event did not parse
        self._stall_summary = ""  # where the vCPUs were when the boot stalled
        self._closed = False
        self._lock = threading.RLock()  # channel reads and the event list
        self._stopping = threading.Lock()  # one shutdown at a time

    # context manager -----------------------------------------------------------------------
    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def argv(self) -> Sequence[str]:
        return self._argv

    def restore(
        self, state: Path, timeout: float = 600.0, *, before_run: BeforeRun | None = None
    ) -> None:
        """Load the saved state ``state`` into this VMM (started with ``incoming``) and run
        it; the guest booted long ago, so the boot deadline no longer applies.

        The host ends of the guest's ports are connected before the guest runs: the control
        port here, the agent port by ``before_run`` (the supervisor's agent link). A port's
        saved state says its host was connected; QEMU compares that with the port's host once
        the guest runs and, when they differ, tells the guest its host left, and later that it
        came back, which the guest agent takes for a new host (its channels end)."""
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with qmp.connect(self.config.state_dir, wait=30.0) as session:
                qmp.load_state(session, fd, timeout)
                with self._lock:
                    if not self._channel.connected:
                        self._channel.try_connect()
                if before_run is not None:
                    before_run()
                session.execute("cont")
        except VMError as exc:
            self.shutdown(grace=0.0)
            raise VMError(f"cannot restore the VM: {exc.message}", hint=self._log_hint()) from exc
        finally:
            os.close(fd)
        with self._lock:
            self._arrivals.setdefault("booted", 0.0)
            self._arrivals.setdefault("started", 0.0)

    def events(self) -> Sequence[Mapping[str, Any]]:
        with self._lock:
            return self._events.snapshot()

    @property
    def pid(self) -> int:
        return self._proc.pid

    # event pump ----------------------------------------------------------------------------
    def _pump(self, timeout: float) -> None:
        with self._lock:
            rotate_log(self.config.serial_log)
            connected = self._channel.connected or self._channel.try_connect()
            if connected:
                for event in self._channel.poll(timeout):
                    self._record(event)
        if not connected:
            time.sleep(min(timeout, 0.01))

    def _record(self, event: dict[str, Any]) -> None:
        name = str(event.get("event"))
        if self._events.add(event):  # bounded, and so are the arrivals (one per kept event)
            self._arrivals.setdefault(name, time.monotonic() - self._t0)
        if name == "exited" and self._result is None and self._malformed is None:
            host = {f"host.{k}": round(v, 3) for k, v in self._arrivals.items()}
            try:
                self._result = GuestResult.from_event(event, host)
            except VMError as exc:  # raised by wait(); never from a pump inside shutdown
                self._malformed = exc

    # waiting -------------------------------------------------------------------------------
    def wait(
        self, timeout: float | None = None, on_output: OutputSink | None = None
    ) -> GuestResult:
        """Wait for the guest's ``exited`` event, then for QEMU to exit (the guest powers off)."""
        limit = timeout if timeout is not None else self.config.timeout
        stream = SerialStream(self.config.serial_log, on_output) if on_output else None
        while self._result is None and self._malformed is None:
            self._pump(0.05)
            if stream:
                stream.pump()
            if self._proc.poll() is not None:
                self._pump(0.05)
                break
            self._check_deadlines(limit)
        if self._malformed is not None:
            self.shutdown()
            raise self._malformed
        if self._result is None:
            raise self._crash_error()
        self._await_exit()
        if stream:
            stream.pump()
        result = self._result
        timings = {**result.timings, "host.vmmExit": round(time.monotonic() - self._t0, 3)}
        return dataclasses.replace(result, timings=timings)

    def _check_deadlines(self, limit: float | None) -> None:
        elapsed = time.monotonic() - self._t0
        if limit is not None and elapsed > limit:
            self.shutdown()
            raise GuestTimeout(
                f"timed out after {limit:g}s: the guest command did not finish; the VM was stopped",
                hint=self._log_hint(),
                result=self._result,
            )
        if "booted" not in self._arrivals and elapsed > BOOT_TIMEOUT:
            diagnosis = self._stall_diagnosis()
            hint = self._log_hint()
            self.shutdown()
            where = f" ({self._stall_summary})" if self._stall_summary else ""
            raise BootStalled(
                f"the guest did not boot within {BOOT_TIMEOUT:g}s{where}",
                hint=hint,
                diagnosis=diagnosis,
            )

    def _stall_diagnosis(self) -> Path | None:
        """Where the vCPUs are at a boot stall: QEMU's ``info registers -a`` (over QMP) and
        its run state, written to :data:`STALL_FILE` in the VM directory (bounded), so a hang
        that does not repeat still says whether the guest spun, waited or halted."""
        try:
            with qmp.connect(self.config.state_dir, wait=2.0) as session:
                status = qmp.run_status(session)
                registers = qmp.monitor_command(session, "info registers -a", STALL_QMP_TIMEOUT)
        except VMError:
            return None
        text = f"run state: {status}\n{registers[:STALL_REGISTERS_MAX]}"
        target = self.config.state_dir / STALL_FILE
        rips = [word for word in text.split() if word.startswith("RIP=")][:4]
        self._stall_summary = f"VMM {status}, vCPU {' '.join(rips) or 'RIP unknown'}"
        with contextlib.suppress(OSError):
            target.unlink(missing_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as out:
                out.write(text)
            self._stall_summary += f"; registers in {target}"
            return target
        return None

    def _await_exit(self) -> None:
        # The command is over; if the guest does not power off, skip asking and signal QEMU.
        deadline = time.monotonic() + POWEROFF_GRACE
        while self._proc.poll() is None and time.monotonic() < deadline:
            rotate_log(self.config.serial_log)  # the guest may still be writing
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(0.1)
        self.shutdown(grace=0.0)

    def _crash_error(self) -> VMError:
        code = self._proc.returncode
        serial = tail_text(self.config.serial_log, 200)
        panic = [line for line in serial.splitlines() if "Kernel panic" in line]
        if panic:
            what = f"the guest kernel panicked: {panic[0].strip()}"
        elif "booted" not in self._arrivals:
            what = f"the VM exited before the guest booted (VMM exit code {code})"
        else:
            what = f"the VM stopped before the guest command finished (VMM exit code {code})"
        self.shutdown()
        return VMError(what, hint=self._log_hint())

    def _log_hint(self) -> str:
        parts = [f"command: {shlex.join(self._argv)}"]
        vmm = tail_text(self.config.vmm_log, 10)
        if vmm:
            parts.append(f"VMM log ({self.config.vmm_log}):\n{vmm}")
        serial = tail_text(self.config.serial_log, 15)
        if serial:
            parts.append(f"serial console ({self.config.serial_log}):\n{serial}")
        return "\n".join(parts)

    # stopping ------------------------------------------------------------------------------
    def shutdown(self, grace: float = 10.0) -> None:
        """Ask the guest to stop, then SIGTERM, then SIGKILL; then release the network.

        Safe to call from another thread while :meth:`wait` runs, and more than once.
        """
        with self._stopping:
            if self._closed:
                return
            try:
                if self._proc.poll() is None and self._channel.send({"op": "shutdown"}):
                    self._drain_until_exit(grace)
                _terminate(self._proc)
            finally:
                self._closed = True
                with self._lock:
                    self._channel.close()
                self._sandbox.teardown()

    def _drain_until_exit(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self._proc.poll() is None and time.monotonic() < deadline:
            self._pump(0.05)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    for signal_it, wait in ((proc.terminate, 3.0), (proc.kill, 5.0)):
        if proc.poll() is not None:
            return
        signal_it()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


# -- the backend ----------------------------------------------------------------------------------


class QemuBackend:
    """Boots :class:`BootConfig` with QEMU."""

    name = "qemu"

    def __init__(self, cache_dir: Path | None = None, binary: str | None = None) -> None:
        self.cache_dir = cache_dir
        self._binary = binary
        self.accel_reason = ""

    def binary(self) -> str:
        if self._binary is None:
            self._binary = qemu_binary()
        return self._binary

    def available(self) -> Availability:
        try:
            binary = self.binary()
            version = qemu_version(binary)
        except ToolError as exc:
            return Availability(False, f"{exc.message}; {exc.hint}".strip("; "))
        return Availability(True, f"{binary} {version}")

    def resolve_accel(self, config: BootConfig) -> Accel:
        """KVM or TCG for ``config`` (probing KVM once per host/kit when asked for auto)."""
        accel, self.accel_reason = choose_accel(
            config.accel,
            lambda: probe_kvm(self.binary(), config.kernel, config.initrd, self.cache_dir),
        )
        return accel

    def _argv(
        self, config: BootConfig, sandbox: NetworkSandbox, *, incoming: bool = False
    ) -> list[str]:
        forwards = [(f, forward_socket(config.state_dir, f)) for f in config.network.forwards]
        socat = runner.find_tool("socat") if forwards else "socat"
        accel = self.resolve_accel(config)
        tsc = hostclock.tsc_khz(self.cache_dir) if accel is Accel.TCG else None
        argv = build_argv(
            self.binary(), config, accel, forwards=forwards, socat=socat, tsc_khz=tsc,
            incoming=incoming,
        )  # fmt: skip
        if config.die_with_parent:
            argv = [*parent_death_prefix(runner.find_tool("setpriv")), *argv]
        return sandbox.wrap(argv)

    def command(self, config: BootConfig) -> list[str]:
        """The argv ``boot`` would run (the netns name is a fresh placeholder)."""
        return self._argv(config, NetworkSandbox(config.network, config.state_dir))

    restores = True  # boot(..., incoming=True) + QemuMachine.restore (snapshots)

    def vmm_version(self) -> str:
        """What a snapshot records as its VMM (a restore needs the same)."""
        return f"qemu {qemu_version(self.binary())}"

    def boot(self, config: BootConfig, *, incoming: bool = False) -> QemuMachine:
        """Start QEMU for ``config``; the netns is set up first and torn down on error.
        ``incoming``: wait for a saved state (:meth:`QemuMachine.restore`), do not boot."""
        check_boot_files(config)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        config.control_socket.unlink(missing_ok=True)
        config.agent_socket.unlink(missing_ok=True)
        (config.state_dir / QMP_SOCKET).unlink(missing_ok=True)
        config.serial_log.unlink(missing_ok=True)  # QEMU appends to it (see serial_args)
        sandbox = NetworkSandbox(config.network, config.state_dir)
        try:
            sandbox.setup()
            # after setup: a rootless netns has a pid then
            argv = self._argv(config, sandbox, incoming=incoming)
            proc = runner.spawn(argv, stdout=config.vmm_log, new_session=True)
        except BaseException:
            sandbox.teardown()
            raise
        return QemuMachine(config, argv, proc, sandbox)
