"""What the guest sends back: reported when it is wrong, bounded when it never ends.

- a declared ``result`` output that is not JSON is reported where the result is read
  (``status`` and ``result``, with ``--json`` and as text), its content kept; it is never
  dropped as if there were no result, and never an error of the command;
- a control line or a console line without a newline is never kept whole: the host's
  memory stays bounded however long the guest writes, and what follows the runaway line
  is read as usual.

Memory is measured with ``tracemalloc`` (a peak far below what the guest sent), so the
tests do not depend on how the readers hold their buffers.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from microagent.runtime import control
from microagent.runtime.control import BEGIN_MARKER, END_MARKER, ControlChannel, SerialStream
from testenv.clitools import cli_json as cli
from testenv.clitools import run_fake_guest

MiB = 1 << 20


# -- a `result` that is not JSON ----------------------------------------------------------------


@pytest.fixture
def project(busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (busybox_project / "microagent.yaml").write_text(
        "name: ws\nimage: oci:layout:latest\nentrypoint: 'true'\n"
        "outputs:\n  - {name: result, path: /workspace/result.json}\n"
        "  - {name: notes, path: /workspace/notes.txt}\n"
    )
    return busybox_project


def run_guest(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, project: Path, **fake: Any
) -> None:
    """Create ``ws`` and run it once with the fake guest reporting ``fake``; wait for the end."""
    run_fake_guest(capsys, monkeypatch, project / "microagent.yaml", fake, timeout=30)


def text(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().out


def outputs(result: str, notes: str = "free text, not JSON") -> dict[str, Any]:
    return {
        "result": {"path": "/workspace/result.json", "content": result, "truncated": False},
        "notes": {"path": "/workspace/notes.txt", "content": notes, "truncated": False},
    }


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("all done, no JSON here", "Expecting value: line 1 column 1 (char 0)"),
        ('{"request_id": "r1", "status": "do', "Unterminated string starting at"),
        ('{"status": "done"} trailing', "Extra data: line 1 column 20 (char 19)"),
        ("", "Expecting value: line 1 column 1 (char 0)"),
    ],
    ids=["prose", "cut-short", "trailing-garbage", "empty"],
)
def test_a_result_that_is_not_json_is_reported(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    content: str,
    why: str,
) -> None:
    run_guest(capsys, monkeypatch, project, exitCode=0, outputs=outputs(content))
    status = cli(capsys, "status", "ws")  # the workspace itself is fine: exit 0, ok
    assert status["ok"] and status["event"]["state"] == "stopped"
    for document in (status["result"], cli(capsys, "result", "ws")["result"]):
        result, notes = document["outputs"]
        assert result["name"] == "result" and result["present"] is True
        assert result["error"].startswith("the result file is not valid JSON: ")
        assert why in result["error"]
        assert result["content"] == content and "value" not in result
        assert "workResult" not in document
        assert notes == {  # another output is free text: kept, never an error
            "name": "notes",
            "path": "/workspace/notes.txt",
            "present": True,
            "truncated": False,
            "content": "free text, not JSON",
        }
    code, shown = text(capsys, "result", "ws")
    assert code == 0
    assert shown.startswith(
        "exit code 0; no WorkResult (declared output `result`): the result file is not valid JSON: "
    )
    assert why in shown


def test_a_json_result_has_no_error(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the guard: valid JSON is the WorkResult, and nothing is reported."""
    work = {"request_id": "r1", "status": "done", "content": "42"}
    run_guest(capsys, monkeypatch, project, exitCode=0, outputs=outputs(json.dumps(work), "{}"))
    document = cli(capsys, "result", "ws")["result"]
    assert document["workResult"] == work
    assert [o.get("error") for o in document["outputs"]] == [None, None]
    assert document["outputs"][1]["value"] == {}
    code, shown = text(capsys, "result", "ws")
    assert (code, shown) == (0, "r1: done (exit code 0)\n42\n")


# -- memory: a control line without an end -----------------------------------------------------


def peak_while(work: Callable[[], None]) -> int:
    """The peak of traced allocations while ``work`` runs, in bytes."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def guest_socket(tmp_path: Path) -> Iterator[tuple[ControlChannel, socket.socket]]:
    """A connected control channel and the guest's end of it (QEMU serves it for real)."""
    path = tmp_path / "ctl.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    channel = ControlChannel(path)
    assert channel.try_connect()
    conn, _ = server.accept()
    yield channel, conn
    channel.close()
    conn.close()
    server.close()


def test_a_runaway_control_line_is_not_kept_in_memory(
    guest_socket: tuple[ControlChannel, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_LINE", 256 << 10)
    channel, conn = guest_socket
    sent = 24 * MiB
    piece = b"x" * MiB
    got: list[dict[str, Any]] = []

    def guest() -> None:
        for _ in range(sent // MiB):
            conn.sendall(piece)
        conn.sendall(b'"}\n{"event":"booted"}\n{"event":"exited","exit_code":0}\n')

    def host() -> None:
        player = threading.Thread(target=guest)
        player.start()
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            got.extend(channel.poll(0.05))
        player.join(10)

    peak = peak_while(host)
    assert got == [{"event": "booted"}, {"event": "exited", "exit_code": 0}]
    assert peak < 4 * MiB, f"{peak} bytes held for a line of {sent} (limit 256 KiB)"


def test_a_control_line_at_the_limit_is_still_an_event(
    guest_socket: tuple[ControlChannel, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound is on length only: a line as long as the limit (newline included) parses."""
    monkeypatch.setattr(control, "MAX_LINE", 64 << 10)
    channel, conn = guest_socket
    head = b'{"event":"note","pad":"'
    line = head + b"p" * ((64 << 10) - len(head) - 3) + b'"}\n'
    assert len(line) == 64 << 10
    conn.sendall(line)
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        got.extend(channel.poll(0.05))
    assert [e["event"] for e in got] == ["note"] and len(got[0]["pad"]) == len(line) - 26


# -- memory: a console line without an end ------------------------------------------------------


class Counting:
    """A console sink that counts what it is given and keeps only the short pieces."""

    def __init__(self) -> None:
        self.total = 0
        self.short: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.total += len(data)
        if len(data) < 100:
            self.short.append(data)


@pytest.mark.parametrize("where", ["boot", "command"])
def test_a_runaway_console_line_is_not_kept_in_memory(tmp_path: Path, where: str) -> None:
    """Before the command starts a long line is dropped, during it passed on in pieces; in
    both cases the marker or line after it is seen, and memory stays bounded."""
    log = tmp_path / "serial.log"
    sent = 24 * MiB
    with log.open("wb") as fh:
        if where == "command":
            fh.write(BEGIN_MARKER.encode() + b"\n")
        for _ in range(sent // MiB):
            fh.write(b"y" * MiB)
        fh.write(b"\n")
        if where == "boot":
            fh.write(BEGIN_MARKER.encode() + b"\r\n")
        fh.write(b"after\n" + END_MARKER.encode() + b" 0\n")
    sink = Counting()
    peak = peak_while(SerialStream(log, sink).pump)
    assert sink.short[-1] == b"after\n"
    assert sink.total == len(b"after\n") + (sent + 1 if where == "command" else 0)
    limit = 3 * control.SERIAL_READ + 2 * control.MAX_SERIAL_LINE  # a piece read, a copy
    assert peak < limit, f"{peak} bytes held for a console line of {sent}"
