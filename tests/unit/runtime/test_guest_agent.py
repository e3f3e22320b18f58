"""The guest agent (kit/agent/ma-agent.c), compiled once and run on the host over a socketpair.

Each test drives the real binary with the Python codec (``--fd`` on one end of a socketpair,
``--root /``): HELLO/PING, exec with pipes and a terminal, exit codes, flow control, many
channels, CLOSE, garbage on the link, mediation. Plus the build (content key, cache) and the
guest init's launch of the agent. No VM; skipped only when there is no C compiler.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from microagent.errors import ToolError
from microagent.kit import agentbin, guestkit
from microagent.runner import find_tool, run
from microagent.runtime.agentlink import RESYNC_PREAMBLE
from microagent.runtime.agentproto import (
    GUEST_CHANNEL_BASE,
    MAX_PAYLOAD,
    PROTOCOL,
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
from microagent.store.content import Store
from testenv.ports import free_port, free_ports
from testenv.prereq import require_root, tool_missing

T = FrameType


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent, built through the kit's own build path (into a throwaway store)."""
    try:
        agentbin.find_compiler(agentbin.debian.debian_arch())
    except ToolError as exc:
        tool_missing("no C compiler to build the guest agent", exc)
    return agentbin.agent_binary(Store(tmp_path_factory.mktemp("agent-store")))


@dataclass
class Result:
    stdout: bytes = b""
    stderr: bytes = b""
    exit: ExecExit | None = None
    started: dict[str, Any] | None = None
    acked: int = 0  # WINDOW bytes the agent granted back for our STDIN/DATA
    frames: list[Frame] = field(default_factory=list)


