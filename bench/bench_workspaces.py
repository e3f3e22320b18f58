"""Benchmark workspaces (issue 7), all measured in one run on this machine.

1. cold `create` of examples/minimal-agent (empty store: pull, setup VMs, rootfs) vs a cache-hit
   `create` of the same spec under a new name — targets: hit <= 0.3 s, >= 100x faster;
2. edit agent.py, then `create`: <= 1 s and zero setup boots;
3. `cp` of 1 MB into a stopped workspace: <= 100 ms;
4. `start --wait` of a trivial entrypoint vs `microagent run` of the same command.

Times are whole CLI processes (what a user waits for) unless noted. Needs root the first time
(the python stand-in is built with debootstrap) and downloads the guest kit once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from testenv import standin  # noqa: E402
from testenv.registry import start_registry  # noqa: E402

MA = [sys.executable, "-m", "microagent.cli"]


def cli(env: dict[str, str], *args: str) -> tuple[float, dict[str, Any]]:
    began = time.perf_counter()
    done = subprocess.run(
        [*MA, "--json", *args], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"microagent {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, json.loads(done.stdout) if done.stdout.strip() else {}


def best(env: dict[str, str], runs: int, *args: str) -> float:
    return min(cli(env, *args)[0] for _ in range(runs))


def main() -> None:
    python = standin.build_python(None)
    busybox = standin.build_busybox(None)
    with tempfile.TemporaryDirectory() as tmp_text, start_registry(Path(tmp_text) / "r") as reg:
        tmp = Path(tmp_text)
        standin.push(python, reg.host)
        standin.push(busybox, reg.host)
        env = dict(
            os.environ,
            MICROAGENT_HOME=str(tmp / "home"),
            MICROAGENT_REGISTRY_MIRRORS=f"docker.io={reg.url}",
            MICROAGENT_CONFIG=str(tmp / "none.yaml"),
            MICROAGENT_EXTRA_CA="host",
        )
        project = tmp / "minimal-agent"
        shutil.copytree(ROOT / "examples" / "minimal-agent", project)
        spec = str(project / "microagent.yaml")
        kit_s, _ = cli(env, "kernel", "install")
        cold_s, cold = cli(env, "create", "-f", spec)
        hit_s, hit = cli(env, "create", "-f", spec, "--name", "hit-1")
        hit_best = min(
            [hit_s] + [cli(env, "create", "-f", spec, "--name", f"hit-{i}")[0] for i in (2, 3, 4)]
        )
        cli(env, "lock", "-f", spec)
        locked_s = min(cli(env, "create", "-f", spec, "--name", f"locked-{i}")[0] for i in range(3))
        (project / "agent.py").write_text((project / "agent.py").read_text() + "\n# edited\n")
        edit_s, edit = cli(env, "create", "-f", spec, "--name", "edited")
        blob = tmp / "one-mb.bin"
        blob.write_bytes(os.urandom(1 << 20))
        cp_s = best(env, 5, "cp", str(blob), "minimal-agent:/workspace/one-mb.bin")
        start_s, run_s = _trivial(env, tmp)
    print(f"guest kit install (once)              {kit_s:7.2f} s")
    print(
        f"cold create (pull + setup VMs)         {cold_s:7.2f} s  "
        f"({cold['setupBoots']} setup boots)"
    )
    print(
        f"cache-hit create, new name             {hit_best:7.3f} s  target 0.3 s "
        f"({hit['setupBoots']} boots)"
    )
    print(f"  speed-up                             {cold_s / hit_best:7.0f}x  target 100x")
    print(
        f"cache-hit create, image locked         {locked_s:7.3f} s  target 0.3 s "
        f"(no registry round trip; {cold_s / locked_s:.0f}x)"
    )
    print(
        f"edit agent.py, then create             {edit_s:7.3f} s  target 1 s "
        f"({edit['setupBoots']} boots, {edit['stepsBuilt']} steps built)"
    )
    print(
        f"cp 1 MB into a stopped workspace       {cp_s * 1000:7.0f} ms target 100 ms "
        "(whole CLI process)"
    )
    print(f"start --wait, entrypoint `true`        {start_s:7.2f} s")
    print(f"run --rootfs ... -- true               {run_s:7.2f} s  ratio {start_s / run_s:.2f}")


def _trivial(env: dict[str, str], tmp: Path) -> tuple[float, float]:
    project = tmp / "trivial"
    project.mkdir()
    (project / "microagent.yaml").write_text(
        'name: trivial\nimage: busybox:latest\nentrypoint: ["true"]\nprofile: tiny\n'
    )
    cli(env, "create", "-f", str(project / "microagent.yaml"))
    start_s = min(cli(env, "start", "trivial", "--wait")[0] for _ in range(3))
    rootfs = json.loads(
        (Path(env["MICROAGENT_HOME"]) / "workspaces/trivial/workspace.json").read_text()
    )["rootfs"]
    run_s = min(cli(env, "run", "--rootfs", rootfs, "--", "true")[0] for _ in range(3))
    return start_s, run_s


if __name__ == "__main__":
    main()
