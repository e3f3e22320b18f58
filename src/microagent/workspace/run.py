"""One-shot runs: ``microagent run IMAGE -- CMD`` (or ``--rootfs FILE``) in a fresh microVM.

The image's root filesystem (pulled or reused like a spec's base) is attached read-only, a
throwaway state disk takes the writes, and the VM is gone when the command ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from microagent.errors import InvalidInputError
from microagent.runtime.backend import Accel, MachineType, NetworkConfig
from microagent.runtime.boot import RunRequest
from microagent.runtime.configdisk import NetworkMode
from microagent.settings import Settings


@dataclass(frozen=True)
class OneShot:
    """What ``run`` was asked for; unset values come from the settings."""

    command: tuple[str, ...]
    image: str | None = None
    rootfs: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(NetworkMode.USER))
    timeout: float | None = None
    memory_mib: int = 1024
    cpus: int = 0
    workdir: str = "/"
    extra_ca: bytes | None = None  # None: the settings' extra CA bundle
    machine: MachineType = MachineType.MICROVM
    accel: Accel | None = None  # None: the settings' accelerator
    kernel: Path | None = None
    initrd: Path | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.rootfs is None) or not self.command:
            raise InvalidInputError(
                "give an image and a command, or --rootfs FILE and a command",
                hint="e.g. microagent run python:3.13-slim -- python3 -c 'print(6*7)'",
            )
        if self.network.published and self.network.mode is NetworkMode.ISOLATED:
            raise InvalidInputError(
                "--publish needs --network user: an isolated VM has no network",
                hint="drop --publish or use --network user",
            )


def one_shot_request(job: OneShot, rootfs: Path, settings: Settings) -> RunRequest:
    """The boot of a one-shot run: a throwaway state disk, the VMM dies with this process."""
    return RunRequest(
        rootfs=rootfs,
        command=job.command,
        env=dict(job.env),
        network=job.network,
        timeout=job.timeout,
        memory_mib=job.memory_mib,
        cpus=job.cpus,
        workdir=job.workdir,
        extra_ca=job.extra_ca if job.extra_ca is not None else settings.extra_ca_bundle(),
        machine=job.machine,
        accel=job.accel or Accel.parse(settings.accel),
        die_with_parent=True,
    )
