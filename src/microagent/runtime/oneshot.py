"""Run one command in a fresh microVM: ``microagent run --rootfs IMAGE.ext4 -- CMD``.

All the runtime needs is a rootfs path: the shared image is attached read-only (overlay
lower), a new sparse state disk in a temp dir takes the writes, and a config disk carries the
command, env, files and certificates. The temp dir is removed afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from microagent import runner
from microagent.errors import InvalidInputError
from microagent.kit.guestkit import GuestKit
from microagent.runtime.backend import (
    Accel,
    Backend,
    BootConfig,
    Disk,
    GuestResult,
    MachineType,
    NetworkConfig,
    OutputSink,
)
from microagent.runtime.configdisk import (
    GuestFile,
    GuestNetwork,
    Output,
    RunConfig,
    write_config_disk,
)

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_STATE_MIB = 4096


@dataclass(frozen=True)
class RunRequest:
    """One command to run in a throwaway VM."""

    rootfs: Path
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    timeout: float | None = None
    memory_mib: int = 1024
    cpus: int = 0  # 0: the backend chooses (1 under TCG)
    files: tuple[GuestFile, ...] = ()
    outputs: tuple[Output, ...] = ()
    hostname: str = "microagent"
    workdir: str = "/"
    extra_ca: bytes | None = None
    state_size_mib: int = DEFAULT_STATE_MIB
    machine: MachineType = MachineType.MICROVM
    accel: Accel = Accel.AUTO

    def run_config(self) -> RunConfig:
        return RunConfig(
            command=self.command,
            env=dict(self.env),
            workdir=self.workdir,
            hostname=self.hostname,
            network=GuestNetwork(mode=self.network.mode),
            outputs=self.outputs,
        )


def make_state_disk(path: Path, size_mib: int) -> Path:
    """A sparse, empty ext4 file system for the overlay upper. It is thrown away after the
    run, so it has no journal (faster to mount, nothing to replay, nothing written up front)."""
    with path.open("wb") as fh:
        fh.truncate(size_mib << 20)
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "state", str(path)]
    runner.run(argv, timeout=60)
    return path


def host_ca_bundle(path: Path = HOST_CA_BUNDLE) -> bytes:
    """The host's CA bundle (for guests behind the same TLS-intercepting proxy)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read CA bundle {path}: {exc.strerror}") from exc


def prepare(request: RunRequest, kit: GuestKit, state_dir: Path) -> BootConfig:
    """Write the state and config disks into ``state_dir`` and describe the boot."""
    rootfs = request.rootfs.resolve()
    if not rootfs.is_file():
        raise InvalidInputError(
            f"rootfs {request.rootfs} does not exist", hint="pass an ext4 image file"
        )
    state = make_state_disk(state_dir / "state.ext4", request.state_size_mib)
    config_disk = write_config_disk(
        state_dir / "config.tar", request.run_config(), request.files, request.extra_ca
    )
    return BootConfig(
        kernel=kit.kernel,
        initrd=kit.initrd,
        disks=(
            Disk(rootfs, readonly=True, serial="rootfs"),
            Disk(state, serial="state"),
            Disk(config_disk, readonly=True, serial="config"),
        ),
        state_dir=state_dir,
        memory_mib=request.memory_mib,
        cpus=request.cpus,
        network=request.network,
        machine=request.machine,
        accel=request.accel,
        timeout=request.timeout,
        die_with_parent=True,
    )


def _temp_dir() -> tempfile.TemporaryDirectory[str]:
    # Short paths: unix socket paths are limited to ~107 bytes.
    base = os.environ.get("TMPDIR") or "/tmp"
    return tempfile.TemporaryDirectory(prefix="microagent-run-", dir=base)


def run_once(
    request: RunRequest,
    *,
    backend: Backend,
    kit: GuestKit,
    on_output: OutputSink | None = None,
) -> GuestResult:
    """Boot, run the command, power off; the guest's result (VMError on failure)."""
    began = time.monotonic()
    with _temp_dir() as tmp:
        config = prepare(request, kit, Path(tmp))
        with backend.boot(config) as machine:
            prepared = time.monotonic() - began
            result = machine.wait(on_output=on_output)
    timings = {"host.prepare": round(prepared, 3), **result.timings}
    return dataclasses.replace(result, timings=timings)


def print_command(request: RunRequest, *, backend: Backend, kit: GuestKit) -> list[str]:
    """The VMM argv the run would use (disks are prepared in a temp dir, then removed)."""
    with _temp_dir() as tmp:
        return list(backend.command(prepare(request, kit, Path(tmp))))
