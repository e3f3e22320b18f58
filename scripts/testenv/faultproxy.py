"""A registry that misbehaves on purpose: an HTTP proxy in front of a real one, for tests.

::

    with FaultProxy(registry.host) as proxy:                  # 127.0.0.1:<free port>
        proxy.inject(Fault.reset(after=4096), path="/blobs/")  # the next blob GET breaks
        proxy.inject(Fault.error(503, retry_after="0.1"), times=2)
        proxy.require_token(user="u", password="p")          # the 401 Bearer token flow
        ... talk to proxy.host ...
        assert proxy.injected()[0].fault == "reset"

Every request is forwarded to ``upstream`` unless a rule answers it itself; rules match a
regular expression searched in the path (query excluded) and optionally a method, skip the
first ``skip`` matches and then fire ``times`` times (None: always). The first rule that fires
wins. ``proxy.log`` records every request: method, path, status sent, the fault applied, the
Range asked for, whether it carried a token. A failing mirror is a second proxy whose one rule
fires always (the ``failing_mirror`` fixture); two faults on one answer, a proxy in front of
another.

Bodies are read whole from upstream (test blobs are small), then sent with the fault applied.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import http.client
import json
import re
import secrets
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}
UPSTREAM_TIMEOUT = 30.0
_REPO_PATH = re.compile(r"^/v2/(.+)/(?:manifests|blobs|tags)/")


class FaultKind(enum.Enum):
    STATUS = "status"  # answer `status` (with Retry-After if set) without asking upstream
    RESET = "reset"  # send headers and `after` body bytes, then RST (None: RST at once)
    TRUNCATE = "truncate"  # send headers and `after` body bytes, then close cleanly
    STALL = "stall"  # send `after` body bytes, say nothing for `seconds`, then the rest
    TRICKLE = "trickle"  # send the body `chunk` bytes at a time, every `seconds`
    LENGTH = "length"  # announce Content-Length + `delta`, send the real body, close
    DIGEST_HEADER = "digest-header"  # Docker-Content-Digest replaced by `digest` ('' drops it)
    CORRUPT = "corrupt"  # flip the body byte at `after` (headers untouched)
    NO_RANGE = "no-range"  # forward without the Range header (a registry that ignores it)


@dataclass(frozen=True)
class Fault:
    """One misbehaviour; build it with the class methods."""

    kind: FaultKind
    status: int = 503
    retry_after: str | None = None
    after: int | None = 0
    seconds: float = 0.0
    chunk: int = 1
    delta: int = 0
    digest: str = ""

    @classmethod
    def error(cls, status: int = 503, retry_after: str | None = None) -> Fault:
        return cls(FaultKind.STATUS, status=status, retry_after=retry_after)

    @classmethod
    def reset(cls, after: int | None = 0) -> Fault:
        return cls(FaultKind.RESET, after=after)

    @classmethod
    def truncate(cls, after: int = 0) -> Fault:
        return cls(FaultKind.TRUNCATE, after=after)

    @classmethod
    def stall(cls, seconds: float, after: int = 0) -> Fault:
        return cls(FaultKind.STALL, seconds=seconds, after=after)

    @classmethod
    def trickle(cls, chunk: int, every: float) -> Fault:
        return cls(FaultKind.TRICKLE, chunk=chunk, seconds=every)

    @classmethod
    def wrong_length(cls, delta: int) -> Fault:
        return cls(FaultKind.LENGTH, delta=delta)

    @classmethod
    def digest_header(cls, digest: str = "") -> Fault:
        return cls(FaultKind.DIGEST_HEADER, digest=digest)

    @classmethod
    def corrupt(cls, at: int = 0) -> Fault:
        return cls(FaultKind.CORRUPT, after=at)

    @classmethod
    def ignore_range(cls) -> Fault:
        return cls(FaultKind.NO_RANGE)


@dataclass
class Rule:
    fault: Fault
    path: re.Pattern[str]
    method: str | None = None
    times: int | None = 1  # None: every match
    skip: int = 0

    def fires(self, method: str, path: str) -> bool:
        """Does this rule take the request (counting it)?"""
        if (self.method and self.method != method) or not self.path.search(path):
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        if self.times is None:
            return True
        if self.times <= 0:
            return False
        self.times -= 1
        return True


@dataclass(frozen=True)
class Seen:
    """One request as the proxy handled it."""

    method: str
    path: str
    status: int  # 0: none sent (reset at once)
    fault: str | None = None
    range: str | None = None
    token: bool = False  # carried a Bearer token the proxy issued
    basic: bool = False  # carried Basic credentials (token endpoint)


@dataclass
class _Upstream:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` (``host:port``)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.log: list[Seen] = []
        self.credentials: tuple[str, str] | None = None
        self.token_required = False
        self.tokens: dict[str, set[str]] = {}  # token -> "repo:action" grants
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def inject(
        self,
        fault: Fault,
        path: str = "",
        *,
        method: str | None = None,
        times: int | None = 1,
        skip: int = 0,
    ) -> Rule:
        """Apply ``fault`` to requests whose path matches ``path`` (a regex, searched)."""
        rule = Rule(fault, re.compile(path), method, times, skip)
        with self._lock:
            self.rules.append(rule)
        return rule

    def require_token(self, user: str | None = None, password: str | None = None) -> None:
        """Answer /v2/ requests without a fitting token 401 with a Bearer challenge whose
        realm is this proxy's /token; that endpoint wants Basic ``user:password`` if given."""
        self.token_required = True
        self.credentials = (user, password or "") if user is not None else None

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def injected(self) -> list[Seen]:
        return [s for s in self.log if s.fault]

    def seen(self, path: str = "", method: str | None = None) -> list[Seen]:
        return [s for s in self.log if re.search(path, s.path) and method in (None, s.method)]

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- handling -------------------------------------------------------------------------

    def _rule(self, method: str, path: str) -> Rule | None:
        with self._lock:
            return next((r for r in self.rules if r.fires(method, path)), None)

    def _record(self, handler: _Handler, status: int, fault: str | None = None) -> None:
        path = urlsplit(handler.path).path
        auth = handler.headers.get("Authorization", "")
        seen = Seen(
            handler.command,
            path,
            status,
            fault,
            handler.headers.get("Range"),
            token=auth.removeprefix("Bearer ") in self.tokens,
            basic=auth.startswith("Basic "),
        )
        with self._lock:
            self.log.append(seen)

    def handle(self, handler: _Handler) -> None:
        body = _request_body(handler)
        path = urlsplit(handler.path).path
        token_flow = self.token_required and path == "/token"
        if self.token_required and not token_flow and not self._authorized(handler, path):
            self._challenge(handler, path)  # before any rule: the registry was not reached
            return
        rule = self._rule(handler.command, path)
        fault = rule.fault if rule else None
        if fault and fault.kind is FaultKind.STATUS:
            self._status(handler, fault)
            return
        if fault and fault.kind is FaultKind.RESET and fault.after is None:
            self._record(handler, 0, fault.kind.value)
            _reset(handler)
            return
        if token_flow:  # (only the two faults above apply to the token endpoint)
            self._issue_token(handler)
            return
        answer = self._forward(handler, body, fault)
        self._record(handler, answer.status, fault.kind.value if fault else None)
        _send(handler, answer, fault, self._stop)

    def _forward(self, handler: _Handler, body: bytes, fault: Fault | None) -> _Upstream:
        conn = http.client.HTTPConnection(self.upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            conn.putrequest(
                handler.command, handler.path, skip_host=True, skip_accept_encoding=True
            )
            for name, value in handler.headers.items():
                lower = name.lower()
                if lower in HOP_BY_HOP or lower == "content-length":
                    continue
                if lower == "authorization" and self.token_required:
                    continue  # the registry behind knows nothing of our tokens
                if lower == "range" and fault and fault.kind is FaultKind.NO_RANGE:
                    continue
                conn.putheader(name, value)
            if body or handler.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            try:
                data = response.read()
            except http.client.IncompleteRead as exc:  # e.g. the registry's 416 answers
                data = exc.partial
            return _Upstream(response.status, response.reason, response.getheaders(), data)
        finally:
            conn.close()

    def _status(self, handler: _Handler, fault: Fault) -> None:
        self._record(handler, fault.status, fault.kind.value)
        body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "injected"}]}).encode()
        handler.send_response(fault.status)
        if fault.retry_after is not None:
            handler.send_header("Retry-After", fault.retry_after)
        _finish_headers(handler, body)

    # -- the Bearer token flow ------------------------------------------------------------

    def _authorized(self, handler: _Handler, path: str) -> bool:
        auth = handler.headers.get("Authorization", "")
        grants = self.tokens.get(auth.removeprefix("Bearer "), set()) if auth else set()
        repo = _REPO_PATH.match(path)
        if repo is None:  # /v2/ itself: any token
            return bool(grants)
        action = "pull" if handler.command in ("GET", "HEAD") else "push"
        return f"{repo.group(1)}:{action}" in grants

    def _challenge(self, handler: _Handler, path: str) -> None:
        self._record(handler, 401, None)
        repo = _REPO_PATH.match(path)
        params = f'realm="{self.url}/token",service="faultproxy"'
        if repo:
            actions = "pull" if handler.command in ("GET", "HEAD") else "pull,push"
            params += f',scope="repository:{repo.group(1)}:{actions}"'
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        handler.send_response(401)
        handler.send_header("WWW-Authenticate", f"Bearer {params}")
        _finish_headers(handler, body)

    def _issue_token(self, handler: _Handler) -> None:
        if self.credentials is not None:
            user, password = self.credentials
            expected = base64.b64encode(f"{user}:{password}".encode()).decode()
            if handler.headers.get("Authorization", "") != f"Basic {expected}":
                self._record(handler, 401, None)
                handler.send_response(401)
                _finish_headers(handler, b'{"details":"bad credentials"}')
                return
        grants: set[str] = set()
        for scope in parse_qs(urlsplit(handler.path).query).get("scope", []):
            _, repo, actions = ([*scope.split(":", 2), "", ""])[:3]
            grants |= {f"{repo}:{action}" for action in actions.split(",") if action}
        token = secrets.token_hex(16)
        self.tokens[token] = grants or {"*"}
        self._record(handler, 200, None)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        _finish_headers(handler, json.dumps({"token": token}).encode())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _proxy(self) -> None:
        try:
            self.server.proxy.handle(self)  # type: ignore[attr-defined]
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True  # the client went away (it gave up on a stall)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the client reset a kept-alive connection: fine
            super().handle()

    def log_message(self, format: str, *args: object) -> None:
        return None


