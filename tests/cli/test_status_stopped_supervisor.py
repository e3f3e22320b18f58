"""A workspace whose supervisor is stopped (SIGSTOP) is still live, but nothing answers for
it: ``status`` says so (text and JSON: ``supervisor``, the detail, exec not ready) instead of a
plain "running", is back to normal after SIGCONT, and ``halt`` of such a workspace resumes the
supervisor so it halts cleanly (no kill after the timeout). Real supervisors, fake backend
with the stand-in guest agent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from microagent import runner
from microagent.cli import main
from microagent.runner import ProcessIdentity
from microagent.workspace.records import Workspace
from testenv.agent_standin import standin_argv
from testenv.clitools import cli_json as cli
from testenv.supervised import end_leftovers


@pytest.fixture
def project(
    busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"hang": True, "agent": standin_argv()}))
    yield busybox_project
    end_leftovers(tmp_path / "home")


def until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never: {what}")
        time.sleep(0.05)


def text(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def sched_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]


def exec_ready(capsys: pytest.CaptureFixture[str], name: str) -> bool:
    return bool(cli(capsys, "status", name)["readiness"]["execReady"]["ready"])


def test_status_and_halt_of_a_workspace_whose_supervisor_is_stopped(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = project / "ws.yaml"
    spec.write_text("name: ws\nimage: oci:layout:latest\nentrypoint: sleep 600\n")
    cli(capsys, "create", "-f", str(spec))
    assert cli(capsys, "start", "ws")["state"] == "running"
    until(lambda: exec_ready(capsys, "ws"), "the guest agent is ready")
    ws = Workspace(tmp_path / "home" / "workspaces" / "ws")
    supervisor = ProcessIdentity.from_json(ws.run.runtime()["supervisor"])
    assert supervisor is not None and runner.is_running(supervisor)
    pid = supervisor.pid
    normal = cli(capsys, "status", "ws")
    assert normal["supervisor"] == {"pid": pid, "state": "running", "responsive": True}
    try:
        os.kill(pid, signal.SIGSTOP)
        until(lambda: sched_state(pid) == "T", "the supervisor is stopped")
        first = text(capsys, "status", "ws").splitlines()[0]
        assert first.startswith(f"ws: running (the supervisor (pid {pid}) is stopped (SIGSTOP")
        assert f"`kill -CONT {pid}` resumes it, `microagent halt ws` resumes" in first
        assert "`microagent kill ws` stops it now" in first
        stopped = cli(capsys, "status", "ws")
        assert (stopped["ok"], stopped["event"]["state"]) == (True, "running")
        detail = stopped["supervisor"].pop("detail")
        assert stopped["supervisor"] == {"pid": pid, "state": "stopped", "responsive": False}
        assert stopped["event"]["detail"] == detail
        assert stopped["readiness"]["execReady"]["ready"] is False
        assert stopped["readiness"]["execReady"]["error"] == detail
        assert stopped["readiness"]["guestReady"] == normal["readiness"]["guestReady"]
        refused = cli(capsys, "exec", "ws", "--", "true", code=1)  # not a hang
        assert refused["error"]["kind"] == "conflict"
        assert refused["error"]["message"].endswith(detail)

        os.kill(pid, signal.SIGCONT)
        until(lambda: sched_state(pid) != "T", "the supervisor runs again")
        again = cli(capsys, "status", "ws")
        assert again["supervisor"] == normal["supervisor"]
        assert again["event"]["detail"] == normal["event"]["detail"]
        assert again["readiness"]["execReady"] == normal["readiness"]["execReady"]
        assert cli(capsys, "exec", "ws", "--", "true")["exitCode"] == 0

        os.kill(pid, signal.SIGSTOP)
        until(lambda: sched_state(pid) == "T", "the supervisor is stopped again")
        assert cli(capsys, "halt", "ws")["state"] == "halted"
        halted = cli(capsys, "status", "ws")
        assert not halted["event"]["detail"].startswith("killed after"), halted["event"]
        assert halted["supervisor"] is None
        seen = [e["event"] for e in cli(capsys, "events", "ws")["events"]]
        assert "supervisor-resumed" in seen
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
