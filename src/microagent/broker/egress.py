"""The egress forward proxy of ``network.allow``: listed names only, never decrypted.

The guest's ``HTTP(S)_PROXY`` points here (through the guest agent's channel and the gateway's
unix socket). Two requests are served, one per connection:

- ``CONNECT host:443``: the name must be listed; it is resolved on the host and *every*
  address it resolves to must be global unicast (:func:`~microagent.broker.addresses.
  destination_allowed`) and not the host's own; the proxy connects to the address it checked
  (no second lookup, so no DNS rebinding), answers ``200``, reads the guest's ClientHello and
  requires its SNI to name the same host (so a listed name cannot front for another), then
  copies bytes both ways without looking at them again. TLS is never terminated.
- ``GET http://host/path`` (absolute form, port 80): the same checks, then the request goes out
  in origin form with ``Host`` set from the URL (the guest's own ``Host`` is dropped: no
  fronting) and ``Connection: close``; the response is relayed as it arrives. A body needs a
  ``Content-Length`` (chunked request bodies get 411) and exactly that many bytes are sent.

Anything else is 400; an unlisted name or a refused address 403; more than ``max_tunnels`` at
once 503. Every request is one entry in the audit log (see docs/broker.md), with the address
connected to and the bytes each way, or the reason it was refused. Untrusted input is bounded
where it enters: the request head (16 KiB, 10 s) and the ClientHello (16 KiB, 10 s).

What the SNI check cannot see: the HTTP ``Host`` inside the TLS session. A listed name served
by a CDN can still be asked, inside TLS, for another site of that CDN; ECH hides the real name
behind an outer SNI, which then fails the check (refused).
"""

from __future__ import annotations

import contextlib
import http
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from microagent.broker.addresses import LookupTimeout, destination_allowed, host_owns, lookup
from microagent.errors import InvalidInputError

HEAD_MAX = 16 << 10
HEAD_TIMEOUT = 10.0
HEADERS_MAX = 100
HELLO_MAX = 16 << 10  # raw bytes of the TLS records that carry the ClientHello
HELLO_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0  # a tunnel with no byte either way this long is closed
MAX_TUNNELS = 64
TLS_PORT = 443
HTTP_PORT = 80
NAME_MAX = 253
RESOLVED_MAX = 64  # addresses checked per name (all of them must pass)
CONNECT_ATTEMPTS = 4  # addresses tried in order until one answers
CHUNK = 64 << 10
DRAIN_MAX = 1 << 20  # bytes the guest sent past its request, dropped before the close
RECORD_MAX = 1 << 14  # a TLS plaintext record's payload

Resolver = Callable[[str, int], Sequence[str]]
Connector = Callable[[str, int, float], socket.socket]

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC = re.compile(r"[0-9]+|0x[0-9a-f]*")  # a last label inet_aton would read as a number
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[\x21-\x7e]+")
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})[ \r]")
_HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    ]
)