def _request_body(handler: _Handler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        data = bytearray()
        while size := int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16):
            data += handler.rfile.read(size)
            handler.rfile.readline()
        while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return bytes(data)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _finish_headers(handler: _Handler, body: bytes) -> None:
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def _send(handler: _Handler, answer: _Upstream, fault: Fault | None, stop: threading.Event) -> None:
    """Send an upstream answer with ``fault`` applied to its headers and body."""
    kind = fault.kind if fault else None
    body = answer.body
    if fault and kind is FaultKind.CORRUPT and body:
        at = min(fault.after or 0, len(body) - 1)
        body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
    handler.send_response(answer.status, answer.reason)
    length = None
    for name, value in answer.headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or (lower == "content-length" and handler.command != "HEAD"):
            continue
        if lower == "docker-content-digest" and kind is FaultKind.DIGEST_HEADER:
            continue
        if lower == "content-length":
            length = value
        handler.send_header(name, value)
    if fault and kind is FaultKind.DIGEST_HEADER and fault.digest:
        handler.send_header("Docker-Content-Digest", fault.digest)
    if handler.command != "HEAD":
        delta = fault.delta if fault and kind is FaultKind.LENGTH else 0
        handler.send_header("Content-Length", str(len(body) + delta))
    elif length is None:
        handler.send_header("Content-Length", "0")
    handler.end_headers()
    if handler.command == "HEAD":
        return
    _send_body(handler, body, fault, stop)