class Link:
    """The host's end: a socketpair whose other end the agent serves (``--fd``)."""

    def __init__(
        self,
        binary: Path,
        log: Path,
        *extra: str,
        root: str = "/",
        ignoring: tuple[signal.Signals, ...] = (),
    ) -> None:
        self.sock, theirs = socket.socketpair()
        argv = [str(binary), "--fd", str(theirs.fileno()), "--root", root, "--log", str(log)]
        if ignoring:  # what a shell does to a background job, nohup to SIGHUP: then exec
            numbers = ",".join(str(int(sig)) for sig in ignoring)
            ignore = f"for s in ({numbers},): signal.signal(s, signal.SIG_IGN)"
            ignore = f"import os, signal, sys\n{ignore}"
            argv = [sys.executable, "-c", f"{ignore}\nos.execv(sys.argv[1], sys.argv[1:])", *argv]
        self.proc = subprocess.Popen(
            [*argv, *extra],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env={**os.environ, "AGENT_TEST_MARK": "inherited"},
        )
        theirs.close()
        self.log = log
        self.reader = FrameReader()
        self.queues: dict[int, collections.deque[Frame]] = collections.defaultdict(
            collections.deque
        )

    def send(self, channel: int, kind: FrameType, payload: bytes = b"") -> None:
        self.sock.sendall(encode(channel, kind, payload))

    def send_json(self, channel: int, kind: FrameType, value: dict[str, Any]) -> None:
        self.sock.sendall(encode_json(channel, kind, value))

    def exec(self, channel: int, *argv: str, **options: Any) -> None:
        self.send_json(channel, T.EXEC, ExecRequest(tuple(argv), **options).to_json())

    def _pump(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        assert data, f"the agent closed the link (exit {self.proc.poll()}): {self.logtext()}"
        for frame in self.reader.feed(data):
            self.queues[frame.channel].append(frame)
        return True

    def next(self, channel: int, timeout: float = 10.0) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.queues[channel]:
            left = deadline - time.monotonic()
            assert left > 0, f"nothing on channel {channel} in {timeout}s: {self.logtext()}"
            self._pump(left)
        return self.queues[channel].popleft()

    def quiet(self, channel: int, seconds: float) -> bool:
        """True if nothing arrives on ``channel`` for ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self.queues[channel] and time.monotonic() < deadline:
            self._pump(deadline - time.monotonic())
        return not self.queues[channel]

    def collect(self, channel: int, *, grant: bool = True, timeout: float = 20.0) -> Result:
        """Every frame of an exec channel up to EXIT (or CLOSE), granting window as it goes."""
        result = Result()
        while True:
            frame = self.next(channel, timeout)
            result.frames.append(frame)
            if frame.type in (T.STDOUT, T.STDERR):
                assert len(frame.payload) <= MAX_PAYLOAD
                if frame.type is T.STDOUT:
                    result.stdout += frame.payload
                else:
                    result.stderr += frame.payload
                if grant:
                    self.sock.sendall(window(channel, len(frame.payload)))
            elif frame.type is T.STARTED:
                result.started = frame.json()
            elif frame.type is T.WINDOW:
                result.acked += frame.count()
            elif frame.type is T.EXIT:
                result.exit = ExecExit.from_json(frame.json())
                return result
            elif frame.type is T.CLOSE:
                return result

    def run(self, channel: int, *argv: str, **options: Any) -> Result:
        self.exec(channel, *argv, **options)
        return self.collect(channel)

    def alive(self) -> None:
        """The agent still answers."""
        self.send(0, T.PING, b"still there?")
        frame = self.next(0)
        assert (frame.type, frame.payload) == (T.PONG, b"still there?")

    def logtext(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def close(self) -> int:
        self.sock.close()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture
def link(agent_bin: Path, tmp_path: Path) -> Iterator[Link]:
    lk = Link(agent_bin, tmp_path / "agent.log")
    hello = lk.next(0)
    assert hello.type is T.HELLO
    yield lk
    # Closing the link ends the agent cleanly: it never crashed during the test.
    assert lk.close() == 0, lk.logtext()


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.02)
    return False


# -- the link ------------------------------------------------------------------------------


def test_hello_ping_pong(link: Link) -> None:
    link.send_json(0, T.HELLO, {"protocol": 1})
    hello = link.next(0).json()
    assert hello == {"protocol": 1, "agent": "ma-agent", "version": hello["version"]}
    link.send(0, T.PING, b"abc")
    assert link.next(0).payload == b"abc"
    link.send(0, T.PING, b"x" * 100)
    assert link.next(0).payload == b"x" * 64  # PING carries at most 64 bytes


@pytest.mark.parametrize("cut", [3, 9, 9 + 40, 9 + 5000], ids=["header", "payload0", "json", "big"])
def test_a_frame_cut_off_by_a_restore_is_resynchronised_by_the_preamble(
    link: Link, cut: int
) -> None:
    """A snapshot can catch the agent with part of the old host's frame read; the restored
    agent never learns that the host changed. A bare HELLO from the new host is then read as
    the rest of that frame (no answer: exec never ready); the link's RESYNC_PREAMBLE before
    the HELLO completes any cut frame and is itself malformed, so the HELLO is answered."""
    old = encode(7, T.STDIN, b"x" * 6000)  # the old host's frame (channel 7: never opened)
    link.sock.sendall(old[:cut])
    assert link.quiet(0, 0.3)
    hello = encode_json(0, T.HELLO, {"protocol": PROTOCOL})
    if cut >= 9:  # a whole header: a bare HELLO vanishes into the cut frame's payload
        link.sock.sendall(hello)
        assert link.quiet(0, 1.0), "the HELLO was answered: the frame was not cut"
    link.sock.sendall(RESYNC_PREAMBLE + hello)
    assert link.next(0).type is T.HELLO
    assert link.run(1, "echo", "ok").stdout == b"ok\n"


def test_garbage_frames_do_not_kill_the_agent(link: Link) -> None:
    link.sock.sendall(b"\x00\x10\x00\x00" + b"\x00" * 4 + b"\x13")  # 1 MiB payload
    link.sock.sendall(encode(5, T.STDOUT)[:8] + b"\x7f" + os.urandom(3000))  # unknown type
    link.send_json(0, T.HELLO, {"protocol": 1})  # the host's HELLO resynchronises
    assert link.next(0).type is T.HELLO
    link.alive()
    assert link.run(1, "echo", "ok").stdout == b"ok\n"
    assert "malformed frame" in link.logtext()


def test_frames_for_unknown_channels_are_ignored(link: Link) -> None:
    link.send(77, T.STDIN, b"data")
    link.send(77, T.WINDOW, b"\x00\x00\x00\x10")
    link.send(77, T.CLOSE)
    link.send_json(77, T.SIGNAL, {"signal": 9})
    link.send(0, T.STDOUT, b"host sent a guest frame")
    link.alive()


# -- exec ----------------------------------------------------------------------------------


def test_echo(link: Link) -> None:
    result = link.run(1, "echo", "hello", "world")
    assert result.stdout == b"hello world\n"
    assert result.stderr == b""
    assert result.started is not None and result.started["pid"] > 0
    assert result.exit == ExecExit(0)
    assert result.frames[0].type is T.STARTED


def test_stderr_is_separate_and_the_exit_code_is_kept(link: Link) -> None:
    result = link.run(1, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    assert result.exit == ExecExit(3)


def test_not_found_is_127_and_never_started(link: Link) -> None:
    result = link.run(1, "no-such-program-zz9")
    assert result.started is None
    assert result.exit is not None and result.exit.exit_code == 127
    assert "no-such-program-zz9: command not found" in (result.exit.error or "")
    missing = link.run(2, "/no/such/path")
    assert missing.exit is not None and missing.exit.exit_code == 127


def test_not_executable_is_126(link: Link, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o644)
    result = link.run(1, str(script))
    assert result.started is None and result.stdout == b""
    assert result.exit is not None and result.exit.exit_code == 126
    assert result.exit.error and "Permission denied" in result.exit.error
    folder = link.run(2, str(tmp_path))
    assert folder.exit is not None and folder.exit.exit_code == 126


def test_script_without_shebang_runs_under_sh(link: Link, tmp_path: Path) -> None:
    script = tmp_path / "plain"
    script.write_text("echo from-sh\n")
    script.chmod(0o755)
    assert link.run(1, str(script)).stdout == b"from-sh\n"


def test_timeout_is_124(link: Link) -> None:
    start = time.monotonic()
    result = link.run(1, "sh", "-c", "echo begun; sleep 30", timeout_ms=300)
    assert time.monotonic() - start < 10
    assert result.stdout == b"begun\n"
    assert result.exit == ExecExit(124, signal=None, timed_out=True, error=None)


def test_signal_reaches_the_process_group(link: Link) -> None:
    link.exec(1, "sh", "-c", "sleep 30; echo not-reached")
    assert link.next(1).type is T.STARTED
    link.send_json(1, T.SIGNAL, {"signal": 9})
    result = link.collect(1)
    assert result.exit == ExecExit(137, signal=9)
    assert result.stdout == b""


def test_env_cwd_and_path(link: Link, tmp_path: Path) -> None:
    env = {"GREETING": "h\u00e9llo \U0001f600", "PATH": f"{tmp_path}:/usr/bin:/bin"}
    tool = tmp_path / "mytool"
    tool.write_text('#!/bin/sh\necho tool "$GREETING" "$(pwd)"\n')
    tool.chmod(0o755)
    result = link.run(1, "mytool", env=env, cwd=str(tmp_path))
    assert result.stdout.decode() == f"tool h\u00e9llo \U0001f600 {tmp_path}\n"
    inherited = link.run(2, "sh", "-c", 'echo "$AGENT_TEST_MARK"')
    assert inherited.stdout == b"inherited\n"  # the agent's own environment
    bad = link.run(3, "pwd", cwd=str(tmp_path / "missing"))
    assert bad.exit is not None and bad.exit.exit_code == 126
    assert "cannot change to directory" in (bad.exit.error or "")


def test_unknown_user_is_126(link: Link) -> None:
    result = link.run(1, "id", user="no-such-user-zz9")
    assert result.exit is not None and result.exit.exit_code == 126
    assert "unable to find user no-such-user-zz9" in (result.exit.error or "")


def test_stdin_is_forwarded_and_closed(link: Link) -> None:
    link.exec(1, "cat", stdin=True)
    link.send(1, T.STDIN, b"hello ")
    link.send(1, T.STDIN, b"agent\n")
    link.send(1, T.STDIN, b"")  # end of input: cat sees EOF and exits
    result = link.collect(1)
    assert result.stdout == b"hello agent\n"
    assert result.exit == ExecExit(0)
    assert result.acked == 12  # every STDIN byte handed on was acknowledged


def test_without_stdin_the_command_reads_dev_null(link: Link) -> None:
    result = link.run(1, "cat")
    assert result.exit == ExecExit(0) and result.stdout == b""
    link.exec(2, "sh", "-c", "cat; echo done")
    link.send(2, T.STDIN, b"ignored")  # no stdin: dropped, yet acknowledged
    result = link.collect(2)
    assert result.stdout == b"done\n" and result.acked == 7


def test_large_output_waits_for_window(link: Link) -> None:
    size = 5_000_000
    link.exec(1, "head", "-c", str(size), "/dev/zero")
    got = 0
    while not link.quiet(1, 0.5):
        frame = link.next(1)
        if frame.type is T.STDOUT:
            got += len(frame.payload)
    assert got == WINDOW  # stalled: a window's worth, nothing more
    link.sock.sendall(window(1, got))
    rest = link.collect(1)
    assert got + len(rest.stdout) == size
    assert rest.exit == ExecExit(0)


def test_large_input_round_trip_under_both_windows(link: Link) -> None:
    data = os.urandom(1 << 20)
    link.exec(1, "cat", stdin=True)
    sent, credit, out = 0, WINDOW, b""
    exit_frame = None
    while exit_frame is None:
        if sent < len(data) and credit:
            piece = data[sent : sent + min(credit, MAX_PAYLOAD)]
            link.send(1, T.STDIN, piece)
            sent, credit = sent + len(piece), credit - len(piece)
            if sent == len(data):
                link.send(1, T.STDIN, b"")
            continue
        frame = link.next(1)
        if frame.type is T.WINDOW:
            credit += frame.count()
            assert credit <= WINDOW
        elif frame.type is T.STDOUT:
            out += frame.payload
            link.sock.sendall(window(1, len(frame.payload)))
        elif frame.type is T.EXIT:
            exit_frame = ExecExit.from_json(frame.json())
    assert exit_frame == ExecExit(0)
    assert out == data


def test_twenty_commands_at_once(link: Link, tmp_path: Path) -> None:
    """They run side by side: each waits until all twenty have started (a barrier, not a
    stopwatch; one at a time, the first would give up after 15 s and exit 9)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    wait_all = (
        f'touch "{gate}/$$"; i=0; while [ "$(ls "{gate}" | wc -l)" -lt 20 ]; do '
        'i=$((i+1)); [ "$i" -lt 300 ] || exit 9; sleep 0.05; done; echo "$N"'
    )
    for n in range(1, 21):
        link.exec(n, "sh", "-c", wait_all, env={"N": str(n)})
    for n in range(1, 21):
        result = link.collect(n)
        assert (result.stdout, result.exit) == (f"{n}\n".encode(), ExecExit(0))


def test_close_kills_the_command(link: Link) -> None:
    link.exec(1, "sh", "-c", "sleep 30 & wait")
    started = link.next(1)
    assert started.type is T.STARTED
    pid = started.json()["pid"]
    link.send(1, T.CLOSE)
    assert wait_gone(pid)
    assert link.quiet(1, 0.3)  # no EXIT after the host closed the channel
    link.alive()


def test_channels_beyond_the_limit_are_refused(link: Link) -> None:
    opened = 0
    refused = None
    for n in range(1, 200):
        link.exec(n, "cat", stdin=True)
        frame = link.next(n)
        if frame.type is T.CLOSE:
            refused = frame.json()
            break
        assert frame.type is T.STARTED
        opened += 1
    assert opened >= 64
    assert refused is not None and "too many" in refused["error"]
    for n in range(1, opened + 1):
        link.send(n, T.CLOSE)
    link.exec(500, "echo", "room again")
    assert link.collect(500).stdout == b"room again\n"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "JSON object"),
        (b'{"argv":[]}', "argv must name a program"),
        (b'{"argv":"ls"}', "argv must be an array"),
        (b'{"argv":["ls"],"env":{"A=B":"c"}}', "env names"),
        (b'{"argv":["ls"],"env":{"A":1}}', "env values"),
        (b'{"argv":["a\\u0000b"]}', "NUL"),
        (b'{"argv":["\\ud800"]}', "surrogate"),
        (b'{"argv":["ls"],"rows":0}', "rows and cols"),
        (b'{"argv":["ls"],"timeoutMs":-5}', "timeoutMs"),
        (b'{"argv":["ls"]} trailing', "trailing"),
        (b'{"argv":["ls"],"x":' + b"[" * 20 + b"]" * 20 + b"}", "nested"),
        (b'{"argv":[' + b'"a",' * 5000 + b'"a"]}', "too many"),
    ],
)
def test_bad_exec_requests_are_refused(link: Link, payload: bytes, reason: str) -> None:
    link.send(3, T.EXEC, payload)
    frame = link.next(3)
    assert frame.type is T.CLOSE
    assert reason in frame.json()["error"]
    link.alive()


