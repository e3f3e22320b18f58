"""The supervisor's agent link against a scripted guest: the test plays the VMM's agent socket
and the guest agent frame by frame, so every channel id the link picks and every frame it
relays is visible (exec clients are raw sockets speaking the protocol too)."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.runtime.agentlink import (
    CLIENT_CHANNEL,
    AgentHello,
    AgentLink,
    MediationTarget,
)
from microagent.runtime.agentproto import (
    GUEST_CHANNEL_BASE,
    MAX_PAYLOAD,
    WINDOW,
    ExecRequest,
    Frame,
    FrameReader,
    FrameType,
    encode,
    encode_json,
    window,
)

TIMEOUT = 5.0
HELLO = encode_json(0, FrameType.HELLO, {"protocol": 1, "agent": "scripted", "version": "1"})


class Peer:
    """One end of a frame connection, read with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
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
        self.sock.settimeout(seconds)
        try:
            return not self.frames and not self.sock.recv(1 << 16, socket.MSG_PEEK)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT)


class Vmm:
    """The VMM's side of the agent port: a unix socket the link connects to."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)

    def guest(self, *, hello: bool = True) -> Peer:
        """Accept the link's connection; read its HELLO and (by default) answer it."""
        conn, _ = self.listener.accept()
        guest = Peer(conn)
        assert guest.expect(FrameType.HELLO).json() == {"protocol": 1}
        if hello:
            guest.send(HELLO)
        return guest


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    """A short directory: unix socket paths are limited, pytest's tmp_path can be long."""
    with tempfile.TemporaryDirectory(prefix="ma-link-") as path:
        yield Path(path)


class Harness:
    def __init__(self, vm_dir: Path, **kwargs: object) -> None:
        self.vmm = Vmm(vm_dir / "agent.sock")
        self.readiness: list[str] = []
        self.link = AgentLink(
            vm_dir / "agent.sock",
            vm_dir / "exec.sock",
            on_ready=lambda hello: self.readiness.append(f"ready {hello.agent}"),
            on_lost=lambda why: self.readiness.append(f"lost {why}"),
            **kwargs,  # type: ignore[arg-type]
        ).start()

    def client(self) -> Peer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.link.exec_socket))
        return Peer(sock)

    def exec(self, guest: Peer, *argv: str) -> tuple[Peer, int]:
        """A client whose EXEC reached the guest; (client, guest channel)."""
        client = self.client()
        client.send(encode_json(CLIENT_CHANNEL, FrameType.EXEC, ExecRequest(argv).to_json()))
        frame = guest.expect(FrameType.EXEC)
        assert frame.json()["argv"] == list(argv)
        return client, frame.channel


@pytest.fixture
def harness(vm_dir: Path) -> Iterator[Harness]:
    h = Harness(vm_dir)
    yield h
    h.link.stop()


def wait_for(condition: object, seconds: float = TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_hello_makes_the_link_ready(harness: Harness) -> None:
    guest = harness.vmm.guest()
    assert harness.link.wait_ready(TIMEOUT)
    assert harness.link.hello == AgentHello("scripted", "1")
    wait_for(lambda: harness.readiness == ["ready scripted"])
    assert harness.link.exec_socket.stat().st_mode & 0o777 == 0o600
    guest.send(encode(0, FrameType.PONG, b"x"))  # ignored
    assert guest.silent()


def test_two_clients_get_their_own_channels(harness: Harness) -> None:
    guest = harness.vmm.guest()
    assert harness.link.wait_ready(TIMEOUT)
    first, ch1 = harness.exec(guest, "one")
    second, ch2 = harness.exec(guest, "two")
    assert ch1 != ch2 and min(ch1, ch2) > 0 and max(ch1, ch2) < GUEST_CHANNEL_BASE

    guest.send(encode_json(ch2, FrameType.STARTED, {"pid": 7}))
    guest.send(encode(ch2, FrameType.STDOUT, b"to two"))
    guest.send(encode(ch1, FrameType.STDERR, b"to one"))
    assert second.expect(FrameType.STARTED) == Frame(
        CLIENT_CHANNEL, FrameType.STARTED, b'{"pid":7}'
    )
    assert second.expect(FrameType.STDOUT) == Frame(CLIENT_CHANNEL, FrameType.STDOUT, b"to two")
    assert first.expect(FrameType.STDERR).payload == b"to one"

    # flow control is end to end: the client's WINDOW reaches the guest on its channel
    second.send(window(CLIENT_CHANNEL, 6))
    assert guest.expect(FrameType.WINDOW) == Frame(ch2, FrameType.WINDOW, (6).to_bytes(4, "big"))
    first.send(encode(CLIENT_CHANNEL, FrameType.STDIN, b"input"))
    first.send(encode_json(CLIENT_CHANNEL, FrameType.SIGNAL, {"signal": 2}))
    assert guest.expect(FrameType.STDIN) == Frame(ch1, FrameType.STDIN, b"input")
    assert guest.expect(FrameType.SIGNAL).channel == ch1
    guest.send(window(ch1, 5))
    assert first.expect(FrameType.WINDOW).count() == 5

    # EXIT ends the client's connection; a client that goes away closes its channel
    guest.send(encode_json(ch1, FrameType.EXIT, {"exitCode": 3}))
    assert first.expect(FrameType.EXIT).json() == {"exitCode": 3}
    assert first.closed()
    second.sock.close()
    assert guest.expect(FrameType.CLOSE) == Frame(ch2, FrameType.CLOSE)
    guest.send(encode(ch2, FrameType.STDOUT, b"late"))  # dropped: the channel is gone
    third, ch3 = harness.exec(guest, "three")
    assert ch3 not in (ch1, ch2)
    assert third.silent()


def test_exec_before_the_guest_is_ready_is_refused(harness: Harness) -> None:
    client = harness.client()
    client.send(encode_json(CLIENT_CHANNEL, FrameType.EXEC, ExecRequest(("x",)).to_json()))
    assert client.expect(FrameType.CLOSE).json() == {"error": "the guest agent is not ready"}
    assert client.closed()


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (encode_json(5, FrameType.EXEC, {"argv": ["x"]}), "a client speaks on channel 1 only"),
        (encode(CLIENT_CHANNEL, FrameType.STDIN, b"x"), "the first frame must be EXEC"),
        (b"\x00\x01\x00\x01" + b"\0\0\0\x01\x10", "agent protocol: a frame of 65537 bytes"),
        (b"\0\0\0\0\0\0\0\x01\x7f", "agent protocol: unknown frame type 0x7f"),
    ],
)
def test_bad_client_frames_are_refused(harness: Harness, frame: bytes, why: str) -> None:
    guest = harness.vmm.guest()
    assert harness.link.wait_ready(TIMEOUT)
    client = harness.client()
    client.send(frame)
    assert client.expect(FrameType.CLOSE).json() == {"error": why}
    assert client.closed()
    assert guest.silent()


def test_a_client_may_not_send_guest_frames(harness: Harness) -> None:
    guest = harness.vmm.guest()
    assert harness.link.wait_ready(TIMEOUT)
    client, channel = harness.exec(guest, "x")
    client.send(encode(CLIENT_CHANNEL, FrameType.STDOUT, b"forged"))
    assert guest.expect(FrameType.CLOSE) == Frame(
        channel, FrameType.CLOSE, b'{"error":"a client may not send STDOUT here"}'
    )
    assert client.expect(FrameType.CLOSE).json()["error"].startswith("a client may not")


def test_guest_going_away_closes_every_exec_then_reconnects(harness: Harness) -> None:
    guest = harness.vmm.guest()
    assert harness.link.wait_ready(TIMEOUT)
    client, _ = harness.exec(guest, "x")
    guest.sock.close()
    assert client.expect(FrameType.CLOSE).json() == {"error": "the guest agent's port closed"}
    assert client.closed()
    again = harness.vmm.guest(hello=False)  # the link connects again and says HELLO
    wait_for(lambda: not harness.link.ready.is_set())
    again.send(HELLO)
    assert harness.link.wait_ready(TIMEOUT)
    wait_for(lambda: len(harness.readiness) == 3)
    assert harness.readiness == [
        "ready scripted",
        "lost the guest agent's port closed",
        "ready scripted",
    ]


def test_a_guest_breaking_the_protocol_is_cut_off(harness: Harness) -> None:
    guest = harness.vmm.guest()
    assert harness.link.wait_ready(TIMEOUT)
    guest.send(b"\xff\xff\xff\xff\0\0\0\0\x13")  # a 4 GiB frame
    assert guest.closed()
    again = harness.vmm.guest()  # kept: dropping it would close the connection
    assert harness.link.wait_ready(TIMEOUT)
    assert again.silent()


def test_wrong_protocol_version_is_not_ready(harness: Harness) -> None:
    guest = harness.vmm.guest(hello=False)
    guest.send(encode_json(0, FrameType.HELLO, {"protocol": 2}))
    assert guest.closed()
    assert not harness.link.ready.is_set()


def test_a_client_that_does_not_read_is_cut_off(harness: Harness) -> None:
    guest = harness.vmm.guest()
    assert harness.link.wait_ready(TIMEOUT)
    client, channel = harness.exec(guest, "x")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = encode(channel, FrameType.STDOUT, b"x" * MAX_PAYLOAD)
    for _ in range(4 * WINDOW // MAX_PAYLOAD):  # a guest ignoring the window
        guest.send(chunk)
    assert guest.expect(FrameType.CLOSE) == Frame(channel, FrameType.CLOSE)


def test_client_limit(vm_dir: Path) -> None:
    h = Harness(vm_dir, max_clients=1)
    try:
        guest = h.vmm.guest()
        assert h.link.wait_ready(TIMEOUT)
        first, ch1 = h.exec(guest, "one")
        waiting = h.client()  # queued by the kernel, not served while the first runs
        waiting.send(encode_json(CLIENT_CHANNEL, FrameType.EXEC, {"argv": ["two"]}))
        assert guest.silent()
        guest.send(encode_json(ch1, FrameType.EXIT, {"exitCode": 0}))
        assert first.expect(FrameType.EXIT)
        assert guest.expect(FrameType.EXEC).json() == {"argv": ["two"]}
    finally:
        h.link.stop()


def test_stop_closes_clients_and_removes_the_socket(harness: Harness) -> None:
    guest = harness.vmm.guest()
    assert harness.link.wait_ready(TIMEOUT)
    client, _ = harness.exec(guest, "x")
    harness.link.stop()
    assert client.expect(FrameType.CLOSE).json() == {"error": "the VM is stopping"}
    assert not harness.link.exec_socket.exists()


# -- mediation -------------------------------------------------------------------------------


class Target:
    """A local TCP server: echoes, or sends a fixed amount first."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.greeting = greeting
        self.received = bytearray()
        self.eof = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(self.greeting)
            while data := conn.recv(1 << 16):
                self.received += data
                conn.sendall(data)
            self.eof.set()


MED = GUEST_CHANNEL_BASE + 3


def mediated(vm_dir: Path, port: int) -> tuple[Harness, Peer]:
    h = Harness(vm_dir, mediation=MediationTarget("127.0.0.1", port))
    guest = h.vmm.guest()
    assert h.link.wait_ready(TIMEOUT)
    return h, guest


def test_mediation_relays_both_ways_and_half_closes(vm_dir: Path) -> None:
    target = Target()
    h, guest = mediated(vm_dir, target.port)
    try:
        guest.send(encode_json(MED, FrameType.MED_OPEN, {"port": 9000}))
        assert guest.expect(FrameType.MED_OPENED) == Frame(MED, FrameType.MED_OPENED)
        guest.send(encode(MED, FrameType.DATA, b"hello"))
        got = {guest.next(), guest.next()}
        assert got == {
            Frame(MED, FrameType.WINDOW, (5).to_bytes(4, "big")),  # written to the target
            Frame(MED, FrameType.DATA, b"hello"),  # the echo
        }
        guest.send(encode(MED, FrameType.DATA))  # end of data: the target sees end of file
        assert target.eof.wait(TIMEOUT)
        assert guest.expect(FrameType.DATA) == Frame(MED, FrameType.DATA)  # and closes too
        assert guest.expect(FrameType.CLOSE) == Frame(MED, FrameType.CLOSE)
    finally:
        h.link.stop()


def test_mediation_honours_the_guest_window(vm_dir: Path) -> None:
    target = Target(greeting=b"z" * (WINDOW + 100_000))
    h, guest = mediated(vm_dir, target.port)
    try:
        guest.send(encode_json(MED, FrameType.MED_OPEN, {"port": 9000}))
        guest.expect(FrameType.MED_OPENED)
        received = 0
        while received < WINDOW:
            frame = guest.expect(FrameType.DATA)
            assert frame.channel == MED and frame.payload
            received += len(frame.payload)
        assert received == WINDOW
        assert guest.silent()  # the window is used up: the link stops reading the target
        guest.send(window(MED, 100_000))
        rest = 0
        while rest < 100_000:
            rest += len(guest.expect(FrameType.DATA).payload)
        assert rest == 100_000
    finally:
        h.link.stop()


def test_mediation_without_a_target_or_unreachable(vm_dir: Path) -> None:
    h = Harness(vm_dir)
    try:
        guest = h.vmm.guest()
        assert h.link.wait_ready(TIMEOUT)
        guest.send(encode_json(MED, FrameType.MED_OPEN, {"port": 9000}))
        assert guest.expect(FrameType.CLOSE).json() == {
            "error": "no mediation target is configured"
        }
    finally:
        h.link.stop()
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    (vm_dir / "agent.sock").unlink()
    h, guest = mediated(vm_dir, port)
    try:
        guest.send(encode_json(MED, FrameType.MED_OPEN, {"port": 9000}))
        error = guest.expect(FrameType.CLOSE).json()["error"]
        assert error == "cannot reach the mediation target: Connection refused"
    finally:
        h.link.stop()


def test_guest_close_ends_the_mediated_connection(vm_dir: Path) -> None:
    target = Target()
    h, guest = mediated(vm_dir, target.port)
    try:
        guest.send(encode_json(MED, FrameType.MED_OPEN, {"port": 9000}))
        guest.expect(FrameType.MED_OPENED)
        guest.send(encode(MED, FrameType.CLOSE))
        assert target.eof.wait(TIMEOUT)
        assert guest.silent()
    finally:
        h.link.stop()
