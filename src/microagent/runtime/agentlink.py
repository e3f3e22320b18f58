"""The supervisor's side of the guest agent (``ma-agent/1``): one thread relays every exec.

The VMM serves the guest agent's virtio-serial port as a unix socket (``agent.sock`` in the VM
directory). :class:`AgentLink` connects to it (retrying until it appears, and again after the
guest side goes away), says HELLO, and counts the agent ready once the guest's HELLO arrives
(``on_ready``). It serves ``exec.sock`` (mode 0600, beside ``agent.sock``) for clients: each
connection is one exec. A client speaks the same frames on channel :data:`CLIENT_CHANNEL`,
EXEC first; the link gives the exec a fresh guest channel and rewrites the ids both ways. Every
frame is relayed as it is, WINDOW frames included, so flow control is end to end and the link
never holds more than about a window per channel. A client that goes away closes its channel
(CLOSE to the guest, whose agent kills the command); EXIT or CLOSE from the guest is passed on
and ends the client's connection.

Mediation and service channels: a guest program's connection to one of the agent's loopback
ports arrives as MED_OPEN ``{"port": N}`` on a guest channel. The port picks the target: a
service channel's unix socket (a credential broker, the egress proxy), or the mediation
target's host TCP address; a port that is neither gets CLOSE with an error. The link connects
to the target without blocking (bounded by :data:`MEDIATION_CONNECT_TIMEOUT`; a unix socket
whose backlog is full is tried again until then) and answers MED_OPENED, else CLOSE with an
error. DATA flows both ways under the window: the link sends WINDOW after writing to the
target and reads the target only while the guest's window has room; an empty DATA is a
half-close. Once both ways ended, the link sends CLOSE when the guest has acknowledged all the
target's data (its whole window is back), so the agent never drops the end of a reply.

A held mediation target (``MediationTarget.hold``: a warm template's boot, which must not
reach the real target) is the host itself, a silent peer: MED_OPEN gets MED_OPENED at once and
nothing else, no socket is made, the guest's DATA is counted and dropped, and no WINDOW goes
back. At most :data:`HOLD_MAX` connections are held at once (more get CLOSE with an error) and
each may send :data:`HOLD_BYTES_MAX` bytes (more is cut off); an empty DATA (the guest's
end of data) or CLOSE ends one. ``on_held`` is told of the first HOLD_MAX (a guest that
opens in a loop makes no more noise); :attr:`AgentLink.held` counts them all.

Everything from the guest and from clients is bounded: frames by :class:`FrameReader`, the
number of clients and of mediated connections, and every buffer (a peer that lets one grow
past :data:`PEER_BUFFER_MAX` has broken the window and is cut off). All sockets belong to the
one link thread; other threads talk to it only through :meth:`AgentLink.stop` and the exec
socket (:meth:`AgentLink.run` is a client like any other).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microagent.errors import InvalidInputError, VMError
from microagent.runtime.agentproto import (
    GUEST_CHANNEL_BASE,
    HEADER,
    MAX_PAYLOAD,
    PROTOCOL,
    WINDOW,
    ExecRequest,
    Frame,
    FrameReader,
    FrameType,
    encode,
    encode_json,
    window,
)
from microagent.runtime.backend import ServiceChannel
from microagent.runtime.execclient import ExecResult, collect

EXEC_SOCKET = "exec.sock"  # in the VM directory, beside the VMM's agent.sock
CLIENT_CHANNEL = 1  # the one channel a client of exec.sock speaks on
MAX_CLIENTS = 64  # exec connections at once
MAX_MEDIATIONS = 64  # mediated guest connections at once
RECONNECT_DELAY = 0.1  # between attempts to reach the VMM's agent socket
MEDIATION_CONNECT_TIMEOUT = 10.0
CONNECT_RETRY = 0.05  # a unix socket whose backlog is full is tried again after this long
READ_SIZE = MAX_PAYLOAD
GUEST_BUFFER_HIGH = 1 << 20  # clients and targets are not read while this much waits
GUEST_BUFFER_MAX = 4 << 20  # ... and the guest is not read either (its replies would pile up)
PEER_BUFFER_MAX = WINDOW + 4 * MAX_PAYLOAD  # a window plus control frames; more breaks the rules
# Sent before the HELLO to a restored guest. A snapshot can catch the guest agent with part of
# the previous host's frame read (a frame crosses virtio buffers); the restored agent never
# notices the new host (its port stayed open), so it would read the new HELLO as the rest of
# that frame and wait for bytes that never come. These bytes complete any partial frame (at
# most a header and MAX_PAYLOAD), and as a header they are malformed (length > MAX_PAYLOAD,
# unknown type), so the agent drops input until the HELLO that follows and answers it.
RESYNC_PREAMBLE = b"\xff" * (HEADER.size + MAX_PAYLOAD)
HELLO_FIELD_MAX = 64  # agent name and version kept from the guest's HELLO
HOLD_MAX = 4  # held mediation connections at once (a serve-mode agent keeps one)
HOLD_BYTES_MAX = 64 << 10  # bytes a held connection may send (counted, dropped)

# Frames a client may send after its EXEC (passed on to the guest with the channel rewritten).
_CLIENT_TYPES = frozenset(
    {FrameType.STDIN, FrameType.RESIZE, FrameType.SIGNAL, FrameType.WINDOW, FrameType.CLOSE}
)
# Frames the guest sends on an exec channel (passed on to its client).
_EXEC_TYPES = frozenset({FrameType.STARTED, FrameType.STDOUT, FrameType.STDERR, FrameType.WINDOW})
_END_TYPES = frozenset({FrameType.EXIT, FrameType.CLOSE})


def exec_socket_path(vm_dir: Path) -> Path:
    return vm_dir / EXEC_SOCKET


@dataclass(frozen=True)
class AgentHello:
    """What the guest's HELLO said (bounded, printable)."""

    agent: str
    version: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AgentHello:
        return cls(_printable(data.get("agent")), _printable(data.get("version")))


