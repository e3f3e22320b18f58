"""Host side of the guest channels: the JSON-lines control socket and the serial console log.

The VMM exposes the guest's ``microagent.ctl`` virtio-serial port as a unix socket (the VMM is
the server). Guest writes made before we connect are kept by the port, so connecting a little
late loses nothing.

Everything here comes from the guest and is bounded before the host acts on it: a control line
(:data:`MAX_LINE`, nested at most :data:`MAX_EVENT_DEPTH` deep), the events a machine keeps
(:class:`EventLog`), a serial line waiting for its newline (:data:`MAX_SERIAL_LINE`) and the
serial log on disk (:func:`rotate_log`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from microagent.errors import InvalidInputError
from microagent.fsutil import atomic_write, load_json_bounded

# The contract with the guest init (kit/templates/init.sh.j2 renders the same values).
PORT_NAME = "microagent.ctl"  # the virtio-serial port carrying JSON-lines events
BEGIN_MARKER = "--- microagent: command started ---"  # serial console: command output follows
END_MARKER = "--- microagent: command exited"  # serial console: command output ended
PROBE_MARKER = "microagent-probe-ok"  # printed by ma_mode=probe boots (the KVM probe)
MAX_LINE = 16 << 20  # one control-channel line (an event with output tails and outputs)
MAX_EVENT_DEPTH = 16  # events nest three levels (outputs.NAME.content); leave room, no more
MAX_OUTPUT_DEPTH = 64  # a declared output parsed as JSON on the host (the agent's WorkResult)
MAX_EVENTS = 256  # events a machine keeps (the first ones: booted, started); later are counted
MAX_SERIAL_LINE = 64 << 10  # a console line longer than this is passed on in pieces
SERIAL_READ = 1 << 20  # the serial log is read in pieces of this size
SERIAL_LOG_MAX = 8 << 20  # serial.log beyond this moves to serial.log.1 and starts again
TAIL_BYTES = 64 << 10  # how much of a log tail_text looks at


class EventLines:
    """Cuts the guest's control stream into events: each complete line is parsed by
    :func:`parse_event` (anything not an event object is dropped); a line growing past
    :data:`MAX_LINE` is dropped up to its newline, so it is never kept whole and its tail is
    never read as a line of its own."""

    def __init__(self) -> None:
        self._buf = b""
        self._skipping = False  # inside a line longer than MAX_LINE

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """The events completed by ``chunk``."""
        if self._skipping:
            _, newline, chunk = chunk.partition(b"\n")
            self._skipping = not newline
        self._buf += chunk
        events = []
        while b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            event = parse_event(line)
            if event is not None:
                events.append(event)
        if len(self._buf) > MAX_LINE:
            self._buf = b""
            self._skipping = True
        return events


class ControlChannel:
    """A newline-delimited JSON connection to the guest init."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._lines = EventLines()
        self.closed = False

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def try_connect(self) -> bool:
        """Connect if the VMM has created the socket; False while it is not there yet."""
        if self._sock is not None:
            return True
        if self.closed:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            return False
        sock.setblocking(False)
        self._sock = sock
        return True

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        """Wait up to ``timeout`` seconds for data; return the complete JSON lines received."""
        if self._sock is None or self.closed:
            time.sleep(timeout)
            return []
        try:
            ready, _, _ = select.select([self._sock], [], [], timeout)
        except (OSError, ValueError):  # closed by another thread
            return []
        return self._lines.feed(self._read_available()) if ready else []

    def _read_available(self) -> bytes:
        assert self._sock is not None
        try:
            chunk = self._sock.recv(1 << 16)
        except BlockingIOError:
            return b""
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
        return chunk

    def send(self, message: Mapping[str, Any], timeout: float = 2.0) -> bool:
        """Send one JSON line; False when the channel is not usable.

        The socket stays non-blocking (another thread may be polling it), so writes wait for
        writability with select.
        """
        if self._sock is None or self.closed:
            return False
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        deadline = time.monotonic() + timeout
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                _, ready, _ = select.select([], [self._sock], [], remaining)
                if ready:
                    data = data[self._sock.send(data) :]
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        self.closed = True


def parse_event(line: bytes) -> dict[str, Any] | None:
    """A guest event from one line (invalid UTF-8 replaced); None for anything not an event
    object, and for a line longer than MAX_LINE or nested deeper than MAX_EVENT_DEPTH."""
    text = line.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        value = load_json_bounded(text, max_bytes=MAX_LINE, max_depth=MAX_EVENT_DEPTH)
    except InvalidInputError:
        return None
    return value if isinstance(value, dict) and "event" in value else None


def parse_output(content: str) -> Any:
    """A declared output's content as JSON, bounded like everything else from the guest
    (MAX_LINE, MAX_OUTPUT_DEPTH); InvalidInputError says what is wrong with it."""
    return load_json_bounded(content, max_bytes=MAX_LINE, max_depth=MAX_OUTPUT_DEPTH)


class EventLog:
    """The events of one boot, in order, at most ``limit`` of them: the first ones are kept
    (``booted`` and ``started`` are what readers look for), later ones are only counted, so a
    guest flooding the control channel cannot grow the host's memory."""

    def __init__(self, limit: int = MAX_EVENTS) -> None:
        self.limit = limit
        self._events: list[dict[str, Any]] = []
        self.dropped = 0

    def add(self, event: dict[str, Any]) -> bool:
        """Keep ``event`` if there is room; False when it was only counted."""
        if len(self._events) >= self.limit:
            self.dropped += 1
            return False
        self._events.append(event)
        return True

    def snapshot(self) -> Sequence[Mapping[str, Any]]:
        return tuple(self._events)

    def __len__(self) -> int:
        return len(self._events)


class SerialStream:
    """Follows the serial log and passes on what the guest command printed.

    Output between the init's begin and end markers is forwarded line by line (CR dropped),
    so boot and shutdown messages stay in the log only. The log is read in pieces; a line
    without a newline is held back up to MAX_SERIAL_LINE bytes, then passed on as it is (boot
    messages that long are dropped); a log that shrank (see :func:`rotate_log`) is read again
    from its start.
    """

    def __init__(self, path: Path, sink: Callable[[bytes], None]) -> None:
        self.path = path
        self.sink = sink
        self._offset = 0
        self._pending = b""
        self._state = "boot"  # boot -> command -> done

    def pump(self) -> None:
        """Forward whatever the log gained since the last call."""
        try:
            with self.path.open("rb") as fh:
                if os.fstat(fh.fileno()).st_size < self._offset:
                    self._offset = 0  # rotated: what was written before the cut is gone
                fh.seek(self._offset)
                while self._state != "done" and (data := fh.read(SERIAL_READ)):
                    self._offset += len(data)
                    self._feed(data)
        except FileNotFoundError:
            return

    def _feed(self, data: bytes) -> None:
        self._pending += data
        while b"\n" in self._pending and self._state != "done":
            line, _, self._pending = self._pending.partition(b"\n")
            self._line(line.rstrip(b"\r"))
        if len(self._pending) > MAX_SERIAL_LINE:
            piece, self._pending = self._pending, b""
            if self._state == "command":
                self.sink(piece)

    def _line(self, line: bytes) -> None:
        if self._state == "boot":
            if line.strip() == BEGIN_MARKER.encode():
                self._state = "command"
            return
        before, marker, _ = line.partition(END_MARKER.encode())
        if marker:
            self._state = "done"
            if before:
                self.sink(before)  # the command's last line had no newline
            return
        self.sink(line + b"\n")


def tail_text(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' when missing); reads its last TAIL_BYTES."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES))
            data = fh.read(TAIL_BYTES)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.strip().splitlines()[-lines:])


def rotate_log(path: Path, limit: int = SERIAL_LOG_MAX) -> bool:
    """Keep a log the VMM appends to under ``limit`` bytes; True when it was cut.

    Once ``path`` is larger, its last ``limit`` bytes replace ``<name>.1`` and ``path`` is
    truncated, so the two never hold much more than twice ``limit``. The writer must have
    opened it with ``O_APPEND`` (QEMU's ``append=on``): its next write then lands at the new
    end instead of leaving a hole. What it writes between the copy and the cut is lost; the
    log is a mirror of the console, and the guest keeps its command's output itself.
    """
    try:
        if path.stat().st_size <= limit:  # the common case: one stat
            return False
        with path.open("rb") as fh:
            fh.seek(-limit, os.SEEK_END)
            tail = fh.read(limit)
    except FileNotFoundError:
        return False
    atomic_write(path.with_name(path.name + ".1"), tail, mode=0o600)
    os.truncate(path, 0)
    return True
