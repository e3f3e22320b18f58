"""Benchmark a trivial setup step after a large one vs `microagent run --rootfs IMAGE -- true`.

Target (issue 15): a trivial setup step (``mkdir -p /x``) after a large one costs at most
1.5x the time of booting the same image for ``true``. In one run, on the python:3.13-slim
stand-in (an OCI layout; no registry, no network):

1. ``build`` of a spec whose first setup step is large (it copies /usr: the image doubles, as
   the demo's ``pip install`` makes it grow) and whose second is ``mkdir -p /x``: each step's
   time and where it went (boot, e2fsck of the guest's disk, export of the upper, zstd and
   store, its root: a layer disk stacked on its parent's root), as the product builds it;
2. the trivial step again, forced (``--no-cache-from 2``), twice, for comparison: with its
   own image derived from its parent's (``ext4.derive``, the default before layer disks; the
   large step's chain is first made one image for it), and flattened from every layer (the
   way every step was built before that);
3. ``microagent run --rootfs <base image> --layer <the large step's layer disk> -- true`` as a
   CLI process (median of ``--boots``): the root the trivial step boots, booted for nothing.

It boots real VMs (KVM when it works, TCG otherwise) and needs the guest kit (``kernel
install`` fetches it once; an existing one under ``~/.cache/microagent`` is copied in).
Everything lives in a temporary MICROAGENT_HOME, removed at the end.

    .venv/bin/python bench/bench_setup.py [--boots 3] [--accel auto|kvm|tcg] [--json]

``--demo`` instead times cold builds of the README demo's setup (examples/minimal-agent:
``pip install`` from PyPI, then ``mkdir``) on the stand-in, each from an empty store (the
guest kit installed first, untimed), as ``microagent build`` processes. With ``--baseline
OLD/src`` (e.g. ``git worktree add /tmp/old COMMIT``, then ``/tmp/old/src``) the old tree's
build runs in the same rounds, alternating with this tree's, and the ratio is printed (target:
>= 2x); ``--rounds`` sets how many pairs. The guest needs PyPI: set ``MICROAGENT_EXTRA_CA=host``
where the host's CA bundle is what reaches it.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from microagent.api import Microagent  # noqa: E402
from microagent.build.setup import BuildContext, StepTimings, ensure_rootfs  # noqa: E402
from microagent.ext4.rootfs import materialise  # noqa: E402
from microagent.runtime.backend import Accel  # noqa: E402
from microagent.settings import Settings  # noqa: E402
from microagent.store.records import read_record, root_of  # noqa: E402
from testenv import standin  # noqa: E402

MA = [sys.executable, "-m", "microagent.cli"]
LARGE = "cp -a /usr /opt/usr-copy"
TRIVIAL = "mkdir -p /x"
TARGET = 1.5
FIELDS = ("boot", "check", "export", "store", "rootfs")


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


def seed_kits(home: Path) -> None:
    """Copy guest kits already installed for this user (saves a download; the key decides)."""
    mine = Path.home() / ".cache" / "microagent" / "store" / "kits"
    if mine.is_dir():
        shutil.copytree(mine, home / "store" / "kits", symlinks=True)


def write_project(tmp: Path) -> Path:
    project = tmp / "project"
    project.mkdir()
    shutil.copytree(standin.build_python(None).layout, project / "layout")
    spec = project / "microagent.yaml"
    spec.write_text(
        "name: bench-setup\nimage: oci:layout:3.13-slim\n"
        f'setup:\n  - {LARGE}\n  - {TRIVIAL}\nentrypoint: "true"\n'
    )
    return spec


DEMO_SPEC = (
    "name: bench-demo\nimage: oci:layout:3.13-slim\nsetup:\n"
    '  - pip install --no-cache-dir "pydantic>=2,<3" "anthropic>=0.40"\n'
    "  - mkdir -p /app /agent /workspace\n"
    'entrypoint: "true"\n'
)


def cold_demo(tmp: Path, accel: str, src: Path | None) -> tuple[float, list[str]]:
    """One cold ``build`` of the demo's setup from an empty home: (seconds, its step lines).
    ``src`` puts another tree's package first on ``PYTHONPATH`` (the baseline)."""
    work = Path(tempfile.mkdtemp(prefix="demo-", dir=tmp))
    try:
        home = work / "home"
        seed_kits(home)
        project = work / "project"
        project.mkdir()
        shutil.copytree(standin.build_python(None).layout, project / "layout")
        spec = project / "microagent.yaml"
        spec.write_text(DEMO_SPEC)
        env = dict(
            os.environ,
            MICROAGENT_HOME=str(home),
            MICROAGENT_CONFIG=str(work / "none.yaml"),
            MICROAGENT_ACCEL=accel,
        )
        if src is not None:
            env["PYTHONPATH"] = str(src)
        run = [*MA, "kernel", "install"]
        subprocess.run(run, env=env, capture_output=True, check=True)  # untimed, once per home
        began = time.perf_counter()
        done = subprocess.run(
            [*MA, "build", "-f", str(spec)], env=env, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - began
        if done.returncode != 0:
            raise SystemExit(f"cold build failed ({src or 'this tree'}):\n{done.stderr}")
        steps = [line.strip() for line in done.stderr.splitlines() if "DONE" in line]
        return seconds, steps
    finally:
        shutil.rmtree(work, ignore_errors=True)


def demo(tmp: Path, accel: str, baseline: Path | None, rounds: int) -> None:
    """Cold builds of the demo's setup, this tree's alternating with the baseline's."""
    trees: dict[str, Path | None] = {"this tree": None}
    if baseline is not None:
        trees["baseline"] = baseline
    times: dict[str, list[float]] = {name: [] for name in trees}
    for index in range(1, rounds + 1):
        for name, src in reversed(trees.items()):  # the baseline first in each round
            took, steps = cold_demo(tmp, accel, src)
            times[name].append(took)
            load = os.getloadavg()[0]
            print(f"round {index}: {name:<10} cold build {took:8.2f} s  (load {load:.2f})")
            for line in steps:
                print(f"    {line}")
    medians = {name: statistics.median(got) for name, got in times.items()}
    for name, took in medians.items():
        print(f"median cold build, {name:<10} {took:8.2f} s")
    if baseline is not None:
        ratio = medians["baseline"] / medians["this tree"]
        print(f"baseline / this tree           {ratio:8.2f}x   target >= 2x  ({baseline})")


def rebuild_trivial(api: Microagent, report: Any, accel: str, *, derive: bool) -> StepTimings:
    """The trivial step built again (``--no-cache-from 2``) with an image of its own."""
    ctx = BuildContext(
        api.store,
        api.kit,
        api.backend,
        accel=Accel.parse(accel),
        ram=api.settings.ram_stage,
        rebuild_from=2,
        derive=derive,
        layered=False,
    )
    ensure_rootfs(ctx, report.outcome.plan, report.outcome.base)
    (timings,) = ctx.timings
    return timings


def row(label: str, t: StepTimings) -> str:
    parts = "  ".join(f"{name} {getattr(t, name):6.2f}" for name in FIELDS)
    return f"{label:<28} {t.total:7.2f} s   ({parts})  rootfs: {t.how}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=3, help="`run -- true` boots (median)")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--demo", action="store_true", help="time cold builds of the demo")
    parser.add_argument(
        "--baseline", type=Path, help="with --demo: another tree's src folder, timed alternately"
    )
    parser.add_argument("--rounds", type=int, default=1, help="with --demo: pairs of builds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ma-bench-setup-") as tmp_text:
        tmp = Path(tmp_text)
        home = tmp / "home"
        seed_kits(home)
        env = dict(
            os.environ,
            MICROAGENT_HOME=str(home),
            MICROAGENT_CONFIG=str(tmp / "none.yaml"),
            MICROAGENT_ACCEL=args.accel,
        )
        if args.demo:
            demo(tmp, args.accel, args.baseline and args.baseline.resolve(), args.rounds)
            return
        cli(env, "kernel", "install")
        spec = write_project(tmp)
        api = Microagent(Settings.from_environ(env))
        began = time.perf_counter()
        report = api.build(spec)
        build_s = time.perf_counter() - began
        large, trivial = report.outcome.built.timings
        record = read_record(api.store, large.key)
        root = root_of(api.store, record) if record is not None else None
        assert record is not None and root is not None and root.layers, "not a stacked root"
        flags = [w for layer in root.layers for w in ("--layer", str(layer))]
        runs = [
            cli(env, "run", "--rootfs", str(root.image), *flags, "--", "true")[0]
            for _ in range(args.boots)
        ]
        run_s = statistics.median(runs)
        began = time.perf_counter()
        merged = materialise(api.store, record)  # what the derive starts from
        merge_s = time.perf_counter() - began
        size = api.store.entry_path(str(merged.rootfs)).stat().st_size
        derived = rebuild_trivial(api, report, args.accel, derive=True)
        flat = rebuild_trivial(api, report, args.accel, derive=False)
    print(f"image after the large step     {size / 1e6:8.0f} MB (ext4, apparent size)")
    print(f"build (base + 2 steps)         {build_s:8.2f} s")
    print(row("large step", large))
    print(row("trivial step", trivial))
    print(row("trivial step, derived", derived))
    print(row("trivial step, flattened", flat))
    print(f"large step's chain as one image {merge_s:7.2f} s   (what the derive needs first)")
    print(f"run --rootfs BASE --layer L -- true {run_s:5.2f} s   (median of {args.boots})")
    print(f"trivial step / run             {trivial.total / run_s:8.2f}x   target {TARGET}x")
    print(f"derived step / run             {derived.total / run_s:8.2f}x")
    print(f"flattened step / run           {flat.total / run_s:8.2f}x")
    if args.json:
        figures = {
            "imageBytes": size,
            "build": round(build_s, 3),
            "large": large.to_json(),
            "trivial": trivial.to_json(),
            "trivialDerived": derived.to_json(),
            "trivialFlattened": flat.to_json(),
            "run": round(run_s, 3),
            "ratio": round(trivial.total / run_s, 3),
            "ratioDerived": round(derived.total / run_s, 3),
            "ratioFlattened": round(flat.total / run_s, 3),
        }
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
