"""Benchmark microVM boot: the floor vs `microagent run --rootfs busybox.ext4 -- true`.

Floor: bare QEMU with the same kernel, machine and flags, booting a busybox-only initramfs whose
/init prints a marker (no modules, no disks, no control channel). Ours: the full one-shot run
(state disk, config disk, modules, overlay root, chroot) up to the moment the guest reports the
command started, and until the VM is gone. Runs alternate with a settle pause before each;
medians are printed, with the ratio (goal <= 1.2x) and where the guest's time goes (from its
/proc/uptime marks).

    .venv/bin/python bench/bench_boot.py [--runs N] [--network user]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from microagent import runner
from microagent.kit import guestkit
from microagent.kit.initramfs import CpioEntry, with_parents, write_initramfs
from microagent.runtime import hostclock
from microagent.runtime.backend import Accel, BootConfig, NetworkConfig
from microagent.runtime.boot import RunRequest, run_once
from microagent.runtime.configdisk import NetworkMode
from microagent.runtime.qemu import QemuBackend, build_argv
from microagent.settings import Settings
from microagent.store.content import Store

FLOOR_MARKER = "FLOOR-USERSPACE"
FLOOR_INIT = f"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
read -r up _ </proc/uptime
echo "{FLOOR_MARKER} $up"
/bin/busybox poweroff -f
"""
SETTLE_SECONDS = 1.0
MARKER_LINE = re.compile(FLOOR_MARKER + r" ([0-9.]+)\r?\n")
STAGES = ("kernel", "init", "modules", "port", "disks", "overlay", "mounts", "config", "exec")


def floor_initrd(directory: Path) -> Path:
    """busybox + a marker /init, written with the same cpio/gzip code as the kit."""
    busybox = Path(runner.find_tool("busybox")).resolve().read_bytes()
    entries = [
        CpioEntry.chardev("dev/console", 5, 1),
        CpioEntry.file("bin/busybox", busybox, 0o755),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.file("init", FLOOR_INIT.encode(), 0o755),
        CpioEntry.directory("proc"),
    ]
    path = directory / "floor-initrd.img"
    write_initramfs(path, with_parents(entries))
    return path


def busybox_rootfs(directory: Path) -> Path:
    tree = directory / "tree"
    for sub in ("bin", "etc", "root", "tmp", "proc", "sys", "dev", "run"):
        (tree / sub).mkdir(parents=True)
    busybox = Path(runner.find_tool("busybox")).resolve()
    (tree / "bin/busybox").write_bytes(busybox.read_bytes())
    (tree / "bin/busybox").chmod(0o755)
    for applet in runner.run([str(busybox), "--list"]).stdout.split():
        if applet != "busybox":
            (tree / "bin" / applet).symlink_to("busybox")
    image = directory / "busybox.ext4"
    with image.open("wb") as fh:
        fh.truncate(64 << 20)
    runner.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image)])
    return image


def floor_argv(kit: guestkit.GuestKit, initrd: Path, serial: Path, tsc: int | None) -> list[str]:
    """Exactly our QEMU flags (same kernel cmdline), minus disks and the control port."""
    config = BootConfig(kernel=kit.kernel, initrd=initrd, disks=(), state_dir=serial.parent)
    argv = build_argv(runner.find_tool("qemu-system-x86_64"), config, Accel.TCG, tsc_khz=tsc)
    argv[argv.index("-serial") + 1] = f"file:{serial}"
    cut = argv.index("-device")  # drop the virtio-serial control port
    return argv[:cut]


def run_floor(argv: list[str], serial: Path) -> tuple[float, float, float]:
    """(seconds to the marker, seconds to QEMU exit, guest uptime at the marker)."""
    serial.unlink(missing_ok=True)
    began = time.monotonic()
    proc = runner.spawn(argv)
    marker_at, uptime = 0.0, 0.0
    while proc.poll() is None:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        found = MARKER_LINE.search(text)
        if not marker_at and found:
            marker_at = time.monotonic() - began
            uptime = float(found.group(1))
        time.sleep(0.002)
    total = time.monotonic() - began
    if not marker_at:
        raise SystemExit(f"floor boot printed no marker:\n{serial.read_text(errors='replace')}")
    return marker_at, total, uptime