def _printable(value: object) -> str:
    text = value if isinstance(value, str) else ""
    return "".join(c if c.isprintable() else "?" for c in text[:HELLO_FIELD_MAX])


@dataclass(frozen=True)
class MediationTarget:
    """Where mediated guest connections go: a host address and port (an IP address, or a
    name resolved once when the link is made). ``guest_port``: the guest port whose
    connections go there (None: every port that is not a service channel's)."""

    host: str
    port: int
    guest_port: int | None = None
    hold: bool = False  # the link holds the connections itself: the target is never contacted

    def address(self) -> tuple[int, tuple[Any, ...]]:
        """(address family, socket address); InvalidInputError if it does not resolve."""
        if not 0 < self.port < 65536:
            raise InvalidInputError(f"mediation target port {self.port} is not 1-65535")
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            try:
                infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise InvalidInputError(
                    f"mediation target {self.host!r} does not resolve: {exc}"
                ) from exc
            return infos[0][0], infos[0][4]
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return family, (str(ip), self.port)


@dataclass(eq=False)
class _Peer:
    """A socket the link writes to through a bounded buffer."""

    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)

    def flush(self) -> int:
        """Write what the socket takes now; the byte count (OSError when it is broken)."""
        if not self.out:
            return 0
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return 0
        del self.out[:sent]
        return sent


@dataclass(eq=False)
class _Client(_Peer):
    """One exec.sock connection: before its EXEC it has no guest channel."""

    reader: FrameReader = field(default_factory=FrameReader)
    channel: int | None = None  # the guest channel once EXEC went out
    ending: bool = False  # EXIT or CLOSE went out to it: close once flushed


@dataclass(frozen=True)
class _Route:
    """Where the connections of one guest port go: a socket address and what it is."""

    family: int
    address: Any
    what: str  # in errors: "the mediation target", "the service 'egress-proxy'"
    hold: bool = False  # the link is the peer: see HOLD_MAX


