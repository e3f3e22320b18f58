"""Benchmark guest speed: the product's guest vs a bare QEMU guest on the same image and kernel.

The image is the python:3.13-slim stand-in plus two setup steps built by the product itself
(``pip install pydantic anthropic``, the minimal-agent example's step, and ``pip download rich``
into /opt/wheels, so the pip workload needs no network inside the timed run). Each workload
runs in:

* ``product``: ``run_once`` (what ``microagent run --rootfs ROOTFS --layer L... -- CMD``
  does) on the step's root as a workspace boots it: the kit's init, the base image read-only
  with each setup step's layer disk stacked on it, a throwaway state disk as overlay upper, the
  config disk, the control port, the guest agent beside the command, the network the flags ask
  for (``--variant one-image`` boots the chain flattened into one image instead);
* ``bare``: plain QEMU with the same kernel, machine, accelerator, memory and vCPU count, one
  plain virtio-blk disk (a fresh copy of the same root as one ext4 image, its chain flattened,
  mounted read-write, no overlay) and a 20-line init appended to the kit's initramfs (it loads
  the same virtio modules, mounts the disk and chroots into it).

Runs alternate (bare, product, bare, product, ...) so both see the same host load. A workload
is timed between two console lines the guest prints right before and after it: the host's wall
time, the VMM process's CPU time (user + system of all its threads: on a shared host the wall
time mostly measures how long the vCPU thread waited for a CPU) and the guest's own clock.
``--variant`` changes the product's QEMU argv in this process (kernel command line, disk
options, CPU model, network) to measure what each setting costs; ``--bare-variant bare-overlay``
gives the bare guest the product's overlay root (upper on a tmpfs) to price the overlay alone.
``--variant layers-N`` (N of 1..13) boots the same root with N more small read-only layer disks
stacked over it as overlay lowers (``RunRequest.layers``), in the worst shape for lookups: each
holds the image's package directory (``/usr/local/lib/python3.13/dist-packages``, parents
root 0755) with one small package of its own, so every lookup there (and in its parents)
consults every layer. The disks are built once per bench run (``mke2fs -d``, 4 MiB each).
``--workload lookups`` times that worst case alone (20,000 names missing there).
``--pyc`` counts stale .pyc files on sys.path in both guests and starts a workspace of the image
twice, counting the modules its import took from a .pyc and those it compiled again.

    .venv/bin/python bench/bench_guest.py [--runs 3] [--workload import,pip] [--variant V]...
        [--bare-variant bare-overlay] [--pyc] [--command SHELL]
    .venv/bin/python bench/bench_guest.py --workload import,lookups --variant as-is \
        --variant layers-4 --variant layers-15
    .venv/bin/python bench/bench_guest.py --list-variants

Uses the store of $MICROAGENT_HOME (the setup steps are built once; they need PyPI, through
$MICROAGENT_EXTRA_CA, default ``host``) and root for the stand-in image (debootstrap, once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from microagent import runner  # noqa: E402
from microagent.api import Microagent  # noqa: E402
from microagent.ext4.rootfs import materialise  # noqa: E402
from microagent.kit import guestkit  # noqa: E402
from microagent.kit.initramfs import CpioEntry, with_parents, write_cpio  # noqa: E402
from microagent.runtime import hostclock, qemu  # noqa: E402
from microagent.runtime.backend import (  # noqa: E402
    Accel,
    BootConfig,
    Disk,
    MachineType,
    NetworkConfig,
)
from microagent.runtime.boot import RunRequest, run_once  # noqa: E402
from microagent.runtime.configdisk import NetworkMode  # noqa: E402
from microagent.runtime.qemu import QemuBackend, QemuMachine  # noqa: E402
from microagent.settings import Settings  # noqa: E402
from microagent.store.records import Root, read_record  # noqa: E402
from testenv import standin  # noqa: E402

MEMORY_MIB = 1024
CPUS = 1
SETTLE_SECONDS = 1.0
RUN_TIMEOUT = 900.0
WHEELS = "/opt/wheels"
SETUP = (
    'pip install --no-cache-dir "pydantic>=2,<3" "anthropic>=0.40"',  # examples/minimal-agent
    f"pip download --no-cache-dir -d {WHEELS} rich",
)
PIP_ENV = "PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1"
WORKLOADS = {
    "import": "python3 -c 'import anthropic, pydantic'",
    "pip": f"{PIP_ENV} pip install -q --no-index --find-links {WHEELS} rich",
    "stdlib": "python3 -c 'import asyncio, email.parser, http.client, json, decimal, "
    "unittest, xml.dom.minidom, argparse, logging.handlers, sqlite3, zipfile'",
    "cpu": "python3 -c 'sum(range(3 * 10**6))'",
    # what an import does to the file system, without the interpreter's work: stat every file
    # of the installed packages and read every .pyc
    "files": "python3 -c "
    + shlex.quote(
        "import os\n"
        "for d, _, names in os.walk('/usr/local/lib/python3.13/dist-packages'):\n"
        "    for n in names:\n"
        "        p = os.path.join(d, n); os.stat(p)\n"
        "        if n.endswith('.pyc'): open(p, 'rb').read()\n"
    ),
    # the worst case of stacked lowers: 20,000 lookups of distinct names that do not exist in
    # the packages directory (each one asks every layer that holds the directory)
    "lookups": "python3 -c "
    + shlex.quote(
        "import os\n"
        "for i in range(20000):\n"
        "    try: os.stat(f'/usr/local/lib/python3.13/dist-packages/missing_{i}')\n"
        "    except FileNotFoundError: pass\n"
    ),
}
# Counts the .pyc files of the standard library and the installed packages: valid for their
# source (timestamp or hash based), stale (Python would compile the source again on every fresh
# root), or missing.
PYC_CHECK = r"""
import importlib.util as u, os, sys
ok = stale = missing = 0
roots = [p for p in sys.path if p.startswith("/usr/") and os.path.isdir(p)]
for root in roots:
    for d, _, names in os.walk(root):
        for n in names:
            if not n.endswith(".py"):
                continue
            src = os.path.join(d, n)
            try:
                head = open(u.cache_from_source(src), "rb").read(16)
            except OSError:
                missing += 1
                continue
            st = os.stat(src)
            flags = int.from_bytes(head[4:8], "little")
            same = (int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                    and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)
            if flags or same:
                ok += 1
            else:
                stale += 1
