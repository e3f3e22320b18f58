"""The credential broker: a reverse proxy to one upstream that holds the real key.

The guest talks plain HTTP/1.1 to it (through the guest agent's channel and a unix socket).
Each request is parsed with hard bounds (head, body, header count), refused unless it is an
origin-form request within the limits, stripped of every auth and hop-by-hop header the guest
sent, given the upstream's ``Host`` and the real key header, and forwarded over verified TLS
(plain HTTP only to a loopback upstream), on an upstream connection kept from an earlier
request when there is one (broker/pool.py). The response is relayed piece by piece as it
arrives, so server-sent events reach the guest one by one. Every request is one audit entry:
method, path without the query, status, body bytes each way, duration, decision and reason;
never a header value, a query string, a body or the key.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote, urlsplit

from microagent.broker.addresses import AddrInfo, LookupTimeout, lookup
from microagent.broker.audit import AuditLog
from microagent.broker.credentials import check_secret
from microagent.broker.http1 import (
    LAST_CHUNK,
    MAX_HEAD,
    TOKEN,
    Body,
    Framing,
    Head,
    HTTPError,
    Reader,
    body_pieces,
    chunk,
    read_head,
    request_body,
    response_body,
    serialize,
)
from microagent.broker.pool import IDLE_TIMEOUT, MAX_IDLE, ConnectionPool
from microagent.errors import InvalidInputError

CONNECT_TIMEOUT = 10.0  # TCP connect plus the TLS handshake
READ_TIMEOUT = 300.0  # the longest silence of either side in the middle of an exchange
KEEPALIVE_TIMEOUT = 60.0  # an idle guest connection between requests
DRAIN_BYTES = 256 << 10  # read (and drop) after a refusal, so the answer is not reset
DRAIN_SECONDS = 1.0
MAX_INTERIM = 8  # 1xx responses skipped before the final one
REPLAY_MAX = 4 << 20  # a body up to this size is held whole, so it can be sent again
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
URL_MAX = 2048

# Never forwarded from the guest: any credential it holds is a placeholder at best.
AUTH_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "x-goog-api-key", "api-key", "cookie"}
)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
SET_BY_BROKER = frozenset({"host", "content-length", "expect"})


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Upstream:
    """Where a credential's requests go: scheme, host, port and a path prefix ("" or
    ``/v1``, never ending in a slash)."""

    scheme: str
    host: str
    port: int
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> Upstream:
        """An ``http(s)://host[:port][/prefix]`` URL, or an InvalidInputError saying why not:
        no user info, query or fragment; plain http only for a loopback host."""
        if not isinstance(url, str) or not url or len(url) > URL_MAX:
            raise InvalidInputError(f"an upstream must be a URL of at most {URL_MAX} characters")
        if not all("!" <= ch <= "~" for ch in url):
            raise InvalidInputError("an upstream URL may hold no space, control or non-ASCII")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidInputError(f"upstream {url!r}: must be an http:// or https:// URL")
        if "@" in parts.netloc or parts.query or parts.fragment or "#" in url or "?" in url:
            raise InvalidInputError(
                f"upstream {url!r}: must not carry user info, a query or a fragment"
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise InvalidInputError(f"upstream {url!r}: bad port") from exc
        host = parts.hostname or ""
        _check_host(url, host)
        prefix = parts.path.rstrip("/")
        if _has_dot_segment(prefix):
            raise InvalidInputError(f"upstream {url!r}: the path has a '.' or '..' segment")
        if parts.scheme == "http" and not is_loopback(host):
            raise InvalidInputError(
                f"upstream {url!r}: plain http is allowed only to a loopback host "
                "(127.0.0.1, ::1, localhost)",
                hint="use https:// (the broker verifies the upstream's certificate)",
            )
        return cls(parts.scheme, host, port, prefix)

    @property
    def authority(self) -> str:
        """The ``Host`` header value: the default port is left out."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.prefix}"


def _check_host(url: str, host: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_label_ok(label) for label in labels):
        raise InvalidInputError(f"upstream {url!r}: {host[:64]!r} is not a host name")


def _label_ok(label: str) -> bool:
    return (
        0 < len(label) <= 63
        and label.replace("-", "").replace("_", "").isalnum()
        and label.isascii()
        and not label.startswith("-")
        and not label.endswith("-")
    )