def test_exec_channel_ids_belong_to_the_host(link: Link) -> None:
    link.exec(GUEST_CHANNEL_BASE, "true")
    assert link.next(GUEST_CHANNEL_BASE).type is T.CLOSE


def test_json_escapes_and_unknown_keys(link: Link) -> None:
    payload = (
        b'{"argv":["printf","%s|%s","\\u00e9\\ud83d\\ude00\\t\\"","x\\/y"],'
        b'"future":{"a":[1,2.5e3,-0.1,true,null,{"b":"c"}]},"tty":false,"stdin":false}'
    )
    link.send(1, T.EXEC, payload)
    result = link.collect(1)
    assert result.stdout.decode() == '\u00e9\U0001f600\t"|x/y'


# -- terminals -----------------------------------------------------------------------------


def test_terminal_session(link: Link) -> None:
    result = link.run(1, "sh", "-c", "tty; stty size", tty=True, rows=33, cols=101)
    text = result.stdout.decode()
    assert "/dev/pts/" in text and "33 101" in text
    assert result.exit == ExecExit(0)


def test_ctrl_c_interrupts(link: Link) -> None:
    link.exec(1, "sleep", "30", tty=True)
    assert link.next(1).type is T.STARTED
    link.send(1, T.STDIN, b"\x03")
    result = link.collect(1)
    assert result.exit == ExecExit(130, signal=2)