print("PYC ok=%d stale=%d missing=%d" % (ok, stale, missing))
"""
# The installed packages' directory in the image (the stand-in's Debian python3 with pip: the
# setup steps install into dist-packages, not site-packages); each bench layer disk holds it.
PACKAGES_DIR = "usr/local/lib/python3.13/dist-packages"
LAYERS_VARIANT = re.compile(r"layers-(\d+)")
MAX_LAYERS = 13  # on top of the root's own two layer disks (16 disks at most)
LAYER_MIB = 4
BEGIN, END = "MA-BENCH-BEGIN", "MA-BENCH-END"
END_LINE = re.compile(END + r" (\d+) ([0-9.]+) ([0-9.]+)")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

BARE_INIT = """#!/bin/sh
export PATH=/bin
/bin/busybox mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in virtio_ring virtio virtio_mmio virtio_blk overlay; do insmod /lib/modules/$m.ko; done
R=/newroot
mount -t ext4 -o noatime /dev/vda $R || { echo BARE-NO-ROOT; poweroff -f; }
{overlay}
mount -t proc proc $R/proc; mount -t sysfs sysfs $R/sys; mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm; mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm; mount -t tmpfs -o mode=755 tmpfs $R/run
cp /bare-cmd.sh $R/run/bare-cmd.sh
chroot $R /usr/bin/env -i PATH={path} HOME=/root LANG=C.UTF-8 /bin/sh /run/bare-cmd.sh
sync
poweroff -f
"""
# The bare guest with the product's disk layout: the rootfs read-only as the lower of an
# overlay whose upper is a tmpfs (the overlay's cost alone, without the state disk).
BARE_OVERLAY = """mkdir -p /lower /up; mount --move $R /lower
mount -t tmpfs tmpfs /up; mkdir -p /up/u /up/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/up/u,workdir=/up/w $R"""


def timed_script(command: str) -> str:
    """``command`` between two console marks (host-timed) with the guest's uptime at each."""
    return (
        f'read -r a _ </proc/uptime; echo "{BEGIN}"; {command}; rc=$?; '
        f'read -r b _ </proc/uptime; echo "{END} $rc $a $b"'
    )


