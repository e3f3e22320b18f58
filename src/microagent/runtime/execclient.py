"""A client of a workspace's ``exec.sock``: one command in the guest, streamed or collected.

The supervisor's :class:`~microagent.runtime.agentlink.AgentLink` serves the socket and relays
the frames to the guest agent (``docs/agent-protocol.md``); a client speaks on channel 1. It
sends EXEC, then STDIN while the guest's window allows (a thread reads the input), and
answers every STDOUT/STDERR it has handed on with WINDOW, so a slow reader stalls only its
own command. Signals and terminal resizes come in through :class:`ExecControls`, which is
safe to call from a signal handler. The host's terminal itself (raw mode, SIGWINCH) is the
CLI's business.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent.errors import InvalidInputError, VMError
from microagent.runtime.agentproto import (
    MAX_PAYLOAD,
    WINDOW,
    ExecExit,
    ExecRequest,
    Frame,
    FrameReader,
    FrameType,
    encode,
    encode_json,
    window,
)

CHANNEL = 1  # a client of exec.sock speaks on this channel only
CONNECT_TIMEOUT = 5.0
EXIT_GRACE = 10.0  # past the command's own timeout, how long the host waits for its EXIT
COLLECT_LIMIT = 16 << 20  # bytes of stdout (and of stderr) a collected exec keeps
READ_SIZE = MAX_PAYLOAD

Sink = Callable[[bytes], None]


@dataclass(frozen=True)
class ExecResult:
    """How an exec ended and, when collected, what it printed."""

    exit: ExecExit
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0
    pid: int | None = None

    @property
    def exit_code(self) -> int:
        return self.exit.exit_code

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.exit.error is None,
            "exitCode": self.exit.exit_code,
            "signal": self.exit.signal,
            "timedOut": self.exit.timed_out,
            "error": self.exit.error,
            "stdout": self.stdout.decode("utf-8", "replace"),
            "stderr": self.stderr.decode("utf-8", "replace"),
            "stdoutTruncated": self.stdout_truncated,
            "stderrTruncated": self.stderr_truncated,
            "durationMs": round(self.duration * 1000),
        }


class ExecControls:
    """Requests into a running exec: signals for the command, terminal resizes.

    Every method only queues and wakes the exec's loop, so it may be called from a signal
    handler or another thread.
    """

    def __init__(self) -> None:
        self._pending: collections.deque[tuple[FrameType, dict[str, int]]] = collections.deque()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def signal(self, signum: int) -> None:
        self._queue(FrameType.SIGNAL, {"signal": signum})

    def resize(self, rows: int, cols: int) -> None:
        self._queue(FrameType.RESIZE, {"rows": rows, "cols": cols})

    def _queue(self, kind: FrameType, payload: dict[str, int]) -> None:
        self._pending.append((kind, payload))
        with contextlib.suppress(OSError):  # full or closed: the loop wakes anyway
            os.write(self._write_fd, b"\0")

    def fileno(self) -> int:
        return self._read_fd

    def take(self) -> list[bytes]:
        """The frames queued since the last call."""
        with contextlib.suppress(OSError):
            os.read(self._read_fd, 4096)
        frames = []
        while self._pending:
            kind, payload = self._pending.popleft()
            frames.append(encode_json(CHANNEL, kind, payload))
        return frames

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class ExecIO:
    """Where a streamed exec's output goes, and its controls (signals, resizes)."""

    stdout: Sink
    stderr: Sink
    controls: ExecControls | None = None


Input = int | bytes | None  # a file descriptor read until end of file, bytes, or no input