def test_commands_start_with_default_signals_whatever_the_agent_inherited(
    agent_bin: Path, tmp_path: Path
) -> None:
    """An agent started ignoring SIGINT, SIGQUIT and SIGHUP (a background job, nohup) runs
    its commands with no signal ignored: ^C on a terminal still interrupts."""
    ignoring = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
    lk = Link(agent_bin, tmp_path / "agent.log", ignoring=ignoring)
    assert lk.next(0).type is T.HELLO
    status = lk.run(1, "cat", "/proc/self/status").stdout.decode()
    ignored = int(status.split("\nSigIgn:\t", 1)[1].split("\n", 1)[0], 16)
    # signals 1-31 (bit n-1); 32 and 33 are glibc's own (signal() refuses them), and a CI
    # harness was seen ignoring 32
    assert ignored & 0x7FFFFFFF == 0, status
    lk.exec(3, "sleep", "30", tty=True)
    assert lk.next(3).type is T.STARTED
    lk.send(3, T.STDIN, b"\x03")
    assert lk.collect(3, timeout=10).exit == ExecExit(130, signal=2)
    assert lk.close() == 0, lk.logtext()


def test_resize_and_end_of_input_on_a_terminal(link: Link) -> None:
    link.exec(1, "sh", "-c", "read line; stty size; cat; echo end", tty=True, stdin=True)
    assert link.next(1).type is T.STARTED
    link.send_json(1, T.RESIZE, {"rows": 40, "cols": 120})
    link.send(1, T.STDIN, b"go\nmore\n")
    link.send(1, T.STDIN, b"")  # typed as ^D: cat ends
    result = link.collect(1)
    assert "40 120" in result.stdout.decode()
    assert result.stdout.decode().rstrip().endswith("end")
    assert result.exit == ExecExit(0)