@dataclasses.dataclass
class Sample:
    host: float  # seconds between the two marks, seen on the host
    guest: float  # the guest's uptime interval
    cpu: float  # CPU seconds the VMM process used between the two marks
    vcpu: float  # of which its busiest thread (the vCPU under TCG)
    output: str


TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: Path) -> float:
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_seconds(pid: int | None) -> tuple[float, dict[str, float]]:
    """User + system CPU time of process ``pid`` (all its threads, exited ones too) and of
    each live thread (the busiest one under TCG is the vCPU)."""
    if pid is None:
        return 0.0, {}
    tasks = Path(f"/proc/{pid}/task")
    threads = {t.name: _stat_cpu(t / "stat") for t in tasks.iterdir()} if tasks.exists() else {}
    return _stat_cpu(Path(f"/proc/{pid}/stat")), threads


class Marks:
    """Host times (and the VMM's CPU time) at which the begin and end marks showed up in a
    growing console text."""

    def __init__(self, pid: Callable[[], int | None]) -> None:
        self.pid = pid
        self.text = ""
        self.begin_at: float | None = None
        self.end_at: float | None = None
        self.cpu_begin: tuple[float, dict[str, float]] = (0.0, {})
        self.cpu_end: tuple[float, dict[str, float]] = (0.0, {})

    def feed(self, chunk: str) -> None:
        self.text += chunk
        now = time.monotonic()
        if self.begin_at is None and BEGIN in self.text:
            self.begin_at = now
            self.cpu_begin = cpu_seconds(self.pid())
        if self.end_at is None and END_LINE.search(self.text):
            self.end_at = now
            self.cpu_end = cpu_seconds(self.pid())

    def vcpu(self) -> float:
        before, after = self.cpu_begin[1], self.cpu_end[1]
        return max((after[t] - before.get(t, 0.0) for t in after), default=0.0)

    def sample(self, what: str) -> Sample:
        found = END_LINE.search(self.text)
        if found is None or self.begin_at is None or self.end_at is None:
            raise SystemExit(f"{what}: no end mark in the output:\n{self.text[-3000:]}")
        if found.group(1) != "0":
            raise SystemExit(f"{what}: the workload exited {found.group(1)}:\n{self.text[-3000:]}")
        guest = float(found.group(3)) - float(found.group(2))
        cpu = self.cpu_end[0] - self.cpu_begin[0]
        return Sample(self.end_at - self.begin_at, guest, cpu, self.vcpu(), self.text)


# -- product variants (argv changes measured in this process) ---------------------------------

Patch = Callable[[], AbstractContextManager[None]]


def _cmdline_words(*words: str) -> Patch:
    @contextmanager
    def patch() -> Iterator[None]:
        original = qemu.kernel_cmdline

        def cmdline(config: BootConfig, *args: Any, **kwargs: Any) -> str:
            extra = dataclasses.replace(config, cmdline_extra=(*words,))
            return str(original(extra, *args, **kwargs))

        with _swap(qemu, "kernel_cmdline", cmdline):
            yield

    return patch


def _drive_options(options: str) -> Patch:
    @contextmanager
    def patch() -> Iterator[None]:
        original = qemu.disk_args

        def disks(items: Sequence[Disk], machine: MachineType) -> list[str]:
            args = original(items, machine)
            return [f"{a},{options}" if a.startswith("id=vd") else a for a in args]

        with _swap(qemu, "disk_args", disks):
            yield

    return patch


