"""Benchmark the compiler: `microagent plan` as a whole process and `compile_plan` itself.

Targets (issue 3): the whole process <= 300 ms, compile_plan <= 50 ms. Prints medians and the
ratio to the target measured in this run; timings are not pass/fail.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "minimal-agent"
DIGEST = "sha256:" + "0" * 64
RUNS = 15


def _median_seconds(fn: object, runs: int = RUNS) -> float:
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def _cli_plan(spec: Path) -> None:
    cmd = [sys.executable, "-m", "microagent.cli", "plan", "--offline", "-f", str(spec)]
    subprocess.run(cmd, check=True, capture_output=True)


def _pinned_copy(tmp: Path) -> Path:
    """A copy of the example with its image pinned, so no registry is involved."""
    import shutil

    project = tmp / "minimal-agent"
    shutil.copytree(EXAMPLE, project)
    lock = {
        "lockVersion": 1,
        "images": {
            "python:3.13-slim": {"reference": "python:3.13-slim", "digest": DIGEST, "platforms": {}}
        },
    }
    (project / "microagent.lock").write_text(json.dumps(lock))
    return project / "microagent.yaml"


def main() -> None:
    from microagent import compile_plan, load_spec
    from microagent.compiler.lock import ResolvedImage

    with tempfile.TemporaryDirectory() as tmp:
        spec_path = _pinned_copy(Path(tmp))
        python_start = _median_seconds(
            lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)
        )
        whole = _median_seconds(lambda: _cli_plan(spec_path))
        spec = load_spec(spec_path)
        image = ResolvedImage("python:3.13-slim", DIGEST, "linux/amd64")
        compile_only = _median_seconds(lambda: compile_plan(spec, image), runs=200)
        load_and_compile = _median_seconds(
            lambda: compile_plan(load_spec(spec_path), image), runs=100
        )
    print(f"python interpreter start-up      {python_start * 1000:7.1f} ms (floor)")
    print(
        f"microagent plan (whole process)  {whole * 1000:7.1f} ms  target 300 ms  "
        f"ratio {whole / 0.300:.2f}"
    )
    print(f"load_spec + compile_plan         {load_and_compile * 1000:7.1f} ms")
    print(
        f"compile_plan                     {compile_only * 1000:7.1f} ms  target 50 ms  "
        f"ratio {compile_only / 0.050:.3f}"
    )


if __name__ == "__main__":
    main()
