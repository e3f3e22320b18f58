"""Bounded HTTP/1.1 framing for the broker, by hand: a message head is read line by line
within a byte budget and checked character by character; a body is an iterator of pieces
(Content-Length, chunked, or up to the end of the connection) that yields data as soon as it
arrives, so a server-sent event is passed on when it comes, never after the whole body.

Every problem is an :class:`HTTPError` that says which side (``guest`` or ``upstream``) and
what kind (``eof``, ``timeout``, ``too_large``, ``malformed``, ``io``); the proxy decides the
answer. Nothing here logs or keeps a header value.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

MAX_HEAD = 64 << 10  # request or response line plus headers
MAX_HEADERS = 256
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
MAX_TRAILERS = 16 << 10
PIECE = 64 << 10  # the most one recv() asks for

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(;.*)?")
LAST_CHUNK = b"0\r\n\r\n"


class HTTPError(Exception):
    """A framing problem on one side of the proxy."""

    def __init__(self, side: str, kind: str, message: str) -> None:
        super().__init__(f"{side}: {message}")
        self.side = side
        self.kind = kind
        self.message = message


class Reader:
    """Buffered reads from one socket (its timeout applies to every recv)."""

    def __init__(self, sock: socket.socket, side: str) -> None:
        self.sock = sock
        self.side = side
        self._buf = bytearray()
        self.received = 0  # bytes read from the socket so far

    def error(self, kind: str, message: str) -> HTTPError:
        return HTTPError(self.side, kind, message)

    def _fill(self) -> bool:
        """Read what the peer has sent (at least a byte); False at the end of its stream."""
        try:
            data = self.sock.recv(PIECE)
        except TimeoutError as exc:
            raise self.error("timeout", "sent nothing in time") from exc
        except OSError as exc:
            detail = exc.strerror or type(exc).__name__
            raise self.error("io", f"connection failed ({detail})") from exc
        self._buf += data
        self.received += len(data)
        return bool(data)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def read_line(self, limit: int) -> bytes | None:
        """One line without its LF (and CR); None when the stream ends before any byte."""
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end >= 0:
                if end > limit:
                    break
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) > limit:
                break
            start = len(self._buf)
            if not self._fill():
                if not self._buf:
                    return None
                raise self.error("eof", "closed the connection in the middle of a line")
        raise self.error("too_large", f"sent a line longer than {limit} bytes")

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes, as soon as any are there; b"" at the end of the stream."""
        if not self._buf and not self._fill():
            return b""
        data = bytes(self._buf[:limit])
        del self._buf[:limit]
        return data


@dataclass(frozen=True)
class Head:
    """A request or status line and its header fields (names as sent, values latin-1)."""

    start: str
    fields: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.fields if key.lower() == name]

    def tokens(self, name: str) -> set[str]:
        """The comma-separated, lower-cased items of every ``name`` field."""
        items = (item.strip().lower() for value in self.values(name) for item in value.split(","))
        return {item for item in items if item}


def read_head(reader: Reader, limit: int = MAX_HEAD, *, idle_ok: bool = False) -> Head | None:
    """The next message head; None when the peer closes before sending one (or, with
    ``idle_ok``, sends nothing in time). Empty lines before the start line are skipped, as
    RFC 9112 asks of a server."""
    used = 0
    start = b""
    while not start:
        try:
            line = reader.read_line(limit - used)
        except HTTPError as exc:
            if idle_ok and exc.kind == "timeout" and not used and not reader.buffered:
                return None
            raise _too_large(exc, limit) from None
        if line is None:
            if used:
                raise reader.error("eof", "closed the connection before a message")
            return None
        used += len(line) + 2
        start = line
    fields = _read_fields(reader, limit - used, limit)
    return Head(_text(reader, start), fields)


def _too_large(exc: HTTPError, limit: int) -> HTTPError:
    if exc.kind == "too_large":
        return HTTPError(exc.side, "too_large", f"sent a message head larger than {limit} bytes")
    return exc


def _read_fields(reader: Reader, budget: int, limit: int) -> tuple[tuple[str, str], ...]:
    fields: list[tuple[str, str]] = []
    while True:
        try:
            line = reader.read_line(budget)
        except HTTPError as exc:
            raise _too_large(exc, limit) from None
        if line is None:
            raise reader.error("eof", "closed the connection in the middle of a message head")
        budget -= len(line) + 2
        if not line:
            return tuple(fields)
        if len(fields) >= MAX_HEADERS:
            raise reader.error("too_large", f"sent more than {MAX_HEADERS} header fields")
        fields.append(parse_field(reader, line))


