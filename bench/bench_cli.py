"""Benchmark how fast the CLI answers (issue 15 item 3), all ratios from one run.

Each figure is the median wall time, and CPU time (user + system, children included), of whole
``microagent`` processes, divided by the same median of ``python -c pass`` (the same interpreter)
measured in the same run, in rounds; on a busy machine the CPU ratio is the steadier one:

1. ``plan --offline`` of examples/minimal-agent with its image pinned — target <= 4x;
2. a cache-hit ``create`` of a spec whose image is an unlocked tag (``busybox:latest``, through
   a registry mirror on loopback; the tag was resolved moments before, so the resolution cache
   answers) — target <= 8x; also shown with ``MICROAGENT_RESOLVE_TTL=0`` (the registry asked);
3. ``cp`` of 1 MB into a stopped workspace (its /tmp) — target <= 6x.

Two floors are timed beside them: ``python -c "import click"`` (what any click CLI pays before
its first line runs) and ``import click, yaml`` (what a command that reads a spec pays).

Workspaces use the fake backend (nothing on the measured paths boots a VM). Bytecode is cached
(in a temporary ``PYTHONPYCACHEPREFIX``) as in an installed package, after warm-up runs.
Needs ``docker-registry``, ``skopeo`` and ``busybox-static``. Timings are printed, not judged.

This machine's speed drifts by 10-20 % between runs (shared CPUs), more than a start-up change
moves the figures: compare two trees with ``--baseline OLD/src``, which times the old tree's
plan, create and cp in the same rounds, not two runs one after the other.
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
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from testenv import standin  # noqa: E402
from testenv.registry import start_registry  # noqa: E402

RUNS = 11
DIGEST = "sha256:" + "0" * 64
SCRIPT = Path(sys.executable).with_name("microagent")
MA = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "microagent.cli"]
TARGETS = {"plan --offline": 4.0, "cache-hit create": 8.0, "cp 1 MB": 6.0}
BASE = "[baseline]"


Timing = tuple[float, float]  # wall seconds, CPU seconds (user + system, its children too)


def seconds(argv: list[str], env: Mapping[str, str]) -> Timing:
    began = time.perf_counter()
    proc = subprocess.Popen(argv, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err!r}")
    return elapsed, usage.ru_utime + usage.ru_stime


def interleaved(cases: Mapping[str, Callable[[], Timing]], runs: int = RUNS) -> dict[str, Timing]:
    """The medians of ``runs`` timings of each case, taken in rounds (one of each per round)
    so that every case sees the same machine load."""
    samples: dict[str, list[Timing]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, run in cases.items():
            samples[name].append(run())
    return {
        name: (statistics.median(t[0] for t in got), statistics.median(t[1] for t in got))
        for name, got in samples.items()
    }


def microagent(env: Mapping[str, str], *args: str) -> dict[str, object]:
    done = subprocess.run(
        [*MA, "--json", *args], env=dict(env), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"microagent {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    data: dict[str, object] = json.loads(done.stdout)
    return data


def base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROAGENT_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    kit = tmp / "kit"
    kit.mkdir()
    (kit / "vmlinuz").write_bytes(b"kernel")
    (kit / "initrd").write_bytes(b"initrd")
    env.update(
        PYTHONPYCACHEPREFIX=str(tmp / "pycache"),
        MICROAGENT_HOME=str(tmp / "home"),
        MICROAGENT_CONFIG=str(tmp / "no-config.yaml"),
        MICROAGENT_BACKEND="fake",
        MICROAGENT_KERNEL=str(kit / "vmlinuz"),
        MICROAGENT_INITRD=str(kit / "initrd"),
    )
    return env


def pinned_example(tmp: Path) -> Path:
    project = tmp / "minimal-agent"
    shutil.copytree(ROOT / "examples" / "minimal-agent", project)
    entry = {"reference": "python:3.13-slim", "digest": DIGEST, "platforms": {}}
    lock = {"lockVersion": 1, "images": {"python:3.13-slim": entry}}
    (project / "microagent.lock").write_text(json.dumps(lock))
    return project / "microagent.yaml"


def measure(tmp: Path, registry_url: str, baseline: Path | None) -> dict[str, Timing]:
    env = base_env(tmp)
    env["MICROAGENT_REGISTRY_MIRRORS"] = f"docker.io={registry_url}"
    python = [sys.executable, "-c", "pass"]
    floor_click = [sys.executable, "-c", "import click"]
    floor_yaml = [sys.executable, "-c", "import click, yaml"]
    plan = [*MA, "plan", "--offline", "-f", str(pinned_example(tmp))]
    project = tmp / "proj"
    project.mkdir()
    spec = project / "microagent.yaml"
    spec.write_text("name: bench\nimage: busybox:latest\nsetup:\n  - echo one\n")
    microagent(env, "create", "-f", str(spec))  # cold: resolve, pull, build the step
    blob = tmp / "one-mb.bin"
    blob.write_bytes(os.urandom(1 << 20))
    cp = [*MA, "cp", str(blob), "bench:/tmp/one-mb.bin"]
    names = iter(range(1_000_000))

    def create(environ: Mapping[str, str]) -> Timing:
        return seconds([*MA, "create", "-f", str(spec), "--name", f"hit-{next(names)}"], environ)

    uncached = dict(env, MICROAGENT_RESOLVE_TTL="0")
    cases: dict[str, Callable[[], Timing]] = {
        "python -c pass": lambda: seconds(python, env),
        "floor: import click": lambda: seconds(floor_click, env),
        "floor: click + yaml": lambda: seconds(floor_yaml, env),
        "plan --offline": lambda: seconds(plan, env),
        "cache-hit create": lambda: create(env),
        "cache-hit create, TTL 0": lambda: create(uncached),
        "cp 1 MB": lambda: seconds(cp, env),
    }
    if baseline is not None:  # the same commands on the other tree, each beside its twin
        old = dict(env, PYTHONPATH=str(baseline))
        twins: dict[str, Callable[[], Timing]] = {
            "plan --offline": lambda: seconds(plan, old),
            "cache-hit create": lambda: create(old),
            "cp 1 MB": lambda: seconds(cp, old),
        }
        cases = {
            label: run
            for name, case in cases.items()
            for label, run in ((name, case), (f"{name} {BASE}", twins.get(name)))
            if run is not None
        }
    interleaved(cases, runs=2)  # warm-up: bytecode written, caches filled
    return interleaved(cases)


def measured_code() -> str:
    """Where the measured ``microagent`` package is imported from (``PYTHONPATH`` can point the
    console script at another tree, e.g. an older commit's, for a before/after)."""
    probe = [sys.executable, "-c", "import microagent; print(microagent.__file__)"]
    done = subprocess.run(probe, capture_output=True, text=True, check=True)
    return str(Path(done.stdout.strip()).parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a folder holding another microagent package (e.g. `git archive OLD src | tar -x`, "
        "then OLD/src): its plan, create and cp are timed in the same rounds, the fair "
        "before/after on a machine whose speed drifts between runs",
    )
    baseline = parser.parse_args().baseline
    busybox = standin.build_busybox(None)
    code = measured_code()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_text:
        tmp = Path(tmp_text)
        with start_registry(tmp / "registry") as registry:
            pushed = standin.push(busybox, registry.host)
            if pushed.repository != "library/busybox" or pushed.tag != "latest":
                raise SystemExit(f"unexpected stand-in reference {pushed.ref}")
            figures = measure(tmp, registry.url, baseline and baseline.resolve())
    wall, cpu = figures["python -c pass"]
    print(f"code measured: {code}" + (f"; {BASE}: {baseline}" if baseline else ""))
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"median of {RUNS} runs each, in rounds; ratios to `python -c pass` in this run")
    print(f"{'':<28} {'wall':>9} {'ratio':>6} {'CPU':>9} {'ratio':>6}")
    for name, (took, used) in figures.items():
        target = TARGETS.get(name.removesuffix(f" {BASE}"))
        goal = f"  (target <= {target:.0f}x)" if target else ""
        print(
            f"{name:<28} {took * 1000:6.1f} ms {took / wall:5.1f}x "
            f"{used * 1000:6.1f} ms {used / cpu:5.1f}x{goal}"
        )


if __name__ == "__main__":
    main()
