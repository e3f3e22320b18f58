"""The gateway: one host process per running workspace that serves its credential brokers
and its egress proxy, each on a unix socket, and writes the audit log.

``python -m microagent.broker.gateway CONFIG`` (spawned by the supervisor, dies with it):

- CONFIG is ``gateway.json`` (:class:`GatewayConfig`; no secret in it);
- stdin is one JSON object ``{"<credential name>": "<secret>", ...}``, read to EOF (≤ 64 KiB),
  with a value for every credential and nothing else;
- once every socket listens, the line ``ready`` is written to stdout;
- SIGTERM (or SIGINT) closes the sockets and the process exits 0;
- a bad config or secret is one line on stderr and exit status 2 (1: cannot listen).

The process is a :class:`Keeper`: it reads the secrets once, binds the sockets and builds the
:class:`Gateway`, then forks a worker that serves it (the worker inherits the secrets in its
memory: they never pass through an argv, an environment, a file or a pipe again). When the
worker dies, the keeper forks a new one from its own, never-served copy after a short
back-off; connections that arrive meanwhile wait in the sockets' backlog. Each restart is one
``gateway: worker restart N/K: ...`` line on stderr; a worker that dies more than
:data:`MAX_RESTARTS` times within :data:`RESTART_WINDOW` seconds makes the keeper give up (a
``gateway: giving up: ...`` line, exit status 1), so that the supervisor reports it.

Nothing here logs a secret: errors name credentials and references, never values.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import selectors
import signal
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from microagent.broker.audit import AuditLog
from microagent.broker.credentials import SECRETS_JSON_MAX, parse_secrets
from microagent.broker.egress import EgressProxy, check_allow_entry
from microagent.broker.http1 import TOKEN
from microagent.broker.reverse import (
    AUTH_HEADERS,
    HOP_BY_HOP,
    SET_BY_BROKER,
    BrokerError,
    ReverseProxy,
    Upstream,
    close_gently,
    error_response,
)
from microagent.errors import EXIT_FAILURE, EXIT_INVALID, EXIT_OK, InvalidInputError
from microagent.fsutil import load_json_bounded

CONFIG_VERSION = 1
CONFIG_MAX = 1 << 20
MAX_CREDENTIALS = 8
MAX_ALLOW = 256
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
FORMAT_MAX = 256
MAX_CONNECTIONS = 128  # guest connections served at once, all routes together
LISTEN_BACKLOG = 64
CLOSE_WAIT = 2.0  # seconds close() waits for connection threads to end
REFUSERS = 8  # threads answering 503 over the cap at once; past them, connections are closed
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
MAX_RESTARTS = 5  # worker restarts within RESTART_WINDOW; one more death and the keeper gives up
RESTART_WINDOW = 60.0
RESTART_DELAY = 0.1  # seconds before the first restart in the window, doubling up to the cap
RESTART_DELAY_MAX = 2.0
STOP_WAIT = 5  # seconds the keeper gives its worker after SIGTERM, then SIGKILL
Handler = Callable[[socket.socket], None]


def _problem(where: str, message: str) -> InvalidInputError:
    return InvalidInputError(f"{where}: {message}" if where else message)


def _socket_path(where: str, path: Path) -> Path:
    raw = os.fsencode(path)
    if not path.is_absolute() or b"\0" in raw or len(raw) > SOCKET_PATH_MAX:
        raise _problem(where, f"must be an absolute path of at most {SOCKET_PATH_MAX} bytes")
    return path


def _int_in(where: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _problem(where, f"must be an integer from {low} to {high}")
    return value


@dataclass(frozen=True)
class Limits:
    """Per credential: request body size, requests in flight, requests a minute."""

    max_body_bytes: int = 32 << 20
    max_concurrent: int = 16
    rate_per_minute: int = 600

    def __post_init__(self) -> None:
        _int_in("limits.maxBodyBytes", self.max_body_bytes, 1, 1 << 30)
        _int_in("limits.maxConcurrent", self.max_concurrent, 1, 256)
        _int_in("limits.ratePerMinute", self.rate_per_minute, 1, 60_000)

    def to_json(self) -> dict[str, Any]:
        return {
            "maxBodyBytes": self.max_body_bytes,
            "maxConcurrent": self.max_concurrent,
            "ratePerMinute": self.rate_per_minute,
        }

    @classmethod
    def from_json(cls, data: object) -> Limits:
        fields = _object("limits", data, (), ("maxBodyBytes", "maxConcurrent", "ratePerMinute"))
        defaults = cls()
        return cls(
            fields.get("maxBodyBytes", defaults.max_body_bytes),
            fields.get("maxConcurrent", defaults.max_concurrent),
            fields.get("ratePerMinute", defaults.rate_per_minute),
        )


@dataclass(frozen=True)
class CredentialRoute:
    """One credential broker: requests on ``socket`` go to ``upstream`` with the header
    ``header: format`` (``{value}`` replaced by the secret)."""

    name: str
    upstream: str
    header: str
    format: str
    socket: Path

    def __post_init__(self) -> None:
        where = f"credential {self.name[:40]!r}" if isinstance(self.name, str) else "credential"
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise _problem(where, f"the name must match {NAME.pattern}")
        try:
            Upstream.parse(self.upstream)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{where}: {exc.message}", hint=exc.hint) from None
        header = self.header if isinstance(self.header, str) else ""
        if not TOKEN.fullmatch(header.encode("ascii", "replace")) or len(header) > 64:
            raise _problem(where, "header: must be a header name (an HTTP token)")
        if header.lower() in (HOP_BY_HOP | SET_BY_BROKER) - AUTH_HEADERS:
            raise _problem(where, f"header: {header} is set by the broker itself")
        text = self.format if isinstance(self.format, str) else ""
        if (
            text.count("{value}") != 1
            or len(text) > FORMAT_MAX
            or not all(" " <= ch <= "~" for ch in text)
        ):
            raise _problem(where, "format: must hold {value} exactly once, in printable ASCII text")
        _socket_path(f"{where}: socket", self.socket)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "upstream": self.upstream,
            "header": self.header,
            "format": self.format,
            "socket": str(self.socket),
        }

    @classmethod
    def from_json(cls, data: object, where: str) -> CredentialRoute:
        keys = ("name", "upstream", "header", "format", "socket")
        fields = _object(where, data, keys, ())
        for key in keys:
            _string(f"{where}.{key}", fields[key])
        return cls(
            fields["name"],
            fields["upstream"],
            fields["header"],
            fields["format"],
            Path(fields["socket"]),
        )


@dataclass(frozen=True)
class EgressRoute:
    """The egress proxy: names in ``allow`` (exact host, or ``.suffix``) on ``socket``."""

    allow: tuple[str, ...]
    socket: Path

    def __post_init__(self) -> None:
        if not isinstance(self.allow, tuple) or len(self.allow) > MAX_ALLOW:
            raise _problem("egress.allow", f"must be a list of at most {MAX_ALLOW} names")
        for index, entry in enumerate(self.allow):
            try:
                check_allow_entry(entry)
            except InvalidInputError as exc:
                raise InvalidInputError(
                    f"egress.allow[{index}]: {exc.message}", hint=exc.hint
                ) from None
        _socket_path("egress.socket", self.socket)

    def to_json(self) -> dict[str, Any]:
        return {"allow": list(self.allow), "socket": str(self.socket)}

    @classmethod
    def from_json(cls, data: object) -> EgressRoute:
        fields = _object("egress", data, ("allow", "socket"), ())
        allow = fields["allow"]
        if not isinstance(allow, list):
            raise _problem("egress.allow", "must be a list of names")
        return cls(tuple(allow), Path(_string("egress.socket", fields["socket"])))


@dataclass(frozen=True)
class GatewayConfig:
    """``gateway.json``: where the audit log goes, the extra CA file, the routes, the limits."""

    audit: Path
    credentials: tuple[CredentialRoute, ...] = ()
    egress: EgressRoute | None = None
    limits: Limits = Limits()
    cafile: Path | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise _problem("version", f"must be {CONFIG_VERSION}")
        if not isinstance(self.audit, Path) or not self.audit.is_absolute():
            raise _problem("audit", "must be an absolute path")
        if self.cafile is not None and not self.cafile.is_absolute():
            raise _problem("cafile", "must be an absolute path or null")
        if len(self.credentials) > MAX_CREDENTIALS:
            raise _problem("credentials", f"at most {MAX_CREDENTIALS}")
        if not self.credentials and self.egress is None:
            raise _problem("", "the gateway has nothing to serve (no credential, no egress)")
        names = [route.name for route in self.credentials]
        if len(set(names)) != len(names):
            raise _problem("credentials", "two credentials have the same name")
        if len(set(self.sockets)) != len(self.sockets):
            raise _problem("", "two routes share a socket path")

    @property
    def sockets(self) -> tuple[Path, ...]:
        egress = (self.egress.socket,) if self.egress else ()
        return (*(route.socket for route in self.credentials), *egress)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "audit": str(self.audit),
            "cafile": str(self.cafile) if self.cafile else None,
            "credentials": [route.to_json() for route in self.credentials],
            "egress": self.egress.to_json() if self.egress else None,
            "limits": self.limits.to_json(),
        }

    @classmethod
    def from_json(cls, data: object) -> GatewayConfig:
        """From the parsed ``gateway.json``; every field is checked (InvalidInputError)."""
        required = ("version", "audit", "credentials")
        fields = _object("", data, required, ("cafile", "egress", "limits"))
        routes = fields["credentials"]
        if not isinstance(routes, list) or len(routes) > MAX_CREDENTIALS:
            raise _problem("credentials", f"must be a list of at most {MAX_CREDENTIALS}")
        cafile = fields.get("cafile")
        egress = fields.get("egress")
        limits = fields.get("limits")
        return cls(
            audit=Path(_string("audit", fields["audit"])),
            credentials=tuple(
                CredentialRoute.from_json(item, f"credentials[{index}]")
                for index, item in enumerate(routes)
            ),
            egress=None if egress is None else EgressRoute.from_json(egress),
            limits=Limits() if limits is None else Limits.from_json(limits),
            cafile=None if cafile is None else Path(_string("cafile", cafile)),
            version=fields["version"],
        )


def _object(
    where: str, data: object, required: Sequence[str], optional: Sequence[str]
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _problem(where, "must be a JSON object")
    unknown = sorted(str(key)[:40] for key in data if key not in (*required, *optional))
    if unknown:
        raise _problem(where, f"unknown field {unknown[0]!r}")
    missing = [key for key in required if key not in data]
    if missing:
        raise _problem(where, f"missing field {missing[0]!r}")
    return data


def _string(where: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise _problem(where, "must be a non-empty string")
    return value


def load_config(path: Path) -> GatewayConfig:
    """``gateway.json`` from disk, bounded and checked; errors start with its path."""
    try:
        with path.open("rb") as fh:
            data = fh.read(CONFIG_MAX + 1)
        return GatewayConfig.from_json(load_json_bounded(data, max_bytes=CONFIG_MAX, max_depth=8))
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read it ({exc.strerror})") from exc
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc.message}", hint=exc.hint) from None


class Gateway:
    """Every route of a config listening on its unix socket (bound, mode 0600, when this is
    built); :meth:`serve_forever` accepts and serves each connection in its own thread, at
    most ``max_connections`` at once; :meth:`close` stops and removes the sockets."""

    def __init__(
        self,
        config: GatewayConfig,
        secrets: Mapping[str, str],
        *,
        max_connections: int = MAX_CONNECTIONS,
        resolve: Callable[..., Any] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.audit = AuditLog(config.audit)
        _check_writable(config.audit)
        self._log = log or _stderr
        self._proxies: list[ReverseProxy] = []
        routes = self._routes(secrets, resolve)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refusers = threading.BoundedSemaphore(REFUSERS)
        self._lock = threading.Lock()
        self._active: dict[socket.socket, threading.Thread] = {}
        self._stopping = False
        self._serving: threading.Thread | None = None
        self._done = threading.Event()
        self._closed = False
        self.keep_files = False  # a worker's: the keeper removes the socket files, not it
        self._listeners: list[tuple[socket.socket, Path, int, Handler, bool]] = []
        try:
            for path, handler, broker in routes:
                sock, inode = _listen(path)
                self._listeners.append((sock, path, inode, handler, broker))
        except BaseException:
            self._cleanup()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _routes(
        self, secrets: Mapping[str, str], resolve: Callable[..., Any] | None
    ) -> list[tuple[Path, Handler, bool]]:
        config, limits = self.config, self.config.limits
        routes: list[tuple[Path, Handler, bool]] = []
        for route in config.credentials:
            if route.name not in secrets:
                raise InvalidInputError(f"no secret for credential {route.name!r}")
            proxy = ReverseProxy(
                route.name,
                route.upstream,
                self.audit,
                header=route.header,
                value_format=route.format,
                secret=secrets[route.name],
                max_body_bytes=limits.max_body_bytes,
                max_concurrent=limits.max_concurrent,
                rate_per_minute=limits.rate_per_minute,
                cafile=config.cafile,
                log=self._log,
            )
            self._proxies.append(proxy)
            routes.append((route.socket, proxy.handle, True))
        if config.egress is not None:
            routes.append(
                (config.egress.socket, _egress(config.egress, self.audit, resolve), False)
            )
        return routes

    @property
    def sockets(self) -> tuple[Path, ...]:
        return tuple(path for _sock, path, _inode, _handler, _broker in self._listeners)

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_forever(self) -> None:
        """Accept connections until :meth:`shutdown` or :meth:`close`; then clean up."""
        with self._lock:
            if self._stopping or self._closed:  # closed before it started
                return
            self._serving = threading.current_thread()
        selector = selectors.DefaultSelector()
        try:
            for sock, _path, _inode, handler, broker in self._listeners:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, (handler, broker))
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            while not self._stopping:
                for key, _events in selector.select():
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 512)
                    elif not self._stopping:
                        self._accept(key.fileobj, *key.data)  # type: ignore[arg-type]
        finally:
            selector.close()
            self._cleanup()
            self._serving = None
            self._done.set()

    def shutdown(self) -> None:
        """Ask :meth:`serve_forever` to stop; safe in a signal handler (no lock taken)."""
        self._stopping = True
        fd = getattr(self, "_wake_w", -1)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, b"x")

    def close(self) -> None:
        """Stop serving, close every socket (listening and served) and remove the files."""
        self.shutdown()
        with self._lock:
            serving = self._serving
        if serving is None:
            self._cleanup()
        elif serving is not threading.current_thread():
            self._done.wait(10)

    def _accept(self, listener: socket.socket, handler: Handler, broker: bool) -> None:
        try:
            conn, _addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of descriptors: the connection waits in the backlog
            self._log(f"accept failed ({exc.strerror})")
            time.sleep(0.1)
            return
        conn.settimeout(None)
        if self._slots.acquire(blocking=False):
            self._start(self._serve, handler, conn)
        elif broker and self._refusers.acquire(blocking=False):
            self._start(self._refuse, conn)
        else:  # the egress proxy's clients, or a flood: just closed
            conn.close()

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        conn = args[-1]
        thread = threading.Thread(target=target, args=args, name="gateway-conn", daemon=True)
        with self._lock:
            self._active[conn] = thread
        thread.start()

    def _serve(self, handler: Handler, conn: socket.socket) -> None:
        try:
            handler(conn)
        except Exception as exc:  # handlers answer their own errors; this is a bug
            self._log(f"connection handler failed: {type(exc).__name__}")
        finally:
            self._forget(conn)
            self._slots.release()

    def _refuse(self, conn: socket.socket) -> None:
        """Over the connection cap: a 503 that says so (in a thread of its own, bounded, so
        that the answer can be read before the connection closes)."""
        try:
            busy = BrokerError(503, "the gateway is serving too many connections", retry_after=1)
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.sendall(error_response(busy, "*"))
            close_gently(conn)
        finally:
            self._forget(conn)
            self._refusers.release()

    def _forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._active.pop(conn, None)
        conn.close()

    def _cleanup(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            active = dict(self._active)
        for sock, path, inode, _handler, _broker in self._listeners:
            sock.close()
            with contextlib.suppress(OSError):
                if not self.keep_files and path.lstat().st_ino == inode:
                    path.unlink()
        for conn in active:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + CLOSE_WAIT  # a thread waiting on an upstream may stay
        for thread in active.values():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for proxy in self._proxies:
            proxy.close()  # the idle upstream connections
        for name in ("_wake_w", "_wake_r"):
            fd = getattr(self, name, -1)
            setattr(self, name, -1)
            if fd >= 0:
                os.close(fd)


def _egress(route: EgressRoute, audit: AuditLog, resolve: Callable[..., Any] | None) -> Handler:
    proxy = EgressProxy(route.allow, audit, resolve=resolve)
    handle: Handler = proxy.handle
    return handle


def _check_writable(path: Path) -> None:
    """The audit log can be written (fail at start, not at the first request)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise InvalidInputError(f"audit log {path}: cannot write it ({exc.strerror})") from exc
    os.close(fd)


