"""Where a remote hit's restore spends its wall time, as ``create`` runs it (the layers and the
rootfs image in parallel): the same setup as bench_remote.py (machine A cold-creates
examples/minimal-agent and pushes it to a local registry), then three restores into fresh
stores, each printed as a timeline of its parts (start -> end, seconds, thread).

``.venv/bin/python bench/bench_remote_timeline.py`` (~4-5 min: the cold create dominates).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_remote as bench

from microagent.ext4 import packed
from microagent.remotecache.restore import Restorer

Event = tuple[str, str, float, float]  # part, thread, start, end
EVENTS: list[Event] = []
PARTS: dict[object, tuple[str, ...]] = {
    Restorer: ("_chain", "_fetch_base_documents", "_fetch_blob", "_usable_image",
               "_unpack_image", "_record_base", "_record_step"),
    packed: ("_unpack_runs", "_unpack_v1", "check_image"),
}  # fmt: skip


def _timed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((name, threading.current_thread().name, began, time.perf_counter()))

    return timed


def main() -> None:
    for owner, names in PARTS.items():
        for name in names:
            setattr(owner, name, _timed(getattr(owner, name), name))
    image = bench.standin.build_python(None)
    with tempfile.TemporaryDirectory() as text, bench.start_registry(Path(text) / "r") as reg:
        tmp = Path(text)
        bench.standin.push(image, reg.host)
        spec = str(bench._project(tmp, "python"))
        repo = f"{reg.host}/team/agent-cache"
        env_a = bench._env(tmp, "a", reg.url)
        bench.cli(env_a, "kernel", "install")
        _, cold = bench.cli(env_a, "create", "-f", spec)
        bench.cli(env_a, "build", "-f", spec, "--push", repo)
        for run in range(3):
            _restore(bench._restorer(tmp / f"t{run}", repo), cold["rootfsKey"], run)


def _restore(restorer: Restorer, key: str, run: int) -> None:
    hit = restorer.probe(key)
    assert hit is not None, "the step must be published"
    os.sync()
    EVENTS.clear()
    began, cpu = time.perf_counter(), bench._cpu()
    restorer.restore(hit)
    wall = time.perf_counter() - began
    print(f"restore {run}: {wall:.2f} s wall, {bench._cpu() - cpu:.2f} s CPU, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for name, thread, start, end in sorted(EVENTS, key=lambda e: e[2]):
        print(f"   {start - began:6.3f} -> {end - began:6.3f}  {end - start:6.3f} s  "
              f"{name:22} {thread}")  # fmt: skip


if __name__ == "__main__":
    main()
