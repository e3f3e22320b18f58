"""Benchmark exec: a command in a running workspace vs a fresh microVM for the same command.

Measured on this machine, same root filesystem (the busybox stand-in) and guest kit:

1. ``microagent exec bench-exec -- true``: the whole CLI process (Python start-up, settings,
   the supervisor's exec socket, the guest agent's round trip);
2. ``Microagent.exec("bench-exec", ["true"])`` in this process: the exec round trip alone
   (client -> supervisor's agent link -> guest agent -> fork/exec -> EXIT back);
3. ``microagent run --rootfs ROOTFS -- true``: boot, run, power off (the one-shot path).

Medians are printed, with the ratio run / exec (how much a warm workspace saves per command).
It boots a real VM (KVM when it works, TCG otherwise), so it needs QEMU, busybox-static for the
stand-in image, and the guest kit with the guest agent (``kernel install`` fetches it once).
Everything lives in a temporary MICROAGENT_HOME, removed at the end.

    .venv/bin/python bench/bench_exec.py [--runs 20] [--boots 3] [--accel auto|kvm|tcg]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from microagent.api import Microagent  # noqa: E402
from microagent.settings import Settings  # noqa: E402
from testenv import standin  # noqa: E402

MA = [sys.executable, "-m", "microagent.cli"]
NAME = "bench-exec"
READY_TIMEOUT = 300.0  # TCG boots are slow


def cli(env: dict[str, str], *args: str) -> tuple[float, dict[str, Any]]:
    """One CLI process with --json: (seconds, its JSON document); exits on failure."""
    began = time.perf_counter()
    done = subprocess.run(
        [*MA, "--json", *args], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"microagent {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, json.loads(done.stdout) if done.stdout.strip() else {}


def median_of(runs: int, once: Callable[[], float]) -> float:
    return statistics.median(once() for _ in range(runs))


def wait_exec_ready(env: dict[str, str]) -> float:
    began = time.perf_counter()
    while time.perf_counter() - began < READY_TIMEOUT:
        status = cli(env, "status", NAME)[1]
        if status["readiness"]["execReady"]["ready"]:
            return time.perf_counter() - began
        if status["event"]["state"] in ("stopped", "halted", "failed"):
            raise SystemExit(f"the workspace ended: {status['event']}")
        time.sleep(0.2)
    raise SystemExit(f"the guest agent was not ready after {READY_TIMEOUT:.0f}s")


def make_workspace(env: dict[str, str], tmp: Path) -> str:
    """A workspace of the busybox stand-in whose entrypoint just waits; its rootfs path."""
    project = tmp / "project"
    project.mkdir()
    shutil.copytree(standin.build_busybox(None).layout, project / "layout")
    (project / "microagent.yaml").write_text(
        f"name: {NAME}\nimage: oci:layout:latest\nentrypoint: sleep 100000\nprofile: tiny\n"
    )
    cli(env, "create", "-f", str(project / "microagent.yaml"))
    record = Path(env["MICROAGENT_HOME"]) / "workspaces" / NAME / "workspace.json"
    return str(json.loads(record.read_text())["rootfs"])


def measure(env: dict[str, str], rootfs: str, runs: int, boots: int) -> dict[str, float]:
    started_s, _ = cli(env, "start", NAME)
    ready_s = wait_exec_ready(env)

    def exec_cli() -> float:
        return cli(env, "exec", NAME, "--", "true")[0]

    api = Microagent(Settings.from_environ(env))

    def exec_library() -> float:
        began = time.perf_counter()
        result = api.exec(NAME, ["true"])
        if result.exit_code != 0:
            raise SystemExit(f"exec true exited {result.exit_code}: {result.exit.error}")
        return time.perf_counter() - began

    exec_library()  # warm: first connection, first fork in the guest
    times = {
        "start": started_s,
        "ready": ready_s,
        "execCli": median_of(runs, exec_cli),
        "execLib": median_of(runs, exec_library),
    }
    cli(env, "halt", NAME)
    times["run"] = median_of(boots, lambda: cli(env, "run", "--rootfs", rootfs, "--", "true")[0])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="execs per measurement")
    parser.add_argument("--boots", type=int, default=3, help="one-shot runs (each boots a VM)")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ma-bench-exec-") as tmp_text:
        tmp = Path(tmp_text)
        env = dict(
            os.environ,
            MICROAGENT_HOME=str(tmp / "home"),
            MICROAGENT_CONFIG=str(tmp / "none.yaml"),
            MICROAGENT_ACCEL=args.accel,
        )
        kit_s, _ = cli(env, "kernel", "install")
        rootfs = make_workspace(env, tmp)
        try:
            times = measure(env, rootfs, args.runs, args.boots)
        finally:
            subprocess.run([*MA, "delete", "--force", "-y", NAME], env=env, check=False)
    print(f"guest kit install (once)                 {kit_s:7.2f} s")
    print(f"start (to running)                       {times['start']:7.2f} s")
    print(f"  then until execReady                   {times['ready']:7.2f} s")
    print(f"exec NAME -- true (CLI process, median)  {times['execCli'] * 1000:7.0f} ms")
    print(f"Microagent.exec(NAME, ['true']) (median) {times['execLib'] * 1000:7.1f} ms")
    print(f"run --rootfs ROOTFS -- true (median)     {times['run']:7.2f} s")
    print(f"  ratio run / exec (CLI)                 {times['run'] / times['execCli']:7.1f}x")
    print(f"  ratio run / exec (library)             {times['run'] / times['execLib']:7.0f}x")


if __name__ == "__main__":
    main()
