"""The egress forward proxy, driven through its public interface over real sockets.

The guest end is one side of a socketpair (as the gateway hands the proxy an accepted unix
connection); upstreams are loopback servers. They are reachable *only* through the injected
``resolve``/``connect`` hooks: the names resolve to a documentation address (allowed), and
``connect`` maps that address to the loopback server. The address checks run on whatever the
hooks return, so a name resolving to loopback is refused with the same hooks in place.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microagent.broker import addresses, egress
from microagent.broker.audit import AuditLog
from microagent.broker.egress import (
    ClientHelloError,
    EgressProxy,
    IncompleteHello,
    check_allow_entry,
    client_hello_sni,
    host_allowed,
)
from microagent.errors import InvalidInputError

PUBLIC = "203.0.113.7"  # documentation range: allowed, and never an address of this host
NAME = "allowed.example"
WAIT = 10.0


# ---------------------------------------------------------------------------------------------
# ClientHellos


def hello_message(sni: str | bytes | None, *, extensions: bytes = b"") -> bytes:
    """A minimal TLS 1.2-style ClientHello handshake message."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    exts = b""
    if sni is not None:
        name = sni.encode() if isinstance(sni, str) else sni
        entry = b"\x00" + len(name).to_bytes(2, "big") + name
        names = len(entry).to_bytes(2, "big") + entry
        exts += b"\x00\x00" + len(names).to_bytes(2, "big") + names
    exts += extensions
    body += len(exts).to_bytes(2, "big") + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, size: int = 1 << 14) -> bytes:
    out = b""
    for start in range(0, len(message), size):
        chunk = message[start : start + size]
        out += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
    return out


def real_hello(server_hostname: str | None) -> bytes:
    """The first flight of Python's own TLS client (OpenSSL), SNI as given."""
    context = ssl.create_default_context()
    if server_hostname is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# ---------------------------------------------------------------------------------------------
# Upstreams and the guest side


@dataclass
class Upstream:
    """A loopback server that runs ``serve`` on each connection in a thread."""

    serve: Callable[[socket.socket, Upstream], None]
    received: list[bytes] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)
    accepted: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(WAIT)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            self.serve(conn, self)

    def close(self) -> None:
        self.sock.close()


def read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def serve_until_eof(conn: socket.socket, upstream: Upstream) -> None:
    """Read everything to the guest's half-close, then answer with a count and close."""
    data = read_all(conn)
    upstream.received.append(data)
    conn.sendall(b"got %d bytes" % len(data))


@dataclass
class Hooks:
    """resolve/connect for the proxy: every name -> ``addresses``; PUBLIC -> the upstream."""

    upstream: Upstream | None
    addresses: tuple[str, ...] = (PUBLIC,)
    resolved: list[str] = field(default_factory=list)
    connected: list[tuple[str, int]] = field(default_factory=list)

    def resolve(self, host: str, port: int) -> list[str]:
        self.resolved.append(host)
        return list(self.addresses)

    def connect(self, address: str, port: int, timeout: float) -> socket.socket:
        self.connected.append((address, port))
        assert self.upstream is not None and address == PUBLIC
        return socket.create_connection(("127.0.0.1", self.upstream.port), timeout=timeout)


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


def entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_proxy(audit_path: Path, hooks: Hooks, allow: tuple[str, ...] = (NAME,), **kw: Any) -> Any:
    return EgressProxy(
        allow, AuditLog(audit_path), resolve=hooks.resolve, connect=hooks.connect, **kw
    )


