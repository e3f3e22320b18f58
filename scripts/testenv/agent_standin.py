"""A stand-in for the guest agent (``ma-agent``), in Python, for tests on the host.

It speaks ``docs/agent-protocol.md`` on a connected socket (``--fd N``) and runs commands on
the host (``--root /`` only): EXEC with pipes or a pseudo-terminal, STDIN, SIGNAL, RESIZE,
timeouts, windows both ways, CLOSE; with ``--mediation-port P`` it listens on 127.0.0.1:P and
turns each connection into MED_OPEN/DATA. It is the guest side of the supervisor's agent link
in tests where the real binary is not built; tests that have the real one run against both.

    python scripts/testenv/agent_standin.py --fd N [--root /] [--mediation-port P]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import pty
import queue
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microagent.errors import InvalidInputError
from microagent.runtime.agentproto import (
    GUEST_CHANNEL_BASE,
    HEADER,
    MAX_PAYLOAD,
    PROTOCOL,
    WINDOW,
    Frame,
    FrameReader,
    FrameType,
    encode,
    encode_json,
    window,
)

Send = Callable[[bytes], None]


class Credit:
    """A send window: wait for room, spend it, grant more."""

    def __init__(self) -> None:
        self.value = WINDOW
        self.cond = threading.Condition()
        self.closed = False

    def take(self, most: int) -> int:
        with self.cond:
            while not self.value and not self.closed:
                self.cond.wait()
            if self.closed:
                return 0
            got = min(self.value, most)
            self.value -= got
            return got

    def grant(self, count: int) -> None:
        with self.cond:
            self.value = min(WINDOW, self.value + count)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Writer(threading.Thread):
    """Writes what the host sent to a local fd or socket, then acknowledges it."""

    def __init__(self, write: Callable[[bytes], None], ack: Callable[[int], None]) -> None:
        super().__init__(daemon=True)
        self.items: queue.Queue[bytes | None] = queue.Queue()
        self.write, self.ack = write, ack
        self.start()

    def run(self) -> None:
        while (data := self.items.get()) is not None:
            with contextlib.suppress(OSError):
                self.write(data)
            if data:
                self.ack(len(data))
            else:
                return


def pump(
    read: Callable[[int], bytes], credit: Credit, send: Send, kind: FrameType, ch: int
) -> None:
    """Read a local fd under the window and send it as ``kind`` frames until end of file."""
    while size := credit.take(MAX_PAYLOAD):
        try:
            data = read(size)
        except OSError:  # EIO: the terminal's last holder went away
            data = b""
        if not data:
            return
        credit.grant(size - len(data))
        send(encode(ch, kind, data))


class Exec:
    def __init__(self, agent: Agent, channel: int) -> None:
        self.agent, self.channel = agent, channel
        self.credit = Credit()
        self.closed = False
        self.master: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.writer = Writer(self._write_input, self._ack)

    def start(self, req: dict[str, Any]) -> None:
        self.proc = self._spawn(req)

    def _spawn(self, req: dict[str, Any]) -> subprocess.Popen[bytes] | None:
        env = {**os.environ, **(req.get("env") or {})}
        cwd = req.get("cwd") or ("/workspace" if Path("/workspace").is_dir() else "/")
        stdin = subprocess.PIPE if req.get("stdin") else subprocess.DEVNULL
        kwargs: dict[str, Any] = {"env": env, "cwd": cwd, "start_new_session": True}
        if req.get("tty"):
            self.master, slave = pty.openpty()
            self._winsize(int(req.get("rows") or 24), int(req.get("cols") or 80))
            kwargs |= {"stdin": slave, "stdout": slave, "stderr": slave}
            kwargs["preexec_fn"] = lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        else:
            kwargs |= {"stdin": stdin, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        try:
            proc = subprocess.Popen(req["argv"], **kwargs)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            self._exit(code, None, False, f"{req['argv'][0]}: {exc.strerror}")
            return None
        finally:
            if req.get("tty"):
                os.close(slave)
        self.agent.send(encode_json(self.channel, FrameType.STARTED, {"pid": proc.pid}))
        timeout = req.get("timeoutMs")
        threading.Thread(target=self._wait, args=(proc, timeout), daemon=True).start()
        return proc

    def _winsize(self, rows: int, cols: int) -> None:
        assert self.master is not None
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _write_input(self, data: bytes) -> None:
        if self.master is not None:
            os.write(self.master, data)
        elif self.proc is not None and self.proc.stdin is not None:
            if data:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            else:
                self.proc.stdin.close()

    def _ack(self, count: int) -> None:
        if not self.closed:
            self.agent.send(window(self.channel, count))

    def _wait(self, proc: subprocess.Popen[bytes], timeout_ms: int | None) -> None:
        if self.master is not None:
            readers = [self._reader(lambda n: os.read(self.master, n), FrameType.STDOUT)]  # type: ignore[arg-type]
        else:
            assert proc.stdout is not None and proc.stderr is not None
            out, err = proc.stdout.fileno(), proc.stderr.fileno()
            readers = [
                self._reader(lambda n: os.read(out, n), FrameType.STDOUT),
                self._reader(lambda n: os.read(err, n), FrameType.STDERR),
            ]
        timed_out = False
        try:
            proc.wait(None if timeout_ms is None else timeout_ms / 1000)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill(signal.SIGKILL)
            proc.wait()
        if self.master is not None:
            self.kill(signal.SIGHUP)
        for reader in readers:
            reader.join()
        code = proc.returncode
        sig = -code if code < 0 else None
        self._exit(124 if timed_out else (128 + sig if sig else code), sig, timed_out, None)

    def _reader(self, read: Callable[[int], bytes], kind: FrameType) -> threading.Thread:
        args = (read, self.credit, self.agent.send, kind, self.channel)
        thread = threading.Thread(target=pump, args=args, daemon=True)
        thread.start()
        return thread

    def _exit(self, code: int, sig: int | None, timed_out: bool, error: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        payload = {"exitCode": code, "signal": sig, "timedOut": timed_out, "error": error}
        self.agent.send(encode_json(self.channel, FrameType.EXIT, payload))
        self.agent.execs.pop(self.channel, None)

    def kill(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def frame(self, frame: Frame) -> None:
        kind = frame.type
        if kind is FrameType.STDIN:
            self.writer.items.put(frame.payload)
        elif kind is FrameType.WINDOW:
            self.credit.grant(frame.count())
        elif kind is FrameType.SIGNAL:
            self.kill(int(frame.json()["signal"]))
        elif kind is FrameType.RESIZE and self.master is not None:
            data = frame.json()
            self._winsize(int(data["rows"]), int(data["cols"]))
        elif kind is FrameType.CLOSE:
            self.closed = True
            self.credit.close()
            self.kill(signal.SIGKILL)
            self.agent.execs.pop(self.channel, None)


class Mediation:
    def __init__(self, agent: Agent, channel: int, conn: socket.socket) -> None:
        self.agent, self.channel, self.conn = agent, channel, conn
        self.credit = Credit()
        self.writer: Writer | None = None

    def opened(self) -> None:
        self.writer = Writer(self._write, lambda n: self.agent.send(window(self.channel, n)))
        threading.Thread(target=self._read, daemon=True).start()

    def _write(self, data: bytes) -> None:
        if data:
            self.conn.sendall(data)
        else:
            self.conn.shutdown(socket.SHUT_WR)

    def _read(self) -> None:
        pump(self.conn.recv, self.credit, self.agent.send, FrameType.DATA, self.channel)
        self.agent.send(encode(self.channel, FrameType.DATA))

    def frame(self, frame: Frame) -> None:
        if frame.type is FrameType.MED_OPENED:
            self.opened()
        elif frame.type is FrameType.DATA and self.writer is not None:
            self.writer.items.put(frame.payload)
        elif frame.type is FrameType.WINDOW:
            self.credit.grant(frame.count())
        elif frame.type is FrameType.CLOSE:
            self.credit.close()
            self.agent.meds.pop(self.channel, None)
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)


HELLO_MAX = 4096  # a HELLO larger than this is not taken for one while resynchronising


def hello_at(data: bytes) -> int | None:
    """Where the first complete-looking HELLO header starts in ``data`` (channel 0, type
    HELLO, a length of at most HELLO_MAX), or None."""
    marker = bytes(4) + bytes([FrameType.HELLO])
    at = data.find(marker, 4)
    while at >= 0:
        head = at - 4
        if int.from_bytes(data[head:at], "big") <= HELLO_MAX:
            return head
        at = data.find(marker, at + 1)
    return None


class Agent:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.execs: dict[int, Exec] = {}
        self.meds: dict[int, Mediation] = {}
        self.next_med = GUEST_CHANNEL_BASE

    def send(self, data: bytes) -> None:
        with self.lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    def hello(self) -> None:
        info = {"protocol": PROTOCOL, "agent": "ma-agent-standin", "version": "0"}
        self.send(encode_json(0, FrameType.HELLO, info))

    def serve(self) -> None:
        self.hello()
        reader: FrameReader | None = FrameReader()
        skipped = b""  # while resynchronising: the input not yet searched for a HELLO
        while data := self.sock.recv(1 << 16):
            if reader is None:  # as ma-agent: a malformed frame drops input up to a HELLO
                skipped += data
                found = hello_at(skipped)
                if found is None:
                    skipped = skipped[-HEADER.size :]
                    continue
                data, skipped, reader = skipped[found:], b"", FrameReader()
            try:
                frames = reader.feed(data)
            except InvalidInputError:  # (a restored guest's host starts with a preamble)
                reader, skipped = None, data[1:]
                found = hello_at(skipped)
                if found is not None:
                    reader = FrameReader()
                    frames = reader.feed(skipped[found:])
                    skipped = b""
                else:
                    continue
            for frame in frames:
                self.dispatch(frame)
        for ex in list(self.execs.values()):
            ex.kill(signal.SIGKILL)

    def dispatch(self, frame: Frame) -> None:
        if frame.channel == 0:
            if frame.type is FrameType.HELLO:
                self.hello()
            elif frame.type is FrameType.PING:
                self.send(encode(0, FrameType.PONG, frame.payload))
        elif frame.type is FrameType.EXEC:
            self.execs[frame.channel] = ex = Exec(self, frame.channel)
            ex.start(frame.json())
        elif frame.channel in self.execs:
            self.execs[frame.channel].frame(frame)
        elif frame.channel in self.meds:
            self.meds[frame.channel].frame(frame)

    def listen(self, port: int) -> None:
        server = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, args=(server, port), daemon=True).start()

    def _accept(self, server: socket.socket, port: int) -> None:
        while True:
            conn, _ = server.accept()
            channel, self.next_med = self.next_med, self.next_med + 1
            self.meds[channel] = Mediation(self, channel, conn)
            self.send(encode_json(channel, FrameType.MED_OPEN, {"port": port}))


def standin_argv(mediation_port: int | None = None) -> list[str]:
    """How to run this stand-in as a guest agent (``--fd N`` is added by the agent port)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--root", "/"]
    return [*argv, "--mediation-port", str(mediation_port)] if mediation_port else argv


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--root", default="/")
    parser.add_argument("--mediation-port", type=int)
    parser.add_argument("--listen", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    if args.root != "/":
        parser.error("the stand-in runs commands on the host only (--root /)")
    agent = Agent(socket.socket(fileno=args.fd))
    if args.mediation_port:
        agent.listen(args.mediation_port)
    for port in args.listen:  # service channels (credential brokers, the egress proxy)
        agent.listen(port)
    agent.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
