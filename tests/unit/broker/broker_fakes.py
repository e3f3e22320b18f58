"""Test doubles around the broker (never the broker itself): a fake upstream that records what
reaches it, a throwaway CA made with the openssl CLI, and a guest-side HTTP client over the
gateway's unix sockets."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from microagent.broker.gateway import CredentialRoute, Gateway, GatewayConfig, Limits
from microagent.runner import find_tool
from testenv.prereq import require_tools

KEY = "sk-test-REALKEY-0123456789abcdef"  # the real key the broker holds
PLACEHOLDER = "microagent-brokered"
MEGABYTE = bytes(range(256)) * 4096  # 1 MiB, every byte value


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Upstream:
    """A loopback HTTP(S) server run by the test; ``url`` is what the broker forwards to."""

    url: str
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # /slow and /sse wait
    in_slow: threading.Event = field(default_factory=threading.Event)
    sse_last_sent: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _any(self) -> None:
        body = self._body()
        upstream = self.server.upstream
        upstream.seen.append(Seen(self.command, self.path, list(self.headers.items()), body))
        route = self.path.split("?")[0].rsplit("/", 1)[-1]
        getattr(self, f"_r_{route}", self._r_echo)(body)

    do_GET = do_POST = do_PUT = do_HEAD = _any

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _r_echo(self, body: bytes) -> None:
        answer = {
            "path": self.path,
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        self._send(200, json.dumps(answer).encode())

    def _r_big(self, _body: bytes) -> None:
        self._send(200, MEGABYTE, "application/octet-stream")

    def _r_bigclose(self, _body: bytes) -> None:
        # No length, no chunking: the body ends when the connection does.
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(MEGABYTE)
        self.close_connection = True

    def _r_slow(self, _body: bytes) -> None:
        self.server.upstream.in_slow.set()
        self.server.upstream.release.wait(10)
        self._send(200, b'{"slow":true}')

    def _r_sse(self, _body: bytes) -> None:
        """Events in chunks; the last is sent only once the test has seen the first."""
        upstream = self.server.upstream
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index, event in enumerate((b"one", b"two", b"three")):
            if index == 2:
                upstream.release.wait(10)
                upstream.sse_last_sent.set()
            data = b"event: message\ndata: " + event + b"\n\n"
            self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(0.05)
        self.wfile.write(b"0\r\n\r\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    upstream: Upstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a request the broker abandoned half-way: expected in refusal tests


@contextlib.contextmanager
def serve_upstream(tls: ssl.SSLContext | None = None, prefix: str = "") -> Iterator[Upstream]:
    """A fake upstream on 127.0.0.1 (HTTPS with ``tls``, whose certificate names localhost)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    scheme, host = ("https", "localhost") if tls else ("http", "127.0.0.1")
    server.upstream = Upstream(f"{scheme}://{host}:{port}{prefix}")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.upstream
    finally:
        server.upstream.release.set()
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class Authority:
    """A throwaway CA and a server certificate it signed for localhost and 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_authority(directory: Path) -> Authority:
    require_tools("openssl")
    openssl = find_tool("openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2"],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"],
    ]
    steps[0] += [
        *("-subj", "/CN=microagent broker test CA"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    ]
    steps[2] += ["-out", cert, "-days", "2", "-extfile", ext]
    for argv in steps:
        subprocess.run([str(word) for word in argv], check=True, capture_output=True, timeout=60)
    return Authority(ca, cert, key)


class GuestConnection(http.client.HTTPConnection):
    """An HTTP client on a gateway's unix socket, as the guest's SDK would be."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self.sock = sock


def request(
    path: Path,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = GuestConnection(path)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def request_while_one_waits(
    path: Path, upstream: Upstream, target: str
) -> tuple[tuple[int, dict[str, str], bytes], list[int]]:
    """``GET target`` while another request waits in the upstream's ``/slow``; that one is
    released after, and its status is in the list once it has ended (within 10 s)."""
    held: list[int] = []
    holder = threading.Thread(target=lambda: held.append(request(path, "GET", "/slow")[0]))
    holder.start()
    assert upstream.in_slow.wait(5)
    answer = request(path, "GET", target)
    upstream.release.set()
    holder.join(10)
    return answer, held


def raw_exchange(path: Path, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, half-close, read everything the broker answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        with contextlib.suppress(OSError):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def error_message(body: bytes) -> str:
    document = json.loads(body)
    assert document["error"]["type"] == "microagent_broker"
    return str(document["error"]["message"])


def audit_entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass
class Running:
    """A gateway served by a thread of the test process."""

    gateway: Gateway
    config: GatewayConfig
    thread: threading.Thread

    @property
    def socket(self) -> Path:
        return self.config.credentials[0].socket

    def audit(self) -> list[dict[str, Any]]:
        return audit_entries(self.config.audit)

    def wait_audit(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The audit entries once there are ``count`` (each is written after its answer)."""
        deadline = time.monotonic() + timeout
        while len(entries := self.audit()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return entries


def credential(
    directory: Path, upstream: str, *, name: str = "model", header: str = "x-api-key"
) -> CredentialRoute:
    fmt = "Bearer {value}" if header.lower() == "authorization" else "{value}"
    return CredentialRoute(name, upstream, header, fmt, directory / f"{name}.sock")


@contextlib.contextmanager
def run_gateway(
    directory: Path,
    routes: tuple[CredentialRoute, ...],
    *,
    limits: Limits | None = None,
    cafile: Path | None = None,
    secrets: dict[str, str] | None = None,
    **options: Any,
) -> Iterator[Running]:
    config = GatewayConfig(
        audit=directory / "audit.jsonl",
        credentials=routes,
        limits=limits or Limits(),
        cafile=cafile,
    )
    gateway = Gateway(config, secrets or {route.name: KEY for route in routes}, **options)
    thread = threading.Thread(target=gateway.serve_forever, daemon=True)
    thread.start()
    try:
        yield Running(gateway, config, thread)
    finally:
        gateway.close()
        thread.join(10)
        assert not thread.is_alive()
