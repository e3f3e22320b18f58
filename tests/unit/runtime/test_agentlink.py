"""The supervisor's agent link against a scripted guest: the test plays the VMM's agent socket
and the guest agent frame by frame, so every channel id the link picks and every frame it
relays is visible (exec clients are raw sockets speaking the protocol too). Last, service
channels end to end: a guest program's connection through the real guest agent (run on the
host by the fake backend) and the link to host unix-socket services."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.errors import InvalidInputError, ToolError
from microagent.kit import agentbin, debian
from microagent.kit.guestkit import GuestKit
from microagent.runtime.agentlink import (
    CLIENT_CHANNEL,
    HOLD_BYTES_MAX,
    HOLD_MAX,
    RESYNC_PREAMBLE,
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
    FrameType,
    encode,
    encode_json,
    window,
)
from microagent.runtime.backend import ServiceChannel
from microagent.runtime.boot import RunRequest, prepare
from microagent.runtime.fake import FakeBackend, FakeOutcome
from microagent.store.content import Store
from testenv.framepeer import FramePeer, VmmSocket, exec_client
from testenv.ports import free_ports
from testenv.prereq import tool_missing

TIMEOUT = 5.0
HELLO = encode_json(0, FrameType.HELLO, {"protocol": 1, "agent": "scripted", "version": "1"})


class Vmm(VmmSocket):
    """The VMM's side of the agent port, answering as the scripted guest."""

    def guest(self, *, hello: bool = True) -> FramePeer:
        """Accept the link's connection; read its HELLO and (by default) answer it."""
        return self.accept(HELLO if hello else None)


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

    def client(self) -> FramePeer:
        return exec_client(self.link.exec_socket)

    def exec(self, guest: FramePeer, *argv: str) -> tuple[FramePeer, int]:
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


def test_a_restored_guest_gets_the_resync_preamble_before_the_first_hello_only(
    vm_dir: Path,
) -> None:
    h = Harness(vm_dir, restored=True)
    try:
        conn, _ = h.vmm.listener.accept()
        conn.settimeout(TIMEOUT)
        first = b""
        while len(first) < len(RESYNC_PREAMBLE):
            chunk = conn.recv(len(RESYNC_PREAMBLE) - len(first))
            assert chunk, "the link closed before its preamble"
            first += chunk
        assert first == RESYNC_PREAMBLE
        guest = FramePeer(conn)
        assert guest.expect(FrameType.HELLO).json() == {"protocol": 1}
        guest.send(HELLO)
        assert h.link.wait_ready(TIMEOUT)
        conn.close()  # the guest side goes away; the link connects again: no preamble now
        wait_for(lambda: "lost" in " ".join(h.readiness))
        again = h.vmm.guest()  # asserts that the first bytes are a HELLO frame
        assert h.link.wait_ready(TIMEOUT) and again.silent()
    finally:
        h.link.stop()


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


def mediated(vm_dir: Path, port: int) -> tuple[Harness, FramePeer]:
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
        # Done both ways, but the CLOSE waits until the guest wrote out the echo: a CLOSE
        # first could make the agent drop data it has not written to its connection yet.
        assert guest.silent()
        guest.send(window(MED, 5))
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


READY_LINE = b'{"signal":"ready"}\n'


