"""Workspaces end to end through the CLI with the fake backend (no VM, real supervisor).

The base image is the busybox stand-in as a local OCI layout, so nothing needs a network; the
guest kit is replaced by placeholder files (the fake backend boots nothing).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from testenv.clitools import cli_json as cli
from testenv.leaks import files_holding

SECRET = "sk-unit-secret-0042"


@pytest.fixture
def project(busybox_project: Path) -> Path:
    proj = busybox_project
    (proj / "note.txt").write_text("hello\n")
    (proj / "microagent.yaml").write_text(
        "name: ws\n"
        "image: oci:layout:latest\n"
        "setup: [mkdir -p /workspace]\n"
        "files: [{src: note.txt, dst: /app/note.txt}]\n"
        "entrypoint: cat /app/note.txt\n"
        "outputs: [{name: result, path: /workspace/result.json}]\n"
    )
    return proj


def outcome(monkeypatch: pytest.MonkeyPatch, **fields: Any) -> None:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(fields))


def wait_state(capsys: pytest.CaptureFixture[str], name: str, states: set[str]) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = str(cli(capsys, "status", name)["event"]["state"])
        if state in states:
            return state
        time.sleep(0.1)
    pytest.fail(f"{name} never reached {states}")


def test_create_start_result_delete(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = str(project / "microagent.yaml")
    created = cli(capsys, "create", "-f", spec, "-e", f"API_KEY={SECRET}")
    assert (created["state"], created["setupBoots"], created["stepsBuilt"]) == ("prepared", 1, 1)
    home = Path(os.environ["MICROAGENT_HOME"])
    record = home / "workspaces" / "ws" / "workspace.json"
    assert record.stat().st_mode & 0o777 == 0o600
    assert SECRET in record.read_text()
    assert files_holding(home / "store", SECRET) == []

    result = {"request_id": "r1", "status": "completed"}
    outcome(
        monkeypatch,
        stdout="hello\n",
        outputs={"result": {"path": "/workspace/result.json", "content": json.dumps(result)}},
    )
    cli(capsys, "start", "ws")
    assert wait_state(capsys, "ws", {"stopped", "failed"}) == "stopped"
    status = cli(capsys, "status", "ws")
    assert status["ok"] and status["readiness"]["resultReady"]["ready"]
    assert status["result"]["workResult"] == result
    assert cli(capsys, "result", "ws")["result"]["stdout"] == "hello\n"
    events = [e["event"] for e in cli(capsys, "events", "ws")["events"]]
    assert events[:1] == ["prepared"] and events[-2:] == ["stopped", "supervisor-exit"]

    again = cli(capsys, "create", "-f", spec, "--name", "ws2")
    assert (again["setupBoots"], again["stepsCached"]) == (0, 1)
    assert [w["name"] for w in cli(capsys, "list")["workspaces"]] == ["ws", "ws2"]
    assert cli(capsys, "delete", "-y", "ws", "ws2")["results"][0]["deleted"]
    assert cli(capsys, "delete", "-y", "ws")["results"][0]["deleted"] is False
    assert cli(capsys, "list")["workspaces"] == []


def test_name_clash_and_unknown_workspace(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = str(project / "microagent.yaml")
    cli(capsys, "create", "-f", spec)
    clash = cli(capsys, "create", "-f", spec, code=1)
    assert clash["error"]["kind"] == "conflict"
    missing = cli(capsys, "status", "nope", code=1)
    assert missing["error"]["kind"] == "not_found"
    assert cli(capsys, "result", "ws", code=1)["error"]["message"].startswith(
        "workspace 'ws' has no result yet"
    )


def test_failed_setup_leaves_nothing(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome(monkeypatch, exitCode=3, stderr="boom\n")
    failed = cli(capsys, "create", "-f", str(project / "microagent.yaml"), code=1)
    assert "setup step failed (exit code 3)" in failed["error"]["message"]
    assert "boom" in failed["error"]["message"]
    home = Path(os.environ["MICROAGENT_HOME"])
    assert list((home / "workspaces").iterdir()) == []
    kinds = [json.loads(p.read_text())["kind"] for p in (home / "store").glob("keys/*.json")]
    assert kinds == ["base"], "nothing may be cached for the failed step"
    assert len(list((home / "store").glob("rootfs/*.ext4"))) == 1
    monkeypatch.delenv("MICROAGENT_FAKE")
    assert cli(capsys, "create", "-f", str(project / "microagent.yaml"))["stepsBuilt"] == 1


def test_entrypoint_failure_and_wait_exit_code(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    outcome(monkeypatch, exitCode=5, stderr="bad\n")
    capsys.readouterr()
    assert main(["start", "ws", "--wait"]) == 5
    status = cli(capsys, "status", "ws")
    assert status["ok"] is False and status["event"]["state"] == "failed"
    assert status["event"]["detail"] == "entrypoint exited with code 5"


def test_running_workspace_refuses_start_cp_delete_then_halts(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:  # fmt: skip
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    outcome(monkeypatch, hang=True)
    cli(capsys, "start", "ws")
    assert wait_state(capsys, "ws", {"running"}) == "running"
    assert cli(capsys, "start", "ws", code=1)["error"]["kind"] == "conflict"
    src = tmp_path / "f.txt"
    src.write_text("x")
    assert "halt" in cli(capsys, "cp", str(src), "ws:/tmp/f.txt", code=1)["error"]["hint"]
    assert cli(capsys, "delete", "-y", "ws", code=1)["error"]["kind"] == "conflict"
    assert cli(capsys, "halt", "ws")["state"] == "halted"
    assert cli(capsys, "halt", "ws")["state"] == "halted"
    cli(capsys, "cp", str(src), "ws:/tmp/f.txt")
    copied = tmp_path / "back.txt"
    cli(capsys, "cp", "ws:/tmp/f.txt", str(copied))
    assert copied.read_text() == "x"


def test_dead_supervisor_is_reported_as_failed(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    outcome(monkeypatch, hang=True)
    cli(capsys, "start", "ws")
    wait_state(capsys, "ws", {"running"})
    runtime = json.loads(
        (Path(os.environ["MICROAGENT_HOME"]) / "workspaces/ws/runtime/runtime.json").read_text()
    )
    os.killpg(runtime["supervisorPid"], signal.SIGKILL)
    time.sleep(0.3)
    status = cli(capsys, "status", "ws")
    assert status["event"]["state"] == "failed"
    assert "supervisor process died" in status["event"]["detail"]
    assert cli(capsys, "delete", "-y", "ws")["results"][0]["deleted"]


def test_force_delete_kills_a_running_workspace(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    outcome(monkeypatch, hang=True)
    cli(capsys, "start", "ws")
    wait_state(capsys, "ws", {"running"})
    assert cli(capsys, "delete", "-y", "--force", "ws")["results"][0]["deleted"]
