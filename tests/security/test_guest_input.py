"""Untrusted input at the host's edges: attacks through the public interface.

- names, variable names, tags and digests are whole-string matches: "name\\n" is refused;
- documents from the guest (control events, declared outputs, result.json) are bounded in size
  and depth before they are parsed: 100000 nested ``[`` is a clear error, never a crash;
- what a guest can make the host keep is capped: the events of a boot, a serial line waiting
  for its newline, a control line without an end, and the serial log on disk;
- what a guest wrote never reaches a terminal as escape sequences (``logs``, ``status``,
  ``result``); ``--json`` and ``logs`` into a pipe stay exact.

Workspaces run through the CLI with the fake backend (no VM, the real detached supervisor);
the control channel and the QEMU machine are driven over a real unix socket.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

from microagent import runner
from microagent.cli import main
from microagent.errors import InvalidInputError
from microagent.fsutil import load_json_bounded
from microagent.runtime import control, qemu
from microagent.runtime.backend import Accel, BootConfig
from microagent.runtime.control import (
    BEGIN_MARKER,
    END_MARKER,
    MAX_EVENTS,
    MAX_SERIAL_LINE,
    SERIAL_LOG_MAX,
    ControlChannel,
    EventLog,
    SerialStream,
    parse_event,
    rotate_log,
    tail_text,
)
from microagent.runtime.qemu import QemuMachine, build_argv
from microagent.runtime.rundir import RunDir
from testenv.clitools import cli_json as cli
from testenv.clitools import run_fake_guest

PINNED = "python:3.13-slim@sha256:" + "12" * 32
DEEP = "[" * 100_000
OSC52 = "\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07"  # writes the user's clipboard
CLEAR = "\x1b[2J"  # clears the screen


# -- helpers -------------------------------------------------------------------------------------


def text(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "microagent.yaml"
    path.write_text(f"name: agent\nimage: {PINNED}\nentrypoint: 'true'\n")
    return path


@pytest.fixture
def project(busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (busybox_project / "microagent.yaml").write_text(
        "name: ws\nimage: oci:layout:latest\nsetup: [mkdir -p /workspace]\nentrypoint: 'true'\n"
        "outputs: [{name: result, path: /workspace/result.json}]\n"
    )
    return busybox_project


def run_dir(name: str = "ws") -> RunDir:
    return RunDir(Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / name / "runtime")


def run_guest(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, project: Path, **fake: Any
) -> None:
    """Create ``ws`` and run it once with the fake guest doing ``fake``; wait for the end."""
    run_fake_guest(capsys, monkeypatch, project / "microagent.yaml", fake, timeout=20)


# -- 1. whole-string names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--name", "agent\n", "--name 'agent\\n': invalid value"),
        ("--hostname", "box\n", "--hostname 'box\\n': invalid value"),
        ("--env", "API_KEY\n=1", "--env 'API_KEY\\n': invalid variable name"),
        ("--image", "python:3.13-slim\n", "invalid image reference 'python:3.13-slim\\n'"),
        ("--image", "python@sha256:" + "ab" * 32 + "\n", "invalid image reference"),
        ("--image", "python:3.13-slim\n@sha256:" + "ab" * 32, "bad tag '3.13-slim\\n'"),
    ],
)
def test_values_with_a_trailing_newline_are_refused(
    spec: Path, flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    got = cli(capsys, "plan", "--offline", "-f", str(spec), flag, value, code=2)
    assert got["error"]["kind"] == "invalid_input"
    assert message in got["error"]["message"]


def test_spec_values_with_a_trailing_newline_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "microagent.yaml"
    bad.write_text('name: "agent\\n"\nhostname: "box\\n"\nenv: {"API_KEY\\n": x}\n')
    code, _, err = text(capsys, "validate", "-f", str(bad))
    assert code == 2
    assert f"{bad}:1:7: name: invalid value 'agent\\n'" in err
    assert f"{bad}:2:11: hostname: invalid value 'box\\n'" in err
    assert f"{bad}:3:7: env['API_KEY\\n']: invalid name 'API_KEY\\n'" in err
    bad.write_text('name: agent\nimage: "python:3.13-slim\\n"\n')  # checked once the schema holds
    code, _, err = text(capsys, "validate", "-f", str(bad))
    assert code == 2
    assert f"{bad}:2:8: image: invalid image reference 'python:3.13-slim\\n'" in err


def test_a_workspace_name_with_a_newline_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    for verb in ("status", "result", "logs", "halt"):
        got = cli(capsys, verb, "ws\n", code=2)
        assert got["error"]["message"] == "invalid workspace name 'ws\\n'"


# -- 2. bounded documents from the guest ---------------------------------------------------------


def test_a_deeply_nested_result_is_reported_not_a_crash(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    output = {"result": {"path": "/workspace/result.json", "content": DEEP}}
    run_guest(capsys, monkeypatch, project, outputs=output)
    status = cli(capsys, "status", "ws")  # exit 0: the workspace itself is fine
    assert status["ok"] and status["event"]["state"] == "stopped"
    (out,) = status["result"]["outputs"]
    assert out["error"] == "the result file is not valid JSON: nested deeper than 64 levels"
    assert "workResult" not in status["result"] and out["content"] == DEEP
    result = cli(capsys, "result", "ws")["result"]
    assert result["outputs"][0]["error"].startswith("the result file is not valid JSON")
    for verb in ("status", "result"):
        code, stdout, err = text(capsys, verb, "ws")
        assert code == 0 and "Traceback" not in stdout + err and "internal error" not in err


def test_a_deeply_nested_result_file_reads_as_no_result(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_guest(capsys, monkeypatch, project)
    run_dir().result_path.write_text('{"outputs": ' + DEEP + "]" * len(DEEP) + "}")
    assert cli(capsys, "status", "ws")["result"] is None
    assert "has no result yet" in cli(capsys, "result", "ws", code=1)["error"]["message"]


def test_bounded_loader_checks_size_and_depth_before_parsing() -> None:
    assert load_json_bounded('{"a": [1, {"b": "[[[["}]}', max_bytes=100, max_depth=3) == {
        "a": [1, {"b": "[[[["}]
    }
    cases: list[tuple[str | bytes, int, str]] = [
        ("[" * 4 + "]" * 4, 100, "nested deeper than 3 levels"),
        (DEEP, len(DEEP), "nested deeper than 3 levels"),
        ('{"a":' * 4 + "1" + "}" * 4, 100, "nested deeper than 3 levels"),
        ("x" * 101, 100, "larger than 100 bytes"),
        (b"[\xff]", 100, "not UTF-8"),
        ("[1,", 100, "not valid JSON"),
    ]
    for doc, limit, why in cases:
        with pytest.raises(InvalidInputError, match=why):
            load_json_bounded(doc, max_bytes=limit, max_depth=3)
    big = "[" * 5_000_000 + "]" * 5_000_000  # linear time, no recursion
    began = time.monotonic()
    with pytest.raises(InvalidInputError, match="nested deeper"):
        load_json_bounded(big, max_bytes=control.MAX_LINE, max_depth=64)
    assert time.monotonic() - began < 5


def test_control_events_are_bounded() -> None:
    assert parse_event(('{"event":"exited","x":' + DEEP).encode()) is None
    nested = '{"event":"exited","x":' + "[" * 20 + "]" * 20 + "}"
    assert parse_event(nested.encode()) is None  # deeper than MAX_EVENT_DEPTH
    ok = '{"event":"exited","outputs":{"result":{"content":"[[[[[[[[[[[[[[[[[[[[[[["}}}'
    assert parse_event(ok.encode()) == json.loads(ok)


# -- 3. what a guest can make the host keep ------------------------------------------------------


class _Guest:
    """The guest end of a control socket the test serves (QEMU serves it for real)."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None

    def accept(self) -> socket.socket:
        self.conn, _ = self.server.accept()
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def test_a_runaway_control_line_is_dropped_up_to_its_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_LINE", 1024)
    guest = _Guest(tmp_path / "ctl.sock")
    channel = ControlChannel(tmp_path / "ctl.sock")
    assert channel.try_connect()
    conn = guest.accept()
    got: list[dict[str, Any]] = []

    def drain() -> None:
        for _ in range(10):
            got.extend(channel.poll(0.05))

    conn.sendall(b"x" * 3000)
    drain()
    conn.sendall(b'{"event":"exited","exit_code":0,"forged":true}\n{"event":"booted"}\n')
    drain()
    assert got == [{"event": "booted"}]
    channel.close()
    guest.close()