def test_a_held_target_is_a_silent_bounded_peer_that_contacts_nothing(vm_dir: Path) -> None:
    """A warm template's boot: the link answers MED_OPENED itself and says nothing more;
    the target (a live listener here, so a contact would show) is never connected to."""
    target = socket.create_server(("127.0.0.1", 0))
    target.settimeout(0.3)
    held_ports: list[int] = []
    mediation = MediationTarget("127.0.0.1", target.getsockname()[1], 2048, hold=True)
    h = Harness(vm_dir, mediation=mediation, on_held=held_ports.append)
    try:
        guest = h.vmm.guest()
        assert h.link.wait_ready(TIMEOUT)
        channels = [MED + i for i in range(HOLD_MAX + 1)]
        for channel in channels:
            guest.send(encode_json(channel, FrameType.MED_OPEN, {"port": 2048}))
        for channel in channels[:HOLD_MAX]:
            assert guest.expect(FrameType.MED_OPENED).channel == channel
        over = guest.expect(FrameType.CLOSE)
        assert over.channel == channels[-1] and "at most" in over.json()["error"]
        guest.send(encode(MED, FrameType.DATA, READY_LINE))
        assert guest.silent()  # no WINDOW, no DATA: nothing was forwarded anywhere
        with pytest.raises(TimeoutError):
            target.accept()
        guest.send(encode(MED + 1, FrameType.DATA, b"x" * MAX_PAYLOAD))
        guest.send(encode(MED + 1, FrameType.DATA, b"x" * (HOLD_BYTES_MAX - MAX_PAYLOAD + 1)))
        cut = guest.expect(FrameType.CLOSE)
        assert cut.channel == MED + 1 and str(HOLD_BYTES_MAX) in cut.json()["error"]
        guest.send(encode(MED + 2, FrameType.DATA))  # the guest's end of data: a clean end
        assert guest.expect(FrameType.CLOSE) == Frame(MED + 2, FrameType.CLOSE)
        guest.send(encode_json(MED + 9, FrameType.MED_OPEN, {"port": 2048}))  # room again
        assert guest.expect(FrameType.MED_OPENED).channel == MED + 9
    finally:
        h.link.stop()
        target.close()
    assert held_ports == [2048] * HOLD_MAX  # told of the first ones; all are counted
    assert (h.link.held.connections, h.link.held.refused) == (HOLD_MAX + 1, 2)
    assert h.link.held.bytes == len(READY_LINE) + HOLD_BYTES_MAX + 1


# -- service channels --------------------------------------------------------------------------


class UnixService:
    """A host service on a unix socket: each connection gets ``greeting`` and then, once the
    guest side ended its data, ``name:`` and what it sent; then the service closes."""

    def __init__(self, path: Path, name: str, greeting: bytes = b"", backlog: int = 16) -> None:
        self.path, self.name, self.greeting = path, name, greeting
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(backlog)
        self.received: list[bytes] = []

    def serve(self) -> UnixService:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the link may close it first
            conn.sendall(self.greeting)
            data = bytearray()
            while chunk := conn.recv(1 << 16):
                data += chunk
            self.received.append(bytes(data))
            conn.sendall(self.name.encode() + b":" + data)

    def close(self) -> None:
        self.server.close()


def frames_by_channel(guest: FramePeer, count: int) -> dict[int, list[Frame]]:
    got: dict[int, list[Frame]] = {}
    for _ in range(count):
        frame = guest.next()
        got.setdefault(frame.channel, []).append(frame)
    return got


def drain_reply(guest: FramePeer, channel: int) -> bytes:
    """DATA of ``channel`` up to its empty DATA (other frames of it skipped)."""
    data = bytearray()
    while True:
        frame = guest.next()
        if frame.channel != channel or frame.type is not FrameType.DATA:
            continue
        if not frame.payload:
            return bytes(data)
        data += frame.payload


def test_the_port_picks_the_service_socket_or_the_mediation_target(vm_dir: Path) -> None:
    alpha = UnixService(vm_dir / "a.sock", "alpha").serve()
    beta = UnixService(vm_dir / "b.sock", "beta").serve()
    tcp = Target()
    services = [
        ServiceChannel(7001, alpha.path, "alpha"),
        ServiceChannel(7002, beta.path, "beta"),
    ]
    mediation = MediationTarget("127.0.0.1", tcp.port, guest_port=7000)
    h = Harness(vm_dir, mediation=mediation, services=services)
    try:
        guest = h.vmm.guest()
        assert h.link.wait_ready(TIMEOUT)
        for i, port in enumerate((7001, 7002, 7000, 7003)):
            guest.send(encode_json(MED + i, FrameType.MED_OPEN, {"port": port}))
        got = frames_by_channel(guest, 4)
        assert got[MED + 3] == [
            Frame(
                MED + 3,
                FrameType.CLOSE,
                b'{"error":"guest port 7003 has no service channel or mediation target"}',
            )
        ]
        assert {ch: [f.type for f in fs] for ch, fs in got.items() if ch != MED + 3} == {
            MED: [FrameType.MED_OPENED],
            MED + 1: [FrameType.MED_OPENED],
            MED + 2: [FrameType.MED_OPENED],
        }
        for channel, name in ((MED, b"alpha"), (MED + 1, b"beta")):
            text = b"to " + name
            guest.send(encode(channel, FrameType.DATA, text) + encode(channel, FrameType.DATA))
            assert drain_reply(guest, channel) == name + b":" + text
        assert (alpha.received, beta.received) == ([b"to alpha"], [b"to beta"])
        guest.send(encode(MED + 2, FrameType.DATA, b"to tcp"))
        while (frame := guest.next()).type is not FrameType.DATA:
            pass
        assert frame == Frame(MED + 2, FrameType.DATA, b"to tcp")  # the TCP echo
    finally:
        h.link.stop()
        alpha.close()
        beta.close()