def _has_dot_segment(path: str) -> bool:
    """Whether a path climbs (``.``/``..``, percent-encoded too) once decoded."""
    decoded = unquote(path).replace("\\", "/")
    return any(segment in (".", "..") for segment in decoded.split("/"))


class BrokerError(Exception):
    """A request the broker answers itself: refused (``deny``) or failed upstream."""

    def __init__(
        self, status: int, reason: str, *, deny: bool = False, retry_after: int = 0
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.deny = deny
        self.retry_after = retry_after


class _Stale(Exception):
    """A connection failed before the upstream answered a byte; ``error`` says how."""

    def __init__(self, error: BrokerError) -> None:
        super().__init__(error.reason)
        self.error = error


class TokenBucket:
    """``per_minute`` requests a minute on average, bursts up to as many; thread-safe."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._tokens = self.capacity
        self._clock = clock
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0.0 when a request may go now (and counts it), else the seconds until one may."""
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._stamp)
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


@dataclass(frozen=True)
class _Request:
    method: str
    target: str  # the upstream's: prefix + the guest's path and query
    path: str  # for the audit: prefix + the guest's path, no query
    http11: bool
    head: Head
    body: Body
    keep_alive: bool
    expect_continue: bool


@dataclass
class _Exchange:
    """What the audit entry of one request says."""

    start: float = field(default_factory=time.monotonic)
    method: str = ""
    path: str = ""
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    answered: bool = False  # the response head went to the guest
    deny: bool = False
    reason: str = ""


