"""`microagent audit` and `workspace.audit` on hand-written logs: text and --json, the rotated
file first, garbage and over-long lines skipped, control characters stripped, `-f` following
new lines and a rotation, and the summary `status` shows."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from microagent.runtime.rundir import RunDir, State
from microagent.workspace import audit

BROKER = {
    "time": "2026-05-01T10:00:00.123Z",
    "kind": "broker",
    "credential": "anthropic",
    "method": "POST",
    "path": "/v1/messages",
    "status": 200,
    "bytesIn": 512,
    "bytesOut": 20480,
    "durationMs": 812,
    "decision": "allow",
}
EGRESS = {
    "time": "2026-05-01T10:00:01.000Z",
    "kind": "egress",
    "host": "evil.example",
    "port": 443,
    "method": "CONNECT",
    "status": 403,
    "bytesIn": 0,
    "bytesOut": 0,
    "durationMs": 1,
    "decision": "deny",
    "reason": "not in network.allow",
}


def line(entry: dict[str, Any]) -> str:
    return json.dumps(entry) + "\n"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    ws = tmp_path / "home" / "workspaces" / "aud"
    (ws / "runtime").mkdir(parents=True)
    (ws / "workspace.json").write_text("{}")
    RunDir(ws / "runtime").set_state(State.STOPPED, "test")
    return ws / "runtime"


def test_entries_rotated_first_garbage_skipped(home: Path) -> None:
    log = home / "audit.jsonl"
    (home / "audit.jsonl.1").write_text(line({**BROKER, "path": "/old"}))
    log.write_bytes(
        b"not json\n"
        + b"[1, 2]\n"
        + b"\xff\xfe\n"
        + b'{"kind": "broker", "path": "'
        + b"x" * 9000
        + b'"}\n'
        + b"[" * 5000
        + b"]" * 5000
        + b"\n"
        + b"\n"
        + line(BROKER).encode()
        + line(EGRESS).encode()
        + b'{"kind": "egress", "decision": "allow", "bytesIn": true, "bytesOut": -5}'
    )
    got = list(audit.entries(log))
    assert [e.get("path") for e in got] == ["/old", "/v1/messages", None, None]
    assert audit.summary(log) == {"requests": 4, "denied": 1, "bytesIn": 1024, "bytesOut": 40960}
    assert audit.summary(home / "missing.jsonl") == {
        "requests": 0,
        "denied": 0,
        "bytesIn": 0,
        "bytesOut": 0,
    }


def test_long_lines_are_dropped_while_streaming() -> None:
    lines = audit._Lines()
    out = list(lines.feed(b'{"a": 1}\n' + b"y" * 5000))
    out += list(lines.feed(b"y" * 5000))  # now over the bound: not held
    out += list(lines.feed(b'\n{"b": 2}\n{"c"'))
    assert out == [b'{"a": 1}', b'{"b": 2}']
    assert lines.tail() == b'{"c"'


def test_audit_command_text_and_json(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "audit.jsonl.1").write_text(line(BROKER))
    hostile = {**EGRESS, "host": "a\x1b[31mred\x07.example", "reason": "bad\nline\u202e"}
    (home / "audit.jsonl").write_text(line(hostile) + "garbage\n")
    assert main(["audit", "aud"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert out[0].split() == [
        "TIME",
        "KIND",
        "CREDENTIAL/HOST",
        "METHOD",
        "PATH",
        "STATUS",
        "IN",
        "OUT",
        "MS",
        "DECISION",
        "REASON",
    ]
    assert out[1].split() == [
        "2026-05-01T10:00:00.123Z",
        "broker",
        "anthropic",
        "POST",
        "/v1/messages",
        "200",
        "512",
        "20480",
        "812",
        "allow",
    ]
    assert "a[31mred.example:443" in out[2] and "badline" in out[2]
    assert "\x1b" not in out[2] and "\u202e" not in out[2]
    assert out[1].index("POST") == out[2].index("CONNECT")  # aligned
    assert out[0].index("DECISION") == out[1].index("allow")

    for args in (["--json", "audit", "aud"], ["audit", "aud", "--json"]):
        assert main(args) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["ok"] is True and doc["workspace"] == "aud"
        assert doc["entries"] == [BROKER, hostile]
        assert doc["summary"] == {"requests": 2, "denied": 1, "bytesIn": 512, "bytesOut": 20480}


def test_audit_of_an_empty_log_and_unknown_workspace(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--json", "audit", "aud"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["entries"] == [] and doc["summary"]["requests"] == 0
    assert main(["--json", "audit", "nope"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["kind"] == "not_found"


def test_follow_prints_until_the_workspace_stops(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (home / "audit.jsonl").write_text(line(BROKER))
    assert main(["--json", "audit", "-f", "aud"]) == 0  # stopped: what is there, then done
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == [BROKER]


def test_follow_sees_new_lines_and_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text(line({**BROKER, "path": "/1"}))
    done = threading.Event()
    seen: list[str] = []

    def writer() -> None:
        time.sleep(0.1)
        with log.open("a") as fh:
            fh.write(line({**BROKER, "path": "/2"}))
        time.sleep(0.1)
        with log.open("a") as fh:  # written just before the rotation
            fh.write(line({**BROKER, "path": "/3"}))
        log.replace(tmp_path / "audit.jsonl.1")
        log.write_text(line({**BROKER, "path": "/4"}))
        time.sleep(0.1)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    for entry in audit.follow(log, stop=done.is_set, poll=0.02):
        seen.append(entry["path"])
    thread.join()
    assert seen == ["/1", "/2", "/3", "/4"]
