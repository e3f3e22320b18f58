"""The workspace spec as typed, immutable values.

Only this module (through :mod:`._loader`) ever sees YAML dictionaries; everything after it works
with these frozen dataclasses. Field names are the schema's keys in snake_case; a test keeps the
two in step.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType

from microagent.compiler.credentials import Credential
from microagent.errors import InvalidInputError, Location
from microagent.frozen import Frozen

DEFAULT_IMAGE = "python:3.13-slim"
DEFAULT_SHELL = "/bin/sh"
RESERVED_NAMES = frozenset(
    {
        "build",
        "host-workers",
        "images",
        "kernels",
        "models",
        "oci",
        "runners",
        "volumes",
        "workspaces",
        "cache",
        "blobs",
        "keys",
        "locks",
        "rootfs",
        "tmp",
    }
)
RESERVED_DISK_NAMES = frozenset({"rootfs", "state", "config"})
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # fullmatch, never match/search


@dataclass(frozen=True, eq=False, repr=False)
class ProfileSize(Frozen):
    """The resources a profile stands for."""

    memory_mib: int
    cpu_count: int
    size_mib: int


class Profile(Enum):
    """Resource presets; explicit ``resources`` values win over them."""

    TINY = "tiny"
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"

    @property
    def size(self) -> ProfileSize:
        return _PROFILE_SIZES[self]


_PROFILE_SIZES: Mapping[Profile, ProfileSize] = {
    Profile.TINY: ProfileSize(256, 1, 512),
    Profile.SMALL: ProfileSize(512, 2, 2048),
    Profile.MEDIUM: ProfileSize(2048, 2, 8192),
    Profile.LARGE: ProfileSize(4096, 4, 16384),
}


class RestartPolicy(Enum):
    NEVER = "never"  # also spelled `no`
    ON_FAILURE = "on-failure"
    ALWAYS = "always"

    def restarts_after(self, *, failed: bool) -> bool:
        """Whether a run that ended this way (``failed``: non-zero exit or no boot) is
        followed by another boot."""
        return self is RestartPolicy.ALWAYS or (failed and self is RestartPolicy.ON_FAILURE)


DEFAULT_MAX_RESTARTS = 5  # plain `on-failure`
_ON_FAILURE_COUNT = re.compile(r"[1-9][0-9]{0,2}")  # the schema's bound: 1 to 999


@dataclass(frozen=True, eq=False, repr=False)
class Restart(Frozen):
    """``restart``: what the supervisor does when the entrypoint exits and no halt was asked
    for. ``max_restarts`` bounds the restarts of one ``start`` (None: no bound)."""

    policy: RestartPolicy = RestartPolicy.NEVER
    max_restarts: int | None = None

    @classmethod
    def parse(cls, value: object) -> Restart:
        """``no``/``never`` (or ``false``: YAML's reading of an unquoted ``no``), ``always``,
        ``on-failure`` (at most :data:`DEFAULT_MAX_RESTARTS`) or ``on-failure:N``.
        ValueError for anything else."""
        if value is False or value in ("no", "never"):
            return cls()
        if value == "always":
            return cls(RestartPolicy.ALWAYS)
        word, sep, count = str(value).partition(":")
        if word == "on-failure" and not sep:
            return cls(RestartPolicy.ON_FAILURE, DEFAULT_MAX_RESTARTS)
        if word == "on-failure" and _ON_FAILURE_COUNT.fullmatch(count):
            return cls(RestartPolicy.ON_FAILURE, int(count))
        raise ValueError(f"invalid restart policy {value!r}")

    @property
    def text(self) -> str:
        """The canonical spelling: ``never``, ``always`` or ``on-failure:N``."""
        if self.policy is RestartPolicy.ON_FAILURE:
            return f"on-failure:{self.max_restarts}"
        return str(self.policy.value)

    def allows(self, *, failed: bool, restarts: int) -> bool:
        """Whether a run that ended this way, after ``restarts`` restarts, boots again."""
        if not self.policy.restarts_after(failed=failed):
            return False
        return self.max_restarts is None or restarts < self.max_restarts


class NetworkMode(Enum):
    """``user``: outbound NAT, host unreachable except forwards. ``isolated``: no NIC."""

    USER = "user"
    ISOLATED = "isolated"

    @property
    def has_nic(self) -> bool:
        return self is NetworkMode.USER


class DiskMode(Enum):
    RO = "ro"
    RW = "rw"


@dataclass(frozen=True, eq=False, repr=False)
class SetupStep(Frozen):
    """One setup command. ``origin`` says where it came from, for messages."""

    run: str
    origin: str
    file: Path | None = None


@dataclass(frozen=True, eq=False, repr=False)
class FileEntry(Frozen):
    """A host file or folder delivered to ``dst`` in the guest on every boot."""

    src: Path
    dst: str
    mode: int | None = None


@dataclass(frozen=True, eq=False, repr=False)
class Resources(Frozen):
    """Explicitly requested resources; ``None`` means "from the profile"."""

    memory_mib: int | None = None
    cpu_count: int | None = None
    size_mib: int | None = None
    headroom_mib: int | None = None


@dataclass(frozen=True, eq=False, repr=False)
class EffectiveResources(Frozen):
    """Resources after applying the profile."""

    memory_mib: int
    cpu_count: int
    size_mib: int
    headroom_mib: int | None

    def to_json(self) -> dict[str, int | None]:
        return {
            "memoryMiB": self.memory_mib,
            "cpuCount": self.cpu_count,
            "sizeMiB": self.size_mib,
            "headroomMiB": self.headroom_mib,
        }


ANY_ADDRESS = "0.0.0.0"


@dataclass(frozen=True, eq=False, repr=False)
class Forward(Frozen):
    """A host TCP port published into the guest."""

    host_port: int
    guest_port: int
    host: str = "127.0.0.1"
    protocol: str = "tcp"

    @property
    def bind(self) -> str:
        return f"{self.host}:{self.host_port}"

    def conflicts_with(self, other: Forward) -> bool:
        """Both would listen on one host port (0.0.0.0 takes it on every address)."""
        same_host = self.host == other.host or ANY_ADDRESS in (self.host, other.host)
        return self.host_port == other.host_port and same_host


def clean_guest_path(raw: str) -> str:
    """``raw`` normalised the way the guest's kernel reads it: ``.`` and repeated slashes
    go, and so does the second of two leading slashes, which ``posixpath.normpath`` keeps
    (POSIX leaves ``//`` implementation-defined; to Linux ``//etc`` is ``/etc`` and ``//`` is
    ``/``). ``..`` is left alone: callers refuse it rather than resolve it."""
    clean = posixpath.normpath(raw)
    return "/" + clean.lstrip("/") if clean.startswith("//") else clean


def publish_host_problem(host: str) -> str:
    """What the schema's pattern cannot say about a published port's IPv4 address."""
    address = ipaddress.IPv4Address(host)
    if address.is_multicast or address.is_reserved:
        return f"{host} is not an address a listener can bind"
    return ""


@dataclass(frozen=True, eq=False, repr=False)
class Network(Frozen):
    """``allow`` (host names, ``.suffix`` for a domain's hosts) makes egress default-deny:
    only those names, through the host's egress proxy."""

    mode: NetworkMode = NetworkMode.USER
    forwards: tuple[Forward, ...] = ()
    allow: tuple[str, ...] = ()


MAX_ALLOW = 64
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")  # a last label like this reads as an address
_HOST_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")  # fullmatch (DNS: `_` too)


def check_allow_entry(entry: str) -> str:
    """A ``network.allow`` entry, lowercased: an exact host name (``pypi.org``) or, with a
    leading dot, every name under a domain (``.pythonhosted.org``). Names only: the egress
    proxy resolves them on the host and checks where they lead, so an IP literal, a port, a
    scheme or a wildcard is refused. (The broker checks entries again at run time.)"""
    shown = entry[:80]
    if not entry.isascii() or not entry.isprintable():
        raise InvalidInputError(
            f"allow entry {shown!r} is not an ASCII host name", hint="write IDNs as xn--..."
        )
    text = entry.lower().removesuffix(".")  # one trailing dot: the root, as DNS writes it
    body = text.removeprefix(".")
    if "*" in text:
        raise InvalidInputError(
            f"allow entry {shown!r}: no wildcards",
            hint="a leading dot allows every name under a domain: .example.com",
        )
    if "/" in body or ":" in body:
        try:
            ipaddress.ip_address(body.strip("[]"))
        except ValueError:
            raise InvalidInputError(
                f"allow entry {shown!r} is not a host name",
                hint="only the name, without scheme, port or path: pypi.org",
            ) from None
    labels = body.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]) or ":" in body:
        raise InvalidInputError(
            f"allow entry {shown!r} is an IP address; egress is allowed by name",
            hint="name the host; the proxy resolves it and refuses private addresses",
        )
    if not body or len(body) > 253 or not all(_HOST_LABEL.fullmatch(part) for part in labels):
        raise InvalidInputError(
            f"allow entry {shown!r} is not a host name",
            hint="labels of letters, digits, `-` and `_`, separated by dots: pypi.org or "
            ".pythonhosted.org",
        )
    return text