def _cpu(model: str) -> Patch:
    @contextmanager
    def patch() -> Iterator[None]:
        with _swap(qemu, "TCG_CPU", model):
            yield

    return patch


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _swap(module: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


VARIANTS: dict[str, Patch] = {
    "as-is": _nothing,
    "mitigations-off": _cmdline_words("mitigations=off"),  # the default under TCG since
    "mitigations-on": _cmdline_words("mitigations=auto"),  # (the later word wins)
    "clock-tsc": _cmdline_words("clocksource=tsc", "tsc=reliable"),
    "clock-jiffies": _cmdline_words("clocksource=jiffies"),
    "cache-unsafe": _drive_options("cache=unsafe"),
    "cache-none-native": _drive_options("cache=none,aio=native"),
    "aio-io_uring": _drive_options("aio=io_uring"),
    "cpu-qemu64": _cpu("qemu64"),
    "isolated": _nothing,  # network isolated instead of user (see run_product)
    "one-image": _nothing,  # the root's chain flattened into one image (see run_product)
}


def layer_count(variant: str) -> int | None:
    """N of a ``layers-N`` variant (None for the others); SystemExit outside 1..MAX_LAYERS."""
    match = LAYERS_VARIANT.fullmatch(variant)
    if match is None:
        return None
    count = int(match.group(1))
    if not 1 <= count <= MAX_LAYERS:
        raise SystemExit(f"{variant}: layers-N takes N of 1..{MAX_LAYERS}")
    return count


def variant_patch(variant: str) -> Patch:
    """The argv change of a variant (a ``layers-N`` variant changes only the request)."""
    return _nothing if layer_count(variant) else VARIANTS[variant]


def build_layers(count: int, work: Path) -> tuple[Path, ...]:
    """``count`` layer disks, bottom first: each the packages directory (parents root 0755)
    with one small package of its own (``ma_bench_layer_I/__init__.py``)."""
    disks = []
    for index in range(1, count + 1):
        tree = work / f"layer-{index}"
        package = tree / PACKAGES_DIR / f"ma_bench_layer_{index}"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f"LAYER = {index}\n")
        for directory in [tree, *(p for p in package.parents if tree in p.parents), package]:
            directory.chmod(0o755)
        image = work / f"layer-{index}.ext4"
        runner.run(
            [
                *("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"),
                *("-O", "^has_journal", "-E", "root_owner=0:0", "-d", tree, image),
                f"{LAYER_MIB}M",
            ]
        )
        disks.append(image)
    return tuple(disks)


# -- the two guests ---------------------------------------------------------------------------


class PidBackend(QemuBackend):
    """The product's QEMU backend, remembering the VMM's pid (for its CPU time)."""

    pid: int | None = None

    def boot(self, config: BootConfig, *args: Any, **kwargs: Any) -> QemuMachine:
        machine = super().boot(config, *args, **kwargs)
        self.pid = machine.pid
        return machine


@dataclasses.dataclass(frozen=True)
class Guest:
    """What both guests boot: the product's backend and its guest kit."""

    backend: PidBackend
    kit: guestkit.GuestKit
    tsc_khz: int | None  # the host TSC rate both guests are told (runtime/hostclock)
    root: Root  # the setup steps' root as workspaces boot it: base image + layer disks
    flat: Path  # the same root as one image (its chain flattened): what the bare guest boots
    layers: tuple[Path, ...] = ()  # bench layer disks, bottom first (layers-N takes N of them)


def run_product(guest: Guest, script: str, variant: str, accel: Accel) -> Sample:
    network = NetworkMode.ISOLATED if variant == "isolated" else NetworkMode.USER
    root = Root(guest.flat) if variant == "one-image" else guest.root
    request = RunRequest(
        rootfs=root.image,
        command=("sh", "-c", script),
        network=NetworkConfig(network),
        memory_mib=MEMORY_MIB,
        cpus=CPUS,
        timeout=RUN_TIMEOUT,
        accel=accel,
        layers=(*root.layers, *guest.layers[: layer_count(variant) or 0]),
    )
    marks = Marks(lambda: guest.backend.pid)
    with variant_patch(variant)():
        result = run_once(
            request,
            backend=guest.backend,
            kit=guest.kit,
            on_output=lambda b: marks.feed(b.decode(errors="replace")),
        )
    if result.error:
        raise SystemExit(f"product run failed: {result.error}\n{result.stderr[-2000:]}")
    return marks.sample(f"product ({variant})")


