"""Upstream connections kept between requests (broker/pool.py through the broker's public
door): a raw HTTP/1.1 server on loopback counts the connections it accepts and the requests
each carries, and can answer without a length, say close, or drop a request unanswered."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from broker_fakes import (
    KEY,
    GuestConnection,
    Running,
    credential,
    make_authority,
    request,
    run_gateway,
)

from microagent.broker.pool import ConnectionPool

WAIT = 20.0  # generous: the machine may be loaded


@dataclass
class Conn:
    """One connection the upstream accepted, and the paths it carried."""

    sock: socket.socket
    paths: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the x-api-key of each request
    busy: bool = False  # a request is being answered on it


@dataclass
class RawUpstream:
    """A loopback HTTP/1.1 server, one thread per connection.

    Paths: ``/len`` (Content-Length), ``/chunked``, ``/toclose`` (no length: the body ends
    with the connection), ``/close`` (``Connection: close``), ``/hold`` (waits until
    ``holding`` requests are held at once, or ``release`` is set). ``drop_reused`` drops
    the next request that arrives on a connection that already carried one (closes it
    unanswered), as a server that timed the connection out just then; ``drop`` drops the
    next requests on any connection.
    """

    conns: list[Conn] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)
    held: int = 0
    holding: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    drop_reused: int = 0
    drop: int = 0
    dropped: int = 0
    closed: int = 0
    overlapped: bool = False  # two requests in progress on one connection at once

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def accepted(self) -> int:
        with self.lock:
            return len(self.conns)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            conn = Conn(sock)
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Conn) -> None:
        conn.sock.settimeout(WAIT * 3)
        reader = conn.sock.makefile("rb")
        try:
            while self._one(conn, reader):
                pass
        except OSError:
            pass
        finally:
            reader.close()
            conn.sock.close()
            with self.cond:
                self.closed += 1
                self.cond.notify_all()

    def _one(self, conn: Conn, reader: object) -> bool:
        assert hasattr(reader, "readline") and hasattr(reader, "read")
        line = reader.readline()
        if not line:
            return False
        headers: dict[str, str] = {}
        while (field_line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = field_line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            while (size := int(reader.readline().split(b";")[0], 16)) > 0:
                reader.read(size + 2)
            reader.readline()
        else:
            reader.read(int(headers.get("content-length", "0")))
        path = line.split()[1].decode()
        with self.cond:
            if conn.busy:
                self.overlapped = True
            conn.busy = True
            if conn.paths and self.drop_reused:
                self.drop_reused -= 1
                self.dropped += 1
                return False
            if self.drop:
                self.drop -= 1
                self.dropped += 1
                return False
            conn.paths.append(path)
            conn.keys.append(headers.get("x-api-key", ""))
        try:
            return self._answer(conn, path)
        finally:
            conn.busy = False

    def _answer(self, conn: Conn, path: str) -> bool:
        body = path.encode()
        send = conn.sock.sendall
        if path == "/hold":
            with self.cond:
                self.held += 1
                self.cond.notify_all()
                self.cond.wait_for(lambda: self.held >= self.holding or self.release.is_set(), WAIT)
        if path == "/chunked":
            send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            send(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
            return True
        if path == "/toclose":
            send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
            return False
        close = path == "/close"
        extra = b"Connection: close\r\n" if close else b""
        send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body))
        return not close

    def wait(self, predicate: object) -> bool:
        assert callable(predicate)
        with self.cond:
            return self.cond.wait_for(predicate, WAIT)

    def close_idle(self) -> None:
        """Close every connection (as a server whose keep-alive ran out)."""
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.release.set()
        with self.cond:
            self.cond.notify_all()
        self.server.close()
        self.close_idle()


@pytest.fixture
def upstream() -> Iterator[RawUpstream]:
    served = RawUpstream()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def broker(sockdir: Path, upstream: RawUpstream) -> Iterator[Running]:
    with run_gateway(sockdir, (credential(sockdir, upstream.url),)) as running:
        yield running


def get(broker: Running, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request, returned once the broker is done with it (see :func:`ended`)."""
    method = "POST" if body is not None else "GET"
    before = len(broker.audit())
    status, _headers, data = request(broker.socket, method, path, body)
    ended(broker, before + 1)
    return status, data


def ended(broker: Running, count: int) -> None:
    """Until ``count`` exchanges are audited. The broker gives an upstream connection back
    to its pool after the guest has the whole answer, and audits the exchange after that: a
    guest's next request may come before the connection is back (it would open another)."""
    assert len(broker.wait_audit(count, WAIT)) >= count, "the broker never ended the exchange"