def _send_body(handler: _Handler, body: bytes, fault: Fault | None, stop: threading.Event) -> None:
    kind = fault.kind if fault else None
    if fault is None or kind in (FaultKind.CORRUPT, FaultKind.DIGEST_HEADER, FaultKind.NO_RANGE):
        handler.wfile.write(body)
        return
    handler.close_connection = True  # whatever follows, this connection is done
    after = min(fault.after or 0, len(body))
    if kind is FaultKind.RESET:
        handler.wfile.write(body[:after])
        _reset(handler)
    elif kind is FaultKind.TRUNCATE:
        handler.wfile.write(body[:after])
    elif kind is FaultKind.STALL:
        handler.wfile.write(body[:after])
        if not stop.wait(fault.seconds):
            handler.wfile.write(body[after:])
    elif kind is FaultKind.TRICKLE:
        for start in range(0, len(body), max(fault.chunk, 1)):
            if stop.wait(fault.seconds):
                return
            handler.wfile.write(body[start : start + fault.chunk])
    else:  # LENGTH: the real body; the client must notice the announced size is wrong
        handler.wfile.write(body)


def _reset(handler: _Handler) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), not a clean FIN."""
    handler.close_connection = True
    sock: socket.socket = handler.connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.rfile.close()  # drops the makefile reference so close() really closes
    sock.close()