@dataclass
class HeldStats:
    """What a held mediation target took (written by the link's thread only)."""

    connections: int = 0  # held, in all
    bytes: int = 0  # the guest's DATA, counted and dropped
    refused: int = 0  # over HOLD_MAX at once, or over HOLD_BYTES_MAX


@dataclass(eq=False)
class _Mediation(_Peer):
    """A guest connection to a mediation or service port and its host-side target socket."""

    route: _Route = _Route(socket.AF_UNIX, "", "nowhere")
    channel: int = 0
    deadline: float = 0.0  # while connecting
    retry_at: float = 0.0  # a unix socket's full backlog: connect again then (0: not waiting)
    opened: bool = False
    credit: int = WINDOW  # DATA bytes the guest still accepts
    guest_done: bool = False  # the guest sent its empty DATA
    target_done: bool = False  # the target reached end of file
    shut: bool = False  # SHUT_WR went to the target


OnReady = Callable[[AgentHello], None]
OnLost = Callable[[str], None]
OnHeld = Callable[[int], None]  # a guest connection to this guest port is held


def _ignore(*_args: object) -> None:
    return None


class AgentLink:
    """The relay thread between exec clients, mediation targets and the guest agent."""

    def __init__(
        self,
        agent_socket: Path,
        exec_socket: Path,
        *,
        mediation: MediationTarget | None = None,
        services: Sequence[ServiceChannel] = (),
        on_ready: OnReady = _ignore,
        on_lost: OnLost = _ignore,
        on_held: OnHeld = _ignore,
        max_clients: int = MAX_CLIENTS,
        restored: bool = False,
    ) -> None:
        self.agent_socket = agent_socket
        self._restored = restored  # the first connection is to a restored guest: resync it
        self.exec_socket = exec_socket
        self.max_clients = max_clients
        self._routes, self._default_route = _routes(mediation, services)
        self._on_ready, self._on_lost, self._on_held = on_ready, on_lost, on_held
        self._sel = selectors.DefaultSelector()
        self._interest: dict[socket.socket, int] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener: socket.socket | None = None
        self._guest: _Peer | None = None
        self._guest_reader = FrameReader()
        self._next_attempt = 0.0
        self._clients: dict[socket.socket, _Client] = {}
        self._execs: dict[int, _Client] = {}  # guest channel -> client
        self._meds: dict[int, _Mediation] = {}  # guest channel -> mediation
        self._by_target: dict[socket.socket, _Mediation] = {}
        self._held: dict[int, int] = {}  # guest channel -> bytes taken (a held target)
        self.held = HeldStats()
        self._next_channel = 1
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self.connected = threading.Event()  # the VMM's agent socket took a connection (once)
        self.hello: AgentHello | None = None
        self._thread = threading.Thread(target=self._main, name="agent-link", daemon=True)

    # -- the public side ---------------------------------------------------------------------

    def start(self) -> AgentLink:
        """Serve exec.sock and start the relay thread (VMError if the socket cannot be made)."""
        self._listener = _listen(self.exec_socket)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread: every client's exec is closed, exec.sock removed."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until the link has connected to the VMM's agent socket (its HELLO queued).
        A restore calls this between loading the state and running the guest: a host
        connected by then is the host the guest's port was saved with, so QEMU tells the guest
        of no change (connect after the guest runs, and the guest sees its host leave and come
        back, which ends the channels opened meanwhile)."""
        return self.connected.wait(timeout)

    def run(
        self, request: ExecRequest, timeout: float | None = None, *, stdin: bytes | None = None
    ) -> ExecResult:
        """Run one command in the guest and collect its output (a client of exec.sock, so
        call it from any thread but the link's). ``timeout`` bounds the command in the guest
        (``timeoutMs``) and, with a grace period, the wait here; VMError if the link cannot
        run it (the agent is not ready, the VM went away)."""
        if timeout is not None and request.timeout_ms is None:
            request = dataclasses.replace(request, timeout_ms=max(1, round(timeout * 1000)))
        return collect(self.exec_socket, request, stdin=stdin, timeout=timeout)

    # -- the loop ----------------------------------------------------------------------------

    def _main(self) -> None:
        assert self._listener is not None
        self._watch(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                self._step()
        except Exception as exc:  # a bug here must end exec cleanly, not leave clients hanging
            self._notify(self._on_lost, f"the agent link failed: {exc!r}")
        finally:
            self._shutdown()

    @staticmethod
    def _notify(callback: Callable[[Any], None], value: object) -> None:
        """Call ``on_ready``/``on_lost``; their failure (a runtime.json write) is theirs."""
        with contextlib.suppress(Exception):
            callback(value)

    def _step(self) -> None:
        if self._guest is None:
            self._connect_guest()
        self._update_interest()
        for key, mask in self._sel.select(self._timeout()):
            sock = key.fileobj
            if self._stopping.is_set():
                return
            if not isinstance(sock, socket.socket) or sock not in self._interest:
                continue  # closed by an earlier handler of this round
            handler: Callable[[socket.socket, int], None] = key.data
            handler(sock, mask)
        self._expire_connects()

    def _timeout(self) -> float:
        now = time.monotonic()
        connecting = [m for m in self._meds.values() if not m.opened]
        waits = [(m.retry_at or m.deadline) - now for m in connecting]
        if self._guest is None:
            waits.append(self._next_attempt - now)
        return max(0.0, min(waits, default=1.0))

    def _watch(self, sock: socket.socket, events: int) -> None:
        """Register, change or drop (``events`` 0) what the selector waits for on ``sock``."""
        current = self._interest.get(sock, 0)
        if events == current:
            return
        if not events:
            self._sel.unregister(sock)
            del self._interest[sock]
        elif not current:
            self._sel.register(sock, events, self._handler_for(sock))
            self._interest[sock] = events
        else:
            self._sel.modify(sock, events, self._handler_for(sock))
            self._interest[sock] = events

    def _handler_for(self, sock: socket.socket) -> Callable[[socket.socket, int], None]:
        if sock is self._wake_r:
            return self._on_wake
        if sock is self._listener:
            return self._on_accept
        if self._guest is not None and sock is self._guest.sock:
            return self._on_guest
        if sock in self._clients:
            return self._on_client
        return self._on_target

    def _update_interest(self) -> None:
        guest = self._guest
        backlog = len(guest.out) if guest else 0
        room = backlog < GUEST_BUFFER_HIGH  # (without a guest, EXEC is refused at once)
        if self._listener is not None:
            full = len(self._clients) >= self.max_clients
            self._watch(self._listener, 0 if full else selectors.EVENT_READ)
        if guest is not None:
            read = selectors.EVENT_READ if backlog < GUEST_BUFFER_MAX else 0
            self._watch(guest.sock, read | (selectors.EVENT_WRITE if guest.out else 0))
        for client in self._clients.values():
            read = selectors.EVENT_READ if room and not client.ending else 0
            self._watch(client.sock, read | (selectors.EVENT_WRITE if client.out else 0))
        for med in self._meds.values():
            self._watch(med.sock, self._target_events(med, room))

    def _target_events(self, med: _Mediation, room: bool) -> int:
        if not med.opened:  # the connect finishes (or waits for its next try)
            return 0 if med.retry_at else selectors.EVENT_WRITE
        readable = room and med.credit > 0 and not med.target_done
        writable = bool(med.out) or (med.guest_done and not med.shut)
        return (selectors.EVENT_READ if readable else 0) | (
            selectors.EVENT_WRITE if writable else 0
        )

    def _on_wake(self, sock: socket.socket, _mask: int) -> None:
        with contextlib.suppress(OSError):
            sock.recv(64)

    def _forget(self, sock: socket.socket) -> None:
        self._watch(sock, 0)
        with contextlib.suppress(OSError):
            sock.close()

    def _shutdown(self) -> None:
        for client in list(self._clients.values()):
            last = b"" if client.ending else _close_frame(CLIENT_CHANNEL, "the VM is stopping")
            _send_now(client.sock, bytes(client.out) + last)
            self._drop_client(client)
        for med in list(self._meds.values()):
            self._drop_mediation(med)
        self._held.clear()
        if self._guest is not None:
            self._forget(self._guest.sock)
            self._guest = None
        if self._listener is not None:
            self._forget(self._listener)
            with contextlib.suppress(OSError):
                self.exec_socket.unlink()
        self.ready.clear()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        self._sel.close()

    # -- the guest ---------------------------------------------------------------------------

    def _connect_guest(self) -> None:
        now = time.monotonic()
        if now < self._next_attempt:
            return
        self._next_attempt = now + RECONNECT_DELAY
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.agent_socket))
        except OSError:
            sock.close()
            return
        sock.setblocking(False)
        self._guest = _Peer(sock)
        self._guest_reader = FrameReader()
        if self._restored:  # see RESYNC_PREAMBLE
            self._restored = False
            self._to_guest(RESYNC_PREAMBLE)
        self._to_guest(encode_json(0, FrameType.HELLO, {"protocol": PROTOCOL}))
        self.connected.set()

    def _to_guest(self, data: bytes) -> None:
        if self._guest is not None:
            self._guest.out += data

    def _on_guest(self, sock: socket.socket, mask: int) -> None:
        guest = self._guest
        assert guest is not None
        try:
            if mask & selectors.EVENT_WRITE:
                guest.flush()
            if mask & selectors.EVENT_READ:
                self._read_guest(sock)
        except OSError as exc:
            self._lose_guest(f"the guest agent's port failed: {exc.strerror or exc}")

    def _read_guest(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            self._lose_guest("the guest agent's port closed")
            return
        try:
            frames = self._guest_reader.feed(data)
        except InvalidInputError as exc:
            self._lose_guest(exc.message)
            return
        for frame in frames:
            if self._guest is None:
                return
            self._from_guest(frame)

    def _lose_guest(self, why: str) -> None:
        """The guest side is gone (or broke the protocol): end every channel, then retry."""
        if self._guest is not None:
            self._forget(self._guest.sock)
            self._guest = None
        was_ready = self.ready.is_set()
        self.ready.clear()
        for client in list(self._execs.values()):
            self._end_client(client, _close_frame(CLIENT_CHANNEL, why))
        for med in list(self._meds.values()):
            self._drop_mediation(med)
        self._held.clear()
        if was_ready:
            self._notify(self._on_lost, why)

    def _from_guest(self, frame: Frame) -> None:
        if frame.channel == 0:
            if frame.type is FrameType.HELLO:
                self._hello(frame)
            return  # PONG, or nothing the host acts on
        if frame.channel >= GUEST_CHANNEL_BASE:
            self._mediation_frame(frame)
            return
        client = self._execs.get(frame.channel)
        if client is None:
            return  # a late frame for a channel that is already closed
        relayed = encode(CLIENT_CHANNEL, frame.type, frame.payload)
        if frame.type in _END_TYPES:
            self._end_client(client, relayed)
        elif frame.type in _EXEC_TYPES:
            self._to_client(client, relayed)

    def _hello(self, frame: Frame) -> None:
        try:
            data = frame.json()
        except InvalidInputError as exc:
            self._lose_guest(exc.message)
            return
        if data.get("protocol") != PROTOCOL:
            self._lose_guest(f"the guest agent speaks protocol {data.get('protocol')!r}")
            self._next_attempt = time.monotonic() + 5.0  # it will not change its mind soon
            return
        self.hello = AgentHello.from_json(data)
        if not self.ready.is_set():
            self.ready.set()
            self._notify(self._on_ready, self.hello)

    # -- clients -----------------------------------------------------------------------------

    def _on_accept(self, sock: socket.socket, _mask: int) -> None:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        if not _same_user(conn) or len(self._clients) >= self.max_clients:
            conn.close()
            return
        conn.setblocking(False)
        self._clients[conn] = _Client(conn)

    def _on_client(self, sock: socket.socket, mask: int) -> None:
        client = self._clients[sock]
        try:
            if mask & selectors.EVENT_WRITE:
                client.flush()
                if client.ending and not client.out:
                    self._drop_client(client)
                    return
            if mask & selectors.EVENT_READ:
                self._read_client(client)
        except OSError:
            self._client_gone(client)

    def _read_client(self, client: _Client) -> None:
        try:
            data = client.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            self._client_gone(client)
            return
        try:
            frames = client.reader.feed(data)
        except InvalidInputError as exc:
            self._refuse(client, exc.message)
            return
        for frame in frames:
            if client.ending or client.sock not in self._clients:
                return
            self._from_client(client, frame)

    def _from_client(self, client: _Client, frame: Frame) -> None:
        if frame.channel != CLIENT_CHANNEL:
            self._refuse(client, f"a client speaks on channel {CLIENT_CHANNEL} only")
        elif client.channel is None:
            self._open_exec(client, frame)
        elif frame.type in _CLIENT_TYPES:
            self._to_guest(encode(client.channel, frame.type, frame.payload))
            if frame.type is FrameType.CLOSE:
                self._execs.pop(client.channel, None)
                self._drop_client(client)
        else:
            self._refuse(client, f"a client may not send {frame.type.name} here")

    def _open_exec(self, client: _Client, frame: Frame) -> None:
        if frame.type is not FrameType.EXEC:
            self._refuse(client, "the first frame must be EXEC")
            return
        if not self.ready.is_set():
            self._refuse(client, "the guest agent is not ready")
            return
        channel = self._new_channel()
        client.channel = channel
        self._execs[channel] = client
        self._to_guest(encode(channel, FrameType.EXEC, frame.payload))

    def _new_channel(self) -> int:
        while True:
            channel = self._next_channel
            self._next_channel = channel + 1 if channel + 1 < GUEST_CHANNEL_BASE else 1
            if channel not in self._execs:
                return channel

    def _to_client(self, client: _Client, data: bytes) -> None:
        client.out += data
        if len(client.out) > PEER_BUFFER_MAX:  # not reading, or the guest ignores the window
            self._client_gone(client)

    def _end_client(self, client: _Client, last: bytes) -> None:
        """Send ``last`` (EXIT or CLOSE), then close the client once it is written."""
        if client.channel is not None:
            self._execs.pop(client.channel, None)
        client.out += last
        client.ending = True

    def _refuse(self, client: _Client, why: str) -> None:
        if client.channel is not None and self._execs.pop(client.channel, None) is not None:
            self._to_guest(_close_frame(client.channel, why))
        client.channel = None
        self._end_client(client, _close_frame(CLIENT_CHANNEL, why))

    def _client_gone(self, client: _Client) -> None:
        """The client went away (or cannot keep up): its command is closed in the guest."""
        if client.channel is not None and self._execs.pop(client.channel, None) is not None:
            self._to_guest(encode(client.channel, FrameType.CLOSE))
        self._drop_client(client)

    def _drop_client(self, client: _Client) -> None:
        self._clients.pop(client.sock, None)
        self._forget(client.sock)

    # -- mediation ---------------------------------------------------------------------------

    def _mediation_frame(self, frame: Frame) -> None:
        if frame.channel in self._held:
            self._held_frame(frame)
            return
        med = self._meds.get(frame.channel)
        if frame.type is FrameType.MED_OPEN:
            if med is None:
                self._open_mediation(frame)
            return
        if med is None:
            return  # late, or never opened
        if frame.type is FrameType.DATA:
            self._guest_data(med, frame.payload)
        elif frame.type is FrameType.WINDOW:
            med.credit = min(WINDOW, med.credit + _count(frame))
            self._maybe_finish(med)
        elif frame.type is FrameType.CLOSE:
            self._drop_mediation(med)

    def _open_mediation(self, frame: Frame) -> None:
        port = _med_port(frame)
        route = self._routes.get(port) if port is not None else None
        route = route or self._default_route
        if route is None:
            self._close_channel(frame.channel, self._no_route(port))
            return
        if route.hold:
            self._hold(frame.channel, port)
            return
        if len(self._meds) >= MAX_MEDIATIONS:
            self._close_channel(frame.channel, "too many mediated connections")
            return
        sock = socket.socket(route.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        deadline = time.monotonic() + MEDIATION_CONNECT_TIMEOUT
        med = _Mediation(sock, route=route, channel=frame.channel, deadline=deadline)
        self._meds[med.channel] = med
        self._by_target[sock] = med
        self._connect(med)

    def _hold(self, channel: int, port: int | None) -> None:
        """Be the silent peer of a held target: opened, and nothing more."""
        if len(self._held) >= HOLD_MAX:
            self.held.refused += 1
            self._close_channel(channel, f"the host holds at most {HOLD_MAX} connections here")
            return
        self._held[channel] = 0
        self.held.connections += 1
        self._to_guest(encode(channel, FrameType.MED_OPENED))
        if self.held.connections <= HOLD_MAX:  # a guest opening in a loop is not news
            self._notify(self._on_held, port)

    def _held_frame(self, frame: Frame) -> None:
        """DATA is counted and dropped (no WINDOW back); its end, or CLOSE, ends the hold."""
        channel = frame.channel
        if frame.type is FrameType.CLOSE:
            del self._held[channel]
        elif frame.type is FrameType.DATA and not frame.payload:
            del self._held[channel]
            self._close_channel(channel, "")
        elif frame.type is FrameType.DATA:
            taken = self._held[channel] + len(frame.payload)
            self._held[channel] = taken
            self.held.bytes += len(frame.payload)
            if taken > HOLD_BYTES_MAX:
                del self._held[channel]
                self.held.refused += 1
                why = f"the host holds this connection and takes at most {HOLD_BYTES_MAX} bytes"
                self._close_channel(channel, why)

    def _no_route(self, port: int | None) -> str:
        if not self._routes:
            return "no mediation target is configured"
        if port is None:
            return "MED_OPEN names no guest port"
        return f"guest port {port} has no service channel or mediation target"

    def _connect(self, med: _Mediation) -> None:
        """Start (or try again) the non-blocking connect to the target."""
        try:
            code = med.sock.connect_ex(med.route.address)
        except OSError as exc:
            code = exc.errno or errno.EINVAL
        med.retry_at = 0.0
        if code == errno.EAGAIN and med.route.family == socket.AF_UNIX:
            med.retry_at = time.monotonic() + CONNECT_RETRY  # its backlog is full for now
        elif code not in (0, errno.EINPROGRESS):
            self._fail_mediation(med, f"cannot reach {med.route.what}: {os.strerror(code)}")

    def _close_channel(self, channel: int, why: str) -> None:
        self._to_guest(_close_frame(channel, why))

    def _expire_connects(self) -> None:
        now = time.monotonic()
        for med in list(self._meds.values()):
            if med.opened:
                continue
            if now > med.deadline:
                self._fail_mediation(med, f"{med.route.what} did not answer in time")
            elif med.retry_at and now >= med.retry_at:
                self._connect(med)

    def _fail_mediation(self, med: _Mediation, why: str) -> None:
        self._close_channel(med.channel, why)
        self._drop_mediation(med)

    def _drop_mediation(self, med: _Mediation) -> None:
        self._meds.pop(med.channel, None)
        self._by_target.pop(med.sock, None)
        self._forget(med.sock)

    def _guest_data(self, med: _Mediation, payload: bytes) -> None:
        if med.guest_done:
            self._fail_mediation(med, "DATA after the end of data")
        elif not payload:
            med.guest_done = True
        else:
            med.out += payload
            if len(med.out) > PEER_BUFFER_MAX:
                self._fail_mediation(med, "the guest sent more than its window")

    def _on_target(self, sock: socket.socket, mask: int) -> None:
        med = self._by_target[sock]
        try:
            if not med.opened:
                self._connected(med)
                return
            if mask & selectors.EVENT_WRITE:
                self._write_target(med)
            if mask & selectors.EVENT_READ and med.channel in self._meds:
                self._read_target(med)
        except OSError as exc:
            self._fail_mediation(med, f"{med.route.what} failed: {exc.strerror or exc}")
            return
        if med.channel in self._meds:
            self._maybe_finish(med)

    def _maybe_finish(self, med: _Mediation) -> None:
        """Both ways ended and the guest wrote out all the target's data (its WINDOW frames
        gave the whole window back): the channel is done. A CLOSE before that could make the
        agent drop the end of the target's data."""
        if med.guest_done and med.target_done and not med.out and med.credit >= WINDOW:
            self._fail_mediation(med, "")

    def _connected(self, med: _Mediation) -> None:
        code = med.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail_mediation(med, f"cannot reach {med.route.what}: {os.strerror(code)}")
            return
        med.opened = True
        self._to_guest(encode(med.channel, FrameType.MED_OPENED))

    def _write_target(self, med: _Mediation) -> None:
        sent = med.flush()
        if sent:
            self._to_guest(window(med.channel, sent))
        if med.guest_done and not med.out and not med.shut:
            med.sock.shutdown(socket.SHUT_WR)
            med.shut = True

    def _read_target(self, med: _Mediation) -> None:
        try:
            data = med.sock.recv(min(med.credit, MAX_PAYLOAD))
        except BlockingIOError:
            return
        if not data:
            med.target_done = True
        med.credit -= len(data)
        self._to_guest(encode(med.channel, FrameType.DATA, data))


