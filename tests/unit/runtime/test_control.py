"""Control channel (JSON lines over a unix socket) and the serial output stream."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from microagent.runtime.control import (
    BEGIN_MARKER,
    END_MARKER,
    ControlChannel,
    SerialStream,
    parse_event,
    tail_text,
)


def test_parse_event() -> None:
    assert parse_event(b'{"event":"booted","uptime":1.2}') == {"event": "booted", "uptime": 1.2}
    assert parse_event(b"not json") is None
    assert parse_event(b'{"no_event":1}') is None
    assert parse_event(b'{"event":"exited","stdout":"\xff"}') == {
        "event": "exited",
        "stdout": "\ufffd",
    }


def test_channel_reads_split_lines_and_sends(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got: list[bytes] = []

    def guest() -> None:
        conn, _ = server.accept()
        conn.sendall(b'{"event":"booted"}\n{"event":"sta')
        conn.sendall(b'rted"}\ngarbage\n')
        got.append(conn.recv(100))
        conn.close()

    thread = threading.Thread(target=guest)
    thread.start()
    channel = ControlChannel(path)
    assert channel.try_connect()
    events: list[dict[str, object]] = []
    for _ in range(50):
        events += channel.poll(0.05)
        if len(events) == 2:
            break
    assert [e["event"] for e in events] == ["booted", "started"]
    assert channel.send({"op": "shutdown"})
    thread.join(5)
    assert got == [b'{"op":"shutdown"}\n']
    for _ in range(20):
        channel.poll(0.05)
    assert channel.closed
    channel.close()
    assert not channel.try_connect() and not channel.send({"op": "x"})
    server.close()


def test_connect_before_the_socket_exists(tmp_path: Path) -> None:
    channel = ControlChannel(tmp_path / "missing.sock")
    assert not channel.try_connect()
    assert channel.poll(0.0) == []


def test_serial_stream_passes_only_the_command_output(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    out: list[bytes] = []
    stream = SerialStream(log, out.append)
    stream.pump()  # no file yet
    log.write_bytes(b"[ 0.1] kernel line\r\n" + BEGIN_MARKER.encode() + b"\r\nhello\r\npart")
    stream.pump()
    with log.open("ab") as fh:
        fh.write(b"ial" + END_MARKER.encode() + b" 0\r\n[ 2.0] reboot: Power down\r\n")
    stream.pump()
    assert b"".join(out) == b"hello\npartial"


def test_tail_text(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"a\r\nb\nc\n")
    assert tail_text(log, 2) == "b\nc"
    assert tail_text(tmp_path / "none") == ""