def pool(broker: Running) -> ConnectionPool:
    return broker.gateway._proxies[0].pool


def test_sequential_requests_share_one_upstream_connection(
    broker: Running, upstream: RawUpstream
) -> None:
    answers = [get(broker, "/len"), get(broker, "/chunked"), get(broker, "/len", b"{}" * 100)]
    answers += [get(broker, "/len") for _ in range(5)]
    assert all(answer == (200, b"/len") for answer in answers[3:])
    assert answers[1] == (200, b"/chunked")
    assert upstream.accepted == 1
    assert len(upstream.conns[0].paths) == 8
    assert pool(broker).opened == 1


def test_a_response_read_to_the_close_is_not_reused(broker: Running, upstream: RawUpstream) -> None:
    assert get(broker, "/toclose") == (200, b"/toclose")
    assert pool(broker).idle == 0
    assert get(broker, "/len") == (200, b"/len")
    assert get(broker, "/len") == (200, b"/len")
    assert upstream.accepted == 2
    assert [conn.paths for conn in upstream.conns] == [["/toclose"], ["/len", "/len"]]


def test_an_upstream_connection_close_is_not_reused(broker: Running, upstream: RawUpstream) -> None:
    assert get(broker, "/close") == (200, b"/close")
    assert pool(broker).idle == 0
    assert get(broker, "/len") == (200, b"/len")
    assert upstream.accepted == 2


def test_an_idle_connection_the_server_closed_is_replaced(
    broker: Running, upstream: RawUpstream
) -> None:
    assert get(broker, "/len") == (200, b"/len")
    upstream.close_idle()
    assert upstream.wait(lambda: upstream.closed == 1)
    assert get(broker, "/len") == (200, b"/len")
    assert upstream.accepted == 2
    assert upstream.dropped == 0


@pytest.mark.parametrize("body", [None, b'{"model": "m"}'])
def test_a_request_dropped_on_a_reused_connection_is_sent_again_on_a_new_one(
    broker: Running, upstream: RawUpstream, body: bytes | None
) -> None:
    """The server closes the idle connection just as the request arrives (it looks alive
    when it is taken): nothing was answered, the body is held, so it goes once more."""
    assert get(broker, "/len") == (200, b"/len")
    upstream.drop_reused = 1
    assert get(broker, "/again", body) == (200, b"/again")
    assert upstream.dropped == 1
    assert upstream.accepted == 2
    assert upstream.conns[1].paths == ["/again"]
    entries = broker.wait_audit(2)
    assert [entry["status"] for entry in entries] == [200, 200]


def test_a_request_is_sent_again_once_only(broker: Running, upstream: RawUpstream) -> None:
    """Dropped on the reused connection and on the new one too: a 502, as before pooling."""
    assert get(broker, "/len") == (200, b"/len")
    upstream.drop = 2
    status, body = get(broker, "/again")
    assert status == 502
    assert b"closed the connection without a response" in body
    assert upstream.dropped == 2
    assert upstream.accepted == 2
    assert broker.wait_audit(2)[-1]["status"] == 502


def test_a_chunked_request_body_goes_on_a_new_connection(
    broker: Running, upstream: RawUpstream
) -> None:
    """A body streamed as it arrives cannot be sent twice: never on an idle connection."""
    assert get(broker, "/len") == (200, b"/len")
    conn = GuestConnection(broker.socket)
    try:
        conn.putrequest("POST", "/streamed")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        conn.send(b"2\r\n{}\r\n0\r\n\r\n")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"/streamed")
    finally:
        conn.close()
    ended(broker, 2)
    assert upstream.accepted == 2
    assert get(broker, "/len") == (200, b"/len")  # one of the two idle ones
    assert upstream.accepted == 2


def test_concurrent_requests_never_share_a_connection_and_the_idle_pool_is_bounded(
    broker: Running, upstream: RawUpstream
) -> None:
    """Six requests held by the server until all six are in it: they can only all get
    there on six connections. Four of them are kept afterwards, the rest closed."""
    upstream.holding = 6
    results: list[tuple[int, bytes]] = []
    threads = [
        threading.Thread(target=lambda: results.append(get(broker, "/hold"))) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    assert results == [(200, b"/hold")] * 6
    ended(broker, 6)
    assert upstream.accepted == 6
    assert not upstream.overlapped
    assert pool(broker).idle == 4
    assert upstream.wait(lambda: upstream.closed == 2)
    for _ in range(3):
        assert get(broker, "/len") == (200, b"/len")
    assert upstream.accepted == 6
    assert pool(broker).idle <= 4


def test_every_request_on_a_reused_connection_carries_the_key(
    broker: Running, upstream: RawUpstream
) -> None:
    for _ in range(3):
        assert get(broker, "/len") == (200, b"/len")
    assert upstream.accepted == 1
    assert upstream.conns[0].keys == [KEY] * 3


# --- the pool alone ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pairs:
    """A pool's ``connect`` that makes socket pairs: the pool gets one end, the test keeps
    the other as the server's (``server(i)``)."""

    def __init__(self) -> None:
        self.made: list[tuple[socket.socket, socket.socket]] = []

    def connect(self) -> socket.socket:
        self.made.append(socket.socketpair())
        return self.made[-1][0]

    def server(self, index: int) -> socket.socket:
        return self.made[index][1]


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    made = Pairs()
    yield made
    for pair in made.made:
        for end in pair:
            end.close()


@contextlib.contextmanager
def pool_of(pairs: Pairs, **options: Any) -> Iterator[ConnectionPool]:
    """A pool over ``pairs``, closed afterwards whatever the test did."""
    kept = ConnectionPool(pairs.connect, **options)
    try:
        yield kept
    finally:
        kept.close()


def test_an_idle_connection_past_its_lifetime_is_closed_not_reused(pairs: Pairs) -> None:
    clock = Clock()
    with pool_of(pairs, max_idle=2, idle_timeout=30.0, clock=clock) as kept:
        first, reused = kept.acquire()
        assert not reused
        kept.release(first, reusable=True)
        clock.now += 29.0
        again, reused = kept.acquire()
        assert (again, reused) == (first, True)
        kept.release(again, reusable=True)
        clock.now += 30.0
        other, reused = kept.acquire()
        assert not reused and other is not first
        assert first.fileno() == -1  # closed when it expired
        kept.release(other, reusable=False)
        assert other.fileno() == -1
        assert kept.opened == 2


def test_an_idle_connection_is_closed_when_it_expires_without_another_request(
    pairs: Pairs,
) -> None:
    """No request need come for an expired connection to close (the server sees its end);
    the timer is re-armed for connections released later and stops with the pool."""
    with pool_of(pairs, max_idle=2, idle_timeout=0.3) as kept:
        for index in range(2):
            sock, _reused = kept.acquire()
            kept.release(sock, reusable=True)
            assert kept.idle == 1
            server = pairs.server(index)
            server.settimeout(WAIT)
            assert server.recv(1) == b""  # closed by the pool, no request in between
            assert kept.idle == 0 and sock.fileno() == -1
        assert kept.opened == 2


def test_a_connection_with_unasked_data_is_not_reused_and_release_respects_the_bound(
    pairs: Pairs,
) -> None:
    with pool_of(pairs, max_idle=1) as kept:
        one, _ = kept.acquire()
        two, _ = kept.acquire()
        kept.release(one, reusable=True)
        kept.release(two, reusable=True)  # over the bound: closed
        assert kept.idle == 1 and two.fileno() == -1
        pairs.server(0).sendall(b"HTTP/1.1 200 OK\r\n")  # the server spoke unasked
        three, reused = kept.acquire()
        assert not reused and one.fileno() == -1
        kept.release(three, reusable=True)
        kept.close()
        assert kept.idle == 0 and three.fileno() == -1
        four, _ = kept.acquire()
        kept.release(four, reusable=True)  # closed pool: closed
        assert four.fileno() == -1


def test_tls_connections_are_reused(sockdir: Path, tmp_path: Path) -> None:
    authority = make_authority(tmp_path)
    served = RawUpstream()
    tls_server = TLSFront(served, authority.server_context())
    try:
        with run_gateway(
            sockdir, (credential(sockdir, tls_server.url),), cafile=authority.ca
        ) as running:
            for count in range(1, 5):
                assert request(running.socket, "GET", "/len")[0] == 200
                ended(running, count)
            assert tls_server.accepted == 1
    finally:
        tls_server.stop()
        served.stop()


class TLSFront:
    """TLS in front of a RawUpstream: one TLS connection per accepted connection, relayed
    to a plain connection of its own (so the upstream's counts stay the same)."""

    def __init__(self, backend: RawUpstream, context: ssl.SSLContext) -> None:
        self.context = context
        self.backend_port = int(backend.url.rsplit(":", 1)[1])
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://localhost:{self.server.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._relay, args=(raw,), daemon=True).start()

    def _relay(self, raw: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
            back = socket.create_connection(("127.0.0.1", self.backend_port))
        except OSError:
            raw.close()
            return

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=pump, args=(back, tls), daemon=True).start()
        pump(tls, back)

    def stop(self) -> None:
        self.server.close()