def test_a_mediation_target_without_a_guest_port_takes_the_other_ports(vm_dir: Path) -> None:
    alpha = UnixService(vm_dir / "a.sock", "alpha", greeting=b"hi").serve()
    tcp = Target(greeting=b"tcp")
    services = [ServiceChannel(7001, alpha.path, "alpha")]
    h = Harness(vm_dir, mediation=MediationTarget("127.0.0.1", tcp.port), services=services)
    try:
        guest = h.vmm.guest()
        assert h.link.wait_ready(TIMEOUT)
        guest.send(encode_json(MED, FrameType.MED_OPEN, {"port": 7001}))
        assert guest.expect(FrameType.MED_OPENED).channel == MED
        assert guest.expect(FrameType.DATA) == Frame(MED, FrameType.DATA, b"hi")
        guest.send(encode_json(MED + 1, FrameType.MED_OPEN, {"port": 9999}))
        assert guest.expect(FrameType.MED_OPENED).channel == MED + 1
        assert guest.expect(FrameType.DATA) == Frame(MED + 1, FrameType.DATA, b"tcp")
    finally:
        h.link.stop()
        alpha.close()


def test_unknown_ports_and_missing_services_are_refused(vm_dir: Path) -> None:
    services = [ServiceChannel(7001, vm_dir / "nobody.sock", "broker:gone")]
    h = Harness(vm_dir, services=services)
    try:
        guest = h.vmm.guest()
        assert h.link.wait_ready(TIMEOUT)
        cases: list[tuple[dict[str, object], str]] = [
            ({"port": 7001}, "cannot reach the service 'broker:gone': No such file or directory"),
            ({"port": 7002}, "guest port 7002 has no service channel or mediation target"),
            ({"port": "7001"}, "MED_OPEN names no guest port"),
            ({}, "MED_OPEN names no guest port"),
        ]
        for i, (payload, why) in enumerate(cases):
            guest.send(encode_json(MED + i, FrameType.MED_OPEN, payload))
            assert guest.expect(FrameType.CLOSE) == Frame(
                MED + i, FrameType.CLOSE, f'{{"error":"{why}"}}'.encode()
            )
        guest.send(encode(MED + 9, FrameType.MED_OPEN, b"not json"))
        assert guest.expect(FrameType.CLOSE).json() == {"error": "MED_OPEN names no guest port"}
    finally:
        h.link.stop()