@dataclass
class Guest:
    sock: socket.socket
    thread: threading.Thread

    def head(self) -> bytes:
        """The response head, read byte by byte so nothing after it is consumed."""
        data = b""
        while not data.endswith(b"\r\n\r\n"):
            byte = self.sock.recv(1)
            if not byte:
                break
            data += byte
        return data

    def rest(self) -> bytes:
        return read_all(self.sock)

    def done(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "handle() did not return"
        self.sock.close()


@pytest.fixture
def guests() -> Iterator[Callable[[Any], Guest]]:
    made: list[Guest] = []

    def start(proxy: EgressProxy) -> Guest:
        guest, side = socket.socketpair()
        guest.settimeout(WAIT)
        thread = threading.Thread(target=proxy.handle, args=(side,), daemon=True)
        thread.start()
        made.append(Guest(guest, thread))
        return made[-1]

    yield start
    for guest in made:
        guest.sock.close()
        guest.thread.join(WAIT)


def connect_request(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


@pytest.fixture
def raw_upstream() -> Iterator[Upstream]:
    upstream = Upstream(serve_until_eof)
    yield upstream
    upstream.close()


# ---------------------------------------------------------------------------------------------
# TLS end to end


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for allowed.example (openssl CLI)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_upstream(certificate: tuple[Path, Path]) -> Iterator[Upstream]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)

    def serve(conn: socket.socket, upstream: Upstream) -> None:
        def note(_tls: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            upstream.names.append(name)

        context.sni_callback = note  # type: ignore[assignment]
        with context.wrap_socket(conn, server_side=True) as tls:
            line = b""
            while not line.endswith(b"\n"):
                line += tls.recv(1)
            upstream.received.append(line)
            tls.sendall(b"echo " + line * 1000)

    upstream = Upstream(serve)
    yield upstream
    upstream.close()


def test_a_tls_client_reaches_the_listed_server_through_connect(
    audit_path: Path, tls_upstream: Upstream, certificate: tuple[Path, Path], guests: Any
) -> None:
    hooks = Hooks(tls_upstream)
    guest = guests(make_proxy(audit_path, hooks))
    guest.sock.sendall(connect_request(f"{NAME}:443"))
    assert guest.head() == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    context = ssl.create_default_context(cafile=str(certificate[0]))
    with context.wrap_socket(guest.sock, server_hostname=NAME) as tls:
        tls.sendall(b"ping\n")
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    guest.done()
    assert reply == b"echo " + b"ping\n" * 1000
    assert tls_upstream.names == [NAME] and tls_upstream.received == [b"ping\n"]
    assert hooks.resolved == [NAME] and hooks.connected == [(PUBLIC, 443)]
    [entry] = entries(audit_path)
    assert entry["kind"] == "egress" and entry["decision"] == "allow"
    assert (entry["host"], entry["port"], entry["method"]) == (NAME, 443, "CONNECT")
    assert (entry["status"], entry["address"]) == (200, PUBLIC)
    assert entry["bytesIn"] > 5 and entry["bytesOut"] > 5000
    assert "path" not in entry and "reason" not in entry and entry["durationMs"] >= 0


def test_the_tunnel_forwards_the_hello_unchanged_and_half_closes_both_ways(
    audit_path: Path, raw_upstream: Upstream, guests: Any
) -> None:
    guest = guests(make_proxy(audit_path, Hooks(raw_upstream)))
    hello = real_hello(NAME)
    payload = bytes(range(256)) * 1000
    guest.sock.sendall(connect_request(f"{NAME}:443"))
    assert guest.head().startswith(b"HTTP/1.1 200 ")
    guest.sock.sendall(hello + payload)
    guest.sock.shutdown(socket.SHUT_WR)  # the upstream answers only after this EOF
    assert guest.rest() == b"got %d bytes" % len(hello + payload)
    guest.done()
    assert raw_upstream.received == [hello + payload]
    [entry] = entries(audit_path)
    assert entry["bytesIn"] == len(hello + payload)
    assert entry["bytesOut"] == len(b"got %d bytes" % len(hello + payload))


@pytest.mark.parametrize(
    ("target", "sni"),
    [
        ("allowed.example:443", "ALLOWED.Example"),  # case does not matter
        ("Allowed.Example.:443", "allowed.example"),  # nor a trailing dot
        ("allowed.example:443", "allowed.example."),
    ],
)
def test_sni_matches_case_insensitively_without_the_trailing_dot(
    audit_path: Path, raw_upstream: Upstream, guests: Any, target: str, sni: str
) -> None:
    guest = guests(make_proxy(audit_path, Hooks(raw_upstream)))
    guest.sock.sendall(connect_request(target))
    assert guest.head().startswith(b"HTTP/1.1 200 ")
    hello = records(hello_message(sni))
    guest.sock.sendall(hello)
    guest.sock.shutdown(socket.SHUT_WR)
    assert guest.rest() == b"got %d bytes" % len(hello)
    guest.done()
    assert entries(audit_path)[0]["decision"] == "allow"


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (real_hello("other.example"), "sni-mismatch"),
        (real_hello(None), "no-sni"),
        (records(hello_message("allowed.example.evil")), "sni-mismatch"),
        (records(hello_message("evil.allowed.example")), "sni-mismatch"),
        (b"GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n", "bad-client-hello"),
        (records(hello_message(NAME, extensions=b"\x00\x00\x00\x00")), "bad-client-hello"),
    ],
)
def test_a_hello_that_does_not_name_the_connect_host_is_refused(
    audit_path: Path, raw_upstream: Upstream, guests: Any, hello: bytes, reason: str
) -> None:
    guest = guests(make_proxy(audit_path, Hooks(raw_upstream)))
    guest.sock.sendall(connect_request(f"{NAME}:443"))
    assert guest.head().startswith(b"HTTP/1.1 200 ")
    guest.sock.sendall(hello)
    assert guest.rest() == b""  # closed, nothing from upstream
    guest.done()
    assert raw_upstream.received in ([], [b""])  # not one byte went upstream
    [entry] = entries(audit_path)
    assert (entry["decision"], entry["reason"]) == ("deny", reason)
    assert "address" not in entry