class ReverseProxy:
    """The broker of one credential: serve guest connections with :meth:`handle`."""

    def __init__(
        self,
        name: str,
        upstream: Upstream | str,
        audit: AuditLog,
        *,
        header: str,
        value_format: str,
        secret: str,
        max_body_bytes: int = 32 << 20,
        max_concurrent: int = 16,
        rate_per_minute: int = 600,
        cafile: Path | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        max_idle: int = MAX_IDLE,
        idle_timeout: float = IDLE_TIMEOUT,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.upstream = upstream if isinstance(upstream, Upstream) else Upstream.parse(upstream)
        if self.upstream.scheme == "http" and not is_loopback(self.upstream.host):
            raise InvalidInputError(f"credential {name}: plain http to a non-loopback upstream")
        self.header = header
        self._auth_value = _auth_value(name, header, value_format, secret)
        self._dropped = AUTH_HEADERS | HOP_BY_HOP | SET_BY_BROKER | {header.lower()}
        self.audit = audit
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.rate_per_minute = rate_per_minute
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._bucket = TokenBucket(rate_per_minute)
        self._tls = _tls_context(cafile) if self.upstream.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        self._log = log or _stderr
        self._pool = ConnectionPool(self._connect, max_idle=max_idle, idle_timeout=idle_timeout)

    @property
    def pool(self) -> ConnectionPool:
        """The upstream connections kept between requests (this credential's only)."""
        return self._pool

    def close(self) -> None:
        """Close the idle upstream connections (the gateway is closing)."""
        self._pool.close()

    def __repr__(self) -> str:
        return f"ReverseProxy(name={self.name!r}, upstream={str(self.upstream)!r})"

    def handle(self, conn: socket.socket) -> None:
        """Serve one guest connection (requests one after another while it keeps it alive);
        blocks until it ends and always closes ``conn``."""
        reader = Reader(conn, "guest")
        try:
            while self._exchange(conn, reader):
                pass
        except Exception as exc:  # a bug: say so, drop the connection, keep the gateway up
            self._log_bug(exc)
        finally:
            close_gently(conn)

    def _exchange(self, conn: socket.socket, reader: Reader) -> bool:
        """One request and its response; True when the guest may send another."""
        conn.settimeout(self.keepalive_timeout)
        ex = _Exchange()
        try:
            head = read_head(reader, idle_ok=True)
            if head is None:
                return False
            conn.settimeout(self.read_timeout)
            ex.start = time.monotonic()
            request = self._parse(reader, head, ex)
            with self._admit():
                return self._forward(conn, reader, request, ex)
        except HTTPError as exc:  # the guest's head
            self._fail(conn, ex, _guest_error(exc, too_large=431))
            return False
        except BrokerError as exc:
            self._fail(conn, ex, exc)
            return False
        finally:
            if ex.status or ex.reason:
                self._record(ex)

    def _fail(self, conn: socket.socket, ex: _Exchange, exc: BrokerError) -> None:
        ex.reason = exc.reason
        if ex.answered:  # too late for an answer: the guest sees the body cut short
            return
        ex.status, ex.deny = exc.status, exc.deny
        with contextlib.suppress(OSError):
            conn.sendall(error_response(exc, self.name))

    def _parse(self, reader: Reader, head: Head, ex: _Exchange) -> _Request:
        method, target, http11 = _request_line(head.start)
        ex.method = method
        path, _, _query = target.partition("?")
        ex.path = self.upstream.prefix + path
        try:
            body = request_body(reader, head)
        except HTTPError as exc:
            raise _guest_error(exc) from None
        if body.framing is Framing.LENGTH and body.length > self.max_body_bytes:
            raise BrokerError(413, self._too_large(), deny=True)
        connection = head.tokens("connection")
        return _Request(
            method=method,
            target=self.upstream.prefix + target,
            path=ex.path,
            http11=http11,
            head=head,
            body=body,
            keep_alive=http11 and "close" not in connection,
            expect_continue="100-continue" in head.tokens("expect") and http11,
        )

    def _too_large(self) -> str:
        return f"the request body is larger than the limit of {self.max_body_bytes} bytes"

    @contextlib.contextmanager
    def _admit(self) -> Iterator[None]:
        """A slot of the concurrency cap and a token of the rate cap, or a 429."""
        if not self._slots.acquire(blocking=False):
            raise BrokerError(
                429,
                f"more than {self.max_concurrent} requests in flight for this credential",
                deny=True,
                retry_after=1,
            )
        try:
            wait = self._bucket.take()
            if wait > 0:
                raise BrokerError(
                    429,
                    f"more than {self.rate_per_minute} requests a minute for this credential",
                    deny=True,
                    retry_after=max(1, math.ceil(wait)),
                )
            yield
        finally:
            self._slots.release()

    def _forward(
        self, conn: socket.socket, reader: Reader, request: _Request, ex: _Exchange
    ) -> bool:
        """The request to the upstream and its answer to the guest; True if keep-alive
        holds. A body that can be sent again goes on an idle connection when there is one
        (and on a new one if that connection turns out closed); any other on a new one."""
        if not self._replayable(request):
            return self._forward_streamed(conn, reader, request, ex)
        if request.expect_continue and request.body.framing is not Framing.NONE:
            _send_guest(conn, CONTINUE)
        payload = self._upstream_head(request) + self._read_body(reader, request, ex)
        upstream, reused = self._pool.acquire()
        try:
            return self._round_trip(conn, upstream, payload, request, ex)
        except _Stale as stale:
            if not reused:
                raise stale.error from None
        # The server closed the idle connection as the request went out: nothing of it was
        # answered, so it goes once more, on a new connection.
        try:
            return self._round_trip(conn, self._pool.fresh(), payload, request, ex)
        except _Stale as stale:
            raise stale.error from None

    def _replayable(self, request: _Request) -> bool:
        """A body the broker holds whole before sending, so it can send it twice."""
        framing, length = request.body.framing, request.body.length
        return framing is Framing.NONE or (framing is Framing.LENGTH and length <= REPLAY_MAX)

    def _read_body(self, reader: Reader, request: _Request, ex: _Exchange) -> bytes:
        data = bytearray()
        try:
            for piece in body_pieces(reader, request.body):
                data += piece
                ex.bytes_in += len(piece)
        except HTTPError as exc:
            raise _guest_error(exc) from None
        return bytes(data)

    def _round_trip(
        self,
        conn: socket.socket,
        upstream: socket.socket,
        payload: bytes,
        request: _Request,
        ex: _Exchange,
    ) -> bool:
        """``payload`` (head and body) on ``upstream``, the answer to the guest. _Stale
        when the upstream failed before it sent a byte (not a timeout): it never saw the
        request, or dropped it unanswered."""
        up_reader = Reader(upstream, "upstream")
        reusable = False
        try:
            try:
                _send(upstream, payload, "upstream")
                _quick_ack(upstream)
                response = _final_response(up_reader)
            except (HTTPError, BrokerError) as exc:
                error = _side_error(exc) if isinstance(exc, HTTPError) else exc
                timeout = isinstance(exc, HTTPError) and exc.kind == "timeout"
                if up_reader.received or timeout:
                    raise error from None
                raise _Stale(error) from None
            keep, reusable = self._relay(conn, up_reader, response, request, ex)
            return keep
        except HTTPError as exc:
            raise _side_error(exc) from None
        finally:
            self._pool.release(upstream, reusable)

    def _forward_streamed(
        self, conn: socket.socket, reader: Reader, request: _Request, ex: _Exchange
    ) -> bool:
        """A chunked or large body, passed on as it arrives over a new connection."""
        upstream = self._pool.fresh()
        up_reader = Reader(upstream, "upstream")
        reusable = False
        try:
            _send(upstream, self._upstream_head(request), "upstream")
            if request.expect_continue and request.body.framing is not Framing.NONE:
                _send(conn, CONTINUE, "guest")
            self._send_body(reader, upstream, request, ex)
            _quick_ack(upstream)
            response = _final_response(up_reader)
            keep, reusable = self._relay(conn, up_reader, response, request, ex)
            return keep
        except HTTPError as exc:
            raise _side_error(exc) from None
        finally:
            self._pool.release(upstream, reusable)

    def _upstream_head(self, request: _Request) -> bytes:
        named = request.head.tokens("connection")
        fields = [("Host", self.upstream.authority)]
        fields += [
            (name, value)
            for name, value in request.head.fields
            if name.lower() not in self._dropped and name.lower() not in named
        ]
        fields.append((self.header, self._auth_value))
        if request.body.framing is Framing.LENGTH:
            fields.append(("Content-Length", str(request.body.length)))
        elif request.body.framing is Framing.CHUNKED:
            fields.append(("Transfer-Encoding", "chunked"))
        return serialize(f"{request.method} {request.target} HTTP/1.1", fields)

    def _send_body(
        self, reader: Reader, upstream: socket.socket, request: _Request, ex: _Exchange
    ) -> None:
        chunked = request.body.framing is Framing.CHUNKED
        try:
            for piece in body_pieces(reader, request.body):
                ex.bytes_in += len(piece)
                if ex.bytes_in > self.max_body_bytes:
                    raise BrokerError(413, self._too_large(), deny=True)
                _send(upstream, chunk(piece) if chunked else piece, "upstream")
        except HTTPError as exc:
            if exc.side == "guest":
                raise _guest_error(exc) from None
            raise
        if chunked:
            _send(upstream, LAST_CHUNK, "upstream")

    def _relay(
        self,
        conn: socket.socket,
        up_reader: Reader,
        response: tuple[Head, int],
        request: _Request,
        ex: _Exchange,
    ) -> tuple[bool, bool]:
        """The response to the guest, each piece as it arrives: whether the guest's
        connection stays open, and whether the upstream's may carry another request (its
        response was framed, read to its end, and the upstream did not say close)."""
        head, status = response
        body = response_body(up_reader, head, status, request.method)
        streamed = body.framing in (Framing.CHUNKED, Framing.CLOSE)
        rechunk = streamed and request.http11
        keep = request.keep_alive and (rechunk or not streamed)
        fields = _response_fields(head, body, rechunk, keep)
        _send(conn, serialize(_status_line(head.start, status), fields), "guest")
        ex.status, ex.answered = status, True
        for piece in body_pieces(up_reader, body):
            _send(conn, chunk(piece) if rechunk else piece, "guest")
            ex.bytes_out += len(piece)
        if rechunk:
            _send(conn, LAST_CHUNK, "guest")
        reusable = (
            body.framing is not Framing.CLOSE
            and head.start.startswith("HTTP/1.1 ")
            and "close" not in head.tokens("connection")
            and not up_reader.buffered
        )
        return keep, reusable

    def _connect(self) -> socket.socket:
        host, port = self.upstream.host, self.upstream.port
        try:
            infos = lookup(host, port, self.connect_timeout)
            if self._tls is None:
                sock = _connect_loopback(host, infos, self.connect_timeout)
            else:
                raw = _connect_first(infos, self.connect_timeout)
                try:
                    sock = self._tls.wrap_socket(raw, server_hostname=host)
                except BaseException:
                    raw.close()
                    raise
        except ssl.SSLCertVerificationError as exc:
            detail = exc.verify_message or "verification failed"
            reason = f"the upstream's TLS certificate is not trusted ({detail})"
            raise BrokerError(502, reason) from None
        except ssl.SSLError as exc:
            reason = f"TLS with the upstream failed ({exc.reason or 'error'})"
            raise BrokerError(502, reason) from None
        except LookupTimeout:
            reason = f"looking up the upstream host {host!r} took longer than "
            reason += f"{self.connect_timeout:g} s"
            raise BrokerError(504, reason) from None
        except TimeoutError:
            reason = f"the upstream did not answer within {self.connect_timeout:g} s"
            raise BrokerError(504, reason) from None
        except socket.gaierror:
            raise BrokerError(502, f"the upstream host {host!r} does not resolve") from None
        except OSError as exc:
            raise BrokerError(502, f"cannot connect to the upstream ({exc.strerror})") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a head, then a body
        sock.settimeout(self.read_timeout)
        return sock

    def _record(self, ex: _Exchange) -> None:
        entry: dict[str, object] = {
            "kind": "broker",
            "credential": self.name,
            "method": ex.method,
            "path": ex.path,
            "status": ex.status,
            "bytesIn": ex.bytes_in,
            "bytesOut": ex.bytes_out,
            "durationMs": round((time.monotonic() - ex.start) * 1000, 1),
            "decision": "deny" if ex.deny else "allow",
        }
        if ex.reason:
            entry["reason"] = ex.reason
        try:
            self.audit.write(entry)
        except OSError as exc:
            self._log(f"credential {self.name}: cannot write the audit log ({exc.strerror})")

    def _log_bug(self, exc: BaseException) -> None:
        # Frames and the exception's type only: a message could quote request data.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        self._log(f"credential {self.name}: internal error {type(exc).__name__}\n{frames}")


def _auth_value(name: str, header: str, value_format: str, secret: str) -> str:
    if not TOKEN.fullmatch(header.encode("ascii", "replace")):
        raise InvalidInputError(f"credential {name}: {header[:64]!r} is not a header name")
    if value_format.count("{value}") != 1:
        raise InvalidInputError(f"credential {name}: the format must hold {{value}} once")
    check_secret(value_format.replace("{value}", "x"), f"credential {name}: the format")
    check_secret(secret, f"credential {name}")
    return value_format.replace("{value}", secret)


def _tls_context(cafile: Path | None) -> ssl.SSLContext:
    """The system's trust store plus ``cafile``; certificates and host names verified."""
    context = ssl.create_default_context()
    if cafile is not None:
        try:
            context.load_verify_locations(cafile=str(cafile))
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInputError(f"cafile {cafile}: cannot load certificates ({exc})") from exc
    context.set_alpn_protocols(["http/1.1"])
    return context


def _connect_loopback(host: str, infos: list[AddrInfo], timeout: float) -> socket.socket:
    """A TCP connection to a loopback address of ``host`` only (plain http upstreams)."""
    addresses = [info for info in infos if is_loopback(str(info[4][0]))]
    if not addresses:
        raise BrokerError(502, f"refused: the upstream {host!r} is not a loopback address")
    return _connect_first(addresses, timeout)


def _connect_first(infos: list[AddrInfo], timeout: float) -> socket.socket:
    """A TCP connection to the first of ``infos`` (getaddrinfo entries) that answers."""
    error: OSError = OSError("no address")
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _request_line(line: str) -> tuple[str, str, bool]:
    """(method, target, HTTP/1.1?) of an origin-form request line, or a refusal."""
    parts = line.split(" ")
    if len(parts) != 3 or not TOKEN.fullmatch(parts[0].encode()):
        raise BrokerError(400, "the request line is not 'METHOD /path HTTP/1.1'", deny=True)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise BrokerError(505, f"{version[:16]} is not served: HTTP/1.1 only", deny=True)
        raise BrokerError(400, "the request line is not 'METHOD /path HTTP/1.1'", deny=True)
    if method == "CONNECT":
        raise BrokerError(
            405, "CONNECT is not served: this is a credential broker, not a proxy", deny=True
        )
    if not target.startswith("/"):
        raise BrokerError(
            400,
            "only origin-form targets are served (a path such as /v1/messages, "
            "not a full URL): this broker reaches one upstream only",
            deny=True,
        )
    if _has_dot_segment(target.partition("?")[0]):
        raise BrokerError(400, "the path has a '.' or '..' segment", deny=True)
    return method, target, version == "HTTP/1.1"


def _quick_ack(sock: socket.socket) -> None:
    """Acknowledge the response's first segments at once (Linux): a server that writes its
    head and its body apart, without TCP_NODELAY, waits for that acknowledgement before it
    sends the body, and a delayed one costs 40 ms on a kept connection."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _send_guest(conn: socket.socket, data: bytes) -> None:
    try:
        _send(conn, data, "guest")
    except HTTPError as exc:
        raise _side_error(exc) from None


def _final_response(reader: Reader) -> tuple[Head, int]:
    """The upstream's final response head (interim 1xx ones skipped) and its status."""
    for _ in range(MAX_INTERIM):
        head = read_head(reader, MAX_HEAD)
        if head is None:
            raise BrokerError(502, "the upstream closed the connection without a response")
        status = _status(head.start)
        if status == 101:
            raise BrokerError(502, "the upstream switched protocols (not supported)")
        if status >= 200:
            return head, status
    raise BrokerError(502, f"the upstream sent more than {MAX_INTERIM} interim responses")


def _status(line: str) -> int:
    parts = line.split(" ", 2)
    if (
        len(parts) < 2
        or parts[0] not in ("HTTP/1.1", "HTTP/1.0")
        or len(parts[1]) != 3
        or not parts[1].isdigit()
        or int(parts[1]) < 100
    ):
        raise BrokerError(502, "the upstream sent a malformed status line")
    return int(parts[1])


def _status_line(line: str, status: int) -> str:
    parts = line.split(" ", 2)
    reason = parts[2] if len(parts) == 3 else _phrase(status)
    return f"HTTP/1.1 {status} {reason}"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


def _response_fields(head: Head, body: Body, rechunk: bool, keep: bool) -> list[tuple[str, str]]:
    named = head.tokens("connection")
    framing = {"content-length"} if body.framing is not Framing.NONE else set()
    fields = [
        (name, value)
        for name, value in head.fields
        if name.lower() not in HOP_BY_HOP | framing and name.lower() not in named
    ]
    if body.framing is Framing.LENGTH:
        fields.append(("Content-Length", str(body.length)))
    elif rechunk:
        fields.append(("Transfer-Encoding", "chunked"))
    if not keep:
        fields.append(("Connection", "close"))
    return fields


def _send(sock: socket.socket, data: bytes, side: str) -> None:
    try:
        sock.sendall(data)
    except TimeoutError as exc:
        raise HTTPError(side, "timeout", "did not read in time") from exc
    except OSError as exc:
        detail = exc.strerror or type(exc).__name__
        raise HTTPError(side, "io", f"connection failed ({detail})") from exc


def _guest_error(exc: HTTPError, too_large: int = 400) -> BrokerError:
    status = {"timeout": 408, "too_large": too_large}.get(exc.kind, 400)
    return BrokerError(status, f"the guest {exc.message}", deny=True)


def _side_error(exc: HTTPError) -> BrokerError:
    """An HTTP problem while forwarding: the guest's side or the upstream's."""
    if exc.side == "guest":
        return BrokerError(400, f"the guest {exc.message}")
    return BrokerError(504 if exc.kind == "timeout" else 502, f"the upstream {exc.message}")


def error_response(exc: BrokerError, credential: str) -> bytes:
    """The broker's own answer: a short JSON error saying what was refused and why."""
    message = f"microagent broker (credential {credential}): {exc.reason}"
    body = json.dumps({"error": {"type": "microagent_broker", "message": message}}).encode()
    fields = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    if exc.retry_after:
        fields.append(("Retry-After", str(exc.retry_after)))
    return serialize(f"HTTP/1.1 {exc.status} {_phrase(exc.status)}", fields) + body


def close_gently(conn: socket.socket) -> None:
    """Close after a last answer: half-close, then read (and drop) what the guest is still
    sending for a moment, so that unread data does not reset the connection before the
    guest has read the answer."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(DRAIN_SECONDS)
        deadline = time.monotonic() + DRAIN_SECONDS
        drained = 0
        while drained < DRAIN_BYTES and time.monotonic() < deadline:
            data = conn.recv(64 << 10)
            if not data:
                break
            drained += len(data)
    conn.close()


def _stderr(line: str) -> None:
    print(f"gateway: {line}", file=sys.stderr, flush=True)
