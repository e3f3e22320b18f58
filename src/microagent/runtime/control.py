"""Host side of the guest channels: the JSON-lines control socket and the serial console log.

The VMM exposes the guest's ``microagent.ctl`` virtio-serial port as a unix socket (the VMM is
the server). Guest writes made before we connect are kept by the port, so connecting a little
late loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# The contract with the guest init (kit/templates/init.sh.j2 renders the same values).
PORT_NAME = "microagent.ctl"  # the virtio-serial port carrying JSON-lines events
BEGIN_MARKER = "--- microagent: command started ---"  # serial console: command output follows
END_MARKER = "--- microagent: command exited"  # serial console: command output ended
PROBE_MARKER = "microagent-probe-ok"  # printed by ma_mode=probe boots (the KVM probe)
MAX_LINE = 16 << 20


class ControlChannel:
    """A newline-delimited JSON connection to the guest init."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = b""
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
        if ready:
            self._read_available()
        return self._take_lines()

    def _read_available(self) -> None:
        assert self._sock is not None
        try:
            chunk = self._sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
            return
        self._buf += chunk
        if len(self._buf) > MAX_LINE and b"\n" not in self._buf:
            self._buf = b""  # a runaway line: drop it rather than grow without bound

    def _take_lines(self) -> list[dict[str, Any]]:
        events = []
        while b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            event = parse_event(line)
            if event is not None:
                events.append(event)
        return events

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
    """A guest event from one line (invalid UTF-8 replaced); None for anything not an object."""
    text = line.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "event" in value else None


class SerialStream:
    """Follows the serial log and passes on what the guest command printed.

    Output between the init's begin and end markers is forwarded line by line (CR dropped),
    so boot and shutdown messages stay in the log only.
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
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        self._pending += data
        while b"\n" in self._pending and self._state != "done":
            line, _, self._pending = self._pending.partition(b"\n")
            self._line(line.rstrip(b"\r"))

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
    """The last ``lines`` lines of a log file ('' when missing)."""
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.strip().splitlines()[-lines:])
