"""user networking: outbound works, the host does not (except the explicit forward); timeouts."""

from __future__ import annotations

import http.server
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import RunVM, our_namespaces, require_user_network

from microagent.errors import VMError
from microagent.kit.guestkit import GuestKit
from microagent.runner import run
from microagent.runtime.backend import Forward, GuestTimeout, NetworkConfig, PublishedPort
from microagent.runtime.boot import RunRequest, prepare, scratch_vm_dir
from microagent.runtime.configdisk import NetworkMode
from microagent.runtime.network import api_socket_path, live_published, parse_host_addresses
from microagent.runtime.qemu import QemuBackend
from testenv.ports import free_port

pytestmark = pytest.mark.vm
USER = NetworkConfig(NetworkMode.USER)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"HOST-SECRET " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        return


def _serve(host: str) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer((host, 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def loopback_port() -> Iterator[int]:
    yield from _serve("127.0.0.1")


@pytest.fixture
def any_port() -> Iterator[int]:
    yield from _serve("0.0.0.0")


def test_outbound_http_fetch(run_vm: RunVM, no_leftovers: None) -> None:
    require_user_network()
    url = "http://deb.debian.org/debian/dists/bookworm/Release"
    result = run_vm("sh", "-c", f"wget -q -O- {url} | head -c 200", network=USER)
    assert result.exit_code == 0, result.stderr
    assert "Origin: Debian" in result.stdout


def test_host_is_unreachable_but_the_forward_works(
    run_vm: RunVM, loopback_port: int, any_port: int, no_leftovers: None
) -> None:
    require_user_network()
    host_ips = parse_host_addresses(run(["ip", "-4", "-o", "addr", "show"]).stdout)
    targets = [f"10.0.2.2:{loopback_port}", f"10.0.2.2:{any_port}", f"127.0.0.1:{loopback_port}"]
    targets += [f"{ip}:{any_port}" for ip in host_ips[:2]]
    probes = " ".join(targets)
    script = (
        f"for t in {probes}; do timeout 3 wget -q -O- http://$t/ >/dev/null 2>&1 "
        '&& echo "REACH $t" || echo "BLOCK $t"; done; '
        "wget -q -O- http://10.0.2.100/first; echo; wget -q -O- http://10.0.2.100/second"
    )
    net = NetworkConfig(NetworkMode.USER, (Forward(80, host_port=loopback_port),))
    result = run_vm("sh", "-c", script, network=net)
    lines = result.stdout.splitlines()
    assert lines[: len(targets)] == [f"BLOCK {t}" for t in targets], result.stdout
    assert lines[len(targets) :] == ["HOST-SECRET /first", "HOST-SECRET /second"]


def test_hung_guest_is_stopped_after_the_timeout(run_vm: RunVM, no_leftovers: None) -> None:
    require_user_network()
    began = time.monotonic()
    with pytest.raises(GuestTimeout, match="timed out after 8s") as raised:
        run_vm("sh", "-c", "echo started; sleep 1000", network=USER, timeout=8)
    elapsed = time.monotonic() - began
    assert 8 <= elapsed < 20
    assert "qemu" in raised.value.hint
    stopped = raised.value.result
    assert stopped is not None and stopped.stopped and stopped.stdout == "started\n"
    assert our_namespaces() == []


def test_user_network_without_a_tun_device_is_refused(
    run_vm: RunVM, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("microagent.runtime.network.os.geteuid", lambda: 1000)  # rootless path
    monkeypatch.setattr("microagent.runtime.network.TUN_DEVICE", tmp_path / "tun")
    with pytest.raises(VMError, match="does not exist"):
        run_vm("true", network=USER)


# The guest serves a page on 8000 (busybox httpd) and, on 9000, records what one connection
# sent and when its peer closed it (nc's stdin is a fifo opened read-write: it never ends).
SERVE_SCRIPT = (
    "mkdir -p /tmp/www && echo GUEST-PAGE > /tmp/www/index.html && httpd -p 8000 -h /tmp/www && "
    "mkfifo /tmp/f && nc -l -p 9000 <>/tmp/f >/tmp/www/got; "
    # Renamed into place: httpd could serve a file created by '>' before its bytes are written.
    "echo closed >/tmp/closed && mv /tmp/closed /tmp/www/closed; "
    "sleep 120"
)


def _get(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
        return reply.status, reply.read()


def _await_page(port: int, path: str, deadline: float) -> bytes:
    """The page once the guest serves it (before, slirp4netns accepts and the namespace
    refuses: the client sees a reset or an empty reply)."""
    while True:
        try:
            status, body = _get(port, path, timeout=5.0)
            if status == 200:
                return body
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"127.0.0.1:{port}{path} never answered")
        time.sleep(0.5)


def _read_to_eof(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):  # b"": the guest's close reached the host
            chunks.append(chunk)
    return b"".join(chunks)


def test_published_ports_reach_the_guest(
    rootfs: Path, kit: GuestKit, backend: QemuBackend, no_leftovers: None
) -> None:
    require_user_network()
    web = PublishedPort("127.0.0.1", free_port(), 8000)
    sink = PublishedPort("127.0.0.1", free_port(), 9000)
    net = NetworkConfig(NetworkMode.USER, published=(web, sink))
    request = RunRequest(rootfs=rootfs, command=("sh", "-c", SERVE_SCRIPT), network=net)
    with scratch_vm_dir() as tmp:
        config = prepare(request, kit, Path(tmp))
        # The owner thread reads the guest's events, as a supervisor does; the machine is
        # left (and stopped) first, so a failing assert never waits on a guest that sleeps.
        with ThreadPoolExecutor(1) as owner, backend.boot(config) as machine:
            waited = owner.submit(machine.wait)
            assert _await_page(web.host_port, "/", time.monotonic() + 120) == b"GUEST-PAGE\n"
            assert set(live_published(api_socket_path(config.state_dir))) == {web, sink}
            # 8 at a time: busybox httpd listens with a backlog of 9; past that the guest
            # drops connections and slirp's own retries take long (see docs/cli.md).
            with ThreadPoolExecutor(8) as pool:
                pages = list(pool.map(lambda _: _get(web.host_port, timeout=30.0), range(24)))
            assert pages == [(200, b"GUEST-PAGE\n")] * 24
            reply = _read_to_eof(web.host_port, b"GET / HTTP/1.0\r\n\r\n")
            assert reply.startswith(b"HTTP/1.") and reply.endswith(b"GUEST-PAGE\n")
            with socket.create_connection(("127.0.0.1", sink.host_port), timeout=30.0) as sock:
                sock.sendall(b"bye from the host\n")
                sock.shutdown(socket.SHUT_WR)  # half-close: nc sees the end and exits ...
                assert sock.recv(1) == b""  # ... and its close comes back
            deadline = time.monotonic() + 60
            assert _await_page(web.host_port, "/closed", deadline) == b"closed\n"
            assert _get(web.host_port, "/got")[1] == b"bye from the host\n"
            machine.shutdown()
            assert waited.result(timeout=30).stopped
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", web.host_port), timeout=5.0)
