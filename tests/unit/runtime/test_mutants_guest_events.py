"""The host's reading of what the guest sends, pinned down where mutants of runtime/control.py
and the exited-event reader in runtime/backend.py outlived the guest tests (docs/testing.md):
exact bounds, lines split over reads, the serial log's rotation and the control channel's
deadlines.
"""

from __future__ import annotations

import json
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.errors import VMError
from microagent.runtime import control
from microagent.runtime.backend import EXIT_CODE_MAX, MAX_MARKS, MAX_OUTPUTS, GuestResult
from microagent.runtime.control import (
    BEGIN_MARKER,
    END_MARKER,
    MAX_LINE,
    MAX_SERIAL_LINE,
    ControlChannel,
    EventLines,
    EventLog,
    SerialStream,
    rotate_log,
    tail_text,
)

# -- the exited event ----------------------------------------------------------------------------


def _malformed(event: dict[str, object]) -> str:
    with pytest.raises(VMError) as raised:
        GuestResult.from_event({"event": "exited", "exit_code": 0, **event}, {})
    return raised.value.message


def test_every_field_of_a_sound_event_is_kept() -> None:
    event = {
        "event": "exited",
        "exit_code": EXIT_CODE_MAX,
        "stdout": "out",
        "stderr": "err",
        "stdout_truncated": True,
        "stderr_truncated": True,
        "started_at": "t0",
        "finished_at": "t1",
        "error": "",
        "stopped": True,
        "outputs": {"r": {"path": "/r", "content": "{}", "truncated": False}, "n": None},
        "marks": {"boot": 1, "run": 2.5},
    }
    result = GuestResult.from_event(event, {"host.x": 0.5})
    assert result == GuestResult(
        exit_code=255,
        stdout="out",
        stderr="err",
        stdout_truncated=True,
        stderr_truncated=True,
        started_at="t0",
        finished_at="t1",
        error=None,
        stopped=True,
        outputs={"r": {"path": "/r", "content": "{}", "truncated": False}, "n": None},
        timings={"host.x": 0.5, "guest.boot": 1.0, "guest.run": 2.5},
    )


def test_absent_fields_take_their_defaults() -> None:
    result = GuestResult.from_event({"event": "exited", "exit_code": 3}, {})
    assert result == GuestResult(exit_code=3)


def test_each_field_of_the_wrong_type_is_named() -> None:
    assert _malformed({"exit_code": EXIT_CODE_MAX + 1}) == (
        "the guest's exited event is malformed: exit_code: expected an integer from 0 to 255, "
        "got int 256"
    )
    message = _malformed(
        {
            "outputs": {
                "a": {"path": 1},
                "b": {"truncated": "yes"},
                "c": {"content": None},
            },
            "stderr": "x" * 40,
        }
    )
    assert message == (
        "the guest's exited event is malformed: "
        "outputs.a: expected null or {path, content, truncated}, got dict {'path': 1}; "
        "outputs.b: expected null or {path, content, truncated}, got dict {'truncated': 'yes'}; "
        "outputs.c: expected null or {path, content, truncated}, got dict {'content': None}"
    )


def test_a_shown_value_is_cut_after_forty_characters() -> None:
    exact = "x" * 38  # repr adds the quotes: 40 characters
    assert _malformed({"stdout_truncated": exact}).endswith(f"got str '{exact}'")
    longer = "y" * 39
    assert _malformed({"stdout_truncated": longer}).endswith("got str '" + "y" * 36 + "...")


def test_marks_and_outputs_up_to_their_limits_are_taken() -> None:
    marks = {f"m{i}": i for i in range(MAX_MARKS)}
    outputs = {f"o{i}": None for i in range(MAX_OUTPUTS)}
    result = GuestResult.from_event(
        {"event": "exited", "exit_code": 0, "marks": marks, "outputs": outputs}, {}
    )
    assert len(result.timings) == MAX_MARKS
    assert len(result.outputs) == MAX_OUTPUTS
    assert _malformed({"marks": {**marks, "one": 1}}).startswith(
        f"the guest's exited event is malformed: marks: expected an object of at most {MAX_MARKS}"
    )
    assert _malformed({"outputs": {**outputs, "one": None}}).startswith(
        "the guest's exited event is malformed: outputs: expected an object of at most "
        f"{MAX_OUTPUTS}"
    )


