"""One-shot runs: ``microagent run IMAGE -- CMD`` (or ``--rootfs FILE``) in a fresh microVM.

The image's root filesystem (pulled or reused like a spec's base) is attached read-only, a
throwaway state disk takes the writes, and the VM is gone when the command ends.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from microagent.compiler.files import has_ext_superblock
from microagent.compiler.overrides import check_flag, check_seconds
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
    cpus: int | None = None  # None: the backend chooses (1 under TCG, 2 under KVM)
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
        if self.network.mode is NetworkMode.ISOLATED:
            for flag, given in (
                ("--publish", self.network.published),
                ("--host-forward", self.network.forwards),
            ):
                if given:
                    raise InvalidInputError(
                        f"{flag} needs --network user: an isolated VM has no network",
                        hint=f"drop {flag} or use --network user",
                    )
        check_flag("--memory", "resources.memoryMiB", self.memory_mib)  # a spec's limits
        if self.cpus is not None:
            check_flag("--cpus", "resources.cpuCount", self.cpus)
        if self.timeout is not None:
            check_seconds("--timeout", self.timeout)
        if self.rootfs is not None:
            check_rootfs(self.rootfs)


def check_rootfs(path: Path) -> None:
    """``--rootfs FILE`` must be a readable regular file holding an ext2/3/4 file system
    (its superblock magic), checked before anything is pulled or booted."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(
                f"--rootfs {path}: not a regular file", hint="give an ext4 image file"
            )
        is_ext = has_ext_superblock(path)
    except FileNotFoundError:
        raise InvalidInputError(
            f"--rootfs {path}: no such file", hint="give the path of an ext4 image file"
        ) from None
    except OSError as exc:
        raise InvalidInputError(f"--rootfs {path}: cannot read it: {exc.strerror or exc}") from None
    if not is_ext:
        raise InvalidInputError(
            f"--rootfs {path}: not an ext4 file system image (no ext2/3/4 superblock)",
            hint="make one with `mke2fs -t ext4 -d DIR IMAGE 1G`, or run an image: "
            "microagent run IMAGE -- CMD",
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
        cpus=job.cpus or 0,
        workdir=job.workdir,
        extra_ca=job.extra_ca if job.extra_ca is not None else settings.extra_ca_bundle(),
        machine=job.machine,
        accel=job.accel or Accel.parse(settings.accel),
        die_with_parent=True,
    )