def test_a_hello_in_single_bytes_and_split_across_records_is_read(
    audit_path: Path, raw_upstream: Upstream, guests: Any
) -> None:
    guest = guests(make_proxy(audit_path, Hooks(raw_upstream)))
    guest.sock.sendall(connect_request(f"{NAME}:443"))
    assert guest.head().startswith(b"HTTP/1.1 200 ")
    hello = records(hello_message(NAME, extensions=b"\x00\x17\x00\x00"), size=7)
    for i in range(len(hello)):
        guest.sock.sendall(hello[i : i + 1])
    guest.sock.shutdown(socket.SHUT_WR)
    assert guest.rest() == b"got %d bytes" % len(hello)
    guest.done()
    assert raw_upstream.received == [hello]


def test_a_silent_guest_after_connect_times_out(
    audit_path: Path, raw_upstream: Upstream, guests: Any
) -> None:
    guest = guests(make_proxy(audit_path, Hooks(raw_upstream), hello_timeout=0.5))
    guest.sock.sendall(connect_request(f"{NAME}:443"))
    assert guest.head().startswith(b"HTTP/1.1 200 ")
    # On a loaded host the proxy may already have timed out and closed: same outcome.
    try:
        guest.sock.sendall(real_hello(NAME)[:20])
        assert guest.rest() == b""
    except (BrokenPipeError, ConnectionResetError):
        pass
    guest.done()
    assert entries(audit_path)[0]["reason"] == "bad-client-hello"


def test_an_idle_tunnel_is_closed(audit_path: Path, raw_upstream: Upstream, guests: Any) -> None:
    guest = guests(make_proxy(audit_path, Hooks(raw_upstream), idle_timeout=0.2))
    guest.sock.sendall(connect_request(f"{NAME}:443") + real_hello(NAME))
    assert guest.head().startswith(b"HTTP/1.1 200 ")
    assert guest.rest() == b""
    guest.done()
    [entry] = entries(audit_path)
    assert (entry["decision"], entry["reason"]) == ("allow", "idle-timeout")


# ---------------------------------------------------------------------------------------------
# Refusals before anything connects


