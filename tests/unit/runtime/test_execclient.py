"""exec end to end without a VM: the exec client -> the supervisor's agent link -> a guest agent
running on the host (``--root /``), reached through an agent port like the VMM's.

The guest agent is the Python stand-in (scripts/testenv/agent_standin.py) and, once it is
built, the real ``ma-agent``; every test runs against each.
"""

from __future__ import annotations

import os
import pty
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.errors import ToolError, VMError
from microagent.kit import agentbin
from microagent.runtime.agentlink import AgentLink, MediationTarget
from microagent.runtime.agentproto import ExecRequest, FrameReader, FrameType, encode_json
from microagent.runtime.execclient import ExecControls, ExecIO, collect, stream
from microagent.runtime.fake import AgentPort
from microagent.store.content import Store
from testenv.agent_standin import standin_argv
from testenv.ports import free_port
from testenv.prereq import tool_missing

WORKSPACE_ENV = {"WS_VAR": "from-workspace"}


class Guest:
    """An agent port serving a guest agent, and the supervisor's link to it."""

    def __init__(
        self, vm_dir: Path, argv: list[str], target: int | None = None, *, restored: bool = False
    ) -> None:
        env = {**WORKSPACE_ENV, "PATH": os.environ["PATH"]}
        self.port = AgentPort(vm_dir / "agent.sock", argv, env, vm_dir / "agent.log")
        mediation = MediationTarget("127.0.0.1", target) if target else None
        self.link = AgentLink(
            vm_dir / "agent.sock", vm_dir / "exec.sock", mediation=mediation, restored=restored
        )
        self.link.start()
        assert self.link.wait_ready(15), (vm_dir / "agent.log").read_text()
        self.exec_socket = self.link.exec_socket

    def close(self) -> None:
        self.link.stop()
        self.port.close()