def test_event_log_keeps_the_first_events_and_counts_the_rest() -> None:
    log = EventLog(limit=3)
    for i in range(10):
        log.add({"event": f"e{i}"})
    assert [e["event"] for e in log.snapshot()] == ["e0", "e1", "e2"]
    assert (len(log), log.dropped) == (3, 7)


class _Proc:
    """A VMM process stand-in: runs until signalled."""

    pid = 4242
    returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            time.sleep(min(timeout or 0.0, 0.05))
            raise subprocess.TimeoutExpired("qemu", timeout or 0.0)
        return self.returncode

    def terminate(self) -> None:
        self.returncode = -15

    kill = terminate


class _Sandbox:
    def teardown(self) -> None:
        return None


def test_qemu_machine_bounds_events_and_the_serial_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu, "POWEROFF_GRACE", 0.2)
    config = BootConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", disks=(), state_dir=tmp_path)
    guest = _Guest(config.control_socket)
    machine = QemuMachine(config, ["qemu"], cast(Any, _Proc()), cast(Any, _Sandbox()))
    flood = 20 * MAX_EVENTS

    def play() -> None:
        conn = guest.accept()
        with config.serial_log.open("ab") as console:  # QEMU's append=on
            for _ in range(9):
                console.write(b"spam " * (1 << 18) + b"\n")  # 1.25 MiB a line
        lines = b"".join(b'{"event":"e%d"}\n' % i for i in range(flood))
        conn.sendall(lines + b'{"event":"exited","exit_code":0}\n')

    player = threading.Thread(target=play)
    player.start()
    result = machine.wait(timeout=30)
    player.join(5)
    guest.close()
    assert result.exit_code == 0
    assert len(machine.events()) == MAX_EVENTS
    assert len(result.timings) <= MAX_EVENTS + 1
    assert config.serial_log.stat().st_size <= SERIAL_LOG_MAX
    rotated = config.serial_log.with_name("serial.log.1")
    assert 0 < rotated.stat().st_size <= SERIAL_LOG_MAX


