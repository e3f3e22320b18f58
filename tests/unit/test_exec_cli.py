"""``microagent exec`` through the CLI on a fake-backend workspace: the real supervisor and its
agent link, and a guest agent running on the host.

The fake backend serves the agent port like QEMU and runs the guest agent given in its
outcome (``agent``) for each connection: here the Python stand-in, which runs commands on the
host with the boot's environment, so the workspace's runtime env reaches the command.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from microagent.api import Microagent
from microagent.cli import main
from microagent.settings import Settings
from testenv.agent_standin import standin_argv
from testenv.clitools import cli_json as cli

SECRET = "s3cret-0042"


@pytest.fixture
def workspace(busybox_project: Path, capsys: pytest.CaptureFixture[str]) -> str:
    spec = busybox_project / "microagent.yaml"
    spec.write_text("name: ws\nimage: oci:layout:latest\nentrypoint: sleep 1000\n")
    cli(capsys, "create", "-f", str(spec), "-e", f"WS_SECRET={SECRET}")
    return "ws"


def start(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"hang": True, "agent": standin_argv()}))
    cli(capsys, "start", name)


def test_exec_streams_and_exits_with_the_commands_code(
    workspace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    start(capsys, monkeypatch, workspace)
    try:
        capsys.readouterr()
        script = 'echo "out $WS_SECRET $EXTRA"; echo err >&2; exit 3'
        code = main(["exec", workspace, "-e", "EXTRA=x", "--", "sh", "-c", script])
        captured = capsys.readouterr()
        assert code == 3
        assert (captured.out, captured.err) == (f"out {SECRET} x\n", "err\n")

        status = cli(capsys, "status", workspace)
        assert status["readiness"]["execReady"]["ready"] is True

        assert main(["exec", workspace, "--", "no-such-program"]) == 127
        assert "microagent: no-such-program" in capsys.readouterr().err
    finally:
        cli(capsys, "halt", workspace)
    assert cli(capsys, "status", workspace)["readiness"]["execReady"]["ready"] is False


def test_json_exec(
    workspace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    start(capsys, monkeypatch, workspace)
    try:
        got = cli(
            capsys, "exec", workspace, "-w", "/tmp", "--", "sh", "-c", "pwd; printf '\\377' >&2"
        )
        assert got.pop("durationMs") >= 0
        assert got == {
            "ok": True,
            "schemaVersion": 1,
            "workspace": workspace,
            "exitCode": 0,
            "signal": None,
            "timedOut": False,
            "error": None,
            "stdout": "/tmp\n",
            "stderr": "\ufffd",  # text, decoded with replacement
            "stdoutTruncated": False,
            "stderrTruncated": False,
        }
        timed = cli(capsys, "exec", workspace, "--timeout", "0.2", "--", "sleep", "30", code=124)
        assert timed["timedOut"] is True
    finally:
        cli(capsys, "halt", workspace)


def test_exec_with_stdin(
    workspace: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    start(capsys, monkeypatch, workspace)
    try:
        (tmp_path / "input").write_bytes(b"line one\nline two\n")
        with (tmp_path / "input").open("rb") as fh:
            monkeypatch.setattr(sys, "stdin", fh)
            got = cli(capsys, "exec", "-i", workspace, "--", "wc", "-l")
        assert got["stdout"].strip() == "2"
    finally:
        cli(capsys, "halt", workspace)


def read_until(fd: int, marker: bytes, seconds: float = 20.0) -> bytes:
    got = b""
    deadline = time.monotonic() + seconds
    while marker not in got:
        assert time.monotonic() < deadline, got
        try:
            got += os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.02)
    return got


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_exec_in_a_terminal(
    workspace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """-i -t from a real terminal (a pty): raw mode, keys as bytes, SIGWINCH, restored after."""
    start(capsys, monkeypatch, workspace)
    primary, secondary = pty.openpty()
    try:
        set_size(secondary, 33, 101)
        before = termios.tcgetattr(secondary)
        script = "stty size; read x; stty size; echo got:$x"
        exec_argv = ["exec", "-i", "-t", workspace, "--", "sh", "-c", script]
        proc = subprocess.Popen(  # setsid -c: a session whose controlling terminal is the pty
            ["setsid", "-c", sys.executable, "-m", "microagent.cli", *exec_argv],
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
        )
        os.set_blocking(primary, False)
        assert b"33 101" in read_until(primary, b"33 101")
        assert termios.tcgetattr(secondary)[3] & termios.ICANON == 0  # raw while it runs
        set_size(primary, 50, 132)
        time.sleep(0.5)
        os.write(primary, b"hello\r")  # Enter in raw mode: the guest's terminal makes it \n
        text = read_until(primary, b"got:hello")
        assert b"50 132" in text
        assert proc.wait(20) == 0
        assert termios.tcgetattr(secondary) == before  # the terminal is restored
    finally:
        os.close(primary)
        os.close(secondary)
        cli(capsys, "halt", workspace)


def test_ctrl_c_is_sent_to_the_command(
    workspace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    start(capsys, monkeypatch, workspace)
    script = 'trap "echo trapped; exit 7" INT; echo ready; sleep 30 >/dev/null 2>&1 & wait'
    proc = subprocess.Popen(
        [sys.executable, "-m", "microagent.cli", "exec", workspace, "--", "sh", "-c", script],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 7
        assert proc.stdout.read() == b"trapped\n"
    finally:
        proc.kill()
        cli(capsys, "halt", workspace)


def test_concurrent_execs_through_the_library(
    workspace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    start(capsys, monkeypatch, workspace)
    api = Microagent(Settings.from_environ())
    results: dict[int, bytes] = {}

    def one(n: int) -> None:
        results[n] = api.exec(workspace, ["sh", "-c", f"sleep 0.5; echo {n}"]).stdout

    try:
        began = time.monotonic()
        threads = [threading.Thread(target=one, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {n: f"{n}\n".encode() for n in range(3)}
        assert time.monotonic() - began < 3
    finally:
        cli(capsys, "halt", workspace)


def test_exec_needs_a_running_workspace(workspace: str, capsys: pytest.CaptureFixture[str]) -> None:
    error = cli(capsys, "exec", workspace, "--", "true", code=1)["error"]
    assert error["kind"] == "conflict"
    assert error["message"] == "workspace 'ws' is not running (state: prepared)"
    assert error["hint"] == "start it first: microagent start ws"
    assert main(["exec", workspace, "--", "true"]) == 1
    assert "hint: start it first: microagent start ws" in capsys.readouterr().err
    assert cli(capsys, "exec", "nope", "--", "true", code=1)["error"]["kind"] == "not_found"


@pytest.mark.parametrize(
    "args",
    [
        ["exec", "ws"],  # no command
        ["exec", "ws", "--bogus", "--", "true"],
        ["exec", "ws", "--timeout", "0", "--", "true"],
        ["exec", "ws", "-e", "1BAD=x", "--", "true"],
        ["--json", "exec", "-t", "ws", "--", "true"],
        ["exec", "-t", "ws", "--", "true"],  # stdin is not a terminal here
    ],
)
def test_bad_flags_exit_2(
    fake_backend: None, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