@pytest.fixture(scope="module")
def real_agent(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The real guest agent, built through the kit's own build path (a throwaway store)."""
    try:
        agentbin.find_compiler(agentbin.debian.debian_arch())
    except ToolError as exc:
        tool_missing("no C compiler to build the guest agent", exc)
    binary = agentbin.agent_binary(Store(tmp_path_factory.mktemp("agent-store")))
    return [str(binary), "--root", "/"]


@pytest.fixture(params=["standin", "ma-agent"])
def agent_argv(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "standin":
        return standin_argv()
    return list(request.getfixturevalue("real_agent"))


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ma-exec-") as path:
        yield Path(path)


@pytest.fixture
def guest(vm_dir: Path, agent_argv: list[str]) -> Iterator[Guest]:
    g = Guest(vm_dir, agent_argv)
    yield g
    g.close()


def sh(script: str, **changes: object) -> ExecRequest:
    return ExecRequest(("sh", "-c", script), **changes)  # type: ignore[arg-type]


def test_a_restored_link_s_preamble_is_skipped_by_either_agent(
    vm_dir: Path, agent_argv: list[str]
) -> None:
    """The link's first connection to a restored guest starts with RESYNC_PREAMBLE: the real
    agent and the stand-in the fake backend's tests use both skip it to the HELLO (a stand-in
    that died on it cost a warm fork its mediation connection, now and then)."""
    g = Guest(vm_dir, agent_argv, restored=True)
    try:
        done = collect(g.exec_socket, sh("echo ok"))
        assert (done.exit_code, done.stdout) == (0, b"ok\n")
        assert "Traceback" not in (vm_dir / "agent.log").read_text()
    finally:
        g.close()


def test_exit_codes_and_separate_streams(guest: Guest) -> None:
    done = collect(guest.exec_socket, sh("echo out; echo err >&2; exit 3"))
    assert (done.exit_code, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    assert done.exit.signal is None and not done.exit.timed_out and done.pid
    assert done.to_json()["ok"] is True and done.to_json()["durationMs"] >= 0
    missing = collect(guest.exec_socket, ExecRequest(("no-such-program-here",)))
    assert missing.exit_code == 127 and missing.exit.error


def test_environment_cwd_and_streaming(guest: Guest) -> None:
    out: list[bytes] = []
    err: list[bytes] = []
    request = sh('echo "$WS_VAR $EXTRA"; pwd; echo e >&2', env={"EXTRA": "x"}, cwd="/tmp")
    done = stream(guest.exec_socket, request, ExecIO(out.append, err.append))
    assert b"".join(out) == b"from-workspace x\n/tmp\n" and b"".join(err) == b"e\n"
    assert done.exit_code == 0 and done.stdout == b""


def test_stdin_until_end_of_file_both_ways_under_the_window(guest: Guest) -> None:
    data = os.urandom(1 << 20)  # four windows each way
    done = collect(guest.exec_socket, ExecRequest(("cat",)), stdin=data)
    assert done.exit_code == 0 and done.stdout == data
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"from a pipe\n")
    os.close(write_fd)
    try:
        piped = collect(guest.exec_socket, ExecRequest(("cat",)), stdin=read_fd)
    finally:
        os.close(read_fd)
    assert piped.stdout == b"from a pipe\n"
    nothing = collect(guest.exec_socket, sh("cat; echo end"))  # no input: /dev/null
    assert nothing.stdout == b"end\n"


def test_collected_output_is_capped(guest: Guest) -> None:
    done = collect(guest.exec_socket, sh("head -c 300000 /dev/zero"), limit=1000)
    assert done.exit_code == 0 and done.stdout == b"\0" * 1000 and done.stdout_truncated
    assert not done.stderr_truncated


def test_signal_and_timeout(guest: Guest) -> None:
    controls = ExecControls()
    threading.Timer(0.5, controls.signal, (signal.SIGTERM,)).start()
    io = ExecIO(lambda _b: None, lambda _b: None, controls)
    done = stream(guest.exec_socket, sh("sleep 30"), io)
    controls.close()
    assert (done.exit_code, done.exit.signal) == (143, signal.SIGTERM)
    began = time.monotonic()
    timed = collect(guest.exec_socket, sh("sleep 30", timeout_ms=300))
    assert (timed.exit_code, timed.exit.timed_out) == (124, True)
    assert time.monotonic() - began < 10


def test_terminal(guest: Guest) -> None:
    controls = ExecControls()
    threading.Timer(0.5, controls.resize, (40, 120)).start()
    request = sh("tty; stty size; sleep 1; stty size", tty=True, rows=30, cols=100)
    out: list[bytes] = []
    done = stream(guest.exec_socket, request, ExecIO(out.append, out.append, controls))
    controls.close()
    text = b"".join(out).decode()
    assert done.exit_code == 0
    assert "/dev/pts/" in text and "30 100" in text and "40 120" in text


def test_terminal_input_is_bytes_for_the_terminal(guest: Guest) -> None:
    primary, secondary = pty.openpty()  # stands in for the user's terminal
    try:
        os.write(primary, b"typed\n")
        request = sh("read line; echo got:$line", tty=True)
        done = collect(guest.exec_socket, request, stdin=secondary, timeout=10)
    finally:
        os.close(primary)
        os.close(secondary)
    assert done.exit_code == 0 and b"got:typed" in done.stdout


def test_concurrent_execs(guest: Guest, tmp_path: Path) -> None:
    """Side by side, not one after another: each command waits until all four have started
    (a barrier, not a stopwatch), so run one at a time they would exit 9 instead."""
    results: dict[int, bytes] = {}
    gate = tmp_path / "gate"
    gate.mkdir()

    def one(n: int) -> None:
        results[n] = collect(guest.exec_socket, sh(barrier(gate, 4) + f"echo {n}")).stdout

    threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n: f"{n}\n".encode() for n in range(4)}


def barrier(gate: Path, count: int) -> str:
    """Shell that marks this command started in ``gate`` and waits (15 s at most, then exit
    9) until ``count`` commands have."""
    return (
        f'touch "{gate}/$$"; i=0; while [ "$(ls "{gate}" | wc -l)" -lt {count} ]; do '
        'i=$((i+1)); [ "$i" -lt 300 ] || exit 9; sleep 0.05; done; '
    )


def test_link_run_for_the_supervisor(guest: Guest) -> None:
    done = guest.link.run(sh("echo probe"), timeout=10)
    assert (done.exit_code, done.stdout) == (0, b"probe\n")
    slow = guest.link.run(sh("sleep 30"), timeout=0.3)
    assert slow.exit.timed_out and slow.exit_code == 124


def test_a_client_that_goes_away_kills_its_command(guest: Guest) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(guest.exec_socket))
    sock.settimeout(10)
    sock.sendall(encode_json(1, FrameType.EXEC, sh("sleep 60").to_json()))
    reader = FrameReader()
    frames = reader.feed(sock.recv(4096))
    assert frames[0].type is FrameType.STARTED
    pid = frames[0].json()["pid"]
    assert Path(f"/proc/{pid}").exists()
    sock.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "the command outlived its client"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_exec_socket_gone_is_a_vm_error(vm_dir: Path) -> None:
    with pytest.raises(VMError, match="cannot reach the exec socket"):
        collect(vm_dir / "exec.sock", sh("true"))


def test_mediation_through_the_guest_agent(vm_dir: Path, agent_argv: list[str]) -> None:
    """A guest program's connection to the mediation port reaches a host TCP echo server."""
    echo = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    guest_port = free_port()
    argv = [*agent_argv, "--mediation-port", str(guest_port)]
    g = Guest(vm_dir, argv, target=echo.getsockname()[1])
    try:
        with socket.create_connection(("127.0.0.1", guest_port), timeout=10) as conn:
            payload = os.urandom(600_000)
            threading.Thread(target=conn.sendall, args=(payload,), daemon=True).start()
            got = bytearray()
            while len(got) < len(payload):
                got += conn.recv(1 << 16)
            assert got == payload
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(10) == b""  # half-close went through and came back
    finally:
        g.close()
        echo.close()
