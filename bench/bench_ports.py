"""Benchmark published ports: a 100 MB transfer guest->host and connection set-up latency.

A busybox guest serves a 100 MB file and a tiny page with httpd on port 8000, published on the
host's 127.0.0.1 (slirp4netns's listener -> the VM's namespace -> QEMU's slirp -> the guest).
Measured from the host: the transfer's throughput (median of --transfers) and, over --requests
sequential connections, the median TCP connect time and the median time from connect to the
first byte of the tiny page's reply, then --parallel concurrent requests. References: the same
transfer inside the guest (its own loopback: what TCG lets the guest push at all) and a Python
HTTP server on the host's loopback.

    .venv/bin/python bench/bench_ports.py [--transfers N] [--requests N] [--mib N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from microagent import runner
from microagent.kit import guestkit
from microagent.runtime.backend import Accel, NetworkConfig, PublishedPort
from microagent.runtime.boot import RunRequest, prepare, scratch_vm_dir
from microagent.runtime.configdisk import NetworkMode
from microagent.runtime.qemu import QemuBackend
from microagent.settings import Settings
from microagent.store.content import Store

GUEST_PORT = 8000
READY_TIMEOUT = 300.0


def guest_script(mib: int) -> str:
    """Write the big file, serve it, time a local copy (the guest's own ceiling), wait."""
    return (
        "mkdir -p /tmp/www && echo ok > /tmp/www/small && "
        f"dd if=/dev/zero of=/tmp/www/big bs=1M count={mib} 2>/dev/null && "
        f"httpd -p {GUEST_PORT} -h /tmp/www && "
        "read -r a _ </proc/uptime; "
        f"wget -q -O /dev/null http://127.0.0.1:{GUEST_PORT}/big; "
        "read -r b _ </proc/uptime; "
        'echo "$a $b" > /tmp/www/local.tmp && mv /tmp/www/local.tmp /tmp/www/local; '
        "sleep 3600"
    )


def busybox_rootfs(directory: Path) -> Path:
    tree = directory / "tree"
    for sub in ("bin", "etc", "root", "tmp", "proc", "sys", "dev", "run"):
        (tree / sub).mkdir(parents=True)
    busybox = Path(runner.find_tool("busybox")).resolve()
    (tree / "bin/busybox").write_bytes(busybox.read_bytes())
    (tree / "bin/busybox").chmod(0o755)
    for applet in runner.run([str(busybox), "--list"]).stdout.split():
        if applet != "busybox":
            (tree / "bin" / applet).symlink_to("busybox")
    image = directory / "busybox.ext4"
    with image.open("wb") as fh:
        fh.truncate(64 << 20)
    runner.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image)])
    return image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch(port: int, path: str, timeout: float = 120.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
        return bytes(reply.read())


def await_file(port: int, path: str) -> bytes:
    """``path`` once the guest serves it (connections before then are refused or reset)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            return fetch(port, path, timeout=5.0)
        time.sleep(0.5)
    raise SystemExit(f"the guest never served {path} on 127.0.0.1:{port}")


def transfer_mb_s(port: int, path: str) -> float:
    """One streamed download, read in 1 MiB chunks into nothing."""
    began = time.monotonic()
    size = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120.0) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        while chunk := sock.recv(1 << 20):
            size += len(chunk)
    return size / (1 << 20) / (time.monotonic() - began)


def setup_latency(port: int, path: str) -> tuple[float, float]:
    """(TCP connect seconds, connect-to-first-reply-byte seconds) for one request."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30.0) as sock:
        connected = time.monotonic()
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        if not sock.recv(1):
            raise SystemExit(f"127.0.0.1:{port}{path}: connection closed without a reply")
        first = time.monotonic()
        while sock.recv(65536):
            pass
    return connected - began, first - began


def measure(port: int, transfers: int, requests: int) -> tuple[float, float, float]:
    """(median MB/s, median connect s, median first-byte s) against ``port``."""
    speeds = []
    for _ in range(transfers):
        speeds.append(transfer_mb_s(port, "/big"))
        print(f"  transfer from :{port}: {speeds[-1]:.1f} MiB/s", flush=True)
    samples = [setup_latency(port, "/small") for _ in range(requests)]
    return (
        statistics.median(speeds),
        statistics.median(s[0] for s in samples),
        statistics.median(s[1] for s in samples),
    )


def parallel_ok(port: int, count: int) -> int:
    with ThreadPoolExecutor(count) as pool:
        return sum(
            body == b"ok\n" for body in pool.map(lambda _: fetch(port, "/small"), range(count))
        )


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:
        return


@contextlib.contextmanager
def host_server(directory: Path) -> Iterator[int]:
    """A Python HTTP server on the host's loopback serving ``directory`` (the reference)."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def host_reference(mib: int, transfers: int, requests: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-ports-host-") as tmp:
        (Path(tmp) / "small").write_bytes(b"ok\n")
        with (Path(tmp) / "big").open("wb") as fh:
            fh.truncate(mib << 20)
        with host_server(Path(tmp)) as port:
            return measure(port, transfers, requests)


def guest_figures(
    args: argparse.Namespace, work: Path
) -> tuple[tuple[float, float, float], float, int]:
    """(published figures, the guest's local MB/s, parallel successes) from one boot."""
    store = Store(Settings.from_environ().store_dir)
    kit = guestkit.ensure_kit(store, progress=print)
    backend = QemuBackend(cache_dir=store.root / "probes")
    port = PublishedPort("127.0.0.1", free_port(), GUEST_PORT)
    request = RunRequest(
        rootfs=busybox_rootfs(work),
        command=("sh", "-c", guest_script(args.mib)),
        network=NetworkConfig(NetworkMode.USER, published=(port,)),
        accel=Accel.TCG,
        state_size_mib=max(1024, args.mib * 2),
        die_with_parent=True,  # an interrupted bench leaves no VM behind
    )
    with scratch_vm_dir() as tmp:
        config = prepare(request, kit, Path(tmp))
        # The guest's events must be read, as a supervisor does; the machine is left (and
        # stopped) before the reader is waited for.
        with ThreadPoolExecutor(1) as owner, backend.boot(config) as machine:
            owner.submit(machine.wait)
            began, ended = map(float, await_file(port.host_port, "/local").split())
            local = args.mib / (ended - began)
            print(f"guest ready; its local copy ran at {local:.1f} MiB/s", flush=True)
            figures = measure(port.host_port, args.transfers, args.requests)
            parallel = parallel_ok(port.host_port, args.parallel)
            machine.shutdown()
    return figures, local, parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfers", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50)
    # busybox httpd listens with a backlog of 9: more at once overflows the guest's queue
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--mib", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("published ports need user networking, which needs root")
    with tempfile.TemporaryDirectory(prefix="bench-ports-") as tmp:
        (speed, connect, first), local, parallel = guest_figures(args, Path(tmp))
    host = host_reference(args.mib, args.transfers, args.requests)
    report(args, (speed, connect, first), host, local, parallel)


def line(label: str, figures: tuple[float, float, float]) -> str:
    speed, connect, first = figures
    return (
        f"{label:<10} transfer {speed:8.1f} MiB/s   connect {connect * 1e3:7.3f} ms   "
        f"first byte {first * 1e3:7.2f} ms"
    )


def report(
    args: argparse.Namespace,
    published: tuple[float, float, float],
    host: tuple[float, float, float],
    local: float,
    parallel: int,
) -> None:
    runs = f"{args.mib} MiB x {args.transfers}, {args.requests} sequential requests"
    print(f"\nTCG, {os.cpu_count()} host CPUs; {runs}; medians")
    print(line("published", published))
    print(line("host lo", host))
    print(f"{'guest lo':<10} transfer {local:8.1f} MiB/s   (wget inside the guest, to /dev/null)")
    print(
        f"ratios     throughput published/guest-local {published[0] / local:.2f}x, "
        f"published/host-loopback {published[0] / host[0]:.3f}x"
    )
    print(
        f"           first byte published/host-loopback {published[2] / host[2]:.1f}x, "
        f"connect {published[1] / host[1]:.1f}x"
    )
    print(f"parallel   {parallel}/{args.parallel} concurrent requests answered")


if __name__ == "__main__":
    main()
