"""The per-boot config disk: a plain tar archive the guest init reads from /dev/vdc.

Layout (in this order): ``run.json`` (the contract, version 1), ``run.sh`` (the same values as
pre-quoted shell assignments, because busybox has no JSON parser), ``ca/extra-ca.crt`` when
extra CA certificates are injected, then ``files/<guest path without leading slash>`` for each
declared file. The archive is padded with zeros to a multiple of 512 bytes and at least 1 MiB.
Nothing on this disk is written into the rootfs; certificates live only here and in the guest's
tmpfs ``/run``.
"""

from __future__ import annotations

import enum
import io
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.compiler.spec import clean_guest_path
from microagent.errors import InvalidInputError

if TYPE_CHECKING:
    import tarfile

CONFIG_VERSION = 1
MIN_DISK_BYTES = 1 << 20
EXTRA_CA_MEMBER = "ca/extra-ca.crt"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DEVICE = re.compile(r"vd[d-z]")


class NetworkMode(enum.Enum):
    """``user``: outbound NAT (host unreachable except forwards); ``isolated``: no NIC."""

    USER = "user"
    ISOLATED = "isolated"

    @classmethod
    def parse(cls, value: str | NetworkMode) -> NetworkMode:
        if isinstance(value, NetworkMode):
            return value
        try:
            return cls(value)
        except ValueError:
            raise InvalidInputError(
                f"unknown network mode {value!r}", hint="use 'user' or 'isolated'"
            ) from None


@dataclass(frozen=True)
class GuestNetwork:
    """How the guest configures eth0 (QEMU slirp defaults)."""

    mode: NetworkMode = NetworkMode.ISOLATED
    address: str = "10.0.2.15/24"
    gateway: str = "10.0.2.2"
    dns: str = "10.0.2.3"

    def to_json(self) -> dict[str, str]:
        return {
            "mode": self.mode.value,
            "address": self.address,
            "gateway": self.gateway,
            "dns": self.dns,
        }


@dataclass(frozen=True)
class Output:
    """A declared output: a name and the guest path the command writes it to."""

    name: str
    path: str


@dataclass(frozen=True)
class ExtraMount:
    """An extra disk (/dev/vdd...) mounted at ``path`` in the guest."""

    device: str
    path: str
    fstype: str = "ext4"
    readonly: bool = False

    @property
    def options(self) -> str:
        """Mount options: a read-only disk is also read-only to the VMM, so ext4 must not
        replay its journal (``noload``)."""
        return "ro,noload" if self.readonly else "rw"

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "path": self.path,
            "fstype": self.fstype,
            "readonly": self.readonly,
        }


@dataclass(frozen=True)
class GuestFile:
    """A file to materialise at an absolute guest path (parents created, existing replaced)."""

    path: str
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class RunConfig:
    """run.json, version 1: what the guest runs and how."""

    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/"
    hostname: str = "microagent"
    network: GuestNetwork = GuestNetwork()
    outputs: tuple[Output, ...] = ()
    mounts: tuple[ExtraMount, ...] = ()
    mode: str = "run"
    mediation_port: int | None = None  # the guest agent listens on 127.0.0.1:PORT
    service_ports: tuple[int, ...] = ()  # ... and on these (service channels, --listen)
    layers: tuple[str, ...] = ()  # read-only layer disks over /dev/vda, bottom first

    def to_json(self, extra_ca: bool = False) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "mode": self.mode,
            "command": list(self.command),
            "env": dict(self.env),
            "workdir": self.workdir,
            "hostname": self.hostname,
            "network": self.network.to_json(),
            "outputs": [{"name": o.name, "path": o.path} for o in self.outputs],
            "extraCaBundle": EXTRA_CA_MEMBER if extra_ca else None,
            "mounts": [m.to_json() for m in self.mounts],
            "mediationPort": self.mediation_port,
            "servicePorts": list(self.service_ports),
            "layers": list(self.layers),
        }


def _absolute(path: str, what: str) -> str:
    norm = clean_guest_path(path)
    if not path.startswith("/") or "\0" in path or "\n" in path:
        raise InvalidInputError(f"{what} {path!r} must be an absolute guest path")
    return norm