# -- as root: a chroot and another user ------------------------------------------------------


def test_root_and_user(agent_bin: Path, tmp_path: Path) -> None:
    require_root("chroot and setuid")
    try:
        busybox = find_tool("busybox")
    except ToolError as exc:
        tool_missing("busybox is the chroot's shell", exc)
    root = tmp_path / "root"
    for d in ("bin", "etc", "workspace", "home/alice"):
        (root / d).mkdir(parents=True)
    (root / "bin/busybox").write_bytes(Path(busybox).read_bytes())
    (root / "bin/busybox").chmod(0o755)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1234:1234::/home/alice:/bin/sh\n"
    )
    (root / "etc/group").write_text("alice:x:1234:\nstaff:x:50:alice,bob\n")
    lk = Link(agent_bin, tmp_path / "agent.log", root=str(root))
    assert lk.next(0).type is T.HELLO
    script = 'echo "$(pwd) $(id -u):$(id -g) $(id -G) $HOME"'
    result = lk.run(1, "/bin/busybox", "sh", "-c", script, user="alice")
    assert result.stdout == b"/workspace 1234:1234 1234 50 /home/alice\n"
    numeric = lk.run(2, "/bin/busybox", "id", "-u", user="4321:50")
    assert numeric.stdout == b"4321\n"
    assert lk.run(3, "busybox", "true", env={"PATH": "/bin"}).exit == ExecExit(0)
    assert lk.close() == 0


# -- mediation -----------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "the agent does not listen"
            time.sleep(0.02)


@pytest.fixture
def mediated(agent_bin: Path, tmp_path: Path) -> Iterator[tuple[Link, int]]:
    port = free_port()
    lk = Link(agent_bin, tmp_path / "agent.log", "--mediation-port", str(port))
    assert lk.next(0).type is T.HELLO
    yield lk, port
    assert lk.close() == 0, lk.logtext()


def med_open(lk: Link, port: int) -> tuple[socket.socket, int]:
    client = connect(port)
    deadline = time.monotonic() + 10
    while True:
        guest = [c for c, q in lk.queues.items() if c >= GUEST_CHANNEL_BASE and q]
        if guest:
            frame = lk.next(guest[0])
            assert frame.type is T.MED_OPEN and frame.json() == {"port": port}
            return client, frame.channel
        assert time.monotonic() < deadline, "no MED_OPEN"
        lk._pump(0.1)