class _Connection:
    """The socket to exec.sock; sends may come from the loop and from the stdin thread."""

    def __init__(self, path: Path) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise VMError(
                f"cannot reach the exec socket {path}: {exc.strerror or exc}",
                hint="the workspace may have stopped; see `microagent status`",
            ) from exc
        sock.settimeout(None)
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def send_soft(self, data: bytes) -> None:
        """Send a frame that may come too late (WINDOW, SIGNAL, RESIZE): once the link has
        closed the connection after EXIT, what is still to be read matters, not this."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class _StdinPump(threading.Thread):
    """Sends the exec's input while the guest's window has room, then the empty STDIN."""

    def __init__(self, conn: _Connection, source: int | bytes) -> None:
        super().__init__(name="exec-stdin", daemon=True)
        self._conn, self._source = conn, source
        self._credit = WINDOW
        self._cond = threading.Condition()
        self._stop_read, self._stop_write = os.pipe2(os.O_CLOEXEC)
        self._stopped = False

    def grant(self, count: int) -> None:
        with self._cond:
            self._credit = min(WINDOW, self._credit + count)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        with contextlib.suppress(OSError):
            os.write(self._stop_write, b"\0")
        self.join(timeout=2.0)
        for fd in (self._stop_read, self._stop_write):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _room(self) -> int:
        with self._cond:
            while not self._credit and not self._stopped:
                self._cond.wait()
            return 0 if self._stopped else min(self._credit, MAX_PAYLOAD)

    def _read(self, size: int, offset: int) -> bytes | None:
        """Up to ``size`` bytes of input (b"" at its end); None once stopped."""
        if isinstance(self._source, bytes):
            return self._source[offset : offset + size]
        ready, _, _ = select.select([self._source, self._stop_read], [], [])
        if self._stop_read in ready:
            return None
        try:
            return os.read(self._source, size)
        except OSError:  # a terminal that hung up, a closed pipe: the input has ended
            return b""

    def run(self) -> None:
        offset = 0
        with contextlib.suppress(OSError):  # the connection is gone: the loop reports it
            while size := self._room():
                data = self._read(size, offset)
                if data is None:
                    return
                self._conn.send(encode(CHANNEL, FrameType.STDIN, data))
                if not data:
                    return
                offset += len(data)
                with self._cond:
                    self._credit -= len(data)


@dataclass
class _Capture:
    """A bounded buffer for collected output."""

    limit: int
    data: bytearray = dataclasses.field(default_factory=bytearray)
    truncated: bool = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[: max(room, 0)]
        self.truncated = self.truncated or len(chunk) > room


class _Exec:
    """The receiving loop of one exec."""

    def __init__(self, conn: _Connection, io: ExecIO, pump: _StdinPump | None) -> None:
        self.conn, self.io, self.pump = conn, io, pump
        self.reader = FrameReader()
        self.pid: int | None = None

    def loop(self, deadline: float | None) -> ExecExit | None:
        """Until EXIT (its ExecExit) or the deadline (None)."""
        controls = self.io.controls
        watched: list[Any] = [self.conn.sock] + ([controls] if controls else [])
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            ready, _, _ = select.select(watched, [], [], remaining)
            if controls is not None and controls in ready:
                for frame in controls.take():
                    self.conn.send_soft(frame)
            if self.conn.sock in ready:
                done = self._receive()
                if done is not None:
                    return done

    def _receive(self) -> ExecExit | None:
        data = self.conn.sock.recv(READ_SIZE)
        if not data:
            raise VMError(
                "the exec ended without an exit status (the VM or its supervisor went away)",
                hint="see `microagent status` and `microagent logs` for the workspace",
            )
        try:
            frames = self.reader.feed(data)
        except InvalidInputError as exc:
            raise VMError(f"exec: {exc.message}") from exc
        for frame in frames:
            done = self._frame(frame)
            if done is not None:
                return done
        return None

    def _frame(self, frame: Frame) -> ExecExit | None:
        kind = frame.type
        if kind in (FrameType.STDOUT, FrameType.STDERR) and frame.payload:
            sink = self.io.stdout if kind is FrameType.STDOUT else self.io.stderr
            sink(frame.payload)
            self.conn.send_soft(window(CHANNEL, len(frame.payload)))
        elif kind is FrameType.WINDOW and self.pump is not None:
            self.pump.grant(_count(frame))
        elif kind is FrameType.STARTED:
            pid = _json(frame).get("pid")
            self.pid = pid if isinstance(pid, int) else None
        elif kind is FrameType.EXIT:
            return ExecExit.from_json(_json(frame))
        elif kind is FrameType.CLOSE:
            why = _json(frame).get("error") or "the channel was closed"
            raise VMError(f"exec failed: {str(why)[:4096]}")
        return None


def _json(frame: Frame) -> dict[str, Any]:
    try:
        return frame.json()
    except InvalidInputError as exc:
        raise VMError(f"exec: {exc.message}") from exc


def _count(frame: Frame) -> int:
    try:
        return frame.count()
    except InvalidInputError as exc:
        raise VMError(f"exec: {exc.message}") from exc


def stream(
    path: Path,
    request: ExecRequest,
    io: ExecIO,
    *,
    stdin: Input = None,
    timeout: float | None = None,
) -> ExecResult:
    """Run ``request`` through the exec socket at ``path``, output to ``io``'s sinks as it
    arrives, input from ``stdin`` (the command gets /dev/null without). ``timeout`` bounds
    the wait for the exit (plus :data:`EXIT_GRACE`, so the guest has time to report its own
    ``timeoutMs``); when it passes the command is closed and the exit says ``timedOut``.
    VMError when the exec could not run or its channel broke."""
    request = dataclasses.replace(request, stdin=stdin is not None)
    began = time.monotonic()
    deadline = None if timeout is None else began + timeout + EXIT_GRACE
    conn = _Connection(path)
    pump = _StdinPump(conn, stdin) if stdin is not None else None
    try:
        conn.send(encode_json(CHANNEL, FrameType.EXEC, request.to_json()))
        if pump is not None:
            pump.start()
        run = _Exec(conn, io, pump)
        done = run.loop(deadline)
    except OSError as exc:
        raise VMError(f"exec: the connection failed: {exc.strerror or exc}") from exc
    finally:
        if pump is not None:
            pump.stop()
        conn.close()  # before EXIT: the link closes the channel and the guest kills it
    if done is None:
        done = ExecExit(124, timed_out=True, error=f"no exit status after {timeout:g}s")
    return ExecResult(done, duration=time.monotonic() - began, pid=run.pid)


def collect(
    path: Path,
    request: ExecRequest,
    *,
    stdin: Input = None,
    timeout: float | None = None,
    limit: int = COLLECT_LIMIT,
) -> ExecResult:
    """Run ``request`` and keep its output: the first ``limit`` bytes of each stream."""
    out, err = _Capture(limit), _Capture(limit)
    io = ExecIO(out.add, err.add)
    result = stream(path, request, io, stdin=stdin, timeout=timeout)
    return dataclasses.replace(
        result,
        stdout=bytes(out.data),
        stderr=bytes(err.data),
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
    )