def _routes(
    mediation: MediationTarget | None, services: Sequence[ServiceChannel]
) -> tuple[dict[int, _Route], _Route | None]:
    """Where each guest port's connections go, and where those of any other port go (the
    mediation target without a guest port of its own, else nowhere)."""
    routes: dict[int, _Route] = {}
    for service in services:
        if service.guest_port in routes:
            raise InvalidInputError(f"guest port {service.guest_port} has two service channels")
        what = f"the service {service.name!r}"
        routes[service.guest_port] = _Route(socket.AF_UNIX, str(service.socket), what)
    if mediation is None:
        return routes, None
    if mediation.hold:  # never resolved nor contacted
        target = _Route(socket.AF_INET, None, "the held mediation channel", hold=True)
    else:
        family, address = mediation.address()
        target = _Route(family, address, "the mediation target")
    if mediation.guest_port is None:
        return routes, target
    if mediation.guest_port in routes:
        raise InvalidInputError(f"guest port {mediation.guest_port} is a service channel's")
    routes[mediation.guest_port] = target
    return routes, None


def _med_port(frame: Frame) -> int | None:
    """The guest port a MED_OPEN names (None when it names none)."""
    try:
        port = frame.json().get("port")
    except InvalidInputError:
        return None
    return port if type(port) is int else None


def _close_frame(channel: int, why: str) -> bytes:
    """CLOSE, with ``{"error": why}`` unless ``why`` is empty (a channel that simply ended)."""
    if not why:
        return encode(channel, FrameType.CLOSE)
    return encode_json(channel, FrameType.CLOSE, {"error": why})


def _count(frame: Frame) -> int:
    try:
        return frame.count()
    except InvalidInputError:
        return 0


def _send_now(sock: socket.socket, data: bytes) -> None:
    """Best effort, without blocking: the peer is about to be closed."""
    with contextlib.suppress(OSError):
        sock.send(data)


def _same_user(conn: socket.socket) -> bool:
    """Whether the peer runs as this user (or root): exec.sock is 0600, this is the second
    lock on the door."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


def _listen(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` (mode 0600; a stale one is replaced)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        path.chmod(0o600)  # the VM directory is private too: nobody else can race us here
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise VMError(f"cannot serve {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock
