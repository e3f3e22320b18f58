"""Benchmark `image pull` of the python:3.13-slim stand-in from a real local registry.

Cold (empty store: download + verify + flatten + ext4) vs cached (same image again), and the
raw download throughput. Targets (issue 5): cached <= 0.2 s and >= 50x faster than cold;
download >= 100 MB/s. Needs root the first time (the stand-in is built with debootstrap).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from microagent.build.base import pull_base  # noqa: E402
from microagent.oci.endpoints import RegistryConfig  # noqa: E402
from microagent.oci.registry import RegistryClient  # noqa: E402
from microagent.store.content import Store  # noqa: E402
from testenv import standin  # noqa: E402
from testenv.registry import start_registry  # noqa: E402


def main() -> None:
    image = standin.build_python(None)
    with tempfile.TemporaryDirectory() as tmp, start_registry(Path(tmp) / "reg") as registry:
        standin.push(image, registry.host)
        client = RegistryClient(RegistryConfig(mirrors={"docker.io": (registry.url,)}))
        lines: list[str] = []
        store = Store(Path(tmp) / "store")
        began = time.perf_counter()
        cold = pull_base(store, "python:3.13-slim", client=client, progress=lines.append)
        cold_s = time.perf_counter() - began
        began = time.perf_counter()
        warm = pull_base(store, "python:3.13-slim", client=client)
        warm_s = time.perf_counter() - began
        assert warm.cached and not cold.cached
    size = image.size()
    print("cold pull steps:")
    for line in lines:
        print(f"  {line.strip()}")
    print(f"compressed layers                {size / 1e6:8.1f} MB")
    print(f"cold pull + flatten + ext4       {cold_s:8.2f} s")
    print(f"cached pull (tag re-resolved)    {warm_s:8.3f} s   target 0.2 s")
    print(f"speed-up cached vs cold          {cold_s / warm_s:8.0f}x   target 50x")


if __name__ == "__main__":
    main()