class AuditSink(Protocol):
    """Where decisions go (:class:`~microagent.broker.audit.AuditLog`)."""

    def write(self, entry: Mapping[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------
# Names and the allow-list


def normalise_host(host: str) -> str | None:
    """``host`` lower-cased without one trailing dot, or None unless it is a DNS host name:
    ASCII letters, digits, ``-`` and ``_`` in labels of 1..63, at most 253 in all, and not an
    address literal (``127.0.0.1``, ``[::1]``, ``0x7f.1`` and ``2130706433`` included)."""
    if not isinstance(host, str) or not host.isascii():
        return None
    name = host.lower()
    name = name.removesuffix(".")
    if not name or len(name) > NAME_MAX:
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or _NUMERIC.fullmatch(labels[-1]):
        return None
    return name


def check_allow_entry(entry: str) -> str:
    """One ``network.allow`` entry, normalised: ``host`` (that name exactly) or ``.suffix``
    (any name under it, not the suffix itself). Raises InvalidInputError for anything else."""
    if not isinstance(entry, str):
        raise InvalidInputError(f"{entry!r} is not a string", hint=_ALLOW_HINT)
    suffix = entry.startswith(".")
    name = normalise_host(entry[1:] if suffix else entry)
    if name is None:
        raise InvalidInputError(
            f"{_show(entry)} is not a host name or a .suffix", hint=_entry_hint(entry)
        )
    return "." + name if suffix else name


_ALLOW_HINT = "write a host name (pypi.org) or a suffix (.pythonhosted.org: any name under it)"


def _entry_hint(entry: str) -> str:
    if entry.startswith("*."):
        return f"write {entry[1:]!r} for any name under {entry[2:]!r}"
    if any(c in entry for c in "/:@"):
        return "a host name only, without a scheme, port or path; " + _ALLOW_HINT
    if not entry.isascii():
        return "write an internationalised name in its ASCII (xn--) form"
    if entry.strip(".").replace(".", "").isdigit():
        return "addresses are not allowed: name the host; " + _ALLOW_HINT
    return _ALLOW_HINT


def _show(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def host_allowed(host: str, allow: Sequence[str]) -> bool:
    """Whether ``host`` is listed in ``allow``: an exact entry, or a ``.suffix`` entry it ends
    with (``.example.com`` matches ``a.example.com``, not ``example.com`` or
    ``badexample.com``). Case-insensitive; a trailing dot does not count; entries that are
    not valid match nothing."""
    name = normalise_host(host)
    if name is None:
        return False
    for entry in allow:
        try:
            rule = check_allow_entry(entry)
        except InvalidInputError:
            continue
        if name == rule or (rule.startswith(".") and name.endswith(rule)):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# The ClientHello's server name


class ClientHelloError(ValueError):
    """The bytes are not (the start of) a TLS ClientHello this proxy can read."""


class IncompleteHello(ClientHelloError):
    """A valid start of a ClientHello: more bytes are needed."""


class _Reader:
    """Bounds-checked reads from a byte string; every overrun is a ClientHelloError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ClientHelloError("truncated ClientHello")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> _Reader:
        return _Reader(self.take(self.uint(length_size)))

    def done(self) -> bool:
        return self.pos == len(self.data)


def client_hello_sni(data: bytes, limit: int = HELLO_MAX) -> str | None:
    """The server name (SNI) of the ClientHello at the start of ``data`` (TLS records, the
    message possibly split across several), None when it names none.

    Raises IncompleteHello when ``data`` is a valid start that needs more bytes (never beyond
    ``limit`` bytes in all), ClientHelloError when it cannot be a ClientHello; nothing else.
    """
    return _server_name_of(_hello_message(data, limit))


def _hello_message(data: bytes, limit: int) -> bytes:
    """The ClientHello handshake message (header and body) reassembled from the records."""
    message = bytearray()
    pos, need = 0, 0
    while not need or len(message) < need:
        if len(data) - pos < 5:
            raise IncompleteHello("record header")
        ctype, major, minor = data[pos], data[pos + 1], data[pos + 2]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if ctype != 22 or major != 3 or minor > 4:
            raise ClientHelloError("not a TLS handshake record")
        if not 0 < length <= RECORD_MAX or pos + 5 + length > limit:
            raise ClientHelloError("bad or oversized TLS record")
        if len(data) - pos - 5 < length:
            raise IncompleteHello("record body")
        message += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if not need and len(message) >= 4:
            need = _hello_length(bytes(message[:4]), limit)
    return bytes(message[:need])


def _hello_length(header: bytes, limit: int) -> int:
    if header[0] != 1:
        raise ClientHelloError("the first handshake message is not a ClientHello")
    need = 4 + int.from_bytes(header[1:4], "big")
    if need > limit:
        raise ClientHelloError("ClientHello longer than the limit")
    return need


def _server_name_of(message: bytes) -> str | None:
    hello = _Reader(message[4:])
    hello.take(2 + 32)  # legacy_version, random
    session = hello.vector(1)
    suites = hello.vector(2)
    compression = hello.vector(1)
    if len(session.data) > 32 or not suites.data or len(suites.data) % 2 or not compression.data:
        raise ClientHelloError("malformed ClientHello")
    if hello.done():
        return None  # no extensions at all
    extensions = hello.vector(2)
    if not hello.done():
        raise ClientHelloError("bytes after the ClientHello's extensions")
    seen: set[int] = set()
    name = None
    while not extensions.done():
        kind, body = extensions.uint(2), extensions.vector(2)
        if kind in seen:
            raise ClientHelloError("an extension appears twice")
        seen.add(kind)
        if kind == 0:  # server_name (RFC 6066)
            name = _host_name(body)
    return name


def _host_name(body: _Reader) -> str | None:
    names = body.vector(2)
    if not body.done() or names.done():
        raise ClientHelloError("malformed server_name extension")
    found = None
    while not names.done():
        kind, value = names.uint(1), names.vector(2).data
        if kind == 0:
            if found is not None:
                raise ClientHelloError("two host names in server_name")
            found = value
    if found is None:
        return None
    if not found or not all(0x21 <= byte <= 0x7E for byte in found):
        raise ClientHelloError("the server name is empty or not printable ASCII")
    return found.decode("ascii")


# ---------------------------------------------------------------------------------------------
# Request heads


@dataclass(frozen=True)
class Request:
    """A parsed request head (``headers`` as sent, names not yet lower-cased)."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


class _Refusal(Exception):
    """Refuse the request: answer ``status`` (None: a response went out already; just close)
    with ``message`` as the text body, audit ``reason``."""

    def __init__(self, status: int | None, reason: str, message: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.message = message


class _Silent(Exception):
    """The guest closed without sending a byte: nothing to answer or audit."""


def _recv(conn: socket.socket, size: int, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    conn.settimeout(remaining)
    return conn.recv(size)


def read_head(conn: socket.socket, deadline: float, limit: int = HEAD_MAX) -> tuple[bytes, bytes]:
    """The request head (through its blank line) and the bytes read after it."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0 and end + 4 <= limit:
            return bytes(buf[: end + 4]), bytes(buf[end + 4 :])
        if end >= 0 or len(buf) > limit:
            raise _Refusal(431, "head-too-large", f"request head over {limit} bytes")
        try:
            chunk = _recv(conn, 4096, deadline)
        except TimeoutError:
            raise _Refusal(408, "timeout", "no complete request head in time") from None
        if not chunk:
            if buf:
                raise _Refusal(400, "bad-request", "the request head ended early")
            raise _Silent
        buf += chunk


def parse_head(head: bytes) -> Request:
    """Request line and header fields; _Refusal(400) for anything malformed."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if (
        len(parts) != 3
        or not _TOKEN.fullmatch(parts[0])
        or not _TARGET.fullmatch(parts[1])
        or parts[2] not in ("HTTP/1.1", "HTTP/1.0")
    ):
        raise _Refusal(400, "bad-request", "malformed request line")
    if len(lines) - 1 > HEADERS_MAX:
        raise _Refusal(400, "bad-request", f"more than {HEADERS_MAX} header fields")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        value = value.strip(" \t")
        if not colon or not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
            raise _Refusal(400, "bad-request", "malformed header field")
        headers.append((name, value))
    return Request(parts[0], parts[1], parts[2], tuple(headers))


def split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` -> (host, port); _Refusal(400) for a bad port or an empty host."""
    host, colon, port = authority.rpartition(":") if ":" in authority else (authority, "", "")
    if colon:
        if not (port.isdigit() and len(port) <= 5 and 0 < int(port) <= 65535):
            raise _Refusal(400, "bad-request", "bad port")
        number = int(port)
    elif default_port is None:
        raise _Refusal(400, "bad-request", "CONNECT needs host:port")
    else:
        number = default_port
    if not host:
        raise _Refusal(400, "bad-request", "no host")
    return host, number


def split_http_url(target: str) -> tuple[str, int, str]:
    """``http://host[:port]/path?query`` -> (host, port, origin-form target)."""
    if target[:7].lower() != "http://":
        raise _Refusal(
            400, "bad-request", "send CONNECT host:443 or an absolute http:// URL to this proxy"
        )
    rest = target[7:].partition("#")[0]
    cut = min((i for i in (rest.find(c) for c in "/?") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        raise _Refusal(400, "bad-request", "user information in the URL")
    host, port = split_authority(authority, HTTP_PORT)
    if not tail.startswith("/"):
        tail = "/" + tail
    return host, port, tail


def body_length(request: Request) -> int:
    """The request body's size: its Content-Length, 0 without one; 411 for a chunked body
    (not forwarded: the proxy sends exactly the bytes it counted), 400 for conflicting ones."""
    if request.values("transfer-encoding"):
        raise _Refusal(411, "bad-request", "send the body with a Content-Length")
    lengths = {v.strip() for value in request.values("content-length") for v in value.split(",")}
    if not lengths:
        return 0
    if len(lengths) > 1 or not all(v.isdigit() and len(v) <= 15 for v in lengths):
        raise _Refusal(400, "bad-request", "bad Content-Length")
    return int(lengths.pop())


def origin_request(request: Request, host: str, port: int, target: str) -> bytes:
    """The head sent upstream: origin form, ``Host`` from the URL, hop-by-hop fields dropped,
    ``Connection: close``."""
    listed = {t.strip().lower() for v in request.values("connection") for t in v.split(",")}
    lines = [f"{request.method} {target} {request.version}"]
    lines.append(f"Host: {host}" if port == HTTP_PORT else f"Host: {host}:{port}")
    for name, value in request.headers:
        if name.lower() not in _HOP_BY_HOP and name.lower() not in listed:
            lines.append(f"{name}: {value}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _close_draining(conn: socket.socket) -> None:
    """Close ``conn`` after dropping what the guest sent and nobody read (bytes past its
    request, up to :data:`DRAIN_MAX`): closing over unread data resets the connection, and
    the guest could then lose the answer it has not read yet."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.setblocking(False)
        dropped = 0
        while dropped < DRAIN_MAX:
            data = conn.recv(CHUNK)  # BlockingIOError (nothing more queued) ends it
            if not data:
                break
            dropped += len(data)
    with contextlib.suppress(OSError):
        conn.close()


def _respond(conn: socket.socket, status: int, message: str) -> None:
    body = (message + "\n").encode("utf-8", "replace")
    extra = "Retry-After: 1\r\n" if status == 503 else ""
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        conn.settimeout(HEAD_TIMEOUT)
        conn.sendall(head.encode("ascii") + body)


# ---------------------------------------------------------------------------------------------
# Copying bytes


@dataclass
class _Flow:
    """One direction of a splice: reads ``src`` into a one-chunk buffer, writes it to ``dst``."""

    src: socket.socket
    dst: socket.socket
    pending: bytearray
    remaining: int | None = None  # bytes still to take from src (None: until EOF)
    eof: bool = False
    shut: bool = False
    count: int = 0
    first: bytearray = field(default_factory=bytearray)  # the first bytes read (a status line)

    @property
    def wants_read(self) -> bool:
        return not self.eof and not self.pending and self.remaining != 0

    @property
    def finished(self) -> bool:
        return not self.pending and (self.shut or self.remaining == 0)

    def step(self, src_events: int, dst_events: int, dst_closed: bool) -> None:
        """Move what the poll said is possible; ``dst_closed``: ``dst`` sent its EOF."""
        if self.pending and dst_events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            self._write(dst_closed)
        if self.wants_read and src_events & (select.POLLIN | select.POLLERR | select.POLLHUP):
            self._read()
        if self.eof and not self.pending and not self.shut:
            with contextlib.suppress(OSError):  # the peer may be gone already
                self.dst.shutdown(socket.SHUT_WR)
            self.shut = True

    def _write(self, dst_closed: bool) -> None:
        try:
            del self.pending[: self.dst.send(self.pending)]
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            if not dst_closed:
                raise
            # A peer that closed after its last byte (a TLS close_notify, say) will not
            # read what is left for it: this direction is over, not broken.
            self.pending.clear()
            self.eof = self.shut = True

    def _read(self) -> None:
        size = CHUNK if self.remaining is None else min(CHUNK, self.remaining)
        try:
            data = self.src.recv(size)
        except BlockingIOError:
            return
        if not data:
            self.eof = True
            return
        self.pending += data
        self.count += len(data)
        if self.remaining is not None:
            self.remaining -= len(data)
        if len(self.first) < 32:
            self.first += data[: 32 - len(self.first)]


@dataclass(frozen=True)
class Spliced:
    """What a splice moved, and why it ended early ('' when both sides closed)."""

    sent: int  # bytes read from the guest and forwarded
    received: int  # bytes read from upstream and forwarded
    first: bytes  # the first bytes upstream sent
    error: str = ""


def splice(
    guest: socket.socket,
    upstream: socket.socket,
    first: bytes = b"",
    *,
    guest_limit: int | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
) -> Spliced:
    """Copy bytes both ways until both directions have ended, passing each end on as a
    half-close; ``first`` goes upstream before anything else. With ``guest_limit``, only that
    many more bytes are taken from the guest (and upstream is not half-closed after them)."""
    up = _Flow(guest, upstream, bytearray(first), guest_limit)
    down = _Flow(upstream, guest, bytearray())
    error = ""
    try:
        _pump(up, down, idle_timeout)
    except TimeoutError:
        error = "idle-timeout"
    except OSError as exc:
        error = "connection-reset" if isinstance(exc, ConnectionError) else "connection-error"
    return Spliced(up.count, down.count, bytes(down.first), error)


def _pump(up: _Flow, down: _Flow, idle_timeout: float) -> None:
    flows = (up, down)
    for sock in (up.src, down.src):
        sock.setblocking(False)
    poller = select.poll()
    while not all(f.finished for f in flows):
        masks = {up.src.fileno(): 0, down.src.fileno(): 0}
        for flow in flows:
            if flow.wants_read:
                masks[flow.src.fileno()] |= select.POLLIN
            if flow.pending:
                masks[flow.dst.fileno()] |= select.POLLOUT
        for fd, mask in masks.items():
            if mask:
                poller.register(fd, mask)
            else:  # nothing to do there: a hang-up must not wake the loop
                with contextlib.suppress(KeyError):
                    poller.unregister(fd)
        events = dict(poller.poll(idle_timeout * 1000))
        if not events:
            raise TimeoutError
        for flow, other in ((up, down), (down, up)):
            src, dst = events.get(flow.src.fileno(), 0), events.get(flow.dst.fileno(), 0)
            flow.step(src, dst, other.eof)


# ---------------------------------------------------------------------------------------------
# The proxy


@dataclass
class _Exchange:
    """The audit entry of one request, filled in as it goes."""

    started: float
    method: str = ""
    host: str = ""
    port: int = 0
    path: str | None = None
    status: int = 0
    sent: int = 0
    received: int = 0
    decision: str = "deny"
    reason: str = ""
    address: str = ""

    def moved(self, result: Spliced, sent_before: int) -> None:
        """Count a splice (after ``sent_before`` guest bytes that went upstream first)."""
        self.sent, self.received = sent_before + result.sent, result.received
        self.reason = result.error

    def entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "kind": "egress",
            "host": self.host,
            "port": self.port,
            "method": self.method,
            "status": self.status,
            "bytesIn": self.sent,
            "bytesOut": self.received,
            "durationMs": round((time.monotonic() - self.started) * 1000),
            "decision": self.decision,
        }
        if self.path is not None:
            entry["path"] = self.path
        if self.reason:
            entry["reason"] = self.reason
        if self.decision == "allow":
            entry["address"] = self.address
        return entry


def default_resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to on this host, in the resolver's order (a lookup
    bounded in time: :func:`~microagent.broker.addresses.lookup`)."""
    return list(dict.fromkeys(str(info[4][0]) for info in lookup(host, port)))


def default_connect(address: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to an address literal (no name lookup)."""
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.settimeout(None)
    return sock


class EgressProxy:
    """Serves one guest connection per :meth:`handle` call; safe to share between threads.

    ``resolve`` and ``connect`` are the lookup and the TCP connect (tests map names to local
    servers with them); every address ``resolve`` returns is checked against
    :func:`~microagent.broker.addresses.destination_allowed` and ``is_host_address``
    whatever the hooks are.
    """

    def __init__(
        self,
        allow: Sequence[str],
        audit: AuditSink,
        *,
        resolve: Resolver | None = None,
        connect: Connector | None = None,
        is_host_address: Callable[[str], bool] = host_owns,
        max_tunnels: int = MAX_TUNNELS,
        head_timeout: float = HEAD_TIMEOUT,
        hello_timeout: float = HELLO_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.allow = tuple(check_allow_entry(entry) for entry in allow)
        self._audit = audit
        self._resolve = resolve or default_resolve
        self._connect = connect or default_connect
        self._is_host_address = is_host_address
        self._slots = threading.BoundedSemaphore(max_tunnels)
        self.head_timeout = head_timeout
        self.hello_timeout = hello_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

    def handle(self, conn: socket.socket) -> None:
        """Serve the one request on ``conn``, audit it, and close ``conn``."""
        exchange = _Exchange(time.monotonic())
        try:
            self._serve(conn, exchange)
        except _Silent:
            return
        except _Refusal as refusal:
            exchange.decision, exchange.reason = "deny", refusal.reason
            if refusal.status is not None:
                exchange.status = refusal.status
                _respond(conn, refusal.status, refusal.message)
        except OSError:
            exchange.reason = exchange.reason or "connection-error"
        finally:
            _close_draining(conn)
        self._audit.write(exchange.entry())

    def _serve(self, conn: socket.socket, exchange: _Exchange) -> None:
        head, rest = read_head(conn, time.monotonic() + self.head_timeout)
        request = parse_head(head)
        exchange.method = request.method
        if request.method == "CONNECT":
            self._tunnel(conn, request, rest, exchange)
        else:
            self._forward(conn, request, rest, exchange)

    def _admit(self, host: str, port: int, wanted_port: int, exchange: _Exchange) -> str:
        """The normalised name if it is listed and ``port`` is the one its method allows."""
        name = normalise_host(host)
        exchange.host, exchange.port = name or host[:NAME_MAX], port
        if name is None or not host_allowed(name, self.allow):
            shown = name or _show(host)
            raise _Refusal(403, "not-allowed", f"{shown} is not in network.allow")
        if port != wanted_port:
            raise _Refusal(403, "port", f"only port {wanted_port} is allowed for this method")
        return name

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise _Refusal(503, "busy", "too many connections through the proxy; retry")
        try:
            yield
        finally:
            self._slots.release()

    def _open(self, name: str, port: int, exchange: _Exchange) -> socket.socket:
        """A connection to an address of ``name`` after every address passed the checks."""
        addresses = self._lookup(name, port)
        for address in addresses:
            allowed, why = destination_allowed(address)
            if not allowed:
                raise _Refusal(403, "private-address", f"{name}: refused address ({why})")
            if self._is_host_address(address):
                why = f"{address} is an address of this host"
                raise _Refusal(403, "host-address", f"{name}: refused address ({why})")
        deadline = time.monotonic() + self.connect_timeout
        for address in addresses[:CONNECT_ATTEMPTS]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(OSError):
                sock = self._connect(address, port, remaining)
                exchange.address = address
                return sock
        raise _Refusal(502, "connect-failed", f"cannot connect to {name}:{port}")

    def _lookup(self, name: str, port: int) -> list[str]:
        try:
            addresses = [str(a) for a in self._resolve(name, port)][:RESOLVED_MAX]
        except LookupTimeout:
            raise _Refusal(504, "resolve-timeout", f"looking up {name} timed out") from None
        except (OSError, UnicodeError):
            addresses = []
        if not addresses:
            raise _Refusal(502, "resolve-failed", f"cannot resolve {name}")
        return addresses

    def _tunnel(self, conn: socket.socket, request: Request, rest: bytes, ex: _Exchange) -> None:
        host, port = split_authority(request.target, None)
        name = self._admit(host, port, TLS_PORT, ex)
        with self._slot(), self._open(name, port, ex) as upstream:
            conn.settimeout(self.head_timeout)
            conn.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            ex.status = 200
            hello = self._check_hello(conn, rest, name)
            ex.decision = "allow"
            result = splice(conn, upstream, hello, idle_timeout=self.idle_timeout)
            ex.moved(result, len(hello))

    def _check_hello(self, conn: socket.socket, rest: bytes, name: str) -> bytes:
        """The guest's first TLS bytes once their SNI names ``name``; else a refusal."""
        data = bytearray(rest)
        deadline = time.monotonic() + self.hello_timeout
        while True:
            try:
                sni = client_hello_sni(bytes(data))
                break
            except IncompleteHello:
                chunk = self._hello_bytes(conn, HELLO_MAX - len(data), deadline)
                data += chunk
            except ClientHelloError:
                raise _Refusal(None, "bad-client-hello") from None
        if sni is None:
            raise _Refusal(None, "no-sni")
        if normalise_host(sni) != name:
            raise _Refusal(None, "sni-mismatch")
        return bytes(data)

    def _hello_bytes(self, conn: socket.socket, room: int, deadline: float) -> bytes:
        try:
            chunk = _recv(conn, room, deadline) if room > 0 else b""
        except TimeoutError:
            chunk = b""
        if not chunk:
            raise _Refusal(None, "bad-client-hello")
        return chunk

    def _forward(self, conn: socket.socket, request: Request, rest: bytes, ex: _Exchange) -> None:
        host, port, target = split_http_url(request.target)
        ex.path = target.partition("?")[0]
        name = self._admit(host, port, HTTP_PORT, ex)
        length = body_length(request)
        body = rest[:length]
        head = origin_request(request, name, port, target)
        with self._slot(), self._open(name, port, ex) as upstream:
            ex.decision = "allow"
            result = splice(
                conn,
                upstream,
                head + body,
                guest_limit=length - len(body),
                idle_timeout=self.idle_timeout,
            )
        ex.moved(result, len(body))
        status = _STATUS.match(result.first)
        ex.status = int(status.group(1)) if status else 502