def test_the_hint_says_who_may_disagree() -> None:
    with pytest.raises(VMError) as raised:
        GuestResult.from_event({"event": "exited"}, {})
    assert raised.value.message == "the guest's exited event is malformed: exit_code: missing"
    assert raised.value.hint == (
        "the guest init and this host disagree on the event format, or a process in the guest "
        "wrote to the control port; the serial log may tell more"
    )


# -- control lines -------------------------------------------------------------------------------


def test_an_event_split_over_reads_is_one_event() -> None:
    lines = EventLines()
    assert lines.feed(b'{"event": "bo') == []
    assert lines.feed(b'oted"}\n{"event"') == [{"event": "booted"}]
    assert lines.feed(b': "started"}\n') == [{"event": "started"}]


def test_a_line_of_exactly_max_line_bytes_is_kept() -> None:
    head = b'{"event": "x", "pad": "'
    line = head + b"p" * (MAX_LINE - len(head) - 2) + b'"}'
    assert len(line) == MAX_LINE
    lines = EventLines()
    assert lines.feed(line) == []
    [event] = lines.feed(b"\n")
    assert event["event"] == "x"


def test_an_overlong_line_is_dropped_up_to_its_newline() -> None:
    """What follows the cut, up to the newline, is the long line's tail: never an event,
    however it looks; the skipping lasts over reads without a newline."""
    forged = b'{"event": "forged"}\n{"event": "after"}\n'
    lines = EventLines()
    assert lines.feed(b'{"event": "x", "pad": "' + b"p" * MAX_LINE) == []
    assert lines.feed(forged) == [{"event": "after"}]
    lines = EventLines()
    assert lines.feed(b'{"event": "x", "pad": "' + b"p" * MAX_LINE) == []
    assert lines.feed(b"q" * 1000) == []  # still inside the long line
    assert lines.feed(forged) == [{"event": "after"}]


def test_the_event_log_counts_what_it_drops() -> None:
    log = EventLog(limit=1)
    assert log.add({"event": "a"}) is True
    assert log.add({"event": "b"}) is False
    assert log.add({"event": "c"}) is False
    assert log.dropped == 2
    assert log.snapshot() == ({"event": "a"},)


# -- the serial log ------------------------------------------------------------------------------


def test_rotation_keeps_the_last_limit_bytes_privately(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"0123456789")
    assert rotate_log(log, limit=10) is False  # at the limit: left alone
    assert log.read_bytes() == b"0123456789"
    log.write_bytes(b"0123456789A")
    assert rotate_log(log, limit=10) is True
    kept = tmp_path / "serial.log.1"
    assert kept.read_bytes() == b"123456789A"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert log.read_bytes() == b""
    assert rotate_log(tmp_path / "absent.log", limit=10) is False
    assert not (tmp_path / "absent.log.1").exists()


def test_tail_text_is_the_last_lines_cleaned(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"".join(f"line {i}\r\n".encode() for i in range(30)) + b"bad \xff end\n")
    assert tail_text(log) == "\n".join(
        [*(f"line {i}" for i in range(11, 30)), "bad \N{REPLACEMENT CHARACTER} end"]
    )
    log.write_bytes(b"abc\nd\ref\n")
    assert tail_text(log) == "abc\ndef"  # the first byte too; a lone CR is dropped


def _stream(tmp_path: Path) -> tuple[Path, SerialStream, list[bytes]]:
    got: list[bytes] = []
    log = tmp_path / "serial.log"
    log.write_bytes(b"")
    return log, SerialStream(log, got.append), got


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)


def test_serial_output_is_passed_on_once_as_the_log_grows(tmp_path: Path) -> None:
    log, stream, got = _stream(tmp_path)
    _append(log, f"boot\n{BEGIN_MARKER}\none XX\r\n".encode())
    stream.pump()
    stream.pump()  # nothing new: nothing passed on again
    _append(log, b"two\n")
    stream.pump()
    _append(log, f"last{END_MARKER} 0 ---  {END_MARKER}\nafter\n".encode())
    stream.pump()
    assert got == [b"one XX\n", b"two\n", b"last"]


