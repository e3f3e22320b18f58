"""The one way a boot is put together: a request to run a command becomes disks and a
:class:`~microagent.runtime.backend.BootConfig`.

Every boot has three disks in this order: the shared root filesystem read-only (overlay
lower), a state disk (overlay upper: the workspace's own, a setup step's scratch, or a
throwaway one made here) and the per-boot config disk (command, env, files, certificates);
then any extra disks (a spec's ``disks`` and ``bundles``) as /dev/vdd, /dev/vde, ..., which
the guest init mounts as run.sh's ``MA_MOUNTS`` says, and last the read-only layer disks
stacked over the root filesystem (``RunRequest.layers``, run.sh's ``MA_LAYERS``).
Setup steps, one-shot runs and workspace starts all go through :func:`prepare`;
:func:`run_once` boots, waits for the command and stops the VM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from microagent.errors import InvalidInputError, VMError
from microagent.ext4.debugfs import repair_image
from microagent.ext4.mkfs import make_state_disk
from microagent.runtime.backend import (
    BOOT_ATTEMPTS,
    Accel,
    Backend,
    BootConfig,
    BootStalled,
    Disk,
    GuestResult,
    MachineType,
    Mediation,
    NetworkConfig,
    OutputSink,
    ServiceChannel,
    check_services,
)
from microagent.runtime.configdisk import (
    ExtraMount,
    GuestFile,
    GuestNetwork,
    Output,
    RunConfig,
    write_config_disk,
)

DEFAULT_STATE_MIB = 4096
THROWAWAY_STATE = "state.ext4"  # a one-shot run's state disk, in its VM directory
SETUP_BOOT = "setup"  # the name of a setup step's boot (RunRequest.name)
SOCKET_PATH_MAX = 100  # unix socket paths are limited to ~107 bytes
SYSTEM_DISKS = 3  # rootfs, state, config: /dev/vda, /dev/vdb, /dev/vdc
# QEMU's microvm machine has 24 virtio-mmio transports (7.2, measured: the 25th device is
# refused). The system disks, the control port and the NIC take 5; 16 extra disks
# (/dev/vdd../dev/vds) leave room for a few more devices.
MAX_EXTRA_DISKS = 16  # extra disks and layer disks together


@dataclass(frozen=True)
class ExtraDisk:
    """A disk attached after the system disks (``/dev/vdd``, ``/dev/vde``, ... in order) and
    mounted at ``mountpoint``; a read-only one is read-only to the VMM too."""

    path: Path
    mountpoint: str
    readonly: bool = True
    name: str = ""


def extra_device(index: int) -> str:
    """The guest's name of the ``index``-th extra disk (``vdd`` for 0): virtio-blk disks are
    named in the order they are attached."""
    return "vd" + chr(ord("a") + SYSTEM_DISKS + index)


class BootFiles(Protocol):
    """The kernel and initramfs to boot (a guest kit, or the user's own)."""

    @property
    def kernel(self) -> Path: ...

    @property
    def initrd(self) -> Path: ...


@dataclass(frozen=True)
class RunRequest:
    """One command to run in a VM, and the VM to run it in."""

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
    state_disk: Path | None = None  # None: a throwaway disk of state_size_mib
    state_size_mib: int = DEFAULT_STATE_MIB
    machine: MachineType = MachineType.MICROVM
    accel: Accel = Accel.AUTO
    name: str = "microagent"
    die_with_parent: bool = False  # the VMM dies with the process that booted it
    disks: tuple[ExtraDisk, ...] = ()
    mediation: Mediation | None = None
    services: tuple[ServiceChannel, ...] = ()  # more guest ports carried to host sockets
    # Read-only ext4 images in overlayfs form (a whiteout is a 0/0 character device, an opaque
    # directory has trusted.overlay.opaque=y), stacked over the rootfs, bottom first.
    layers: tuple[Path, ...] = ()

    def run_config(self) -> RunConfig:
        return RunConfig(
            command=self.command,
            env=dict(self.env),
            workdir=self.workdir,
            hostname=self.hostname,
            network=GuestNetwork(mode=self.network.mode),
            outputs=self.outputs,
            mounts=self.mounts(),
            mediation_port=self.mediation.guest_port if self.mediation else None,
            service_ports=tuple(s.guest_port for s in self.services),
            layers=self.layer_devices(),
        )

    def layer_devices(self) -> tuple[str, ...]:
        """The guest's names of the layer disks (bottom first): after the extra disks."""
        return tuple(extra_device(len(self.disks) + i) for i in range(len(self.layers)))

    def mounts(self) -> tuple[ExtraMount, ...]:
        """The extra disks' mounts, a parent folder's before what is mounted inside it."""
        mounts = [
            ExtraMount(extra_device(i), d.mountpoint, readonly=d.readonly)
            for i, d in enumerate(self.disks)
        ]
        return tuple(sorted(mounts, key=lambda m: m.path.rstrip("/").count("/")))

    def extra_disks(self) -> tuple[Disk, ...]:
        """The extra disks and then the layer disks (bottom first, read-only) as the VMM
        attaches them; InvalidInputError when there are more than fit or one is missing."""
        self._check_disk_count()
        for disk in self.disks:
            if not disk.path.is_file():
                raise InvalidInputError(
                    f"disk {disk.name or disk.mountpoint}: image {disk.path} does not exist",
                    hint="recreate the workspace to rebuild its disks",
                )
        for number, layer in enumerate(self.layers, 1):
            if not layer.is_file():
                raise InvalidInputError(
                    f"layer {number}: image {layer} does not exist or is not a regular file",
                    hint="give read-only ext4 layer images, bottom first",
                )
        serials = (f"disk-{d.name}"[:20] for d in self.disks)  # virtio-blk serials: 20 bytes
        disks = [Disk(d.path, d.readonly, s) for d, s in zip(self.disks, serials, strict=True)]
        disks += [
            Disk(path.resolve(), readonly=True, serial=f"layer-{number}")
            for number, path in enumerate(self.layers, 1)
        ]
        return tuple(disks)

    def _check_disk_count(self) -> None:
        count = len(self.disks) + len(self.layers)
        if count <= MAX_EXTRA_DISKS:
            return
        if not self.layers:
            raise InvalidInputError(
                f"{count} extra disks, but a VM takes at most {MAX_EXTRA_DISKS}",
                hint="merge some disks or bundles into one",
            )
        room = MAX_EXTRA_DISKS - len(self.disks)
        raise InvalidInputError(
            f"{len(self.layers)} layers and {len(self.disks)} extra disks, but a VM takes at "
            f"most {MAX_EXTRA_DISKS} disks besides its rootfs, state and config disks "
            f"(room for {max(room, 0)} layers here)",
            hint="merge layers into one image (or merge disks or bundles)",
        )


def prepare(
    request: RunRequest, kit: BootFiles, vm_dir: Path, *, work_dir: Path | None = None
) -> BootConfig:
    """Write the config disk (and a throwaway state disk) and describe the boot.

    The VMM's sockets and logs go to ``vm_dir``; disks made here to ``work_dir`` (default
    ``vm_dir``). The config disk is private (0600): it carries the environment.
    """
    rootfs = request.rootfs.resolve()
    if not rootfs.is_file():
        raise InvalidInputError(
            f"rootfs {request.rootfs} does not exist", hint="pass an ext4 image file"
        )
    extra = request.extra_disks()
    check_services(request.services, request.mediation)
    work = work_dir or vm_dir
    state = request.state_disk
    if state is None:
        state = make_state_disk(work / THROWAWAY_STATE, request.state_size_mib, journal=False)
    config_disk = work / "config.tar"
    config_disk.unlink(missing_ok=True)
    write_config_disk(config_disk, request.run_config(), request.files, request.extra_ca)
    config_disk.chmod(0o600)
    return BootConfig(
        kernel=kit.kernel,
        initrd=kit.initrd,
        disks=(
            Disk(rootfs, readonly=True, serial="rootfs"),
            Disk(state, serial="state"),
            Disk(config_disk, readonly=True, serial="config"),
            *extra,
        ),
        state_dir=vm_dir,
        memory_mib=request.memory_mib,
        cpus=request.cpus,
        network=request.network,
        machine=request.machine,
        accel=request.accel,
        timeout=request.timeout,
        name=request.name,
        die_with_parent=request.die_with_parent,
        mediation=request.mediation,
        services=request.services,
    )


def _temp_root() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp")


def scratch_vm_dir(prefix: str = "microagent-run-") -> tempfile.TemporaryDirectory[str]:
    """A temporary directory short enough for the VMM's unix sockets (``mkdtemp``: a fresh
    name, mode 0700, so nobody else can have made it or write into it)."""
    return tempfile.TemporaryDirectory(prefix=prefix, dir=_temp_root())


def is_private_dir(path: Path) -> bool:
    """Whether ``path`` is a real directory (not a symlink) of ours that nobody else may
    write to or look into: owned by this user, no group or other permission bits."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077


def _trusted_parent(path: Path) -> bool:
    """Nobody but us (or root) can rename entries of ``path``: owned by us or root, and
    not writable by others unless sticky (like /tmp)."""
    try:
        info = path.stat()
    except OSError:
        return False
    shared = info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX
    return info.st_uid in (0, os.geteuid()) and not shared


def private_runtime_dir() -> Path:
    """A directory for VMM sockets and logs that only this user can reach.

    ``$XDG_RUNTIME_DIR/microagent``, else ``$TMPDIR/microagent-<uid>`` (``/tmp`` when
    TMPDIR is unset): created 0700, or, when it exists, used only if it is a directory of
    ours that nobody else may enter, in a parent nobody else can rename entries of. A name
    another user planted (their directory, a symlink, loose permissions) is left alone and
    a fresh ``mkdtemp`` directory is used instead.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    uid = os.geteuid()
    base = Path(runtime) / "microagent" if runtime else _temp_root() / f"microagent-{uid}"
    if _trusted_parent(base.parent):
        with contextlib.suppress(OSError):  # exists (checked next) or cannot be made
            base.mkdir(mode=0o700)
        if is_private_dir(base):
            return base
    return Path(tempfile.mkdtemp(prefix=f"microagent-{uid}-", dir=_temp_root()))


def vm_dir_for(run_dir: Path, name: str) -> Path:
    """``run_dir/vm`` when socket paths fit, else a directory named after ``run_dir``
    (emptied first) in :func:`private_runtime_dir`."""
    path = run_dir / "vm"
    if len(str(path / "control.sock")) < SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
    base = private_runtime_dir()
    link = base / f"{name[:40]}-{digest}"
    if len(str(link / "control.sock")) >= SOCKET_PATH_MAX:
        link = base / digest  # the name is only there for people looking
    if len(str(link / "control.sock")) >= SOCKET_PATH_MAX:
        raise VMError(
            f"the VM's sockets would be too long a path in {base} (unix sockets are limited "
            f"to ~107 bytes), and in {run_dir} too",
            hint="set XDG_RUNTIME_DIR or TMPDIR to a shorter directory, or MICROAGENT_HOME",
        )
    shutil.rmtree(link, ignore_errors=True)
    link.mkdir(mode=0o700)
    return link


def run_once(
    request: RunRequest,
    *,
    backend: Backend,
    kit: BootFiles,
    on_output: OutputSink | None = None,
    vm_dir: Path | None = None,
) -> GuestResult:
    """Boot, run the command, power off; the guest's result (VMError on failure). The VM's
    files go to ``vm_dir`` (default: a scratch directory removed afterwards). With service
    channels, the host side of the guest agent carries them while the VM runs.

    A boot that stalls before the guest's first event (:class:`BootStalled`: nothing of the
    command ran) is tried once more, after a repairing check of a state disk the caller
    gave (the stalled VM was killed); the result's timings then count ``host.bootStalls``."""
    stalls = 0
    while True:
        try:
            result = _boot_and_wait(request, backend, kit, on_output, vm_dir)
        except BootStalled:
            stalls += 1
            if stalls >= BOOT_ATTEMPTS:
                raise
            _repair_after_stall(request, vm_dir)
            continue
        if not stalls:
            return result
        timings = {**result.timings, "host.bootStalls": float(stalls)}
        return dataclasses.replace(result, timings=timings)


def _repair_after_stall(request: RunRequest, vm_dir: Path | None) -> None:
    """The disks a stalled (killed) VM may have written get a repairing check before the next
    boot: the caller's state disk and the writable extra disks (a throwaway state disk is
    made afresh)."""
    if request.state_disk is not None:
        repair_image(request.state_disk, "state disk")
    elif vm_dir is not None:
        (vm_dir / THROWAWAY_STATE).unlink(missing_ok=True)
    for disk in request.disks:
        if not disk.readonly:
            repair_image(disk.path, f"disk {disk.name or disk.mountpoint}")


def _boot_and_wait(
    request: RunRequest,
    backend: Backend,
    kit: BootFiles,
    on_output: OutputSink | None,
    vm_dir: Path | None,
) -> GuestResult:
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        if vm_dir is None:
            vm_dir = Path(stack.enter_context(scratch_vm_dir()))
        config = prepare(request, kit, vm_dir)
        machine = stack.enter_context(backend.boot(config))
        if config.services:
            stack.enter_context(_service_link(config))
        prepared = time.monotonic() - began
        result = machine.wait(on_output=on_output)
    timings = {"host.prepare": round(prepared, 3), **result.timings}
    return dataclasses.replace(result, timings=timings)


@contextlib.contextmanager
def _service_link(config: BootConfig) -> Iterator[None]:
    """The host side of the guest agent for a boot without a supervisor: it carries the
    service channels' connections to their sockets (and serves exec.sock beside them)."""
    # deferred: the agent link, only for a boot with service channels
    from microagent.runtime.agentlink import AgentLink, exec_socket_path

    link = AgentLink(
        config.agent_socket, exec_socket_path(config.state_dir), services=config.services
    )
    link.start()
    try:
        yield
    finally:
        link.stop()


def print_command(request: RunRequest, *, backend: Backend, kit: BootFiles) -> list[str]:
    """The VMM argv the run would use (disks are prepared in a temp dir, then removed)."""
    with scratch_vm_dir() as tmp:
        return list(backend.command(prepare(request, kit, Path(tmp))))
