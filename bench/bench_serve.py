"""Benchmark serve mode (issue "Live workspaces", item 8): what a request costs once the agent
stays up, against one agent process per request.

On the host (default), for each example agent whose SDK is installed, with a scripted fake of
the provider's API on 127.0.0.1 answering at once (so the model itself costs nothing):

1. serve mode: one agent process driven by scripts/dispatch.py over loopback TCP; start-up
   (spawn to `ready`, which includes importing pydantic and the SDK), request 1, requests 2..N;
2. file mode: one `python agent.py` per request (input.json in, result.json out), as the
   walkthrough runs it, minus the VM.

Ratios: request 1 / median(requests 2..N); file-mode request / median(serve requests 2..N).

What this cannot show is the VM: under TCG the SDK import takes far longer than here, and file
mode pays it (plus a boot) per request while serve mode pays it once. To measure that, run the
same exchange against a real workspace:

    microagent create --file examples/minimal-agent/microagent.yaml --credential anthropic \\
        --mediation 2048=127.0.0.1:9900 --name serve-bench
    python bench/bench_serve.py --external 127.0.0.1:9900 --requests 10 &
    microagent start serve-bench

`--external` listens on the mediation target, waits for the workspace's agent, sends N
generated requests and prints the agent's import time (from its `ready` signal) and the same
request 1 vs 2..N figures. The file-mode side in a VM is `cp` + `start` + wait per request
(scripts/demo.sh times that loop).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The fake provider APIs and the agent launcher are the example tests' own helpers.
sys.path[:0] = [str(ROOT / "tests" / "examples"), str(ROOT / "scripts")]

import dispatch  # noqa: E402
from example_harness import AgentHarness, FakeModelAPI  # noqa: E402
from example_providers import PROVIDERS, Provider  # noqa: E402

WAIT_SECONDS = 120.0


def quiet(event: str, fields: dict[str, Any]) -> None:
    pass


@dataclass(frozen=True)
class ServeRun:
    startup: float  # spawn to the ready signal
    imports: str  # what the agent says its imports took
    latencies: list[float]

    @property
    def rest(self) -> float:
        return statistics.median(self.latencies[1:])


def generated_lines(count: int, prefix: str) -> list[tuple[bytes, str]]:
    lines = []
    for number in range(1, count + 1):
        request = dispatch.generated_request(number, f"{prefix} request {number}")
        lines.append(dispatch.request_line(request | {"request_id": f"{prefix}-{number:03d}"}))
    return lines


def serve_exchanges(listener: Any, count: int, prefix: str) -> tuple[float, str, list[float]]:
    """Wait for the agent, time `count` requests, close; (wait to ready, imports, latencies)."""
    started = time.perf_counter()
    peer, ready = dispatch.wait_for_agent(listener, time.monotonic() + WAIT_SECONDS, quiet)
    try:
        dispatch.check_ready(ready, peer)
        startup = time.perf_counter() - started
        deadline = time.monotonic() + WAIT_SECONDS
        latencies = [
            dispatch.exchange(peer, line, rid, deadline, quiet).latency
            for line, rid in generated_lines(count, prefix)
        ]
        peer.finish(deadline)
    finally:
        peer.close()
    imports = str(ready.get("detail", "")).rpartition("imports took ")[2] or "?"
    return startup, imports, latencies


def serve_on_host(provider: Provider, root: Path, count: int) -> ServeRun:
    with FakeModelAPI() as api, dispatch.listen("127.0.0.1:0") as listener:
        for _ in range(count):
            api.reply(provider.answer("done"))
        agent = provider.configure(AgentHarness(provider.example, root), api)
        proc = agent.start_serving(dispatch.bound_address(listener))
        try:
            startup, imports, latencies = serve_exchanges(listener, count, "serve")
        finally:
            if proc.wait(timeout=WAIT_SECONDS) != 0:
                raise SystemExit(f"{provider.example} exited {proc.returncode}:\n{agent.output()}")
    return ServeRun(startup, imports, latencies)


def file_mode_on_host(provider: Provider, root: Path, runs: int) -> list[float]:
    with FakeModelAPI() as api:
        agent = provider.configure(AgentHarness(provider.example, root), api)
        seconds = []
        for number in range(1, runs + 1):
            api.reply(provider.answer("done"))
            agent.write_request(request_id=f"file-{number:03d}")
            started = time.perf_counter()
            run = agent.run()
            seconds.append(time.perf_counter() - started)
            if run.returncode != 0:
                raise SystemExit(f"{provider.example} (file mode) failed:\n{run.stderr}")
    return seconds


def report(provider: Provider, serve: ServeRun, file_runs: list[float]) -> None:
    file_median = statistics.median(file_runs)
    first, rest = serve.latencies[0], serve.rest
    print(f"\n{provider.example} ({provider.sdk})")
    print(f"  serve: start-up {serve.startup:.3f} s (imports took {serve.imports})")
    print(f"  serve: request 1 {first * 1000:.1f} ms, requests 2..{len(serve.latencies)}")
    print(f"         median {rest * 1000:.1f} ms, max {max(serve.latencies[1:]) * 1000:.1f} ms")
    print(f"  file : one process per request, median {file_median:.3f} s of {len(file_runs)}")
    print(f"  ratio: request 1 / requests 2..N          = {first / rest:8.1f}x")
    print(f"  ratio: file-mode request / serve 2..N     = {file_median / rest:8.1f}x")
    print(f"  ratio: file-mode request / serve request 1 = {file_median / first:7.1f}x")


def bench_host(names: list[str], requests: int, file_runs: int) -> None:
    chosen = [p for p in PROVIDERS if (not names or p.name in names) and p.installed()]
    if not chosen:
        raise SystemExit("no example agent with an installed SDK (pip install -e '.[examples]')")
    print(f"host, fake model: {requests} requests in serve mode, {file_runs} file-mode runs")
    for provider in chosen:
        with (
            tempfile.TemporaryDirectory() as serve_root,
            tempfile.TemporaryDirectory() as file_root,
        ):
            serve = serve_on_host(provider, Path(serve_root), requests)
            files = file_mode_on_host(provider, Path(file_root), file_runs)
        report(provider, serve, files)


def bench_external(address: str, requests: int) -> None:
    with dispatch.listen(address) as listener:
        print(f"listening on {dispatch.bound_address(listener)}; start the workspace now")
        startup, imports, latencies = serve_exchanges(listener, requests, "bench")
    rest = statistics.median(latencies[1:])
    print(f"agent ready after {startup:.3f} s of waiting; its imports took {imports}")
    print(f"request 1 {latencies[0]:.3f} s; requests 2..{requests} median {rest:.3f} s")
    print(f"ratio: request 1 / requests 2..N = {latencies[0] / rest:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10, help="serve-mode requests (>= 2)")
    parser.add_argument("--file-runs", type=int, default=3, help="file-mode processes")
    parser.add_argument("--provider", action="append", default=[], help="anthropic|openai|gemini")
    parser.add_argument("--external", metavar="HOST:PORT", help="a real workspace's target")
    args = parser.parse_args()
    if args.requests < 2 or args.file_runs < 1:
        parser.error("--requests must be at least 2 and --file-runs at least 1")
    if args.external:
        bench_external(args.external, args.requests)
    else:
        bench_host(args.provider, args.requests, args.file_runs)


if __name__ == "__main__":
    main()