def bare_initrd(kit_initrd: Path, script: str, work: Path, overlay: bool) -> Path:
    """The kit's initramfs plus a second cpio archive with /bare-init and the command."""
    init = BARE_INIT.replace("{path}", DEFAULT_PATH)
    init = init.replace("{overlay}", BARE_OVERLAY if overlay else "")
    extra = work / "bare-extra.cpio"
    entries = [
        CpioEntry.file("bare-init", init.encode(), 0o755),
        CpioEntry.file("bare-cmd.sh", script.encode(), 0o644),
    ]
    with extra.open("wb") as fh:
        write_cpio(fh, with_parents(entries))
    out = work / "bare-initrd.img"
    with out.open("wb") as fh:
        fh.write(kit_initrd.read_bytes())
        fh.write(extra.read_bytes())
    return out


def bare_argv(guest: Guest, initrd: Path, disk: Path, serial: Path, accel: Accel) -> list[str]:
    """Plain QEMU: the product's machine/accel/CPU flags, same memory and vCPUs, one disk."""
    # tsc_early_khz: without it the kernel cannot calibrate the TSC on microvm under TCG (no
    # PIT/HPET reference) and hangs; the product passes the same value (runtime/hostclock).
    cmdline = (
        f"console=ttyS0 quiet panic=-1 pci=off tsc_early_khz={guest.tsc_khz} rdinit=/bare-init"
    )
    return [
        runner.find_tool("qemu-system-x86_64"),
        *("-M", "microvm", "-accel", accel.value, "-cpu", "max" if accel is Accel.TCG else "host"),
        *("-m", str(MEMORY_MIB), "-smp", str(CPUS)),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-serial", f"file:{serial}", "-kernel", str(guest.kit.kernel), "-initrd", str(initrd)),
        *("-append", cmdline),
        *("-drive", f"id=vd0,file={disk},format=raw,if=none"),
        *("-device", "virtio-blk-device,drive=vd0"),
    ]


def run_bare(
    guest: Guest, rootfs: Path, script: str, work: Path, accel: Accel, *, overlay: bool
) -> Sample:
    disk = work / "bare-root.ext4"
    subprocess.run(["cp", "--sparse=always", str(rootfs), str(disk)], check=True)
    serial = work / "bare-serial.log"
    serial.unlink(missing_ok=True)
    initrd = bare_initrd(guest.kit.initrd, script, work, overlay)
    argv = bare_argv(guest, initrd, disk, serial, accel)
    proc = runner.spawn(argv)
    marks, seen = Marks(lambda: proc.pid), 0
    deadline = time.monotonic() + RUN_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        if len(text) > seen:
            marks.feed(text[seen:])
            seen = len(text)
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    text = serial.read_text(errors="replace") if serial.exists() else ""
    marks.feed(text[seen:])
    disk.unlink()
    return marks.sample("bare")


# -- the image --------------------------------------------------------------------------------


def build_image(api: Microagent, work: Path) -> tuple[Root, Path]:
    """The stand-in + the setup steps, built (or reused) by the product: the last step's root
    as a workspace boots it (its stack, kept in the record) and the same root as one image."""
    image = standin.build_python(None)
    spec = work / "microagent.yaml"
    steps = "".join(f"  - {json.dumps(step)}\n" for step in SETUP)
    spec.write_text(f"name: bench-guest\nimage: {image.oci_ref}\nsetup:\n{steps}")
    report = api.build(spec)
    record = read_record(api.store, report.outcome.built.key)
    assert record is not None
    if record.rootfs is None:  # a stack: flatten it once into one image beside it
        record = materialise(api.store, record)
    assert record.rootfs is not None
    flat = api.store.entry_path(record.rootfs)
    stack = record.stack
    if stack is None:  # layer disks off: both guests boot the one image
        return Root(flat), flat
    return Root(
        api.store.entry_path(stack.image), tuple(map(api.store.entry_path, stack.layers))
    ), flat