def validate(config: RunConfig, files: Sequence[GuestFile] = ()) -> None:
    """Reject what the guest init cannot carry out safely (with the offending value)."""
    if not config.command or not config.command[0]:
        raise InvalidInputError("no command to run", hint="give the command after `--`")
    bad_env = sorted(k for k in config.env if not _ENV_NAME.fullmatch(k))
    if bad_env:
        raise InvalidInputError(f"invalid environment variable name(s): {', '.join(bad_env)}")
    if not _HOSTNAME.fullmatch(config.hostname):
        raise InvalidInputError(f"invalid hostname {config.hostname!r}")
    _absolute(config.workdir, "workdir")
    for out in config.outputs:
        _absolute(out.path, f"output {out.name!r} path")
    for mount in config.mounts:
        _absolute(mount.path, "mount path")
        if not _DEVICE.fullmatch(mount.device):
            raise InvalidInputError(f"extra disk device {mount.device!r} must be vdd..vdz")
    _check_layers(config)
    for item in files:
        if _absolute(item.path, "file destination") == "/":
            raise InvalidInputError("a file cannot be placed at /")


def _check_layers(config: RunConfig) -> None:
    """Layer devices are vdd..vdz, each used once, none also an extra disk's."""
    for device in config.layers:
        if not _DEVICE.fullmatch(device):
            raise InvalidInputError(f"layer device {device!r} must be vdd..vdz")
    taken = [m.device for m in config.mounts]
    for device in config.layers:
        if device in taken:
            raise InvalidInputError(f"device {device!r} is given twice (layers, extra disks)")
        taken.append(device)


def _words(values: Sequence[str]) -> str:
    return " ".join(shlex.quote(v) for v in values)


def render_run_sh(config: RunConfig, extra_ca: bool = False) -> str:
    """run.sh: shell assignments the init sources (every value single-quoted)."""
    net = config.network
    mounts: list[str] = []
    for m in config.mounts:
        mounts += [m.device, m.path, m.options, m.fstype]
    assignments = {
        "MA_ARGV": _words(config.command),
        "MA_ENV": _words([f"{k}={v}" for k, v in config.env.items()]),
        "MA_WORKDIR": shlex.quote(config.workdir),
        "MA_HOSTNAME": config.hostname,
        "MA_NET_MODE": net.mode.value,
        "MA_NET_ADDRESS": net.address,
        "MA_NET_GATEWAY": net.gateway,
        "MA_NET_DNS": net.dns,
        "MA_OUTPUTS": _words([v for o in config.outputs for v in (o.name, o.path)]),
        "MA_MOUNTS": _words(mounts),
        "MA_LAYERS": _words(config.layers),
        "MA_CA": EXTRA_CA_MEMBER if extra_ca else "",
        "MA_MEDIATION_PORT": str(config.mediation_port or ""),
        "MA_SERVICE_PORTS": " ".join(str(port) for port in config.service_ports),
    }
    lines = ["# generated by microagent; sourced by the guest init"]
    lines += [f"{k}={shlex.quote(v)}" for k, v in assignments.items()]
    return "\n".join(lines) + "\n"


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    import tarfile  # deferred: see build_archive

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def build_archive(
    config: RunConfig, files: Sequence[GuestFile] = (), extra_ca: bytes | None = None
) -> bytes:
    """The config disk contents (validated, padded)."""
    import tarfile  # deferred: only a boot writes the disk; `cp` and `create` load this module

    validate(config, files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        run_json = json.dumps(config.to_json(extra_ca is not None), indent=2, sort_keys=True)
        _add(tar, "run.json", run_json.encode() + b"\n")
        _add(tar, "run.sh", render_run_sh(config, extra_ca is not None).encode())
        if extra_ca is not None:
            _add(tar, EXTRA_CA_MEMBER, extra_ca)
        for item in files:
            guest = _absolute(item.path, "file destination")
            _add(tar, "files" + guest, item.data, item.mode & 0o7777)
    data = buf.getvalue()
    size = max(MIN_DISK_BYTES, -(-len(data) // 512) * 512)
    return data + b"\0" * (size - len(data))


def write_config_disk(
    path: Path,
    config: RunConfig,
    files: Sequence[GuestFile] = (),
    extra_ca: bytes | None = None,
) -> Path:
    """Write the config disk image to ``path`` and return it.

    The zero padding is left as a hole (sparse file): nothing to write back while the VM boots.
    """
    data = build_archive(config, files, extra_ca)
    used = len(data.rstrip(b"\0"))
    used += -used % 512
    with path.open("wb") as fh:
        fh.write(data[:used])
        fh.truncate(len(data))
    return path