@dataclass(frozen=True, eq=False, repr=False)
class Mediation(Frozen):
    """The mediation channel: guest ``127.0.0.1:port`` carried to the host's ``target``."""

    port: int
    target_host: str
    target_port: int
    required: bool = False

    @property
    def target(self) -> str:
        host = f"[{self.target_host}]" if ":" in self.target_host else self.target_host
        return f"{host}:{self.target_port}"

    @property
    def guest_address(self) -> str:
        return f"127.0.0.1:{self.port}"


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` with an IP address (IPv6 in brackets) or ``localhost`` as HOST.

    Only literal addresses: a name would be resolved on the host at every connect, and a spec
    from a cloned repository should say plainly which host service the guest may reach."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535:
        raise InvalidInputError(
            f"mediation target {text!r} is not HOST:PORT", hint="e.g. 127.0.0.1:9900"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise InvalidInputError(f"mediation target {text!r}: brackets are for IPv6 only")
    elif ":" in host:
        raise InvalidInputError(
            f"mediation target {text!r}: write an IPv6 address in brackets", hint="[::1]:9900"
        )
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise InvalidInputError(
                f"mediation target {text!r}: the host must be an IP address or localhost",
                hint="e.g. 127.0.0.1:9900",
            ) from None
    return host, int(port)


@dataclass(frozen=True, eq=False, repr=False)
class Health(Frozen):
    """A probe run through the guest agent; exit code 0 is healthy."""

    exec: tuple[str, ...]
    interval_seconds: int = 30
    timeout_seconds: int = 5
    retries: int = 3
    start_period_seconds: int = 0


@dataclass(frozen=True, eq=False, repr=False)
class Output(Frozen):
    name: str
    path: str


@dataclass(frozen=True, eq=False, repr=False)
class Disk(Frozen):
    """An extra disk: an ext4 image (``disks``) or a tar archive made into one (``bundles``)."""

    name: str
    path: Path
    mountpoint: str
    mode: DiskMode = DiskMode.RO
    origin: str = ""  # the spec field, e.g. ``disks[0]``, for messages
    location: Location | None = None  # where ``path`` is written in the spec


def _frozen_env() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, eq=False, repr=False)
class Spec(Frozen):
    """A validated ``microagent.yaml``."""

    source: Path = field(metadata={"schema": False})
    name: str | None = None
    image: str = DEFAULT_IMAGE
    profile: Profile = Profile.SMALL
    restart: Restart = Restart()
    entrypoint: str | tuple[str, ...] | None = None
    workdir: str | None = None
    shell: str = DEFAULT_SHELL
    hostname: str | None = None
    setup: tuple[SetupStep, ...] = ()
    setup_files: tuple[SetupStep, ...] = ()
    files: tuple[FileEntry, ...] = ()
    env: Mapping[str, str] = field(default_factory=_frozen_env)
    resources: Resources = Resources()
    network: Network = Network()
    mediation: Mediation | None = None
    credentials: tuple[Credential, ...] = ()
    health: Health | None = None
    warm: bool = False  # start workspaces from a warm template (create --warm)
    outputs: tuple[Output, ...] = ()
    disks: tuple[Disk, ...] = ()
    bundles: tuple[Disk, ...] = ()

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in the spec resolve against."""
        return self.source.parent

    @property
    def setup_steps(self) -> tuple[SetupStep, ...]:
        """Every setup command in order: ``setup`` then ``setupFiles``."""
        return self.setup + self.setup_files

    def command(self) -> tuple[str, ...] | None:
        """The entrypoint as an argv: a string runs through ``<shell> -lc``."""
        if self.entrypoint is None:
            return None
        if isinstance(self.entrypoint, str):
            return (self.shell, "-lc", self.entrypoint)
        return self.entrypoint

    def effective_resources(self) -> EffectiveResources:
        preset = self.profile.size
        res = self.resources
        return EffectiveResources(
            memory_mib=res.memory_mib or preset.memory_mib,
            cpu_count=res.cpu_count or preset.cpu_count,
            size_mib=res.size_mib or preset.size_mib,
            headroom_mib=res.headroom_mib,
        )

    def effective_hostname(self) -> str:
        return self.hostname or default_hostname(self.name or "")


def default_hostname(name: str) -> str:
    """Lowercase, non-alphanumerics to ``-``, at most 63 characters, never empty."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return cleaned or "microagent"
