"""Benchmark snapshots and warm templates (issue 18), ratios in one run.

The workspace is the minimal-agent's image as bench/bench_guest.py builds it (the
python:3.13-slim stand-in + ``pip install pydantic anthropic``; a cache hit after the first
run) with an entrypoint that imports the SDK, marks itself ready (/tmp/ready) and stays up,
as the example agent in serve mode does; a health probe (``test -f /tmp/ready``) tells a
warm create when to take the template. "Ready" below is the first moment an exec of
``test -f /tmp/ready`` through the guest agent succeeds (polled from the host), the same
measure on both sides.

1. warm: ``create --warm`` (the template exists: a fork) + ``start`` -> ready, against cold:
   ``create`` (cache hit, no boot) + ``start`` -> ready; ratio. The template itself is made
   first (a cold boot until ready + snapshot), timed too.
2. ``start`` of a suspended workspace -> exec-ready, against a cold ``start`` of the same
   workspace (halted) -> exec-ready; ratio.
3. a snapshot of the ready workspace: VM state bytes, disk bytes, write time (the vCPUs
   stood still that long), each per GiB of guest memory (QEMU skips zero pages).

    .venv/bin/python bench/bench_snapshot.py [--runs 2] [--memory 1024]

Uses the store of ``MICROAGENT_HOME`` (default: the user's), workspaces named ``bench-snap-*``
(deleted before and after) and removes the template it made at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_guest import SETUP  # noqa: E402

from microagent.api import Microagent  # noqa: E402
from microagent.compiler.overrides import Overrides  # noqa: E402
from microagent.errors import MicroagentError  # noqa: E402
from microagent.settings import Settings  # noqa: E402
from testenv import standin  # noqa: E402

PREFIX = "bench-snap"
ENTRY = (
    'python3 -c \'import time, anthropic, pydantic; open("/tmp/ready", "w").close(); '
    "time.sleep(10**9)'"
)
READY = ["test", "-f", "/tmp/ready"]
TIMEOUT = 1800.0
POLL = 0.05


def write_spec(work: Path, memory: int) -> Path:
    image = standin.build_python(None)
    steps = "".join(f"  - {shlex.quote(step)}\n" for step in SETUP)
    spec = work / "microagent.yaml"
    spec.write_text(
        f"name: {PREFIX}-make\nimage: {image.oci_ref}\nsetup:\n{steps}"
        f"entrypoint: {json.dumps(ENTRY)}\nnetwork: {{mode: isolated}}\n"
        f"resources: {{memoryMiB: {memory}, cpuCount: 1}}\n"
        "health: {exec: [test, -f, /tmp/ready], intervalSeconds: 1, timeoutSeconds: 30}\n"
    )
    return spec


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {what}")
        time.sleep(POLL)


def exec_ready(api: Microagent, name: str) -> bool:
    return bool(api.status(name)["readiness"]["execReady"]["ready"])


def agent_ready(api: Microagent, name: str) -> bool:
    if not exec_ready(api, name):
        return False
    try:
        return api.exec(name, READY, timeout=30).exit_code == 0
    except MicroagentError:
        return False


def cleanup(api: Microagent) -> None:
    names = [row["name"] for row in api.list_workspaces() if row["name"].startswith(PREFIX)]
    api.delete(names, force=True)


def timed(step: Callable[[], object]) -> float:
    began = time.monotonic()
    step()
    return time.monotonic() - began


def warm_vs_cold(api: Microagent, spec: Path, runs: int) -> tuple[list[float], list[float]]:
    made = api.create(spec, warm=True)
    assert made.warm is not None
    what = "made" if made.warm.made else "already there (made by an earlier run)"
    print(
        f"template {made.warm.key[7:19]} {what}: create --warm {made.seconds:.1f}s "
        f"(cold boot to ready {made.warm.ready_seconds:.1f}s)",
        flush=True,
    )
    warm, cold = [], []
    for i in range(runs):
        name = f"{PREFIX}-warm{i}"

        def warm_run(name: str = name) -> None:
            report = api.create(spec, Overrides(name=name), warm=True)
            assert report.warm is not None and not report.warm.made, report.warm
            api.start(name)
            until(lambda: agent_ready(api, name), f"{name} ready")

        warm.append(timed(warm_run))
        print(f"  warm create -> ready: {warm[-1]:.2f}s", flush=True)
        name = f"{PREFIX}-cold{i}"

        def cold_run(name: str = name) -> None:
            api.create(spec, Overrides(name=name))
            api.start(name)
            until(lambda: agent_ready(api, name), f"{name} ready")

        cold.append(timed(cold_run))
        print(f"  cold create (cache hit) -> ready: {cold[-1]:.2f}s", flush=True)
    return warm, cold


def suspend_vs_cold(
    api: Microagent, runs: int
) -> tuple[list[float], list[float], dict[str, float]]:
    name = f"{PREFIX}-cold0"  # ready (from the first part)
    resumed, cold = [], []
    snap: dict[str, float] = {}
    for _ in range(runs):
        report = api.suspend(name)
        snap = {
            "bytes": report.bytes,
            "stateBytes": report.state_bytes,
            "diskBytes": report.disk_bytes,
            "seconds": report.seconds,
        }
        resumed.append(timed(lambda: (api.start(name), until(lambda: exec_ready(api, name), "x"))))
        print(f"  start of a suspended workspace -> exec-ready: {resumed[-1]:.2f}s", flush=True)
        api.halt(name)
        api.snapshot_remove(name, "suspended")
        cold.append(timed(lambda: (api.start(name), until(lambda: exec_ready(api, name), "x"))))
        print(f"  cold start -> exec-ready: {cold[-1]:.2f}s", flush=True)
        until(lambda: agent_ready(api, name), "ready again")  # the next suspend: a ready agent
    return resumed, cold, snap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--memory", type=int, default=1024, help="guest MiB")
    args = parser.parse_args()
    os.environ.setdefault("MICROAGENT_EXTRA_CA", "host")  # a first build's setup reaches PyPI
    api = Microagent(Settings.from_environ())
    cleanup(api)
    key = ""
    with tempfile.TemporaryDirectory(prefix="bench-snap-") as tmp:
        spec = write_spec(Path(tmp), args.memory)
        try:
            warm, cold = warm_vs_cold(api, spec, args.runs)
            key = str(api.workspace(f"{PREFIX}-make").record().template)
            resumed, cold_start, snap = suspend_vs_cold(api, args.runs)
        finally:
            cleanup(api)
            if key:
                api.store.remove(f"templates/{key.removeprefix('sha256:')}")
    report(args, warm=warm, cold=cold, resumed=resumed, cold_start=cold_start, snap=snap)


def report(
    args: argparse.Namespace,
    *,
    warm: list[float],
    cold: list[float],
    resumed: list[float],
    cold_start: list[float],
    snap: dict[str, float],
) -> None:
    load = os.getloadavg()
    gib = args.memory / 1024
    print(f"\n{os.cpu_count()} host CPUs, load {load[0]:.2f}; guest {args.memory} MiB, 1 vCPU")
    w, c = statistics.median(warm), statistics.median(cold)
    print(
        f"warm create -> ready {w:.2f}s vs cold create (cache hit) -> ready {c:.2f}s: {c / w:.1f}x"
    )
    r, s = statistics.median(resumed), statistics.median(cold_start)
    print(
        f"start of a suspended workspace {r:.2f}s vs cold start {s:.2f}s "
        f"to exec-ready: {s / r:.1f}x"
    )
    state, disk = snap["stateBytes"] / 2**20, snap["diskBytes"] / 2**20
    print(
        f"snapshot: VM state {state:.0f} MiB ({state / gib:.0f} MiB per GiB of guest memory), "
        f"{disk:.0f} MiB on the host's disk, written in {snap['seconds']:.2f}s "
        f"({snap['seconds'] / gib:.2f}s per GiB)"
    )


if __name__ == "__main__":
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("needs qemu-system-x86_64")
    main()
