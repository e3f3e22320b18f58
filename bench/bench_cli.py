"""Benchmark how fast the CLI answers (issue 15 item 3), all ratios from one run.

Each figure is the median wall time of whole ``microagent`` processes, divided by the median of
``python -c pass`` (the same interpreter) measured in the same run:

1. ``plan --offline`` of examples/minimal-agent with its image pinned — target <= 4x;
2. a cache-hit ``create`` of a spec whose image is an unlocked tag (``busybox:latest``, through
   a registry mirror on loopback; the tag was resolved moments before, so the resolution cache
   answers) — target <= 8x; also shown with ``MICROAGENT_RESOLVE_TTL=0`` (the registry asked);
3. ``cp`` of 1 MB into a stopped workspace (its /tmp) — target <= 6x.

Workspaces use the fake backend (nothing on the measured paths boots a VM). Bytecode is cached
(in a temporary ``PYTHONPYCACHEPREFIX``) as in an installed package, after warm-up runs.
Needs ``docker-registry``, ``skopeo`` and ``busybox-static``. Timings are printed, not judged.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
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


def median_seconds(argv: list[str], env: Mapping[str, str], runs: int = RUNS) -> float:
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        done = subprocess.run(argv, env=dict(env), capture_output=True, check=False)
        samples.append(time.perf_counter() - began)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout!r}\n{done.stderr!r}")
    return statistics.median(samples)


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


def measure(tmp: Path, registry_url: str) -> dict[str, float]:
    env = base_env(tmp)
    env["MICROAGENT_REGISTRY_MIRRORS"] = f"docker.io={registry_url}"
    python = [sys.executable, "-c", "pass"]
    plan = [*MA, "plan", "--offline", "-f", str(pinned_example(tmp))]
    project = tmp / "proj"
    project.mkdir()
    spec = project / "microagent.yaml"
    spec.write_text("name: bench\nimage: busybox:latest\nsetup:\n  - echo one\n")
    microagent(env, "create", "-f", str(spec))  # cold: resolve, pull, build the step
    blob = tmp / "one-mb.bin"
    blob.write_bytes(os.urandom(1 << 20))
    cp = [*MA, "cp", str(blob), "bench:/tmp/one-mb.bin"]
    for argv in (python, plan, cp):  # warm-up: bytecode written, caches filled
        median_seconds(argv, env, runs=2)
    counter = iter(range(10_000))

    def create(environ: Mapping[str, str]) -> float:
        samples = []
        for _ in range(RUNS):
            argv = [*MA, "create", "-f", str(spec), "--name", f"hit-{next(counter)}"]
            samples.append(median_seconds(argv, environ, runs=1))
        return statistics.median(samples)

    create(env)  # warm-up
    uncached = dict(env, MICROAGENT_RESOLVE_TTL="0")
    return {
        "python -c pass": median_seconds(python, env),
        "plan --offline": median_seconds(plan, env),
        "cache-hit create": create(env),
        "cache-hit create, TTL 0": create(uncached),
        "cp 1 MB": median_seconds(cp, env),
    }


def main() -> None:
    busybox = standin.build_busybox(None)
    with tempfile.TemporaryDirectory() as tmp_text:
        tmp = Path(tmp_text)
        with start_registry(tmp / "registry") as registry:
            pushed = standin.push(busybox, registry.host)
            if pushed.repository != "library/busybox" or pushed.tag != "latest":
                raise SystemExit(f"unexpected stand-in reference {pushed.ref}")
            figures = measure(tmp, registry.url)
    base = figures["python -c pass"]
    print(f"median of {RUNS} runs each; ratios to `python -c pass` in this run")
    for name, seconds in figures.items():
        target = TARGETS.get(name)
        goal = f"  (target <= {target:.0f}x)" if target else ""
        print(f"{name:<26} {seconds * 1000:7.1f} ms  {seconds / base:5.1f}x{goal}")


if __name__ == "__main__":
    main()
