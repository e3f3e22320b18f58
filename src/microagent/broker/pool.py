"""Idle upstream connections of one credential broker, kept for the next request.

An agent's tool loop sends many requests one after another to the same API; a new TCP and
TLS handshake for each costs a round trip or three. A :class:`ConnectionPool` belongs to one
:class:`~microagent.broker.reverse.ReverseProxy` (one credential, one upstream), so a
connection is never shared between credentials. It holds at most ``max_idle`` connections
that nobody uses, each for at most ``idle_timeout`` seconds (below the keep-alive of common
servers); a connection in use is in no list, so two requests never share one. The proxy
decides whether a connection may come back (:meth:`release` with ``reusable``); the pool
only checks, when it hands one out again, that the server has not closed it or sent
anything unasked in the meantime. A timer closes connections that outstay ``idle_timeout``
while no request comes (armed while any connection is idle: no thread otherwise).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_IDLE = 4  # idle connections kept per credential
IDLE_TIMEOUT = 30.0  # seconds an idle connection is kept (servers keep 60 s or more)


@dataclass
class _Idle:
    sock: socket.socket
    since: float


class ConnectionPool:
    """Idle connections to one upstream; ``connect`` makes a new one (or raises)."""

    def __init__(
        self,
        connect: Callable[[], socket.socket],
        *,
        max_idle: int = MAX_IDLE,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._idle: list[_Idle] = []
        self._lock = threading.Lock()
        self._closed = False
        self._reaper: threading.Timer | None = None  # armed while a connection is idle
        self.opened = 0  # connections made, for tests and figures

    @property
    def idle(self) -> int:
        """How many idle connections are kept now."""
        with self._lock:
            return len(self._idle)

    def acquire(self) -> tuple[socket.socket, bool]:
        """An idle connection that is still usable (the most recently used first), or a new
        one; and whether it was reused."""
        while (sock := self._take()) is not None:
            if _usable(sock):
                return sock, True
            _close(sock)
        return self.fresh(), False

    def fresh(self) -> socket.socket:
        """A new connection, never an idle one."""
        sock = self._connect()
        with self._lock:
            self.opened += 1
        return sock

    def release(self, sock: socket.socket, reusable: bool) -> None:
        """Done with ``sock``: kept for the next request if ``reusable`` and there is room,
        else closed."""
        if reusable:
            with self._lock:
                self._expire()
                if not self._closed and len(self._idle) < self.max_idle:
                    self._idle.append(_Idle(sock, self._clock()))
                    self._arm()
                    return
        _close(sock)

    def close(self) -> None:
        """Close every idle connection; later releases close theirs."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
        for item in idle:
            _close(item.sock)

    def _take(self) -> socket.socket | None:
        with self._lock:
            self._expire()
            return self._idle.pop().sock if self._idle else None

    def _arm(self) -> None:
        """Start the timer for the oldest idle connection's expiry (lock held)."""
        if self._reaper is not None or self._closed or not self._idle:
            return
        oldest = min(item.since for item in self._idle)
        delay = max(0.05, oldest + self.idle_timeout - self._clock())
        self._reaper = threading.Timer(delay, self._reap)
        self._reaper.daemon = True
        self._reaper.start()

    def _reap(self) -> None:
        """The timer: close what expired, and wait for the next expiry if any is left."""
        with self._lock:
            self._reaper = None
            self._expire()
            self._arm()

    def _expire(self) -> None:
        """Close the connections idle for longer than ``idle_timeout`` (lock held)."""
        now = self._clock()
        keep = [item for item in self._idle if now - item.since < self.idle_timeout]
        for item in self._idle:
            if now - item.since >= self.idle_timeout:
                _close(item.sock)
        self._idle = keep


def _usable(sock: socket.socket) -> bool:
    """Whether an idle connection can carry a request: nothing to read on it. Readable
    means the server closed it (or sent something unasked): either way it is dropped. Over
    TLS, records that carry no data (a session ticket) are read and the connection kept."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return True
    if not isinstance(sock, ssl.SSLSocket):
        return False
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        sock.recv(1)  # data or the end of the stream: not usable
        return False
    except ssl.SSLWantReadError:
        return True
    except OSError:  # ssl.SSLError too
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
