"""user networking: outbound works, the host does not (except the explicit forward); timeouts."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunVM, our_namespaces, require_user_network

from microagent.errors import VMError
from microagent.runner import run
from microagent.runtime.backend import Forward, GuestTimeout, NetworkConfig
from microagent.runtime.configdisk import NetworkMode
from microagent.runtime.network import parse_host_addresses

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


def test_user_network_without_root_is_refused(
    run_vm: RunVM, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("microagent.runtime.network.os.geteuid", lambda: 1000)
    with pytest.raises(VMError, match="needs root"):
        run_vm("true", network=USER)