def test_mediation_relays_both_ways_with_half_close(mediated: tuple[Link, int]) -> None:
    lk, port = mediated
    client, ch = med_open(lk, port)
    client.sendall(b"early")
    assert lk.quiet(ch, 0.3)  # nothing is relayed before the host says MED_OPENED
    lk.send(ch, T.MED_OPENED)
    assert lk.next(ch) == Frame(ch, T.DATA, b"early")
    lk.sock.sendall(window(ch, 5))
    lk.send(ch, T.DATA, b"from the host")
    assert lk.next(ch) == Frame(ch, T.WINDOW, (13).to_bytes(4, "big"))
    assert client.recv(100) == b"from the host"
    client.shutdown(socket.SHUT_WR)
    assert lk.next(ch) == Frame(ch, T.DATA, b"")  # the guest side's EOF
    lk.send(ch, T.DATA, b"after half-close")
    assert client.recv(100) == b"after half-close"
    lk.send(ch, T.DATA, b"")
    assert lk.next(ch).type is T.WINDOW
    assert client.recv(100) == b""  # the host's EOF
    client.close()
    second, ch2 = med_open(lk, port)
    assert ch2 != ch and ch2 >= GUEST_CHANNEL_BASE
    second.close()


def test_mediation_refused_by_the_host(mediated: tuple[Link, int]) -> None:
    lk, port = mediated
    client, ch = med_open(lk, port)
    lk.send_json(ch, T.CLOSE, {"error": "no route"})
    with pytest.raises(ConnectionResetError):  # cut off, not a finished stream (EOF)
        client.recv(100)
    client.close()
    lk.alive()


def test_a_new_host_hello_drops_the_previous_hosts_channels(mediated: tuple[Link, int]) -> None:
    """A VM restored from a snapshot keeps its port connected while the host behind it is
    new: the new host's HELLO ends what the old one left open (commands killed, mediated
    connections reset, so the program reconnects), and the new host is served."""
    lk, port = mediated
    lk.exec(1, "sleep", "30")
    started = lk.next(1)
    assert started.type is T.STARTED
    client, ch = med_open(lk, port)
    lk.send(ch, T.MED_OPENED)
    lk.send_json(0, T.HELLO, {"protocol": PROTOCOL})
    assert lk.next(0).type is T.HELLO
    with pytest.raises(ConnectionResetError):
        client.recv(100)
    client.close()
    assert wait_gone(started.json()["pid"])
    assert "dropping 2 channels of the previous one" in lk.logtext()
    assert lk.run(2, "echo", "served").stdout == b"served\n"
    again, ch2 = med_open(lk, port)
    assert ch2 != ch
    again.close()


def test_mediation_output_waits_for_window(mediated: tuple[Link, int]) -> None:
    lk, port = mediated
    client, ch = med_open(lk, port)
    lk.send(ch, T.MED_OPENED)
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(64):  # 4 MiB, or until the socket buffers are full
            client.send(b"z" * 65536)
    got = 0
    while not lk.quiet(ch, 0.3):
        got += len(lk.next(ch).payload)
    assert got == WINDOW  # and no more until the host acknowledges
    lk.sock.sendall(window(ch, got))
    assert not lk.quiet(ch, 2)
    client.close()


# -- service channels (--listen) -------------------------------------------------------------


def test_every_listen_port_opens_with_its_own_port(agent_bin: Path, tmp_path: Path) -> None:
    med, first, second = free_ports(3)
    extra = ("--listen", str(first), "--mediation-port", str(med), "--listen", str(second))
    lk = Link(agent_bin, tmp_path / "agent.log", *extra)
    try:
        assert lk.next(0).type is T.HELLO
        opened = {port: med_open(lk, port) for port in (second, med, first)}
        assert len({ch for _, ch in opened.values()}) == 3
        client, ch = opened[second]
        lk.send(ch, T.MED_OPENED)
        client.sendall(b"to the service")
        client.shutdown(socket.SHUT_WR)
        assert lk.next(ch) == Frame(ch, T.DATA, b"to the service")
        assert lk.next(ch) == Frame(ch, T.DATA, b"")  # the guest's half-close
        lk.send(ch, T.DATA, b"reply after the half-close")
        assert lk.next(ch).type is T.WINDOW
        lk.send(ch, T.DATA, b"")
        assert client.recv(100) == b"reply after the half-close"
        assert client.recv(100) == b""
        for other, other_ch in (opened[med], opened[first]):
            lk.send_json(other_ch, T.CLOSE, {"error": "refused by the host"})
            with pytest.raises(ConnectionResetError):
                other.recv(100)
            other.close()
        client.close()
        lk.alive()
        assert "listening on 3 of 3 ports" in lk.logtext()
    finally:
        assert lk.close() == 0, lk.logtext()