def parse_field(reader: Reader, line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise reader.error("malformed", "sent a folded header line (obsolete, refused)")
    name, colon, value = line.partition(b":")
    if not colon or not TOKEN.fullmatch(name):
        raise reader.error("malformed", "sent a header line that is not 'name: value'")
    value = value.strip(b" \t")
    if not _FIELD_VALUE.fullmatch(value):
        raise reader.error("malformed", f"sent a control character in header {_name(name)}")
    return name.decode("ascii"), value.decode("latin-1")


def _name(name: bytes) -> str:
    return name[:64].decode("ascii", "replace")


def _text(reader: Reader, line: bytes) -> str:
    if not all(0x20 <= byte <= 0x7E for byte in line):
        raise reader.error("malformed", "sent a start line with a control or non-ASCII byte")
    return line.decode("ascii")


class Framing(Enum):
    """How a body ends."""

    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    CLOSE = "close"  # at the end of the connection (responses only)


@dataclass(frozen=True)
class Body:
    framing: Framing
    length: int = 0


def content_length(reader: Reader, head: Head) -> int | None:
    values = {item.strip() for value in head.values("content-length") for item in value.split(",")}
    if not values:
        return None
    if len(values) != 1 or not re.fullmatch(r"[0-9]{1,18}", next(iter(values))):
        raise reader.error("malformed", "sent an invalid or conflicting Content-Length")
    return int(values.pop())


def _codings(head: Head) -> list[str]:
    items = (
        item.strip().lower() for v in head.values("transfer-encoding") for item in v.split(",")
    )
    return [item for item in items if item]


def request_body(reader: Reader, head: Head) -> Body:
    """A request's body framing (RFC 9112 6.3); Transfer-Encoding with Content-Length, or
    any coding but chunked, is refused rather than guessed at."""
    codings = _codings(head)
    length = content_length(reader, head)
    if codings:
        if length is not None:
            raise reader.error("malformed", "sent both Transfer-Encoding and Content-Length")
        if codings != ["chunked"]:
            raise reader.error("malformed", "sent a Transfer-Encoding other than chunked")
        return Body(Framing.CHUNKED)
    if length is not None:
        return Body(Framing.LENGTH, length)
    return Body(Framing.NONE)


def response_body(reader: Reader, head: Head, status: int, method: str) -> Body:
    """A response's body framing: none for HEAD, 1xx, 204 and 304; chunked when that is
    the last coding; else Content-Length; else up to the end of the connection."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return Body(Framing.NONE)
    codings = _codings(head)
    if codings:
        return Body(Framing.CHUNKED if codings[-1] == "chunked" else Framing.CLOSE)
    length = content_length(reader, head)
    return Body(Framing.CLOSE) if length is None else Body(Framing.LENGTH, length)


def body_pieces(reader: Reader, body: Body) -> Iterator[bytes]:
    """The body's data in pieces as they arrive (chunked framing and trailers removed)."""
    if body.framing is Framing.LENGTH:
        yield from _exactly(reader, body.length)
    elif body.framing is Framing.CHUNKED:
        yield from _chunked(reader)
    elif body.framing is Framing.CLOSE:
        while piece := reader.read_some(PIECE):
            yield piece


def _exactly(reader: Reader, length: int) -> Iterator[bytes]:
    left = length
    while left:
        piece = reader.read_some(min(left, PIECE))
        if not piece:
            raise reader.error("eof", f"closed the connection {left} bytes before the body's end")
        left -= len(piece)
        yield piece


def _chunked(reader: Reader) -> Iterator[bytes]:
    while True:
        line = reader.read_line(MAX_CHUNK_LINE)
        if line is None:
            raise reader.error("eof", "closed the connection before the last chunk")
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None:
            raise reader.error("malformed", "sent a bad chunk-size line")
        size = int(match.group(1), 16)
        if size == 0:
            _skip_trailers(reader)
            return
        yield from _exactly(reader, size)
        if reader.read_line(2) != b"":
            raise reader.error("malformed", "sent chunk data longer than its size")


def _skip_trailers(reader: Reader) -> None:
    budget = MAX_TRAILERS
    while True:
        line = reader.read_line(budget)
        if line is None:
            raise reader.error("eof", "closed the connection inside the chunked trailers")
        if not line:
            return
        parse_field(reader, line)
        budget -= len(line) + 2


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def serialize(start: str, fields: list[tuple[str, str]]) -> bytes:
    """A message head (every name and value was checked on the way in, or is ours)."""
    lines = [start, *(f"{name}: {value}" for name, value in fields), "", ""]
    return "\r\n".join(lines).encode("latin-1")