# -- main -------------------------------------------------------------------------------------


def measure(
    args: argparse.Namespace, guest: Guest, work: Path
) -> dict[tuple[str, str], list[Sample]]:
    accel = Accel(args.accel)
    samples: dict[tuple[str, str], list[Sample]] = {}
    for workload in args.workload:
        quiet = "" if workload == "custom" else " >/dev/null"
        script = timed_script(WORKLOADS[workload] + quiet)
        for index in range(args.runs):
            for side in ["bare", *args.bare_variant, *args.variant]:
                time.sleep(SETTLE_SECONDS)
                if side == "bare" or side in args.bare_variant:
                    overlay = side == "bare-overlay"
                    sample = run_bare(guest, guest.flat, script, work, accel, overlay=overlay)
                else:
                    sample = run_product(guest, script, side, accel)
                samples.setdefault((workload, side), []).append(sample)
                if workload == "custom":
                    print(sample.output[sample.output.find(BEGIN) :], flush=True)
                print(
                    f"  {workload:<7} run {index + 1} {side:<18} {sample.host:7.2f} s "
                    f"(VMM CPU {sample.cpu:7.2f} s, vCPU {sample.vcpu:7.2f} s, "
                    f"guest clock {sample.guest:7.2f} s)",
                    flush=True,
                )
    return samples


def pyc_check(guest: Guest, work: Path, accel: Accel) -> tuple[str, str]:
    """The .pyc census in the bare guest and in the product's guest."""
    script = timed_script(f"python3 -c {shlex.quote(PYC_CHECK)}")
    bare = run_bare(guest, guest.flat, script, work, accel, overlay=False).output
    product = run_product(guest, script, "as-is", accel).output
    census = re.compile(r"PYC ok=\d+ stale=\d+ missing=\d+")

    def found(text: str) -> str:
        match = census.search(text)
        return match.group(0) if match else "no census"

    return found(bare), found(product)


# A workspace's entrypoint: which modules the import took from a .pyc ("matches") and which it
# compiled again ("created" a .pyc in the overlay upper).
WS_NAME = "bench-guest-pyc"
WS_ENTRY = (
    "python3 -v -c 'import anthropic, pydantic' 2>/tmp/pyc-v.txt; "
    "echo PYC-START matched=$(grep -c ' matches ' /tmp/pyc-v.txt) "
    "compiled=$(grep -c '^# created ' /tmp/pyc-v.txt)"
)
MA = [sys.executable, "-m", "microagent.cli"]