def run_agent(agent_bin: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(agent_bin), "--fd", "0", *extra],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--listen", "4000", "--listen", "4000"), "--listen 4000: the port is given twice"),
        (("--listen", "4000", "--mediation-port", "4000"), "--mediation-port 4000: the port is"),
        (("--listen", "0"), "--listen 0: ports are 1-65535"),
        (
            tuple(w for p in range(4001, 4012) for w in ("--listen", str(p))),
            "more than 10 --listen ports",
        ),
        (("--listen", "65536"), "usage: ma-agent"),
        (("--listen", "-1"), "usage: ma-agent"),
        (("--listen", "80x"), "usage: ma-agent"),
        (("--listen",), "usage: ma-agent"),
    ],
)
def test_bad_listen_ports_are_refused(
    agent_bin: Path, extra: tuple[str, ...], message: str
) -> None:
    done = run_agent(agent_bin, *extra)
    assert done.returncode == 2
    assert message in done.stderr
    assert "[--listen N]..." in done.stderr


def test_ten_listen_ports_and_the_mediation_port_are_taken(agent_bin: Path, tmp_path: Path) -> None:
    ports = free_ports(11)
    extra = [w for p in ports[:10] for w in ("--listen", str(p))]
    lk = Link(agent_bin, tmp_path / "agent.log", *extra, "--mediation-port", str(ports[10]))
    try:
        assert lk.next(0).type is T.HELLO
        client, _ = med_open(lk, ports[9])
        client.close()
        assert "listening on 11 of 11 ports" in lk.logtext()
    finally:
        assert lk.close() == 0, lk.logtext()


def test_a_port_it_cannot_listen_on_is_skipped(agent_bin: Path, tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))  # SO_REUSEADDR does not share a listener
    free = free_ports(1)[0]
    busy = str(taken.getsockname()[1])
    lk = Link(agent_bin, tmp_path / "agent.log", "--listen", busy, "--listen", str(free))
    try:
        assert lk.next(0).type is T.HELLO
        client, _ = med_open(lk, free)
        client.close()
        log = lk.logtext()
        assert f"cannot listen on 127.0.0.1:{busy}" in log and "listening on 1 of 2" in log
    finally:
        taken.close()
        assert lk.close() == 0, lk.logtext()


# -- the build and the kit -----------------------------------------------------------------