def run_ours(
    rootfs: Path, kit: guestkit.GuestKit, backend: QemuBackend, mode: NetworkMode
) -> tuple[float, float, dict[str, float]]:
    """(seconds to 'started', seconds to the end incl. VM exit, guest marks)."""
    began = time.monotonic()
    request = RunRequest(
        rootfs=rootfs, command=("true",), network=NetworkConfig(mode), accel=Accel.TCG
    )
    result = run_once(request, backend=backend, kit=kit)
    total = time.monotonic() - began
    t = result.timings
    started = t["host.prepare"] + t["host.started"]
    marks = {k.removeprefix("guest."): v for k, v in t.items() if k.startswith("guest.")}
    return started, total, marks


def cli_wall(rootfs: Path) -> float:
    began = time.monotonic()
    argv = [sys.executable, "-m", "microagent.cli", "run", "--rootfs", str(rootfs)]
    subprocess.run([*argv, "--network", "isolated", "--", "true"], check=True)
    return time.monotonic() - began


def breakdown(marks: list[dict[str, float]]) -> list[str]:
    lines = []
    previous = 0.0
    for stage in STAGES:
        values = [m[stage] for m in marks if stage in m]
        if not values:
            continue
        at = statistics.median(values)
        label = "kernel boot to /init" if stage == "kernel" else f"-> {stage}"
        lines.append(f"  {label:<22} {at - previous:6.3f} s   (uptime {at:.3f})")
        previous = at
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--network", choices=["isolated", "user"], default="isolated")
    args = parser.parse_args()
    store = Store(Settings.from_environ().store_dir)
    kit = guestkit.ensure_kit(store, progress=print)
    backend = QemuBackend(cache_dir=store.root / "probes")
    tsc = hostclock.tsc_khz(store.root / "probes")
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        work = Path(tmp)
        rootfs = busybox_rootfs(work)
        serial = work / "floor-serial.log"
        argv = floor_argv(kit, floor_initrd(work), serial, tsc)
        print("floor:", shlex.join(argv))
        floor, ours, marks = [], [], []
        for _ in range(args.runs):
            # Same host state before each boot: this host (itself a VM) boots a guest faster
            # right after another one finished than after a pause, which skewed alternation.
            time.sleep(SETTLE_SECONDS)
            floor.append(run_floor(argv, serial))
            time.sleep(SETTLE_SECONDS)
            started, total, guest = run_ours(rootfs, kit, backend, NetworkMode(args.network))
            ours.append((started, total))
            marks.append(guest)
        wall = cli_wall(rootfs)
    report(floor, ours, marks, wall, args)


def report(
    floor: list[tuple[float, float, float]],
    ours: list[tuple[float, float]],
    marks: list[dict[str, float]],
    wall: float,
    args: argparse.Namespace,
) -> None:
    f_marker = statistics.median(x[0] for x in floor)
    f_total = statistics.median(x[1] for x in floor)
    f_uptime = statistics.median(x[2] for x in floor)
    o_started = statistics.median(x[0] for x in ours)
    o_total = statistics.median(x[1] for x in ours)
    f_min, o_min = min(x[0] for x in floor), min(x[0] for x in ours)
    print(f"\nTCG, {os.cpu_count()} host CPUs, {args.runs} runs each, network={args.network}")
    floor_extra = f"(guest uptime {f_uptime:.3f}, exit {f_total:.3f} s)"
    print(f"floor  boot-to-userspace  {f_marker:6.3f} s  {floor_extra}")
    print(
        f"ours   boot-to-command    {o_started:6.3f} s  (whole run incl. VM exit {o_total:.3f} s)"
    )
    print(
        f"ratio  {o_started / f_marker:.2f}x  (goal <= 1.20x); end-to-end {o_total / f_total:.2f}x"
    )
    print(f"best   floor {f_min:.3f} s, ours {o_min:.3f} s: {o_min / f_min:.2f}x")
    print(f"cli    `microagent run ... -- true` wall {wall:.3f} s (python start-up included)")
    print("where the guest's time goes (median uptime marks):")
    print("\n".join(breakdown(marks)))
    after_init = statistics.median(m["exec"] - m["kernel"] for m in marks)
    print(f"guest work from /init to the command: {after_init:.3f} s (the floor has none)")


if __name__ == "__main__":
    main()