def test_a_service_with_a_full_backlog_is_tried_again(vm_dir: Path) -> None:
    service = UnixService(vm_dir / "busy.sock", "busy", greeting=b"at last", backlog=0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(str(service.path))  # the one connection a backlog of 0 holds
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    assert probe.connect_ex(str(service.path)) == errno.EAGAIN  # full: what the link sees
    probe.close()
    h = Harness(vm_dir, services=[ServiceChannel(7001, service.path, "busy")])
    try:
        guest = h.vmm.guest()
        assert h.link.wait_ready(TIMEOUT)
        guest.send(encode_json(MED, FrameType.MED_OPEN, {"port": 7001}))
        assert guest.silent(0.5)  # neither opened nor refused while the backlog is full
        service.serve()  # accepts the filler, which makes room
        assert guest.expect(FrameType.MED_OPENED).channel == MED
        assert guest.expect(FrameType.DATA) == Frame(MED, FrameType.DATA, b"at last")
    finally:
        h.link.stop()
        filler.close()
        service.close()


def test_colliding_guest_ports_are_refused(vm_dir: Path) -> None:
    one = ServiceChannel(7001, vm_dir / "a.sock", "a")
    with pytest.raises(InvalidInputError, match="guest port 7001 has two service channels"):
        AgentLink(vm_dir / "agent.sock", vm_dir / "exec.sock", services=[one, one])
    with pytest.raises(InvalidInputError, match="guest port 7001 is a service channel's"):
        AgentLink(
            vm_dir / "agent.sock",
            vm_dir / "exec.sock",
            mediation=MediationTarget("127.0.0.1", 80, guest_port=7001),
            services=[one],
        )


# -- service channels through the real guest agent ------------------------------------------------


@pytest.fixture(scope="module")
def real_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real guest agent, built through the kit's own build path (a throwaway store)."""
    try:
        agentbin.find_compiler(debian.debian_arch())
    except ToolError as exc:
        tool_missing("no C compiler to build the guest agent", exc)
    return agentbin.agent_binary(Store(tmp_path_factory.mktemp("agent-store")))


def guest_connect(port: int) -> socket.socket:
    """A "guest program" connecting to the agent's loopback port (the agent runs on the host)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.02)


def read_to_end(conn: socket.socket) -> bytes:
    data = bytearray()
    while chunk := conn.recv(1 << 16):
        data += chunk
    return bytes(data)


def test_guest_connections_reach_host_services_through_the_real_agent(
    vm_dir: Path, real_agent: Path
) -> None:
    """A boot's service channels, as the fake backend runs it: ``--listen`` for each (and one
    port more, which the host does not know), the real agent, the link, two unix sockets."""
    (vm_dir / "k").write_bytes(b"k")
    (vm_dir / "i").write_bytes(b"i")
    (vm_dir / "root.ext4").write_bytes(b"\0" * 4096)
    echo = UnixService(vm_dir / "echo.sock", "echo").serve()
    greeter = UnixService(vm_dir / "greet.sock", "greeter", greeting=b"hello, guest\n").serve()
    echo_port, greet_port, stray_port = free_ports(3)
    services = (
        ServiceChannel(echo_port, echo.path, "echo"),
        ServiceChannel(greet_port, greeter.path, "greeter"),
    )
    agent = (str(real_agent), "--root", "/", "--listen", str(stray_port))
    backend = FakeBackend(lambda _run: FakeOutcome(hang=True, agent=agent))
    request = RunRequest(rootfs=vm_dir / "root.ext4", command=("true",), services=services)
    (vm_dir / "vm").mkdir()
    config = prepare(request, GuestKit(vm_dir / "k", vm_dir / "i", key="k"), vm_dir / "vm")
    assert config.services == services
    with backend.boot(config):
        link = AgentLink(
            config.agent_socket, vm_dir / "exec.sock", services=config.services
        ).start()
        try:
            assert link.wait_ready(15), (config.state_dir / "agent.log").read_text()
            payload = os.urandom(700_000)  # more than a window each way
            with guest_connect(echo_port) as conn:
                conn.sendall(payload)  # the service reads it all before it answers
                conn.shutdown(socket.SHUT_WR)  # the guest half-closes; the reply still comes
                assert read_to_end(conn) == b"echo:" + payload
            assert echo.received == [payload]
            with guest_connect(greet_port) as conn:
                assert conn.recv(100) == b"hello, guest\n"
                conn.sendall(b"thanks")
                conn.shutdown(socket.SHUT_WR)
                assert read_to_end(conn) == b"greeter:thanks"
            # the host refuses the port: a reset, not a clean end (under load it can come
            # before the connect has returned)
            with pytest.raises(ConnectionResetError), guest_connect(stray_port) as conn:
                read_to_end(conn)
            assert (echo.received, greeter.received) == ([payload], [b"thanks"])
        finally:
            link.stop()
    echo.close()
    greeter.close()