def test_build_is_cached_and_keyed(agent_bin: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    first = agentbin.agent_binary(store)
    assert agentbin.agent_binary(store) == first
    assert first.read_bytes()[:4] == b"\x7fELF" and os.access(first, os.X_OK)
    assert first.name.startswith("ma-agent-") and first.parent.name == "kits"
    source = agentbin.source_bytes()
    key = agentbin.build_key(source, "gcc 12", "amd64")
    assert key != agentbin.build_key(source + b"\n", "gcc 12", "amd64")
    assert key != agentbin.build_key(source, "gcc 13", "amd64")
    assert key != agentbin.build_key(source, "gcc 12", "arm64")
    assert not guestkit.list_kits(store)  # the binary is not mistaken for a kit


def test_binary_is_static(agent_bin: Path) -> None:
    """No program interpreter (PT_INTERP): it runs in an initramfs without a libc."""
    elf = agent_bin.read_bytes()
    assert elf[:5] == b"\x7fELF\x02"  # 64-bit
    phoff, phentsize, phnum = elf[32:40], elf[54:56], elf[56:58]
    start, size = int.from_bytes(phoff, "little"), int.from_bytes(phentsize, "little")
    types = [
        int.from_bytes(elf[start + i * size : start + i * size + 4], "little")
        for i in range(int.from_bytes(phnum, "little"))
    ]
    assert 1 in types and 3 not in types  # PT_LOAD, no PT_INTERP


def test_missing_compiler_names_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise ToolError(f"required program {name!r} is not installed")

    monkeypatch.setattr(agentbin.runner, "find_tool", missing)
    with pytest.raises(ToolError) as caught:
        agentbin.find_compiler(agentbin.debian.debian_arch())
    assert "gcc libc6-dev" in caught.value.hint


def test_kit_recipe_follows_the_agent_source(monkeypatch: pytest.MonkeyPatch) -> None:
    before = guestkit.recipe_digest()
    monkeypatch.setattr(agentbin, "source_bytes", lambda: b"int main(void) { return 0; }\n")
    assert guestkit.recipe_digest() != before


def test_initramfs_holds_the_agent() -> None:
    entries = guestkit.initramfs_entries(b"BUSYBOX", "#!/bin/sh\n", {}, agent=b"\x7fELF-agent")
    agent = {e.path: e for e in entries}["lib/microagent/ma-agent"]
    assert agent.data == b"\x7fELF-agent" and agent.mode == 0o100755


# -- the guest init's launch ----------------------------------------------------------------

GROUPS: dict[str, list[str]] = {"mmio": [], "pci": [], "disk": [], "late": [], "net": []}


def _start_agent_function() -> str:
    text = guestkit.render_init(GROUPS)
    start = text.index("start_agent() {")
    return text[start : text.index("\n}\n", start) + 3]


def test_init_starts_the_agent_with_the_workload_env(tmp_path: Path) -> None:
    try:
        busybox = find_tool("busybox")
    except ToolError as exc:
        tool_missing("busybox runs the init script's functions", exc)
    ports = tmp_path / "ports"
    (ports / "vport0p1").mkdir(parents=True)
    (ports / "vport0p1/name").write_text("microagent.ctl\n")
    (ports / "null").mkdir()  # -> /dev/null, a character device like a real port
    (ports / "null/name").write_text("microagent.agent\n")
    fake = tmp_path / "ma-agent"
    fake.write_text('#!/bin/sh\necho "$@"\nenv | sort\n')
    fake.chmod(0o755)
    body = _start_agent_function().replace("/sys/class/virtio-ports", str(ports))
    body = body.replace("/lib/microagent/ma-agent", str(fake))
    script = (
        body + "BASE_ENV=\"'PATH=/usr/bin:/bin' 'HOME=/root'\"\nCA_ENV=''\n"
        "MA_ENV=\"'FOO=a b'\"\nMED_PORT=7777\nstart_agent\n"
    )
    out = run([busybox, "sh", "-c", script]).stdout
    assert "--port /dev/null --root /newroot --mediation-port 7777" in out
    assert "FOO=a b" in out and "HOME=/root" in out
    (ports / "null/name").write_text("something.else\n")
    missing = run([busybox, "sh", "-c", body + "start_agent\n"]).stdout
    assert "no port microagent.agent" in missing


def test_init_passes_the_service_ports_to_the_agent(tmp_path: Path) -> None:
    try:
        busybox = find_tool("busybox")
    except ToolError as exc:
        tool_missing("busybox runs the init script's functions", exc)
    text = guestkit.render_init(GROUPS)
    start = text.index('SERVICE_PORTS=""')
    parse = text[start : text.index("start_agent() {", start)]
    ports = tmp_path / "ports"
    (ports / "null").mkdir(parents=True)
    (ports / "null/name").write_text("microagent.agent\n")
    fake = tmp_path / "ma-agent"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    (tmp_path / "18781").touch()  # a word that globs must not pick up file names
    body = _start_agent_function().replace("/sys/class/virtio-ports", str(ports))
    body = body.replace("/lib/microagent/ma-agent", str(fake))
    script = (
        'log() { echo "log: $*"; }\n'
        f"cd {tmp_path}\n"
        "MA_SERVICE_PORTS='18780 1878x 1878? 18782'\n"
        + parse
        + "BASE_ENV='' CA_ENV='' MA_ENV='' MED_PORT=2048\n"
        + body
        + "start_agent\n"
    )
    out = run([busybox, "sh", "-c", script]).stdout.splitlines()
    assert out == [
        "log: ignoring the service port '1878x'",
        "log: ignoring the service port '1878?'",
        "--port /dev/null --root /newroot --mediation-port 2048 --listen 18780 --listen 18782",
    ]
    none = run([busybox, "sh", "-c", "log() { :; }\n" + parse + 'echo "<$SERVICE_PORTS>"']).stdout
    assert none == "<>\n"


def test_init_gives_the_workload_the_mediation_address() -> None:
    text = guestkit.render_init(GROUPS)
    assert "MICROAGENT_MEDIATION_ADDR=127.0.0.1:$MED_PORT" in text
    launch = text.index("start_agent </dev/null")
    assert launch < text.index("launch >/ma/out")  # before the workload starts
    assert 'kill "$AGENT"' in text[text.index("finish() {") :]


# -- a port (--port): the host can go away -------------------------------------------------


def test_port_host_going_away_kills_its_commands(agent_bin: Path, tmp_path: Path) -> None:
    """A raw pseudo-terminal stands in for the virtio port: closing its master is the host
    disconnecting (the port then polls POLLHUP, as a virtio port without a host does)."""
    master, slave = os.openpty()
    tty.setraw(master)  # binary frames pass untouched
    log = tmp_path / "agent.log"
    argv = [str(agent_bin), "--port", os.ttyname(slave), "--root", "/", "--log", str(log)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    reader = FrameReader()

    def frame() -> Frame:
        frames: list[Frame] = []
        while not frames:
            ready, _, _ = select.select([master], [], [], 10)
            assert ready, log.read_text()
            frames = reader.feed(os.read(master, 65536))
        assert len(frames) == 1
        return frames[0]

    try:
        assert frame().type is T.HELLO
        os.close(slave)
        os.write(master, encode_json(1, T.EXEC, ExecRequest(("sleep", "30")).to_json()))
        started = frame()
        assert started.type is T.STARTED
        os.close(master)
        assert wait_gone(started.json()["pid"])
        time.sleep(0.3)
        assert proc.poll() is None  # still there, waiting for the next host
        assert "the host disconnected" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