def refused(guest: Guest) -> tuple[int, bytes]:
    response = guest.rest()
    guest.done()
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    "target",
    ["evil.example:443", "example:443", "127.0.0.1:443", "[::1]:443", "notallowed.example:443"],
)
def test_an_unlisted_host_gets_403_and_is_audited(
    audit_path: Path, guests: Any, target: str
) -> None:
    hooks = Hooks(None)
    guest = guests(make_proxy(audit_path, hooks))
    guest.sock.sendall(connect_request(target))
    status, body = refused(guest)
    host = target.rpartition(":")[0]
    assert status == 403 and b"not in network.allow" in body and host.encode() in body
    assert hooks.resolved == [] and hooks.connected == []
    [entry] = entries(audit_path)
    assert (entry["decision"], entry["reason"], entry["status"]) == ("deny", "not-allowed", 403)
    assert entry["host"] == host and entry["port"] == 443


def test_plain_http_to_an_unlisted_host_is_refused_too(audit_path: Path, guests: Any) -> None:
    hooks = Hooks(None)
    guest = guests(make_proxy(audit_path, hooks))
    guest.sock.sendall(b"GET http://evil.example/x?secret=1 HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert refused(guest)[0] == 403
    [entry] = entries(audit_path)
    assert (entry["reason"], entry["method"], entry["path"]) == ("not-allowed", "GET", "/x")
    assert "secret" not in json.dumps(entry)
    assert hooks.connected == []


@pytest.mark.parametrize(
    "request_",
    [
        connect_request(f"{NAME}:22"),
        connect_request(f"{NAME}:80"),
        f"GET http://{NAME}:8080/ HTTP/1.1\r\n\r\n".encode(),
        f"GET http://{NAME}:443/ HTTP/1.1\r\n\r\n".encode(),
    ],
)
def test_other_ports_are_refused(audit_path: Path, guests: Any, request_: bytes) -> None:
    hooks = Hooks(None)
    guest = guests(make_proxy(audit_path, hooks))
    guest.sock.sendall(request_)
    assert refused(guest)[0] == 403
    assert entries(audit_path)[0]["reason"] == "port" and hooks.connected == []


@pytest.mark.parametrize(
    "addresses",
    [
        ("127.0.0.1",),
        ("169.254.169.254",),
        ("10.1.2.3",),
        ("168.63.129.16",),
        ("::1",),
        ("::ffff:127.0.0.1",),
        ("fd00:ec2::254",),
        (PUBLIC, "127.0.0.1"),  # any one bad address refuses the name
        ("127.0.0.1", PUBLIC),
    ],
)
def test_a_listed_name_resolving_to_a_private_address_is_refused_without_connecting(
    audit_path: Path, raw_upstream: Upstream, guests: Any, addresses: tuple[str, ...]
) -> None:
    hooks = Hooks(raw_upstream, addresses)
    guest = guests(make_proxy(audit_path, hooks))
    guest.sock.sendall(connect_request(f"{NAME}:443"))
    status, body = refused(guest)
    assert status == 403 and NAME.encode() in body
    assert hooks.connected == [] and raw_upstream.accepted == 0
    [entry] = entries(audit_path)
    assert (entry["decision"], entry["reason"]) == ("deny", "private-address")
    assert "address" not in entry


def test_the_default_resolver_refuses_loopback(audit_path: Path, guests: Any) -> None:
    """No hooks but a connect spy: 'localhost' is listed, resolves to loopback, is refused."""
    connected: list[str] = []

    def spy(address: str, port: int, timeout: float) -> socket.socket:
        connected.append(address)
        raise AssertionError("no connection may be made")

    proxy = EgressProxy(["localhost"], AuditLog(audit_path), connect=spy)
    guest = guests(proxy)
    guest.sock.sendall(connect_request("localhost:443"))
    assert refused(guest)[0] == 403
    assert connected == []
    assert entries(audit_path)[0]["reason"] == "private-address"


def test_the_default_hooks_refuse_loopback_end_to_end(audit_path: Path, guests: Any) -> None:
    proxy = EgressProxy(["localhost"], AuditLog(audit_path))
    for request_ in (connect_request("localhost:443"), b"GET http://localhost/ HTTP/1.1\r\n\r\n"):
        guest = guests(proxy)
        guest.sock.sendall(request_)
        assert refused(guest)[0] == 403
    assert [e["reason"] for e in entries(audit_path)] == ["private-address"] * 2


def test_the_hosts_own_address_is_refused(
    audit_path: Path, raw_upstream: Upstream, guests: Any
) -> None:
    hooks = Hooks(raw_upstream)
    proxy = make_proxy(audit_path, hooks, is_host_address=lambda address: address == PUBLIC)
    guest = guests(proxy)
    guest.sock.sendall(connect_request(f"{NAME}:443"))
    assert refused(guest)[0] == 403
    assert hooks.connected == [] and entries(audit_path)[0]["reason"] == "host-address"


@pytest.mark.parametrize("outcome", ["error", "empty"])
def test_a_name_that_does_not_resolve_gets_502(audit_path: Path, guests: Any, outcome: str) -> None:
    def resolve(host: str, port: int) -> list[str]:
        if outcome == "error":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return []

    proxy = EgressProxy([NAME], AuditLog(audit_path), resolve=resolve)
    guest = guests(proxy)
    guest.sock.sendall(connect_request(f"{NAME}:443"))
    assert refused(guest)[0] == 502
    assert entries(audit_path)[0]["reason"] == "resolve-failed"


def test_a_refused_connection_gets_502(audit_path: Path, guests: Any) -> None:
    def connect(address: str, port: int, timeout: float) -> socket.socket:
        raise ConnectionRefusedError

    proxy = EgressProxy([NAME], AuditLog(audit_path), resolve=Hooks(None).resolve, connect=connect)
    guest = guests(proxy)
    guest.sock.sendall(connect_request(f"{NAME}:443"))
    assert refused(guest)[0] == 502
    assert entries(audit_path)[0]["reason"] == "connect-failed"


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n", 400),  # origin form
        (b"GET https://allowed.example/ HTTP/1.1\r\n\r\n", 400),  # https goes by CONNECT
        (b"GET http://user@allowed.example/ HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT allowed.example HTTP/1.1\r\n\r\n", 400),  # no port
        (b"CONNECT allowed.example:99999 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT allowed.example:443 HTTP/2\r\n\r\n", 400),
        (b"CONNECT  allowed.example:443 HTTP/1.1\r\n\r\n", 400),
        (b"hello\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n", 400),
        (b"CONNECT allowed.example:443 HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"CONNECT allowed.example:443 HTTP/1.1\r\nX : a\r\n\r\n", 400),
        (b"CONNECT allowed.example:443 HTTP/1.1\r\nX: a\nY: b\r\n\r\n", 400),
        (b"CONNECT allowed.example:443 HTTP/1.1\r\n" + b"X: " + b"a" * 17000 + b"\r\n\r\n", 431),
        (b"CONNECT allowed.example:443 HTTP/1.1\r\n" + b"X: a\r\n" * 101 + b"\r\n", 400),
        (b"GET http://allowed.example/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (
            b"POST http://allowed.example/ HTTP/1.1\r\n"
            b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (b"POST http://allowed.example/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"CONNECT allowed.example:443 HTTP/1.1\r\nHost: x\r\n", 400),  # ends early (EOF)
    ],
)
def test_malformed_requests_get_4xx_and_are_audited(
    audit_path: Path, guests: Any, request_: bytes, status: int
) -> None:
    hooks = Hooks(None)
    guest = guests(make_proxy(audit_path, hooks))
    guest.sock.sendall(request_)
    guest.sock.shutdown(socket.SHUT_WR)
    assert refused(guest)[0] == status
    assert hooks.connected == []
    [entry] = entries(audit_path)
    assert entry["decision"] == "deny" and entry["status"] == status
    assert entry["reason"] == ("head-too-large" if status == 431 else "bad-request")


def test_a_slow_head_gets_408(audit_path: Path, guests: Any) -> None:
    guest = guests(make_proxy(audit_path, Hooks(None), head_timeout=0.2))
    guest.sock.sendall(b"CONNECT allowed.exa")
    assert refused(guest)[0] == 408
    assert entries(audit_path)[0]["reason"] == "timeout"


def test_a_connection_that_says_nothing_is_not_audited(audit_path: Path, guests: Any) -> None:
    guest = guests(make_proxy(audit_path, Hooks(None)))
    guest.sock.shutdown(socket.SHUT_WR)
    assert guest.rest() == b""
    guest.done()
    assert entries(audit_path) == []


def test_more_tunnels_than_allowed_get_503(
    audit_path: Path, raw_upstream: Upstream, guests: Any
) -> None:
    proxy = make_proxy(audit_path, Hooks(raw_upstream), max_tunnels=1)
    first = guests(proxy)
    first.sock.sendall(connect_request(f"{NAME}:443") + real_hello(NAME))
    assert first.head().startswith(b"HTTP/1.1 200 ")
    second = guests(proxy)
    second.sock.sendall(connect_request(f"{NAME}:443"))
    response = second.rest()
    second.done()
    assert response.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in response
    first.sock.shutdown(socket.SHUT_WR)
    assert first.rest().startswith(b"got ")
    first.done()
    third = guests(proxy)  # the slot is free again
    third.sock.sendall(connect_request(f"{NAME}:443"))
    assert third.head().startswith(b"HTTP/1.1 200 ")
    reasons = [e.get("reason") for e in entries(audit_path)]
    assert reasons == ["busy", None]


# ---------------------------------------------------------------------------------------------
# Plain HTTP


def serve_http(conn: socket.socket, upstream: Upstream) -> None:
    """Read one request (head + Content-Length body), answer, then note anything more."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        body += conn.recv(65536)
    conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 6\r\nConnection: close\r\n\r\nmade\r\n")
    conn.settimeout(0.3)
    extra = b""
    try:
        while chunk := conn.recv(65536):
            extra += chunk
    except TimeoutError:
        pass
    upstream.received.append(head + b"\r\n\r\n" + body)
    upstream.received.append(extra)


@pytest.fixture
def http_upstream() -> Iterator[Upstream]:
    upstream = Upstream(serve_http)
    yield upstream
    upstream.close()


RESPONSE = b"HTTP/1.1 201 Created\r\nContent-Length: 6\r\nConnection: close\r\n\r\nmade\r\n"


def test_plain_http_goes_out_in_origin_form_with_the_urls_host(
    audit_path: Path, http_upstream: Upstream, guests: Any
) -> None:
    hooks = Hooks(http_upstream)
    guest = guests(make_proxy(audit_path, hooks, allow=(".example",)))
    guest.sock.sendall(
        b"GET http://files.Example/simple/pkg/?q=1 HTTP/1.1\r\n"
        b"Host: evil.example\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nAccept: */*\r\n\r\n"
    )
    assert guest.rest() == RESPONSE
    guest.done()
    sent, extra = http_upstream.received
    assert sent == (
        b"GET /simple/pkg/?q=1 HTTP/1.1\r\nHost: files.example\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert extra == b""
    assert hooks.connected == [(PUBLIC, 80)]
    [entry] = entries(audit_path)
    assert (entry["method"], entry["host"], entry["port"], entry["path"]) == (
        "GET",
        "files.example",
        80,
        "/simple/pkg/",
    )
    assert (entry["status"], entry["decision"], entry["address"]) == (201, "allow", PUBLIC)
    assert (entry["bytesIn"], entry["bytesOut"]) == (0, len(RESPONSE))


def test_plain_http_sends_exactly_the_body_and_nothing_pipelined_after_it(
    audit_path: Path, http_upstream: Upstream, guests: Any
) -> None:
    guest = guests(make_proxy(audit_path, Hooks(http_upstream)))
    smuggled = b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    guest.sock.sendall(b"POST http://allowed.example HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello")
    guest.sock.sendall(b" world" + smuggled)
    assert guest.rest() == RESPONSE
    guest.done()
    sent, extra = http_upstream.received
    assert sent.endswith(b"\r\n\r\nhello world") and sent.startswith(b"POST / HTTP/1.1\r\n")
    assert extra == b""
    [entry] = entries(audit_path)
    assert (entry["bytesIn"], entry["path"], entry["status"]) == (11, "/", 201)


def test_bytes_past_the_request_sent_while_it_is_forwarded_do_not_reset_the_answer(
    audit_path: Path, http_upstream: Upstream, guests: Any
) -> None:
    """The rest of the body and a pipelined request arrive once the proxy forwards: it
    takes the body's bytes only, and the rest, never read, must not turn its close into a
    reset that takes the answer with it (read here once the proxy is done: a guest slower
    than the proxy, as under load)."""
    guest = guests(make_proxy(audit_path, Hooks(http_upstream)))
    guest.sock.sendall(b"POST http://allowed.example HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello")
    deadline = time.monotonic() + WAIT
    while http_upstream.accepted < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert http_upstream.accepted == 1
    guest.sock.sendall(
        b" world" + b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    )
    guest.thread.join(WAIT)  # the proxy has closed its end: the answer is all queued
    assert not guest.thread.is_alive()
    assert guest.rest() == RESPONSE
    guest.done()
    sent, extra = http_upstream.received
    assert sent.endswith(b"\r\n\r\nhello world")
    assert extra == b""


# ---------------------------------------------------------------------------------------------
# The allow-list


@pytest.mark.parametrize(
    ("host", "allow", "expected"),
    [
        ("pypi.org", ["pypi.org"], True),
        ("PyPI.org.", ["pypi.org"], True),
        ("pypi.org", ["PYPI.ORG."], True),
        ("www.pypi.org", ["pypi.org"], False),  # an exact entry is exact
        ("a.example.com", [".example.com"], True),
        ("a.b.example.com", [".example.com"], True),
        ("example.com", [".example.com"], False),  # a suffix is not its own name
        ("badexample.com", [".example.com"], False),
        ("example.com.evil", [".example.com"], False),
        ("files.pythonhosted.org", ["pypi.org", ".pythonhosted.org"], True),
        ("127.0.0.1", ["127.0.0.1"], False),  # addresses never match
        ("2130706433", [".0"], False),
        ("0x7f.1", [".1"], False),
        ("[::1]", ["[::1]"], False),
        ("a..example.com", [".example.com"], False),
        ("", [""], False),
        (".example.com", [".example.com"], False),
        ("bücher.example", [".example"], False),
        ("a" * 64 + ".example", [".example"], False),  # label over 63
        (("a" * 63 + ".") * 4 + "example", [".example"], False),  # name over 253
        ("ok.example", ["*.example", ".example"], True),  # a bad entry is skipped
        ("x y.example", [".example"], False),
    ],
)
def test_host_allowed(host: str, allow: list[str], expected: bool) -> None:
    assert host_allowed(host, allow) is expected


@pytest.mark.parametrize(
    ("entry", "normalised"),
    [("PyPI.org", "pypi.org"), ("pypi.org.", "pypi.org"), (".Example.COM.", ".example.com")],
)
def test_check_allow_entry_normalises(entry: str, normalised: str) -> None:
    assert check_allow_entry(entry) == normalised


@pytest.mark.parametrize(
    ("entry", "hint"),
    [
        ("*.example.com", "'.example.com'"),
        ("https://pypi.org", "without a scheme"),
        ("pypi.org:443", "without a scheme"),
        ("10.0.0.1", "addresses are not allowed"),
        ("bücher.example", "xn--"),
        ("", "a host name"),
        (".", "a host name"),
        ("..example", "a host name"),
        ("a_-.example", "a host name"),
    ],
)
def test_check_allow_entry_refuses_with_a_hint(entry: str, hint: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_allow_entry(entry)
    assert hint in caught.value.hint and repr(entry) in caught.value.message


def test_a_bad_allow_entry_fails_the_proxy_at_construction(audit_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        EgressProxy(["pypi.org", "http://x"], AuditLog(audit_path))


# ---------------------------------------------------------------------------------------------
# The ClientHello parser


def test_the_parser_reads_real_hellos() -> None:
    assert client_hello_sni(real_hello(NAME)) == NAME
    assert client_hello_sni(real_hello(None)) is None
    assert client_hello_sni(records(hello_message(None))) is None


def test_every_proper_prefix_of_a_hello_is_incomplete() -> None:
    hello = real_hello(NAME)
    for size in range(len(hello)):
        with pytest.raises(IncompleteHello):
            client_hello_sni(hello[:size])


@pytest.mark.parametrize(
    "data",
    [
        b"\x17\x03\x03\x00\x05hello",  # application data, not a handshake
        b"\x16\x02\x00\x00\x05hello",  # SSL 2
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x40\x01" + bytes(0x4001),  # record over 16 KiB
        records(b"\x02" + hello_message(NAME)[1:]),  # a ServerHello
        records(hello_message(b"caf\xc3\xa9.example")),  # not ASCII
        records(hello_message(b"")),
        records(hello_message(NAME, extensions=hello_message(NAME)[-20:])),  # duplicate SNI
        records(hello_message(b"allowed.example\x00")),  # a NUL in the name
    ],
)
def test_the_parser_refuses_what_is_not_a_client_hello(data: bytes) -> None:
    with pytest.raises(ClientHelloError) as caught:
        client_hello_sni(data)
    assert type(caught.value) is ClientHelloError  # definite, not "send more"


def test_the_parser_is_bounded() -> None:
    huge = records(hello_message(NAME, extensions=b"\x00\x15" + (20000).to_bytes(2, "big")))
    with pytest.raises(ClientHelloError) as caught:
        client_hello_sni(huge[:100])  # the length alone says it will not fit
    assert type(caught.value) is ClientHelloError
    assert client_hello_sni(records(hello_message(NAME)), limit=200) == NAME
    with pytest.raises(ClientHelloError):
        client_hello_sni(records(hello_message(NAME)), limit=40)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_the_parser_raises_only_its_own_error_on_random_bytes(data: bytes) -> None:
    for candidate in (data, b"\x16\x03\x01" + data, records(b"\x01" + data)):
        try:
            result = client_hello_sni(candidate)
        except ClientHelloError:
            continue
        assert result is None or isinstance(result, str)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_the_parser_survives_mutated_real_hellos(data: st.DataObject) -> None:
    hello = bytearray(egress_hello())
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(hello) - 1))
        hello[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(hello)))
    try:
        result = client_hello_sni(bytes(hello[:cut]))
    except ClientHelloError:
        return
    assert result is None or isinstance(result, str)


_HELLO: list[bytes] = []


def egress_hello() -> bytes:
    if not _HELLO:
        _HELLO.append(real_hello(NAME))
    return _HELLO[0]


def test_module_limits_are_what_the_docs_say() -> None:
    assert egress.HEAD_MAX == 16 << 10 and egress.HELLO_MAX == 16 << 10
    assert egress.TLS_PORT == 443 and egress.HTTP_PORT == 80


def test_a_lookup_that_hangs_gets_504_within_its_bound(
    audit_path: Path, guests: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system resolver may retry for much longer than a guest should wait: the default
    resolver gives a lookup LOOKUP_TIMEOUT, then answers 504; nothing is connected."""
    release = threading.Event()

    def hung(*args: Any, **kwargs: Any) -> Any:
        release.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    monkeypatch.setattr(addresses, "LOOKUP_TIMEOUT", 0.3)
    connected: list[str] = []

    def spy(address: str, port: int, timeout: float) -> socket.socket:
        connected.append(address)
        raise AssertionError("no connection may be made")

    proxy = EgressProxy([NAME], AuditLog(audit_path), connect=spy)
    try:
        guest = guests(proxy)
        began = time.monotonic()
        guest.sock.sendall(connect_request(f"{NAME}:443"))
        status, body = refused(guest)
        assert status == 504 and b"timed out" in body
        assert time.monotonic() - began < 30  # the bound, not the resolver's 60 s
        assert connected == [] and entries(audit_path)[0]["reason"] == "resolve-timeout"
    finally:
        release.set()
