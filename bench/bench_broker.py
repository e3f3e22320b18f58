"""Benchmark the credential broker (issue "Credential broker and egress policy"): what going
through the broker costs against the plain guest->host forward to the same upstream.

One busybox workspace (`user` networking) with a generic credential whose upstream is an HTTP
server on the host's loopback, and a `--host-forward` to that same server. In the guest,
busybox wget fetches a 1 MiB response and a 2-byte response N times each way, timed by the
guest's own clock (/proc/uptime, 10 ms resolution, so loops not single requests):

- forward: guest -> slirp guestfwd (10.0.2.100) -> socat -> the upstream;
- broker:  guest -> ma-agent (127.0.0.1:18780) -> virtio-serial -> the supervisor's link ->
  the gateway's unix socket -> the broker (key added) -> the upstream.

Printed: seconds per 1 MiB response each way and their ratio (goal <= 1.2x), and the time each
small request adds through the broker (goal <= 5 ms on KVM-class hosts; TCG here). A host-only
line shows the broker's own cost without a VM (the same requests from this process).

    .venv/bin/python bench/bench_broker.py [--big N] [--small N] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from microagent.broker.audit import AuditLog  # noqa: E402
from microagent.broker.reverse import ReverseProxy  # noqa: E402
from testenv import standin  # noqa: E402

MA = [sys.executable, "-m", "microagent.cli"]
NAME = "bench-broker"
READY_TIMEOUT = 300.0
GUEST_PORT = 8080
BIG = b"x" * (1 << 20)


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = BIG if self.path.startswith("/big") else b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        return


def cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [*MA, "--json", *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"microagent {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout) if done.stdout.strip() else {}


def guest_seconds(env: dict[str, str], url: str, count: int) -> float:
    """Seconds the guest takes for ``count`` sequential GETs of ``url`` (its own clock)."""
    script = (
        "read -r a _ </proc/uptime; i=0; "
        f'while [ $i -lt {count} ]; do wget -q -O /dev/null "{url}" || exit 9; i=$((i+1)); done; '
        'read -r b _ </proc/uptime; echo "$a $b"'
    )
    done = subprocess.run(
        [*MA, "exec", NAME, "--", "sh", "-c", script],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the guest loop failed ({done.returncode}): {done.stderr}")
    began, ended = (float(x) for x in done.stdout.split())
    return ended - began


def make_workspace(env: dict[str, str], tmp: Path, upstream: int) -> None:
    project = tmp / "project"
    project.mkdir()
    shutil.copytree(standin.build_busybox(None).layout, project / "layout")
    (project / "microagent.yaml").write_text(
        f"name: {NAME}\nimage: oci:layout:latest\nentrypoint: sleep 100000\nprofile: tiny\n"
        "network: {mode: user}\n"
        "credentials:\n"
        "  - name: bench\n"
        "    from: env:BENCH_KEY\n"
        f"    upstream: http://127.0.0.1:{upstream}\n"
        "    header: Authorization\n"
        '    format: "Bearer {value}"\n'
        "    baseUrlEnv: BENCH_BASE_URL\n"
        "    keyEnv: BENCH_KEY\n"
    )
    cli(
        env, "create", "-f", str(project / "microagent.yaml"), "--credential", "bench",
        "--host-forward", f"{GUEST_PORT}={upstream}",
    )  # fmt: skip


def wait_ready(env: dict[str, str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        status = cli(env, "status", NAME)
        if status["readiness"]["execReady"]["ready"]:
            return
        if status["event"]["state"] in ("stopped", "halted", "failed"):
            raise SystemExit(f"the workspace ended: {status['event']}")
        time.sleep(0.5)
    raise SystemExit("the guest agent was not ready in time")


def host_only(upstream: int, count: int, tmp: Path) -> tuple[float, float]:
    """Seconds per 1 MiB GET from this process directly and through an in-process broker."""
    proxy = ReverseProxy(
        "bench", f"http://127.0.0.1:{upstream}", AuditLog(tmp / "audit.jsonl"),
        header="Authorization", value_format="Bearer {value}", secret="k",
    )  # fmt: skip
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp / "b.sock"))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=proxy.handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()

    def fetch(connect: Any) -> float:
        began = time.perf_counter()
        with connect() as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while sock.recv(1 << 20):
                pass
        return time.perf_counter() - began

    def direct() -> socket.socket:
        return socket.create_connection(("127.0.0.1", upstream))

    def brokered() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(tmp / "b.sock"))
        return sock

    plain = statistics.median(fetch(direct) for _ in range(count))
    through = statistics.median(fetch(brokered) for _ in range(count))
    server.close()
    return plain, through


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", type=int, default=5, help="1 MiB GETs per loop")
    parser.add_argument("--small", type=int, default=20, help="small GETs per loop")
    parser.add_argument("--runs", type=int, default=3, help="loops per measurement (median)")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    upstream = int(server.server_address[1])
    with tempfile.TemporaryDirectory(prefix="ma-bench-broker-") as tmp_text:
        tmp = Path(tmp_text)
        env = dict(
            os.environ,
            MICROAGENT_HOME=str(tmp / "home"),
            MICROAGENT_CONFIG=str(tmp / "none.yaml"),
            MICROAGENT_ACCEL=args.accel,
            BENCH_KEY="bench-secret",
        )
        plain_host, broker_host = host_only(upstream, 20, tmp)
        cli(env, "kernel", "install")
        make_workspace(env, tmp, upstream)
        cli(env, "start", NAME)
        try:
            wait_ready(env)
            forward = f"http://10.0.2.100:{GUEST_PORT}"
            broker = "$BENCH_BASE_URL"

            def per_request(url: str, count: int) -> float:
                loops = [guest_seconds(env, url, count) for _ in range(args.runs)]
                return statistics.median(loops) / count

            guest_seconds(env, f"{broker}/small", 2)  # warm both paths
            guest_seconds(env, f"{forward}/small", 2)
            big_fwd = per_request(f"{forward}/big", args.big)
            big_brk = per_request(f"{broker}/big", args.big)
            small_fwd = per_request(f"{forward}/small", args.small)
            small_brk = per_request(f"{broker}/small", args.small)
        finally:
            cli(env, "halt", NAME)
    print(f"1 MiB response, guest->host forward   {big_fwd * 1000:8.1f} ms")
    print(f"1 MiB response, through the broker     {big_brk * 1000:8.1f} ms")
    print(f"  ratio broker/forward                 {big_brk / big_fwd:8.2f} x   (goal <= 1.2)")
    print(f"small request, guest->host forward     {small_fwd * 1000:8.1f} ms")
    print(f"small request, through the broker      {small_brk * 1000:8.1f} ms")
    print(f"  added per small request              {(small_brk - small_fwd) * 1000:8.1f} ms")
    print(f"host only (no VM), 1 MiB direct        {plain_host * 1000:8.2f} ms")
    print(f"host only (no VM), 1 MiB via broker    {broker_host * 1000:8.2f} ms")
    server.shutdown()


if __name__ == "__main__":
    main()