def _listen(path: Path) -> tuple[socket.socket, int]:
    """A listening unix socket at ``path`` (0600); a stale socket file there is replaced,
    a live one (someone accepts on it) or any other file is an error."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(0o600)
        sock.listen(LISTEN_BACKLOG)
        return sock, path.lstat().st_ino
    except BaseException:
        sock.close()
        raise


def _remove_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidInputError(f"{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: left by a gateway that died
        return
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot tell whether it is in use ({exc})") from exc
    finally:
        probe.close()
    raise InvalidInputError(f"{path}: another process is serving this socket")


PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Linux: have the kernel send ``signum`` when the parent (the supervisor) dies;
    best effort, False where it cannot be set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _read_secrets_input() -> bytes:
    stream = sys.stdin.buffer if sys.stdin is not None else None
    data = stream.read(SECRETS_JSON_MAX + 1) if stream is not None else b""
    if len(data) > SECRETS_JSON_MAX:
        raise InvalidInputError(f"secrets on stdin: larger than {SECRETS_JSON_MAX} bytes")
    return data


class Keeper:
    """The gateway process: keeps ``gateway`` as built (sockets bound, secrets in memory,
    never served) and runs it in a forked worker, forked again when it dies (see the
    module's docstring). :meth:`run` returns the process's exit status."""

    def __init__(
        self,
        gateway: Gateway,
        *,
        max_restarts: int = MAX_RESTARTS,
        window: float = RESTART_WINDOW,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.max_restarts = max_restarts
        self.window = window
        self._log = log or _stderr
        self._pid = os.getpid()
        self._worker = 0
        self._stopping = False
        self._restarts: deque[float] = deque()

    def stop(self, _signum: int = 0, _frame: object = None) -> None:
        """SIGTERM/SIGINT: the worker is asked to stop (and killed after :data:`STOP_WAIT`
        seconds), then :meth:`run` closes the sockets and returns."""
        self._stopping = True
        self._signal_worker(signal.SIGTERM)
        signal.alarm(STOP_WAIT)

    def _kill_worker(self, _signum: int = 0, _frame: object = None) -> None:
        self._signal_worker(signal.SIGKILL)

    def _signal_worker(self, signum: int) -> None:
        if self._worker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._worker, signum)

    def run(self, ready: Callable[[], None] = lambda: None) -> int:
        """Serve until SIGTERM/SIGINT (EXIT_OK) or the restart limit (EXIT_FAILURE);
        ``ready`` is called once the signal handlers are in place."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.stop)
        signal.signal(signal.SIGALRM, self._kill_worker)
        ready()
        try:
            while not self._stopping:
                pid = self._fork()
                _pid, status = os.waitpid(pid, 0)
                self._worker = 0
                if not self._stopping and not self._may_restart(pid, status):
                    return EXIT_FAILURE
            return EXIT_OK
        finally:
            signal.alarm(0)
            self.gateway.close()

    def _fork(self) -> int:
        """A worker serving the gateway; SIGTERM waits until both sides have their
        handlers (a stop is never lost between the fork and the worker's handler)."""
        stops = {signal.SIGTERM, signal.SIGINT}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                self._serve(mask)
            self._worker = pid
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._log(f"worker {pid} serving")
        if self._stopping:  # asked while it was being forked
            self._signal_worker(signal.SIGTERM)
        return pid

    def _serve(self, mask: Iterable[int]) -> NoReturn:
        """The worker, in the forked child: serves until SIGTERM, never returns."""
        code = EXIT_FAILURE
        try:
            # A keeper killed outright takes its worker (and the secrets) with it at once.
            if set_parent_death_signal(signal.SIGKILL) and os.getppid() != self._pid:
                os._exit(EXIT_FAILURE)  # the keeper died before the signal was set
            gateway = self.gateway
            gateway.keep_files = True
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda _signum, _frame: gateway.shutdown())
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            gateway.serve_forever()
            code = EXIT_OK
        except BaseException as exc:  # a bug: say what (no message: it could quote data)
            self._log(f"the worker failed: {type(exc).__name__}")
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _may_restart(self, pid: int, status: int) -> bool:
        """Log the worker's death; wait out the back-off; False once the limit is hit."""
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] >= self.window:
            self._restarts.popleft()
        what = f"the worker (pid {pid}) {_death(status)}"
        if len(self._restarts) >= self.max_restarts:
            self._log(
                f"giving up: {what}, its {len(self._restarts) + 1}th death within "
                f"{self.window:g} s; the credential brokers and the egress proxy are down"
            )
            return False
        self._restarts.append(now)
        count = len(self._restarts)
        delay = min(RESTART_DELAY_MAX, RESTART_DELAY * 2 ** (count - 1))
        self._log(
            f"worker restart {count}/{self.max_restarts}: {what}; "
            f"serving again in {delay:g} s (connections wait in the backlog)"
        )
        deadline = time.monotonic() + delay
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
        return True


def _death(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "a signal"
        return f"was killed by signal {-code} ({name})"
    return f"exited with status {code}"


def main(argv: Sequence[str]) -> int:
    """The gateway process; ``argv`` is ``[CONFIG]``. See the module's docstring."""
    parent = os.getppid()
    if set_parent_death_signal() and os.getppid() != parent:
        return EXIT_FAILURE  # the parent died before the signal was set
    if len(argv) != 1:
        _stderr("usage: python -m microagent.broker.gateway CONFIG  (secrets as JSON on stdin)")
        return EXIT_INVALID
    try:
        config = load_config(Path(argv[0]))
        secrets = parse_secrets(_read_secrets_input(), [route.name for route in config.credentials])
        gateway = Gateway(config, secrets)
    except InvalidInputError as exc:
        _stderr(exc.message)
        return EXIT_INVALID
    except OSError as exc:
        _stderr(f"cannot listen: {exc.strerror or type(exc).__name__}")
        return EXIT_FAILURE
    return Keeper(gateway).run(ready=_say_ready)


def _say_ready() -> None:
    with contextlib.suppress(OSError):
        sys.stdout.write("ready\n")
        sys.stdout.flush()


def _stderr(line: str) -> None:
    print(f"gateway: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