def test_a_long_console_line_is_passed_on_in_pieces_only_past_the_limit(tmp_path: Path) -> None:
    log, stream, got = _stream(tmp_path)
    _append(log, f"{BEGIN_MARKER}\n".encode() + b"a" * MAX_SERIAL_LINE)
    stream.pump()
    assert got == []
    _append(log, b"b")
    stream.pump()
    assert got == [b"a" * MAX_SERIAL_LINE + b"b"]
    _append(log, b"c\n")
    stream.pump()
    assert got == [b"a" * MAX_SERIAL_LINE + b"b", b"c\n"]


def test_a_rotated_log_is_read_again_from_its_start(tmp_path: Path) -> None:
    log, stream, got = _stream(tmp_path)
    _append(log, f"{BEGIN_MARKER}\nfirst line of output\n".encode())
    stream.pump()
    log.write_bytes(b"new\n")  # shorter than what was read: rotated
    stream.pump()
    assert got == [b"first line of output\n", b"new\n"]


# -- the control channel -------------------------------------------------------------------------


class _Guest:
    """The VMM's end of the control socket: accepts one connection, optionally reads."""

    def __init__(self, path: Path, *, read: bool) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.received = b""
        self.conn: socket.socket | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._serve, args=(read,), daemon=True).start()

    def _serve(self, read: bool) -> None:
        self.conn, _ = self.server.accept()
        self.ready.set()
        while read and (chunk := self.conn.recv(65536)):
            self.received += chunk

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ma-ctl-") as tmp:  # short: a socket path
        yield Path(tmp)


def test_send_writes_one_compact_line_and_only_when_connected(sock_dir: Path) -> None:
    channel = ControlChannel(sock_dir / "ctl.sock")
    assert channel.send({"a": 1}) is False  # not connected yet
    guest = _Guest(sock_dir / "ctl.sock", read=True)
    try:
        assert channel.try_connect() is True
        assert channel.try_connect() is True  # already connected
        assert guest.ready.wait(5)
        assert channel.send({"a": 1, "b": [1, 2]}, timeout=0.5) is True
        deadline = time.monotonic() + 5
        while guest.received != b'{"a":1,"b":[1,2]}\n' and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guest.received == b'{"a":1,"b":[1,2]}\n'
        channel.close()
        assert channel.send({"a": 1}) is False
        assert channel.try_connect() is False
    finally:
        guest.close()


def test_send_gives_up_at_its_deadline_when_the_guest_does_not_read(sock_dir: Path) -> None:
    channel = ControlChannel(sock_dir / "ctl.sock")
    guest = _Guest(sock_dir / "ctl.sock", read=False)
    try:
        assert channel.try_connect()
        started = time.monotonic()
        assert channel.send({"pad": "x" * (8 << 20)}, timeout=0.3) is False
        assert time.monotonic() - started < 5
    finally:
        channel.close()
        guest.close()


def test_poll_waits_no_longer_than_asked(sock_dir: Path) -> None:
    channel = ControlChannel(sock_dir / "ctl.sock")
    guest = _Guest(sock_dir / "ctl.sock", read=False)
    try:
        assert channel.try_connect()
        assert guest.ready.wait(5)
        started = time.monotonic()
        assert channel.poll(0.05) == []
        assert time.monotonic() - started < 3
        assert guest.conn is not None
        guest.conn.sendall(json.dumps({"event": "booted"}).encode() + b"\n")
        deadline = time.monotonic() + 5
        events: list[dict[str, object]] = []
        while not events and time.monotonic() < deadline:
            events = channel.poll(0.05)
        assert events == [{"event": "booted"}]
        guest.conn.close()
        while not channel.closed and time.monotonic() < deadline:
            channel.poll(0.05)
        assert channel.closed
    finally:
        channel.close()
        guest.close()


def test_the_limits_are_what_the_guest_contract_says() -> None:
    assert (control.MAX_LINE, control.MAX_EVENT_DEPTH) == (16 << 20, 16)