def test_rotate_log_cuts_an_appended_log_without_a_hole(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    assert not rotate_log(log, 10)
    with log.open("ab") as vmm:  # the VMM keeps its file open, O_APPEND
        vmm.write(b"0123456789abcdef")
        vmm.flush()
        assert rotate_log(log, 10)
        assert log.stat().st_size == 0
        assert log.with_name("serial.log.1").read_bytes() == b"6789abcdef"
        vmm.write(b"next")
        vmm.flush()
    assert log.read_bytes() == b"next"
    assert not rotate_log(log, 10)


def test_qemu_appends_to_the_serial_log(tmp_path: Path) -> None:
    config = BootConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", disks=(), state_dir=tmp_path)
    argv = build_argv("qemu", config, Accel.TCG)
    chardev = argv[argv.index("-chardev") + 1]
    assert chardev == f"file,id=serial0,path={tmp_path}/serial.log,append=on"
    assert argv[argv.index("-serial") + 1] == "chardev:serial0"


def test_serial_stream_bounds_a_line_without_newline(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    out: list[bytes] = []
    stream = SerialStream(log, out.append)
    log.write_bytes(b"boot " * 100_000 + b"\n" + BEGIN_MARKER.encode() + b"\r\n")
    stream.pump()
    with log.open("ab") as fh:
        fh.write(b"y" * (4 * MAX_SERIAL_LINE))
    stream.pump()
    assert len(stream._pending) <= MAX_SERIAL_LINE
    with log.open("ab") as fh:
        fh.write(b"z\n" + END_MARKER.encode() + b" 0\n")
    stream.pump()
    assert b"".join(out) == b"y" * (4 * MAX_SERIAL_LINE) + b"z\n"


def test_serial_stream_follows_a_rotated_log(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    out: list[bytes] = []
    stream = SerialStream(log, out.append)
    log.write_bytes(BEGIN_MARKER.encode() + b"\n" + b"a" * 100 + b"\n")
    stream.pump()
    assert rotate_log(log, 10)
    with log.open("ab") as fh:
        fh.write(b"after\n")
    stream.pump()
    assert out == [b"a" * 100 + b"\n", b"after\n"]


def test_tail_text_reads_only_the_end(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    log.write_bytes(b"\0" * (control.TAIL_BYTES * 4) + b"first\nlast line\r\n")
    assert tail_text(log, 1) == "last line"


# -- 4. nothing from the guest drives the terminal -----------------------------------------------


class _Stdout(io.TextIOWrapper):
    """A stdout that is a terminal (or a pipe), keeping what was written."""

    def __init__(self, tty: bool) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8")
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def written(self) -> bytes:
        self.flush()
        return cast(io.BytesIO, self.buffer).getvalue()


def test_logs_neutralise_escape_sequences_on_a_terminal_only(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_guest(capsys, monkeypatch, project)
    console = f"[ 0.1] boot\r\n{OSC52}{CLEAR}agent says hi \u202eevil \u009b2J\r\n".encode()
    console += b"bad bytes \xff\x9b2J\n"
    run_dir().serial_log.parent.mkdir(parents=True, exist_ok=True)
    run_dir().serial_log.write_bytes(console)
    terminal, pipe = _Stdout(tty=True), _Stdout(tty=False)
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["logs", "ws"]) == 0
    shown = terminal.written()
    assert b"\x1b" not in shown and b"\x07" not in shown and b"\x9b" not in shown
    assert b"\\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\\x07\\x1b[2Jagent says hi" in shown
    assert b"\\u202eevil \\x9b2J\n" in shown and b"[ 0.1] boot\n" in shown
    monkeypatch.setattr(sys, "stdout", pipe)  # a file or a pipe: the bytes exactly
    assert main(["logs", "ws"]) == 0
    assert pipe.written() == console


def test_status_and_result_text_neutralise_guest_text(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = {"request_id": "r1", "status": "done", "content": f"all good{OSC52}", "error": CLEAR}
    outputs = {"result": {"path": "/workspace/result.json", "content": json.dumps(work)}}
    run_guest(capsys, monkeypatch, project, exitCode=3, outputs=outputs)
    code, out, _ = text(capsys, "result", "ws")
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "all good\\x1b]52;c;" in out and "error: \\x1b[2J" in out
    assert cli(capsys, "result", "ws")["result"]["workResult"] == work  # --json: exact
    run_guest_error = {"error": f"no such command{CLEAR}", "stderr": OSC52}
    cli(capsys, "delete", "-y", "ws")
    run_guest(capsys, monkeypatch, project, **run_guest_error)
    code, out, _ = text(capsys, "status", "ws")
    assert "\x1b" not in out and "no such command\\x1b[2J" in out
    code, out, _ = text(capsys, "result", "ws")
    assert "\x1b" not in out and "no such command\\x1b[2J" in out
    code, out, _ = text(capsys, "events", "ws")
    assert "\x1b" not in out
    assert cli(capsys, "status", "ws")["event"]["detail"] == f"no such command{CLEAR}"


@pytest.mark.parametrize("live", [False, True], ids=["plain", "live-view"])
def test_error_messages_carrying_guest_text_are_neutralised_on_a_terminal(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    live: bool,
) -> None:
    """A failing setup step's message quotes the guest's stderr: it must not drive a terminal,
    whether progress is plain lines (a CI job) or the live view (a terminal outside CI)."""
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"exitCode": 1, "stderr": f"x{OSC52}"}))
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("MICROAGENT_PROGRESS", raising=False)  # auto: CI and TERM decide
    if live:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", "true")
    terminal = _Stdout(tty=True)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["create", "-f", str(project / "microagent.yaml"), "--name", "boom"]) == 1
    shown = terminal.written()
    assert b"setup step failed" in shown and b"x\\x1b]52;c;" in shown
    # no OSC sequence and no bell from the guest; the live view's own cursor codes are CSI
    assert b"\x1b]" not in shown and b"\x07" not in shown
    assert (b"\x1b[" in shown) is live


def test_logs_follow_starts_again_after_a_rotation(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from microagent import Microagent, Settings
    from microagent.runtime.rundir import State

    run_guest(capsys, monkeypatch, project)
    me = runner.process_identity(os.getpid())  # a live supervisor, as far as liveness can tell
    assert me is not None
    run_dir().set_state(
        State.RUNNING, "still running", supervisorPid=me.pid, supervisor=me.to_json()
    )
    log = run_dir().serial_log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"old line, long before the rotation\n")
    api = Microagent(Settings.from_environ())
    chunks = api.logs("ws", follow=True, poll=0.01)
    assert next(chunks) == b"old line, long before the rotation\n"
    log.write_bytes(b"new\n")  # rotated: shorter than what was read
    with ThreadPoolExecutor(1) as pool:  # a follower stuck at the old offset would wait forever
        assert pool.submit(next, chunks).result(timeout=10) == b"new\n"
