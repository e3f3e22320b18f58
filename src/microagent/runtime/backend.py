"""The backend interface: what every VMM integration (QEMU, fake, later Firecracker/VZ) offers.

A backend reports whether it can run here (``available()``) and boots a :class:`BootConfig`
into a :class:`Machine`. A machine is a context manager whose exit always stops the VM with
escalating force (ask the guest over the control channel, then SIGTERM, then SIGKILL) and
releases everything the boot set up (network namespace, helpers).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from microagent.errors import InvalidInputError, VMError
from microagent.runtime.configdisk import NetworkMode

# The machine's enums live in a module of their own, so that what needs only them (the build
# pipeline's accelerator choice, say) does not build this module's dataclasses; re-exported.
from microagent.runtime.machine import Accel as Accel  # noqa: PLC0414
from microagent.runtime.machine import MachineType as MachineType  # noqa: PLC0414


@dataclass(frozen=True)
class Availability:
    """Whether a backend can boot VMs here, and why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Disk:
    """A raw disk image attached in list order (/dev/vda, /dev/vdb, ...)."""

    path: Path
    readonly: bool = False
    serial: str = ""


@dataclass(frozen=True)
class Forward:
    """A guest->host forward: guest TCP ``10.0.2.100:guest_port`` reaches a host service.

    The target is a host TCP port on 127.0.0.1 or a unix socket path.
    """

    guest_port: int
    host_port: int | None = None
    unix_socket: Path | None = None

    def describe(self) -> str:
        target = f"unix:{self.unix_socket}" if self.unix_socket else f"127.0.0.1:{self.host_port}"
        return f"10.0.2.100:{self.guest_port} -> {target}"

    @classmethod
    def parse(cls, text: str, *, flag: str = "--host-forward", sep: str = "=") -> Forward:
        """``GUESTPORT=HOSTPORT`` or ``GUESTPORT=/path/to.sock`` (``sep`` for old spellings)."""
        guest, found, target = text.partition(sep)
        if not (found and guest.isdigit() and 0 < int(guest) < 65536 and target):
            raise InvalidInputError(
                f"{flag} {text!r}: expected GUESTPORT{sep}HOSTPORT or GUESTPORT{sep}/path/to.sock",
                hint=f"e.g. {flag} 8080{sep}18080 lets the guest reach 127.0.0.1:18080 on the "
                "host at http://10.0.2.100:8080",
            )
        if target.isdigit():
            if not 0 < int(target) < 65536:
                raise InvalidInputError(
                    f"{flag} {text!r}: host port must be 1-65535",
                    hint=f"e.g. {flag} {guest}{sep}18080",
                )
            return cls(int(guest), host_port=int(target))
        return cls(int(guest), unix_socket=Path(target).expanduser().resolve())


FORWARD_ADDRESS = "10.0.2.100"


def _is_port(value: object) -> bool:
    return type(value) is int and 0 < value < 65536


def publish_host_problem(host: object) -> str:
    """Why ``host`` cannot be a published port's listen address ('' when it can): an IPv4
    literal in dotted-quad form (slirp4netns forwards IPv4 only), unicast or 0.0.0.0."""
    if not isinstance(host, str) or len(host) > 15:
        return "the host must be an IPv4 address such as 127.0.0.1"
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        if ":" in host:
            return "IPv6 host addresses are not supported (slirp4netns forwards IPv4 only)"
        return f"{host!r} is not an IPv4 address"
    if str(address) != host:
        return f"{host!r} is not written as a plain IPv4 address (use {address})"
    if address.is_multicast or address.is_reserved:
        return f"{host} is not an address a listener can bind"
    return ""


@dataclass(frozen=True)
class PublishedPort:
    """A published port: a host TCP listener on ``host:host_port`` that reaches the guest's
    ``guest_port`` while the VM runs (host->guest; ``user`` mode only).

    Checked when made, wherever it comes from (spec, flag, a record on disk), because its
    values go into QEMU's argv and slirp4netns's API.
    """

    host: str
    host_port: int
    guest_port: int
    protocol: str = "tcp"

    def __post_init__(self) -> None:
        problem = publish_host_problem(self.host)
        if not problem and not (_is_port(self.host_port) and _is_port(self.guest_port)):
            problem = "ports must be integers from 1 to 65535"
        if not problem and self.protocol != "tcp":
            problem = "published ports are TCP only"
        if problem:
            raise InvalidInputError(f"published port {self.describe()[:80]!r}: {problem}")

    def describe(self) -> str:
        return f"{self.host}:{self.host_port}->{self.guest_port}/{self.protocol}"

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "host": self.host,
            "hostPort": self.host_port,
            "guestPort": self.guest_port,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PublishedPort:
        """From a record or ``boot.json``: checked like any other."""
        return cls(
            host=data.get("host", ""),
            host_port=data.get("hostPort", 0),
            guest_port=data.get("guestPort", 0),
            protocol=data.get("protocol", "tcp"),
        )


