"""One-shot runs: ``microagent run IMAGE -- CMD`` (or ``--rootfs FILE``) in a fresh microVM.

The image's root filesystem (pulled or reused like a spec's base) is attached read-only, a
throwaway state disk takes the writes, and the VM is gone when the command ends. With
``--rootfs FILE``, ``--layer LAYER`` (repeatable, bottom first) stacks read-only ext4 layer
images over it as overlay lowers.

With ``--credential``, the run gets what a workspace's start gets (docs/broker.md): each key is
read on the host before anything is pulled, a credential gateway (started here, as a
workspace's supervisor starts it) holds the values, which reach it through a pipe only, and the
guest gets each broker's address and a placeholder key in the credential's variables. The
gateway's files (its configuration without a secret, its log, the audit log) live in the run's
scratch directory and go with it; the gateway stops when the run ends (and dies with this
process). ``--audit-log FILE`` keeps the audit: the file is opened for appending before
anything is pulled (so a path that cannot take it fails first), and when the run ends, however
it ends, the gateway's entries are appended to it (read as ``audit`` reads a workspace's log:
bounded lines, JSON objects only).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from microagent.compiler.credentials import Credential
from microagent.compiler.files import has_ext_superblock
from microagent.compiler.overrides import check_flag, check_runtime_env, check_seconds
from microagent.errors import InvalidInputError
from microagent.runtime.backend import (
    Accel,
    Backend,
    GuestResult,
    MachineType,
    NetworkConfig,
    OutputSink,
)
from microagent.runtime.boot import (
    MAX_EXTRA_DISKS,
    BootFiles,
    RunRequest,
    run_once,
    scratch_vm_dir,
)
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
    credentials: tuple[Credential, ...] = ()  # brokered: references only, never a value
    audit_log: Path | None = None  # where the broker's audit entries are appended
    layers: tuple[Path, ...] = ()  # read-only ext4 layers over --rootfs, bottom first

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
        check_layers(self.layers, rootfs=self.rootfs is not None)
        check_runtime_env(self.credentials, self.env)
        if self.audit_log is not None and not self.credentials:
            raise InvalidInputError(
                "--audit-log needs --credential: only a brokered run has an audit",
                hint="add --credential NAME, or drop --audit-log",
            )


def check_rootfs(path: Path) -> None:
    """``--rootfs FILE`` must be a readable regular file holding an ext2/3/4 file system
    (its superblock magic), checked before anything is pulled or booted."""
    _check_ext4_image(
        path,
        "--rootfs",
        hint="make one with `mke2fs -t ext4 -d DIR IMAGE 1G`, or run an image: "
        "microagent run IMAGE -- CMD",
    )


def check_layers(layers: tuple[Path, ...], *, rootfs: bool) -> None:
    """``--layer FILE`` (repeatable) goes with ``--rootfs``; the layers fit beside the VM's
    other disks and each is an ext4 image, checked before anything boots."""
    if not layers:
        return
    if not rootfs:
        raise InvalidInputError(
            "--layer needs --rootfs: layers stack over an ext4 root file system image",
            hint="microagent run --rootfs ROOT.ext4 --layer LAYER.ext4 -- CMD",
        )
    if len(layers) > MAX_EXTRA_DISKS:
        raise InvalidInputError(
            f"{len(layers)} layers, but a VM takes at most {MAX_EXTRA_DISKS}",
            hint="merge layers into one image (e.g. the lower ones into the rootfs)",
        )
    for layer in layers:
        _check_ext4_image(
            layer,
            "--layer",
            hint="a layer is an ext4 image in overlayfs form: `mke2fs -t ext4 -d DIR IMAGE 64M`",
        )


def _check_ext4_image(path: Path, flag: str, *, hint: str) -> None:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(
                f"{flag} {path}: not a regular file", hint="give an ext4 image file"
            )
        is_ext = has_ext_superblock(path)
    except FileNotFoundError:
        raise InvalidInputError(
            f"{flag} {path}: no such file", hint="give the path of an ext4 image file"
        ) from None
    except OSError as exc:
        raise InvalidInputError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
    if not is_ext:
        raise InvalidInputError(
            f"{flag} {path}: not an ext4 file system image (no ext2/3/4 superblock)", hint=hint
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
        layers=job.layers,
    )


def read_secrets(job: OneShot) -> dict[str, str]:
    """Each credential's value, read on the host now (before anything is pulled or booted);
    InvalidInputError names a missing reference, never a value."""
    if not job.credentials:
        return {}
    # deferred: the broker's modules, only for a run with credentials
    from microagent.workspace.services import resolve_secrets

    return resolve_secrets(job.credentials)


def open_audit_log(path: Path | None) -> int | None:
    """``--audit-log FILE`` opened for appending (created 0600), or None. The last component
    is not followed (a symlink planted in a shared directory cannot aim the log at another
    file) and must be a regular file (a FIFO would block the run's end)."""
    if path is None:
        return None
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        named = {errno.ELOOP: "a symbolic link", errno.ENXIO: "not a regular file (a FIFO?)"}
        why = named.get(exc.errno or 0) or exc.strerror or str(exc)
        raise InvalidInputError(
            f"--audit-log {path}: cannot append to it: {why}",
            hint="give a regular file in a directory you can write",
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidInputError(
            f"--audit-log {path}: not a regular file", hint="give a regular file's path"
        )
    os.set_blocking(fd, True)
    return fd


def keep_audit(fd: int, vm_dir: Path) -> str | None:
    """Append the gateway's audit entries (its log and a rotated predecessor, oldest first)
    to ``fd``; each a bounded JSON object, as ``audit`` reads them. What went wrong, if the
    entries could not all be written (said, never raised: the run's own outcome comes first)."""
    # deferred: with the broker's modules, only for a run with credentials
    from microagent.workspace.audit import AUDIT_NAME, entries

    batch: list[bytes] = []
    try:
        for entry in entries(vm_dir / AUDIT_NAME):
            batch.append(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
            if len(batch) >= 256:
                _write_all(fd, b"".join(batch))
                batch.clear()
        _write_all(fd, b"".join(batch))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_brokered(
    request: RunRequest,
    job: OneShot,
    secrets: Mapping[str, str],
    *,
    settings: Settings,
    backend: Backend,
    kit: BootFiles,
    on_output: OutputSink | None = None,
    audit_fd: int | None = None,
    notice: Callable[[str], None] = lambda _message: None,
) -> GuestResult:
    """Run ``request`` with ``job``'s credentials brokered (see the module docstring); the
    audit entries are appended to ``audit_fd`` at the end when it is given (``notice`` tells
    when they could not be, even with --json)."""
    if not job.credentials:
        return run_once(request, backend=backend, kit=kit, on_output=on_output)
    # deferred: the broker's modules (TLS, HTTP), only for a run with credentials
    from microagent.runtime.gatewayproc import GatewayProcess
    from microagent.workspace.services import plan_services, secrets_pipe

    with scratch_vm_dir() as tmp:
        vm_dir = Path(tmp)
        services = plan_services(
            job.credentials,
            (),
            vm_dir=vm_dir,
            run_dir=vm_dir,
            port_base=settings.service_port_base,
            cafile=settings.extra_ca_file(),
        )
        assert services.gateway is not None  # there are credentials
        request = dataclasses.replace(
            request, env={**request.env, **services.env}, services=services.channels
        )
        gateway = GatewayProcess(services.gateway, vm_dir)
        try:
            stdin = secrets_pipe(secrets)
            try:
                gateway.start(stdin=stdin)
            finally:
                os.close(stdin)
            return run_once(request, backend=backend, kit=kit, on_output=on_output, vm_dir=vm_dir)
        finally:
            gateway.stop()
            problem = None if audit_fd is None else keep_audit(audit_fd, vm_dir)
            if problem is not None:
                notice(
                    f"warning: the run's audit was not all appended to {job.audit_log}: {problem}"
                )
