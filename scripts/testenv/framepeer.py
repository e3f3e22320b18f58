"""A scripted guest for the host's agent link (``microagent.runtime.agentlink``), frame by frame.

The test plays the VMM's agent socket (:class:`VmmSocket`: the unix socket the link connects
to) and the guest agent behind it, and talks to the link's exec socket as a raw client; each
end is a :class:`FramePeer` that reads frames with a deadline, so every channel id the link
picks and every frame it relays is visible to the test.
"""

from __future__ import annotations

import socket
from pathlib import Path

from microagent.runtime.agentproto import Frame, FrameReader, FrameType

TIMEOUT = 5.0


class FramePeer:
    """One end of a frame connection, read with a deadline (``timeout`` seconds a read)."""

    def __init__(self, sock: socket.socket, timeout: float = TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.sock.settimeout(timeout)
        self.reader = FrameReader()
        self.frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next(self) -> Frame:
        while not self.frames:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the peer closed the connection")
            self.frames += self.reader.feed(data)
        return self.frames.pop(0)

    def expect(self, kind: FrameType) -> Frame:
        frame = self.next()
        assert frame.type is kind, frame
        return frame

    def closed(self) -> bool:
        """Whether the peer closes the connection (nothing else arrives first)."""
        try:
            frame = self.next()
        except EOFError:
            return True
        raise AssertionError(f"unexpected {frame}")

    def silent(self, seconds: float = 0.3) -> bool:
        """Whether nothing arrives (and the peer does not close) for ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            return not self.frames and not self.sock.recv(1 << 16, socket.MSG_PEEK)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(self.timeout)


class VmmSocket:
    """The VMM's side of the agent port: a unix socket at ``path`` the link connects to."""

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(timeout)

    def accept(self, hello: bytes | None = None) -> FramePeer:
        """The link's connection, as the guest: its HELLO read (and checked), then ``hello``
        sent back when given (the guest's HELLO frame)."""
        conn, _ = self.listener.accept()
        guest = FramePeer(conn, self.timeout)
        assert guest.expect(FrameType.HELLO).json() == {"protocol": 1}
        if hello is not None:
            guest.send(hello)
        return guest


def exec_client(exec_socket: Path, timeout: float = TIMEOUT) -> FramePeer:
    """A raw client connected to the link's exec socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(exec_socket))
    return FramePeer(sock, timeout)
