"""A hostile guest agent against the host's agent link (``runtime/agentlink.py``).

The guest is root in its VM and speaks to the supervisor's link over a virtio-serial port; the
test plays the VMM's socket and a guest that ignores the rules: it opens and closes held
mediation connections in a loop, never reads its port while it floods requests, repeats
HELLO with oversized and escape-laden fields, and reuses channel ids. Each time the host must
stay bounded (memory, notifications, slots) and keep serving exec.
"""

from __future__ import annotations

import select
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.runtime.agentlink import (
    CLIENT_CHANNEL,
    HELLO_FIELD_MAX,
    HOLD_MAX,
    AgentLink,
    MediationTarget,
)
from microagent.runtime.agentproto import (
    GUEST_CHANNEL_BASE,
    ExecRequest,
    FrameType,
    encode,
    encode_json,
)
from testenv.framepeer import FramePeer, VmmSocket, exec_client

TIMEOUT = 10.0
MED = GUEST_CHANNEL_BASE + 100
GUEST_PORT = 2048
HELLO = encode_json(0, FrameType.HELLO, {"protocol": 1, "agent": "hostile", "version": "1"})


class Guest:
    """The VMM's agent socket and the link that connects to it (held mediation target)."""

    def __init__(self, vm_dir: Path) -> None:
        self.vmm = VmmSocket(vm_dir / "agent.sock", TIMEOUT)
        self.ready: list[str] = []
        self.held: list[int] = []
        self.link = AgentLink(
            vm_dir / "agent.sock",
            vm_dir / "exec.sock",
            mediation=MediationTarget("127.0.0.1", 9, GUEST_PORT, hold=True),
            on_ready=lambda hello: self.ready.append(hello.agent),
            on_held=self.held.append,
        ).start()

    def accept(self) -> FramePeer:
        return self.vmm.accept()

    def exec_works(self, guest: FramePeer) -> None:
        """An exec client still reaches the guest and gets its output back."""
        client = exec_client(self.link.exec_socket, TIMEOUT)
        client.send(encode_json(CLIENT_CHANNEL, FrameType.EXEC, ExecRequest(("x",)).to_json()))
        channel = guest.expect(FrameType.EXEC).channel
        guest.send(encode(channel, FrameType.STDOUT, b"still here"))
        assert client.expect(FrameType.STDOUT).payload == b"still here"
        client.sock.close()


@pytest.fixture
def host() -> Iterator[Guest]:
    with tempfile.TemporaryDirectory(prefix="ma-hostile-") as path:  # short unix socket paths
        made = Guest(Path(path))
        try:
            yield made
        finally:
            made.link.stop()


def med_open(channel: int, port: int = GUEST_PORT) -> bytes:
    return encode_json(channel, FrameType.MED_OPEN, {"port": port})


def test_a_guest_opening_and_closing_held_connections_in_a_loop_stays_bounded(
    host: Guest,
) -> None:
    """2000 opens and closes: every one answered and counted, the supervisor told of the
    first HOLD_MAX only (no event per open), every slot given back."""
    guest = host.accept()
    guest.send(HELLO)
    loops = 2000
    burst = b"".join(med_open(MED) + encode(MED, FrameType.CLOSE) for _ in range(loops))
    guest.send(burst)
    for _ in range(loops):
        assert guest.expect(FrameType.MED_OPENED).channel == MED
    channels = [MED + 1 + i for i in range(HOLD_MAX)]
    guest.send(b"".join(med_open(c) for c in channels))
    assert [guest.expect(FrameType.MED_OPENED).channel for _ in channels] == channels
    host.exec_works(guest)
    assert host.held == [GUEST_PORT] * HOLD_MAX
    assert (host.link.held.connections, host.link.held.refused) == (loops + HOLD_MAX, 0)


def test_a_reused_or_unknown_channel_gets_nothing(host: Guest) -> None:
    """MED_OPEN again on a held channel, frames on channels never opened (mediation and
    exec): no second MED_OPENED, no reply, nothing counted."""
    guest = host.accept()
    guest.send(HELLO)
    guest.send(med_open(MED))
    assert guest.expect(FrameType.MED_OPENED).channel == MED
    guest.send(med_open(MED))
    guest.send(encode(MED + 7, FrameType.DATA, b"never opened"))
    guest.send(encode(MED + 7, FrameType.WINDOW, (1 << 31).to_bytes(4, "big")))
    guest.send(encode(MED + 8, FrameType.CLOSE))
    guest.send(encode_json(12345, FrameType.EXIT, {"exitCode": 0}))  # no such exec
    guest.send(encode(12345, FrameType.STDOUT, b"to nobody"))
    assert guest.silent()
    assert (host.link.held.connections, host.link.held.bytes) == (1, 0)
    host.exec_works(guest)


def test_hello_floods_make_the_link_ready_once_with_bounded_printable_fields(
    host: Guest,
) -> None:
    guest = host.accept()
    loud = {"protocol": 1, "agent": "\x1b]0;owned\x07" + "A" * 60_000, "version": "\x1b[2J"}
    guest.send(encode_json(0, FrameType.HELLO, loud) * 200)
    guest.send(HELLO)
    host.exec_works(guest)
    assert host.link.hello is not None
    assert host.link.hello.agent == "hostile" and host.link.hello.version == "1"
    assert len(host.ready) == 1, "ready is news once"
    first = host.ready[0]
    assert len(first) == HELLO_FIELD_MAX and first.isprintable() and "\x1b" not in first


def _send_until_stalled(sock: socket.socket, data: bytes, stall: float, cap: int) -> int:
    """Send ``data`` (repeated) without reading until the peer takes nothing for ``stall``
    seconds or ``cap`` bytes went; the number of bytes sent."""
    sent, pos = 0, 0
    sock.setblocking(False)
    try:
        while sent < cap:
            _, writable, _ = select.select([], [sock], [], stall)
            if not writable:
                return sent
            try:
                count = sock.send(data[pos:])
            except BlockingIOError:
                continue
            sent += count
            pos = (pos + count) % len(data)
        return sent
    finally:
        sock.setblocking(True)
        sock.settimeout(TIMEOUT)


def test_a_guest_that_never_reads_its_port_is_no_longer_read(host: Guest) -> None:
    """Each refused MED_OPEN costs the host a CLOSE with an error, about four times its
    size. A guest that sends them without reading its answers must find the host stop
    reading it once a bounded backlog waits (4 MiB), not the host buffering without end;
    once it reads again everything is answered and exec still works."""
    guest = host.accept()
    guest.send(HELLO)
    host.exec_works(guest)
    guest.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    refused = med_open(MED, port=GUEST_PORT + 1)  # no route: a CLOSE with an error each
    batch = refused * 4096
    cap = 16 << 20
    sent = _send_until_stalled(guest.sock, batch, stall=2.0, cap=cap)
    assert sent < cap, "the host kept reading a guest that reads nothing"
    whole, part = divmod(sent, len(refused))
    answered = 0
    deadline = time.monotonic() + 60
    while answered < whole:
        assert time.monotonic() < deadline
        frame = guest.next()
        if frame.channel != MED:
            continue  # the CLOSE of the exec client that went away before
        assert frame.type is FrameType.CLOSE and "has no service channel" in frame.json()["error"]
        answered += 1
    guest.send(refused[part:] if part else b"")
    if part:
        assert guest.expect(FrameType.CLOSE).channel == MED
    host.exec_works(guest)
