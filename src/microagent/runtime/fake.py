"""A backend that boots nothing: it reads the config disk and plays back guest events.

For fast tests of everything above the VMM (CLI, lifecycle, supervisor); it needs no guest kit
(:func:`placeholder_boot_files` stand in for one). What the "guest"
does is decided by a handler ``RunConfig -> FakeOutcome``; :func:`outcome_handler` answers
with one outcome given as JSON (``$MICROAGENT_FAKE``: the :class:`FakeOutcome` fields in
camelCase), or exits 0 echoing the argv.
A hanging outcome stops only when the machine is shut down or the timeout passes; an
outcome's ``stalls`` makes the backend's first N boots stall before the guest's first event
(:class:`BootStalled`, as QEMU's machine reports a boot that passes its deadline). An outcome
with a ``process`` runs that argv as a stand-in VMM process, started like QEMU (own session,
the parent-death signal when the boot asks for it) and stopped with the machine, so process
ownership (pids recorded, nothing outliving its supervisor) is testable without a VM. An
outcome with an ``agent`` serves the guest agent's port (``agent.sock``) the way QEMU does and
hands each connection to that argv plus ``--fd N`` (the real ``ma-agent --root /`` or a
stand-in, run on the host with the boot's environment), so ``exec`` works without a VM. Like
the guest init, it adds ``--listen N`` for each of the boot's service channels (the stand-in
must then understand it); the mediation port stays the outcome's to give.

The fake guest does real work on the state disk: an outcome's ``writes`` (guest path ->
text) land in the overlay upper of ``/dev/vdb`` through the same ext4 tools ``cp`` uses
(parents made and copied up as overlayfs would), and every setup step's boot also leaves a
marker, ``/etc/microagent-fake-setup/<sha256 of the command, 12 hex>`` holding the command,
so setup layers carry content through build, push, restore and flatten. An outcome's
``events`` are raw control-channel lines (strings as they are, other JSON values encoded)
sent after ``started``; they go through the host's own line reader and ``exited`` parser,
so a malformed or oversized event is handled exactly as one from a real guest. An
``exited`` among them ends the command; otherwise the usual one follows.

Like QEMU, a fake machine serves QMP on ``qmp.sock`` in its VM directory (:class:`FakeQmp`):
``stop``/``cont`` pause it, ``getfd`` + ``migrate fd:NAME`` write a small fake VM state (its
memory size, vCPUs, disks and whether it was paused), ``quit`` ends it as a killed VMM ends;
``boot(config, incoming=True)`` + :meth:`FakeMachine.restore` read such a state back and
refuse anything else, so the snapshot code above the VMM is tested without a VM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from microagent import runner
from microagent.errors import MicroagentError, VMError
from microagent.ext4 import overlay
from microagent.runtime.backend import (
    Availability,
    BeforeRun,
    BootConfig,
    BootStalled,
    GuestResult,
    GuestTimeout,
    OutputSink,
    check_boot_files,
)
from microagent.runtime.boot import SETUP_BOOT
from microagent.runtime.configdisk import (
    ExtraMount,
    GuestNetwork,
    NetworkMode,
    Output,
    RunConfig,
)
from microagent.runtime.control import EventLines, EventLog
from microagent.runtime.qemu import BOOT_TIMEOUT, parent_death_prefix

ROOTFS_DISK_INDEX, STATE_DISK_INDEX, CONFIG_DISK_INDEX = 0, 1, 2
SETUP_MARKER_DIR = "/etc/microagent-fake-setup"
HOST_TIMINGS = {"host.booted": 0.01, "host.exited": 0.03}
HANG_POLL = 0.05  # seconds: how often a hanging guest looks at its stand-in VMM
FAKE_STATE_MAGIC = b"microagent-fake-vmstate/1\n"
QMP_LINE_MAX = 65536
PLACEHOLDER = b"microagent fake backend: a placeholder, never booted\n"


def placeholder_boot_files(directory: Path) -> tuple[Path, Path]:
    """A kernel and an initrd for the fake backend, which boots nothing: two small files in
    ``directory`` (made once), so nothing is downloaded or built for a fake boot."""
    directory.mkdir(parents=True, exist_ok=True)
    files = (directory / "vmlinuz", directory / "initrd.img")
    for path in files:
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_bytes(PLACEHOLDER)
            tmp.replace(path)
    return files


@dataclass(frozen=True)
class FakeOutcome:
    """What the fake guest does with a command."""

    exit_code: int = 0
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # the command never ran (exit code 127 is used)
    hang: bool = False  # runs until shutdown or timeout
    crash: str | None = None  # the VM dies before booting, with this VMM message
    outputs: Mapping[str, Any] = field(default_factory=dict)
    process: tuple[str, ...] = ()  # a stand-in VMM process run while the machine is up
    agent: tuple[str, ...] = ()  # the guest agent, run per agent-port connection (+ --fd N)
    writes: Mapping[str, str] = field(default_factory=dict)  # guest path -> text, in the upper
    events: tuple[str, ...] = ()  # raw control-channel lines sent after "started"
    save_seconds: float = 0.0  # how long a QMP ``migrate`` (a snapshot's save) takes
    stalls: int = 0  # the backend's first N boots stall before the guest's first event

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FakeOutcome:
        return cls(
            exit_code=int(data.get("exitCode", 0)),
            stdout=str(data.get("stdout", "")),
            stderr=str(data.get("stderr", "")),
            error=data.get("error"),
            hang=bool(data.get("hang", False)),
            crash=data.get("crash"),
            outputs=dict(data.get("outputs") or {}),
            process=tuple(str(word) for word in data.get("process") or ()),
            agent=tuple(str(word) for word in data.get("agent") or ()),
            writes={str(k): str(v) for k, v in dict(data.get("writes") or {}).items()},
            events=tuple(_raw_line(line) for line in data.get("events") or ()),
            save_seconds=float(data.get("saveSeconds", 0.0)),
            stalls=int(data.get("stalls", 0)),
        )


def _raw_line(value: Any) -> str:
    """An event line as given: a string as it is, any other JSON value encoded."""
    return value if isinstance(value, str) else json.dumps(value)


Handler = Callable[[RunConfig], FakeOutcome]


def echo_handler(config: RunConfig) -> FakeOutcome:
    """The default: exit 0 and echo the argv."""
    return FakeOutcome(stdout=" ".join(config.command) + "\n")


def outcome_handler(raw: str | None) -> Handler:
    """A handler answering every boot with the outcome ``raw`` (JSON), else echoing."""
    if not raw:
        return echo_handler
    try:
        data = json.loads(raw)
        outcome = FakeOutcome.from_json(data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise VMError(f"fake guest: the outcome is not valid JSON: {exc}") from exc
    return lambda _config: outcome


def read_run_config(path: Path) -> RunConfig:
    """Parse run.json from a config disk (the same bytes the guest init reads)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            member = tar.extractfile("run.json")
            data = json.loads(member.read()) if member else None
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
        raise VMError(f"fake guest: cannot read run.json from {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != 1:
        raise VMError(f"fake guest: {path} holds no version 1 run.json")
    net = data.get("network") or {}
    return RunConfig(
        command=tuple(data["command"]),
        env=dict(data.get("env") or {}),
        workdir=data.get("workdir", "/"),
        hostname=data.get("hostname", "microagent"),
        network=GuestNetwork(mode=NetworkMode(net.get("mode", "isolated"))),
        outputs=tuple(Output(o["name"], o["path"]) for o in data.get("outputs") or []),
        mounts=tuple(
            ExtraMount(m["device"], m["path"], m.get("fstype", "ext4"), bool(m["readonly"]))
            for m in data.get("mounts") or []
        ),
        layers=tuple(str(d) for d in data.get("layers") or ()),
    )


def check_mounts(config: BootConfig, run: RunConfig) -> None:
    """Fail like the guest init would when a mount or a layer names a disk that is not
    attached (disks are named vda, vdb, ... in attach order), when a mount would write a disk
    the VMM made read-only, or when a layer disk is writable (the host always attaches them
    read-only)."""
    for mount in run.mounts:
        index = _disk_index(
            config, mount.device, f"cannot mount /dev/{mount.device} on {mount.path}"
        )
        if config.disks[index].readonly and not mount.readonly:
            raise VMError(f"fake guest: /dev/{mount.device} is read-only, mounted rw")
    for number, device in enumerate(run.layers, start=1):
        index = _disk_index(config, device, f"cannot mount layer {number} (/dev/{device})")
        if not config.disks[index].readonly:
            raise VMError(f"fake guest: layer {number} (/dev/{device}) is attached writable")


def _disk_index(config: BootConfig, device: str, why: str) -> int:
    """The attached disk ``device`` names (vda, vdb, ... in attach order), or VMError."""
    index = ord(device[-1]) - ord("a")
    if not 0 <= index < len(config.disks):
        raise VMError(f"fake guest: {why}")
    return index


def root_stack(config: BootConfig, run: RunConfig) -> list[Path]:
    """The read-only root images as the guest stacks them, top first: the layer disks (given
    bottom first), then the rootfs."""
    layers = [config.disks[_disk_index(config, d, f"no layer disk /dev/{d}")] for d in run.layers]
    return [*(disk.path for disk in reversed(layers)), config.disks[ROOTFS_DISK_INDEX].path]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def setup_marker(command: Sequence[str]) -> tuple[str, str]:
    """The guest path and content of the file the fake guest leaves for a setup step."""
    text = shlex.join(command)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{SETUP_MARKER_DIR}/{digest}", text + "\n"


def guest_writes(config: BootConfig, run: RunConfig, outcome: FakeOutcome) -> dict[str, str]:
    """What the fake guest's command writes: the outcome's ``writes``, plus the setup marker
    on a setup step's boot."""
    files = dict(outcome.writes)
    if config.name == SETUP_BOOT:
        path, text = setup_marker(run.command)
        files.setdefault(path, text)
    return files


def write_guest_files(config: BootConfig, files: Mapping[str, str], run: RunConfig) -> None:
    """Write ``files`` into the overlay upper of the state disk (the rootfs and the layer
    disks over it as the lowers), making missing parent directories, as a command in the
    guest would."""
    state = config.disks[STATE_DISK_INDEX].path
    rootfs = root_stack(config, run)
    with tempfile.TemporaryDirectory(prefix="microagent-fake-") as tmp:
        for index, (path, text) in enumerate(sorted(files.items())):
            try:
                parent = overlay.guest_parts(path)[:-1]
                if parent:
                    overlay.make_dirs(state, rootfs, "/" + "/".join(parent))
                src = Path(tmp) / str(index)
                src.write_text(text, encoding="utf-8")
                overlay.copy_in(state, rootfs, src, path)
            except MicroagentError as exc:
                raise VMError(f"fake guest: cannot write {path}: {exc.message}") from exc


class FakeMachine:
    """A pretend VM; records the shutdown escalation it was put through."""

    def __init__(
        self,
        config: BootConfig,
        outcome: FakeOutcome,
        run: RunConfig,
        process: subprocess.Popen[bytes] | None = None,
        *,
        stall: bool = False,
    ) -> None:
        self.config = config
        self.outcome = outcome
        self.stall = stall  # this boot never gets to the guest's first event
        self.run_config = run
        self._process = process
        self._agent = agent_port(config, outcome.agent, run.env) if outcome.agent else None
        self.shutdown_steps: list[str] = []
        self._events = EventLog()
        self._result: GuestResult | None = None
        self._stop = threading.Event()
        self._closed = False
        self.paused = False
        self.restored = False
        self.quit = False  # the VMM was told to quit (QMP): it ends like a killed one
        self._qmp: FakeQmp | None = FakeQmp(self)

    def __enter__(self) -> FakeMachine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def argv(self) -> Sequence[str]:
        return fake_argv(self.config)

    def state_bytes(self) -> bytes:
        """What ``migrate`` writes: the magic line, then the machine's shape as JSON."""
        shape = {"argv": list(fake_argv(self.config)), "paused": self.paused}
        return FAKE_STATE_MAGIC + json.dumps(shape).encode() + b"\n"

    def restore(
        self, state: Path, timeout: float = 600.0, *, before_run: BeforeRun | None = None
    ) -> None:
        """Take a state ``migrate`` wrote (VMError for anything else) and run on; ``before_run``
        is called before it runs on, as QEMU's restore does."""
        try:
            data = state.read_bytes()
        except OSError as exc:
            raise VMError(f"cannot restore the VM: {exc.strerror or exc}") from exc
        if not data.startswith(FAKE_STATE_MAGIC):
            self.shutdown()
            raise VMError("cannot restore the VM: load of migration failed: not a VM state")
        if before_run is not None:
            before_run()
        self.restored = True
        self.paused = False

    @property
    def pid(self) -> int | None:
        """The stand-in VMM process (None when the outcome names none)."""
        return self._process.pid if self._process is not None else None

    def events(self) -> Sequence[Mapping[str, Any]]:
        return self._events.snapshot()

    def _emit(self, event: dict[str, Any]) -> None:
        """Take an event the way the QEMU machine does: kept while there is room, and the
        first ``exited`` is the command's result (a malformed one is a VMError)."""
        self._events.add(event)
        if event.get("event") == "exited" and self._result is None:
            self._result = GuestResult.from_event(event, HOST_TIMINGS)

    def wait(
        self, timeout: float | None = None, on_output: OutputSink | None = None
    ) -> GuestResult:
        """Play back booted/started, the command's writes and raw events, then exited; a hang
        lasts until shutdown or the timeout."""
        out = self.outcome
        if out.crash:
            raise VMError(f"the VM exited before the guest booted: {out.crash}")
        if self.stall:
            self.shutdown()
            raise BootStalled(f"the guest did not boot within {BOOT_TIMEOUT:g}s (fake stall)")
        self._emit({"event": "booted", "uptime": 0.01, "kernel": "fake"})
        started = _now()
        self._emit({"event": "started", "at": started, "uptime": 0.02})
        if not out.error:
            writes = guest_writes(self.config, self.run_config, out)
            write_guest_files(self.config, writes, self.run_config)
        if on_output and not out.error:
            on_output((out.stdout + out.stderr).encode())
        lines = EventLines()
        for raw in out.events:
            for event in lines.feed(raw.encode("utf-8", "surrogateescape") + b"\n"):
                self._emit(event)
        limit = timeout if timeout is not None else self.config.timeout
        if self._result is None and out.hang:
            self._hang(limit)
        if self._result is None:
            self._emit(self._exited_event(started))
        assert self._result is not None
        return self._result

    def _hang(self, limit: float | None) -> None:
        """Until the machine is shut down; GuestTimeout after ``limit``, and VMError when the
        stand-in VMM dies meanwhile (as the QEMU backend notices QEMU's exit)."""
        deadline = None if limit is None else time.monotonic() + limit
        while not self._stop.wait(HANG_POLL):
            if self.quit:
                raise VMError("the VM stopped before the guest command finished (VMM quit)")
            proc = self._process
            if proc is not None and proc.poll() is not None:
                raise VMError(
                    "the VM stopped before the guest command finished "
                    f"(VMM exit code {proc.returncode})"
                )
            if deadline is not None and time.monotonic() > deadline:
                self.shutdown()
                raise GuestTimeout(f"timed out after {limit:g}s: the guest command did not finish")

    def _exited_event(self, started: str) -> dict[str, Any]:
        out = self.outcome
        stopped = self._stop.is_set()
        code = 127 if out.error else (143 if stopped else out.exit_code)
        event: dict[str, Any] = {
            "event": "exited",
            "exit_code": code,
            "stdout": "" if out.error else out.stdout,
            "stderr": out.error or out.stderr,
            "stdout_truncated": False,
            "stderr_truncated": False,
            "started_at": started,
            "finished_at": _now(),
            "outputs": dict(out.outputs),
            "stopped": stopped,
        }
        if out.error:
            event["error"] = out.error
        return event

    def shutdown(self, grace: float = 10.0) -> None:
        """The fake guest always honours the control-channel request."""
        if self._closed:
            return
        self._closed = True
        self.shutdown_steps.append("control")
        self._stop.set()
        if self._qmp is not None:
            self._qmp.close()
        if self._agent is not None:
            self._agent.close()
        if self._process is not None:
            _stop_process(self._process)


def fake_argv(config: BootConfig) -> tuple[str, ...]:
    """The fake VMM's "command line": its disks, memory and vCPUs (what a snapshot's shape
    records, as QEMU's argv does)."""
    disks = (str(d.path) for d in config.disks)
    return ("fake-vmm", *disks, "-m", str(config.memory_mib), "-smp", str(config.cpus))


class FakeQmp(threading.Thread):
    """The fake machine's QMP socket: one client at a time, one JSON command per line."""

    def __init__(self, machine: FakeMachine) -> None:
        super().__init__(name="fake-qmp", daemon=True)
        self.machine = machine
        self.path = machine.config.state_dir / "qmp.sock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(4)
        self.listener.settimeout(0.1)
        self.stopped = threading.Event()
        self.fds: dict[str, int] = {}
        self.migrated = False
        self.migrating: threading.Thread | None = None
        self.start()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                with contextlib.suppress(OSError, ValueError):
                    self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(b'{"QMP": {"version": {"fake": true}, "capabilities": []}}\n')
        buffer = b""
        while not self.stopped.is_set():
            msg, fds, _flags, _addr = socket.recv_fds(conn, QMP_LINE_MAX, 4)
            if not msg:
                return
            buffer += msg
            for fd in fds:
                self.fds["pending"] = fd
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                request = json.loads(line)
                conn.sendall(json.dumps(self._answer(request)).encode() + b"\n")
                if request.get("execute") == "quit":
                    self.machine.quit = True
                    return

    def _answer(self, request: Mapping[str, Any]) -> dict[str, Any]:
        command = str(request.get("execute"))
        args = request.get("arguments") or {}
        handlers: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
            "query-status": self._status,
            "stop": lambda _a: self._run(paused=True),
            "cont": lambda _a: self._run(paused=False),
            "getfd": self._getfd,
            "migrate": self._migrate,
            "query-migrate": self._query_migrate,
            "qmp_capabilities": lambda _a: {},
            "quit": lambda _a: {},
        }
        handler = handlers.get(command)
        if handler is None:
            return {"error": {"class": "CommandNotFound", "desc": f"fake: no command {command}"}}
        return {"return": handler(args)}

    def _status(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        paused = self.machine.paused
        return {"status": "paused" if paused else "running", "running": not paused}

    def _run(self, *, paused: bool) -> dict[str, Any]:
        self.machine.paused = paused
        return {}

    def _getfd(self, args: Mapping[str, Any]) -> dict[str, Any]:
        self.fds[str(args.get("fdname"))] = self.fds.pop("pending")
        return {}

    def _migrate(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Write the state in the background, as QEMU does (``query-migrate`` says when)."""
        fd = self.fds.pop(str(args.get("uri", "")).removeprefix("fd:"))
        self.migrated = False
        self.migrating = threading.Thread(target=self._save, args=(fd,), daemon=True)
        self.migrating.start()
        return {}

    def _save(self, fd: int) -> None:
        data = self.machine.state_bytes()
        with os.fdopen(fd, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            self.stopped.wait(self.machine.outcome.save_seconds)
            fh.write(data[len(data) // 2 :])
        self.migrated = True

    def _query_migrate(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        if self.migrated:
            return {"status": "completed"}
        return {"status": "active"} if self.migrating is not None else {}

    def close(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.path.unlink(missing_ok=True)


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(3.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class AgentPort(threading.Thread):
    """The guest agent's port as the VMM serves it: a unix socket at ``path`` taking one
    connection at a time, each handed to a fresh agent process (``argv --fd N``, with the
    environment ``env``; its output appended to ``log``)."""

    def __init__(self, path: Path, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        super().__init__(name="fake-agent-port", daemon=True)
        self.path, self.argv, self.env, self.log = path, tuple(argv), dict(env), log
        self.path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.listener.settimeout(0.1)
        self.stopped = threading.Event()
        self.agent: subprocess.Popen[bytes] | None = None
        self.start()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                fd = conn.fileno()
                argv = [*self.argv, "--fd", str(fd)]
                self.agent = runner.spawn(argv, env=self.env, stdout=self.log, pass_fds=(fd,))
            while self.agent.poll() is None and not self.stopped.wait(0.05):
                pass

    def close(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        self.join(timeout=2.0)
        if self.agent is not None and self.agent.poll() is None:
            _stop_process(self.agent)
        self.path.unlink(missing_ok=True)


def agent_port(config: BootConfig, argv: Sequence[str], env: Mapping[str, str]) -> AgentPort:
    """The agent port of a fake machine, where QEMU would serve it (agent.log beside it)."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    listen = [word for s in config.services for word in ("--listen", str(s.guest_port))]
    return AgentPort(config.agent_socket, [*argv, *listen], env, config.state_dir / "agent.log")


def _spawn_stand_in(config: BootConfig, argv: Sequence[str]) -> subprocess.Popen[bytes] | None:
    """The outcome's stand-in VMM, started the way the QEMU backend starts QEMU."""
    if not argv:
        return None
    prefix = parent_death_prefix(runner.find_tool("setpriv")) if config.die_with_parent else []
    return runner.spawn([*prefix, *argv], new_session=True)


class FakeBackend:
    """Boots :class:`FakeMachine` objects; ``machines`` lists every boot."""

    name = "fake"

    def __init__(self, handler: Handler = echo_handler) -> None:
        self.handler = handler
        self.machines: list[FakeMachine] = []
        self.stalled = 0  # boots that stalled (an outcome's ``stalls``)

    def available(self) -> Availability:
        return Availability(True, "fake backend (no VM is booted)")

    restores = True  # boot(..., incoming=True) + FakeMachine.restore (snapshots)

    def vmm_version(self) -> str:
        return "fake"

    def command(self, config: BootConfig) -> list[str]:
        return list(fake_argv(config))

    def boot(self, config: BootConfig, *, incoming: bool = False) -> FakeMachine:
        """A fake machine; ``incoming``: one that waits for :meth:`FakeMachine.restore`
        (the fake resumes at once either way)."""
        check_boot_files(config)
        if len(config.disks) <= CONFIG_DISK_INDEX:
            raise VMError("fake guest: no config disk (/dev/vdc) attached")
        run = read_run_config(config.disks[CONFIG_DISK_INDEX].path)
        check_mounts(config, run)
        outcome = self.handler(run)
        stall = self.stalled < outcome.stalls
        self.stalled += stall
        process = _spawn_stand_in(config, outcome.process)
        machine = FakeMachine(config, outcome, run, process, stall=stall)
        self.machines.append(machine)
        return machine