@dataclass(frozen=True)
class NetworkConfig:
    """Network mode, guest->host forwards and published (host->guest) ports; both need
    ``user`` mode."""

    mode: NetworkMode = NetworkMode.ISOLATED
    forwards: tuple[Forward, ...] = ()
    published: tuple[PublishedPort, ...] = ()
    # False (``network.allow``): the guest's NIC reaches nothing outside (DNS neither); its
    # traffic goes through the host's egress proxy over the guest agent's channel instead.
    direct_egress: bool = True


@dataclass(frozen=True)
class Mediation:
    """The mediation channel of a boot: guest ``127.0.0.1:guest_port`` is carried over the
    guest agent's channel to the host's TCP ``host:port``. ``required``: fail closed.
    ``hold``: the host holds the guest's connections itself instead (accepted, kept open and
    silent, nothing forwarded, the target never contacted): a warm template's boot."""

    guest_port: int
    host: str
    port: int
    required: bool = False
    hold: bool = False

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "port": self.guest_port,
            "target": self.target,
            "host": self.host,
            "targetPort": self.port,
            "required": self.required,
            **({"hold": True} if self.hold else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Mediation:
        return cls(
            int(data["port"]),
            str(data["host"]),
            int(data["targetPort"]),
            bool(data["required"]),
            data.get("hold") is True,
        )


MAX_SERVICES = 10  # service channels per boot (the guest agent's --listen limit)
SERVICE_NAME_MAX = 64
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclass(frozen=True)
class ServiceChannel:
    """A service channel of a boot: guest ``127.0.0.1:guest_port`` is carried over the guest
    agent's channel to the host's unix socket ``socket`` (a credential broker, the egress
    proxy). ``name`` says what it is, in errors and logs.

    Checked when made, wherever it comes from (the workspace layer, ``boot.json``).
    """

    guest_port: int
    socket: Path
    name: str

    def __post_init__(self) -> None:
        problem = ""
        if not _is_port(self.guest_port):
            problem = "the guest port must be an integer from 1 to 65535"
        elif not isinstance(self.name, str) or not 0 < len(self.name) <= SERVICE_NAME_MAX:
            problem = f"the name must be 1 to {SERVICE_NAME_MAX} characters"
        elif not self.name.isprintable() or not self.name.isascii():
            problem = "the name must be printable ASCII"
        elif not isinstance(self.socket, Path) or not self.socket.is_absolute():
            problem = "the socket must be an absolute path"
        elif "\0" in str(self.socket) or len(os.fsencode(self.socket)) > UNIX_PATH_MAX:
            problem = f"the socket path must be at most {UNIX_PATH_MAX} bytes, without NUL"
        if problem:
            label = self.name[:SERVICE_NAME_MAX] if isinstance(self.name, str) else "?"
            raise InvalidInputError(f"service channel {label!r}: {problem}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "guestPort": self.guest_port, "socket": str(self.socket)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceChannel:
        """From ``boot.json``: checked like any other."""
        sock = data.get("socket")
        return cls(
            guest_port=data.get("guestPort", 0),
            socket=Path(sock) if isinstance(sock, str) and sock else Path(),
            name=data.get("name", ""),
        )


def check_services(services: Sequence[ServiceChannel], mediation: Mediation | None) -> None:
    """At most :data:`MAX_SERVICES`, each on a guest port of its own (not the mediation
    port either); InvalidInputError otherwise."""
    if len(services) > MAX_SERVICES:
        raise InvalidInputError(
            f"{len(services)} service channels, but a boot takes at most {MAX_SERVICES}"
        )
    taken = {mediation.guest_port: "the mediation channel"} if mediation else {}
    for service in services:
        other = taken.get(service.guest_port)
        if other:
            raise InvalidInputError(
                f"service channel {service.name!r}: guest port {service.guest_port} is "
                f"taken by {other}",
                hint="give every service channel a guest port of its own",
            )
        taken[service.guest_port] = f"service channel {service.name!r}"


@dataclass(frozen=True)
class BootConfig:
    """Everything a backend needs to boot one VM."""

    kernel: Path
    initrd: Path
    disks: tuple[Disk, ...]
    state_dir: Path
    memory_mib: int = 1024
    cpus: int = 0  # 0: the backend chooses
    network: NetworkConfig = NetworkConfig()
    machine: MachineType = MachineType.MICROVM
    accel: Accel = Accel.AUTO
    timeout: float | None = None
    cmdline_extra: tuple[str, ...] = ()
    name: str = "microagent"
    # The VMM is killed when the process that booted it dies (one-shot runs: no orphan VMs).
    die_with_parent: bool = False
    mediation: Mediation | None = None
    services: tuple[ServiceChannel, ...] = ()

    def __post_init__(self) -> None:
        check_services(self.services, self.mediation)

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def agent_socket(self) -> Path:
        """The guest agent's port (``microagent.agent``), a unix socket the VMM serves."""
        return self.state_dir / "agent.sock"

    @property
    def serial_log(self) -> Path:
        return self.state_dir / "serial.log"

    @property
    def vmm_log(self) -> Path:
        return self.state_dir / "vmm.log"


@dataclass(frozen=True)
class GuestResult:
    """What the guest reported when its command ended (or why it did not run)."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    stopped: bool = False
    outputs: Mapping[str, Any] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_event(cls, event: Mapping[str, Any], timings: Mapping[str, float]) -> GuestResult:
        """Build from the guest's ``exited`` event plus the host's ``timings`` (the event's
        ``marks`` are added as ``guest.*``). The event comes from the guest: a field of the
        wrong type is a VMError naming every such field, never a crash."""
        ex = _ExitedEvent(event)
        result = cls(
            exit_code=ex.exit_code(),
            stdout=ex.text("stdout"),
            stderr=ex.text("stderr"),
            stdout_truncated=ex.flag("stdout_truncated"),
            stderr_truncated=ex.flag("stderr_truncated"),
            started_at=ex.optional_text("started_at"),
            finished_at=ex.optional_text("finished_at"),
            error=ex.optional_text("error"),
            stopped=ex.flag("stopped"),
            outputs=ex.outputs(),
            timings={**timings, **ex.marks()},
        )
        ex.check()
        return result

    def to_json(self) -> dict[str, Any]:
        return {
            "exitCode": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "stdoutTruncated": self.stdout_truncated,
            "stderrTruncated": self.stderr_truncated,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "error": self.error,
            "stopped": self.stopped,
            "outputs": dict(self.outputs),
            "timings": dict(self.timings),
        }


EXIT_CODE_MAX = 255  # a shell's exit status
MAX_MARKS = 64  # boot-phase marks an exited event may carry (the init sets about ten)
MAX_OUTPUTS = 64  # declared outputs an exited event may carry


class _ExitedEvent:
    """Reads the fields of an ``exited`` event, noting each one of the wrong type (the
    field's default is used meanwhile); :meth:`check` raises them all at once."""

    def __init__(self, event: Mapping[str, Any]) -> None:
        self.event = event
        self.problems: list[str] = []

    def _bad(self, where: str, want: str, value: Any) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        self.problems.append(f"{where}: expected {want}, got {type(value).__name__} {shown}")

    def exit_code(self) -> int:
        if "exit_code" not in self.event:
            self.problems.append("exit_code: missing")
            return 127
        value = self.event["exit_code"]
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or not 0 <= value <= EXIT_CODE_MAX:
            self._bad("exit_code", f"an integer from 0 to {EXIT_CODE_MAX}", value)
            return 127
        return int(value)

    def text(self, name: str) -> str:
        value = self.event.get(name, "")
        if isinstance(value, str):
            return value
        self._bad(name, "a string", value)
        return ""

    def optional_text(self, name: str) -> str | None:
        value = self.event.get(name)
        return None if value is None else self.text(name) or None

    def flag(self, name: str) -> bool:
        value = self.event.get(name, False)
        if isinstance(value, bool):
            return value
        self._bad(name, "true or false", value)
        return False

    def outputs(self) -> dict[str, Any]:
        """``name -> null | {"path": str, "content": str, "truncated": bool}``."""
        value = self.event.get("outputs")
        value = {} if value is None else value
        if not isinstance(value, Mapping) or len(value) > MAX_OUTPUTS:
            self._bad("outputs", f"an object of at most {MAX_OUTPUTS} outputs", value)
            return {}
        out: dict[str, Any] = {}
        for name, entry in value.items():
            if entry is not None and not _output_entry_ok(entry):
                self._bad(f"outputs.{name}", "null or {path, content, truncated}", entry)
                continue
            out[name] = entry
        return out

    def marks(self) -> dict[str, float]:
        value = self.event.get("marks")
        value = {} if value is None else value
        if not isinstance(value, Mapping) or len(value) > MAX_MARKS:
            self._bad("marks", f"an object of at most {MAX_MARKS} numbers", value)
            return {}
        out: dict[str, float] = {}
        for name, mark in value.items():
            if isinstance(mark, int | float) and not isinstance(mark, bool):
                out[f"guest.{name}"] = float(mark)
            else:
                self._bad(f"marks.{name}", "a number", mark)
        return out

    def check(self) -> None:
        if self.problems:
            raise VMError(
                "the guest's exited event is malformed: " + "; ".join(self.problems),
                hint="the guest init and this host disagree on the event format, or a process "
                "in the guest wrote to the control port; the serial log may tell more",
            )


def _output_entry_ok(entry: Any) -> bool:
    if not isinstance(entry, Mapping):
        return False
    kinds = {"path": str, "content": str, "truncated": bool}
    return all(k not in entry or isinstance(entry[k], t) for k, t in kinds.items())


class BootStalled(VMError):
    """The guest never said it booted: the kernel or the init stopped before the guest's
    first event. Nothing of the guest's command ran, so booting again is safe; callers try
    once more (:data:`BOOT_ATTEMPTS`). ``diagnosis`` names the file holding the vCPUs'
    state at the stall, when the VMM could give it."""

    def __init__(self, message: str, *, hint: str = "", diagnosis: Path | None = None) -> None:
        super().__init__(message, hint=hint)
        self.diagnosis = diagnosis


BOOT_ATTEMPTS = 2  # boots tried when the guest stalls before its first event


class GuestTimeout(VMError):
    """The guest command did not finish in time; the VM was stopped.

    ``result`` holds what the guest reported while stopping, if anything.
    """

    kind = "timeout"

    def __init__(self, message: str, *, hint: str = "", result: GuestResult | None = None) -> None:
        super().__init__(message, hint=hint)
        self.result = result


OutputSink = Callable[[bytes], None]
# called by a restore between loading the saved state and running the guest
BeforeRun = Callable[[], None]


@runtime_checkable
class Machine(Protocol):
    """A booted VM. Leaving the ``with`` block stops it (escalating) and cleans up."""

    config: BootConfig

    def __enter__(self) -> Machine: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def wait(
        self, timeout: float | None = None, on_output: OutputSink | None = None
    ) -> GuestResult:
        """Block until the guest reports its command's end; VMError on timeout or crash."""
        ...

    def events(self) -> Sequence[Mapping[str, Any]]:
        """Control-channel events received so far (booted, started, exited)."""
        ...

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop the VM: control-channel request, then SIGTERM, then SIGKILL."""
        ...

    def argv(self) -> Sequence[str]:
        """The VMM command line (empty for a backend without one)."""
        ...

    @property
    def pid(self) -> int | None:
        """The VMM's process id (None for a backend that runs no process), so its owner can
        record it and the lifecycle can make sure no VMM outlives its supervisor."""
        ...


def check_boot_files(config: BootConfig) -> None:
    """Clear errors for a missing kernel, initrd or disk before anything starts."""
    for what, path in (("kernel", config.kernel), ("initrd", config.initrd)):
        if not path.is_file():
            raise InvalidInputError(f"{what} {path} does not exist or is not a file")
    for index, disk in enumerate(config.disks):
        if not disk.path.is_file():
            raise InvalidInputError(f"disk {index} ({disk.path}) does not exist")


class Backend(Protocol):
    """A way to boot VMs."""

    name: str

    def available(self) -> Availability: ...

    def boot(self, config: BootConfig) -> Machine: ...

    def command(self, config: BootConfig) -> Sequence[str]:
        """The VMM argv for ``config`` without starting anything (``--print-command``)."""
        ...