def cli(*args: str) -> str:
    """One microagent CLI process; its stdout (exits with its output on failure)."""
    done = subprocess.run([*MA, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"microagent {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def workspace_pyc(work: Path) -> list[str]:
    """Create a workspace of the bench image, start it twice: each start's census line."""
    image = standin.build_python(None)
    spec = work / "ws" / "microagent.yaml"
    spec.parent.mkdir()
    steps = "".join(f"  - {json.dumps(step)}\n" for step in SETUP)
    entry = json.dumps(WS_ENTRY)
    spec.write_text(
        f"name: {WS_NAME}\nimage: {image.oci_ref}\nsetup:\n{steps}entrypoint: {entry}\n"
        "network: {mode: isolated}\n"
    )
    subprocess.run([*MA, "delete", "--force", "-y", WS_NAME], capture_output=True, check=False)
    lines = []
    try:
        cli("create", "-f", str(spec))
        for _ in range(2):
            cli("start", "--wait", WS_NAME)
            out = cli("--json", "result", WS_NAME)
            found = re.search(r"PYC-START matched=\d+ compiled=\d+", out)
            lines.append(found.group(0) if found else f"no census in {out[-500:]}")
    finally:
        subprocess.run([*MA, "delete", "--force", "-y", WS_NAME], capture_output=True, check=False)
    return lines


def report(samples: dict[tuple[str, str], list[Sample]], args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(f"\naccel={args.accel}, {os.cpu_count()} host CPUs, load {load[0]:.2f} {load[1]:.2f}")
    print(f"{MEMORY_MIB} MiB, {CPUS} vCPU, {args.runs} alternating runs; medians (host-timed)")
    print("wall: host-timed median; CPU: the VMM process's CPU time, median and best run")
    print("(on a shared host the best run is the least disturbed one)")
    for workload in args.workload:
        bare = samples[(workload, "bare")]
        wall0 = statistics.median(s.host for s in bare)
        cpu0, best0 = statistics.median(s.cpu for s in bare), min(s.cpu for s in bare)
        vcpu0 = statistics.median(s.vcpu for s in bare)
        print(
            f"{workload}: bare wall {wall0:.2f} s, CPU {cpu0:.2f} s, best {best0:.2f} s, "
            f"vCPU {vcpu0:.2f} s"
        )
        for side in [*args.bare_variant, *args.variant]:
            runs = samples[(workload, side)]
            wall = statistics.median(s.host for s in runs)
            cpu, best = statistics.median(s.cpu for s in runs), min(s.cpu for s in runs)
            vcpu = statistics.median(s.vcpu for s in runs)
            print(
                f"  {side:<18} wall {wall:7.2f} s {wall / wall0:5.2f}x   "
                f"CPU {cpu:7.2f} s {cpu / cpu0:5.2f}x   best {best:7.2f} s {best / best0:5.2f}x"
                f"   vCPU {vcpu:7.2f} s {vcpu / vcpu0:5.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workload", default="import,pip", help=f"of {','.join(WORKLOADS)}")
    parser.add_argument("--variant", action="append", help="product variant (repeatable)")
    parser.add_argument("--bare-variant", action="append", default=[], choices=["bare-overlay"])
    parser.add_argument("--command", help="a workload of your own (shell), named 'custom'")
    parser.add_argument("--accel", choices=["tcg", "kvm"], default="tcg")
    parser.add_argument("--pyc", action="store_true", help="also count stale .pyc files")
    parser.add_argument("--list-variants", action="store_true")
    args = parser.parse_args()
    if args.list_variants:
        print("\n".join([*VARIANTS, f"layers-N (N of 1..{MAX_LAYERS})"]))
        return
    args.workload = args.workload.split(",")
    if args.command:
        WORKLOADS["custom"] = args.command
        args.workload = ["custom"]
    args.variant = args.variant or ["as-is"]
    for name in args.variant:
        if name not in VARIANTS and layer_count(name) is None:
            raise SystemExit(f"unknown variant {name!r}; see --list-variants")
    layers = max((layer_count(name) or 0 for name in args.variant), default=0)
    os.environ.setdefault("MICROAGENT_EXTRA_CA", "host")  # the setup steps reach PyPI
    api = Microagent(Settings.from_environ())
    with tempfile.TemporaryDirectory(prefix="bench-guest-") as tmp:
        work = Path(tmp)
        root, flat = build_image(api, work)
        tsc = hostclock.tsc_khz(api.settings.probes_dir)
        backend = PidBackend(cache_dir=api.settings.probes_dir)
        guest = Guest(backend, api.kit(), tsc, root, flat, build_layers(layers, work))
        print(f"product's root: {root.image.name} + {len(root.layers)} layer disk(s)", flush=True)
        print(f"bare guest's root: {flat} ({flat.stat().st_size >> 20} MiB)", flush=True)
        if args.pyc:
            bare, product = pyc_check(guest, work, Accel(args.accel))
            print(f".pyc files on sys.path: bare {bare}; product {product}")
            for index, line in enumerate(workspace_pyc(work), start=1):
                print(f"workspace start {index}: import anthropic, pydantic: {line}", flush=True)
        samples = measure(args, guest, work)
    report(samples, args)


if __name__ == "__main__":
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("needs qemu-system-x86_64")
    main()
