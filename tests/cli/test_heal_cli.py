"""State that heals, as the CLI shows it (issue 16 item 2): after a kill -9 of a supervisor
``list``, ``status`` and ``ps`` say ``failed`` with the reason (text and JSON) and never a live
state; the credential gateway never outlives its supervisor, even one the kernel's
parent-death signal could not end; ``delete --force`` removes a workspace whose runtime.json
is half-written, with every process of it. Real supervisors, fake backend.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent import runner
from microagent.cli import main
from microagent.runner import ProcessIdentity
from microagent.workspace.lifecycle import leftovers
from microagent.workspace.records import Workspace
from testenv.clitools import cli_json as cli
from testenv.ports import free_port_pair
from testenv.supervised import end_leftovers

HANG_WITH_VMM = {"hang": True, "process": ["sleep", "600"]}


def until(check: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never: {what}")
        time.sleep(0.05)


def text(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> str:
    capsys.readouterr()
    assert main(list(args)) == code
    return capsys.readouterr().out


@pytest.fixture
def project(
    busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(HANG_WITH_VMM))
    base = free_port_pair()
    if base is None:
        pytest.fail("no two free consecutive loopback ports in 50 tries")
    monkeypatch.setenv("MICROAGENT_SERVICE_PORT_BASE", str(base))
    monkeypatch.setenv("MA_HEAL_SECRET", "sk-heal-not-a-real-key")
    yield busybox_project
    end_leftovers(tmp_path / "home")


def workspace(name: str) -> Workspace:
    return Workspace(Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / name)


def start(
    capsys: pytest.CaptureFixture[str], proj: Path, name: str, *, broker: bool = False
) -> Workspace:
    spec = proj / f"{name}.yaml"
    lines = [f"name: {name}", "image: oci:layout:latest", "entrypoint: sleep 600"]
    if broker:
        lines += [
            "credentials:",
            "  - name: internal",
            "    from: env:MA_HEAL_SECRET",
            "    upstream: http://127.0.0.1:9/base",
            "    header: Authorization",
            '    format: "Bearer {value}"',
            "    baseUrlEnv: INTERNAL_BASE_URL",
            "    keyEnv: INTERNAL_TOKEN",
        ]
    spec.write_text("\n".join(lines) + "\n")
    cli(capsys, "create", "-f", str(spec), *(["--credential", "internal"] if broker else []))
    cli(capsys, "start", name)
    ws = workspace(name)
    until(lambda: ws.run.vmm() is not None, "the VMM is recorded")
    return ws


def supervisor_of(ws: Workspace) -> ProcessIdentity:
    identity = ProcessIdentity.from_json(ws.run.runtime()["supervisor"])
    assert identity is not None and runner.is_running(identity)
    return identity


def kill_9(process: ProcessIdentity) -> None:
    os.kill(process.pid, signal.SIGKILL)
    until(lambda: not runner.is_running(process), f"pid {process.pid} is gone")


def test_list_status_and_ps_after_a_kill_9(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alive, dead = start(capsys, project, "alive"), start(capsys, project, "dead")
    supervisor = supervisor_of(dead)
    kill_9(supervisor)
    rows = {r["name"]: r["state"] for r in cli(capsys, "list")["workspaces"]}
    assert rows == {"alive": "running", "dead": "failed"}
    reason = (
        f"the supervisor process died unexpectedly (pid {supervisor.pid}; killed, or out of "
        "memory?)"
    )
    assert text(capsys, "status", "dead").splitlines()[0] == f"dead: failed ({reason})"
    status = cli(capsys, "status", "dead")
    assert (status["ok"], status["event"]["detail"]) == (False, reason)
    assert [r["name"] for r in cli(capsys, "ps")["workspaces"]] == ["alive"]
    listed = text(capsys, "list").splitlines()
    assert [line.split()[:2] for line in listed[1:]] == [["alive", "running"], ["dead", "failed"]]
    assert cli(capsys, "halt", "alive")["state"] == "halted"
    assert leftovers(alive) == [] and leftovers(dead) == []


def test_the_gateway_never_outlives_its_supervisor(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = start(capsys, project, "brokered", broker=True)
    gateway = ws.run.gateway_process()
    assert gateway is not None and runner.is_running(gateway)
    assert cli(capsys, "status", "brokered")["readiness"]["brokerReady"]["ready"] is True
    os.kill(gateway.pid, signal.SIGSTOP)  # so the parent-death SIGTERM cannot end it
    kill_9(supervisor_of(ws))
    time.sleep(0.2)
    assert runner.is_running(gateway), "only the kernel's signal so far, and it is pending"
    status = cli(capsys, "status", "brokered")
    assert status["event"]["state"] == "failed"
    assert status["readiness"]["brokerReady"] == {"ready": False, "error": "not running"}
    assert not runner.is_running(gateway), "the credentials left memory with it"
    assert [e["event"] for e in cli(capsys, "events", "brokered")["events"]][-1] == (
        "gateway-killed"
    )


def test_delete_force_of_a_workspace_with_a_half_written_runtime_json(
    project: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ws = start(capsys, project, "brokered", broker=True)
    supervisor, gateway, vmm = supervisor_of(ws), ws.run.gateway_process(), ws.run.vmm()
    assert gateway is not None and vmm is not None
    os.kill(gateway.pid, signal.SIGSTOP)
    kill_9(supervisor)
    whole = ws.run.runtime_path.read_bytes()
    ws.run.runtime_path.write_bytes(whole[: len(whole) // 2])  # nothing in it says what runs
    refused = cli(capsys, "delete", "-y", "brokered", code=1)["error"]
    assert refused["message"] == "workspace 'brokered' is running processes without its supervisor"
    assert runner.is_running(gateway), "refused without --force: nothing killed"
    assert text(capsys, "delete", "-y", "--force", "brokered") == "brokered: deleted\n"
    assert not ws.root.exists()
    for process in (supervisor, gateway, vmm):
        assert not runner.is_running(process)
    named = [
        pid
        for pid in runner.processes()
        if any(str(tmp_path / "home") in word for word in runner.command_line(pid))
    ]
    assert named == []
    assert text(capsys, "delete", "-y", "--force", "brokered") == "brokered: not found\n"


def test_status_of_a_workspace_whose_runtime_json_is_garbage(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = start(capsys, project, "ws")
    ws.run.runtime_path.write_bytes(b"\x00" * 100)
    status = cli(capsys, "status", "ws")
    assert status["event"]["state"] == "running", "its supervisor still runs"
    assert status["event"]["detail"].startswith(
        "runtime.json was unreadable (kept as runtime.json.corrupt); its supervisor still runs"
    )
    assert cli(capsys, "halt", "ws")["state"] == "halted"
    assert leftovers(ws) == []


def test_wait_ends_when_the_supervisor_is_killed(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = start(capsys, project, "ws")
    supervisor = supervisor_of(ws)
    killer = threading.Timer(0.5, os.kill, (supervisor.pid, signal.SIGKILL))
    killer.start()
    began = time.monotonic()
    done = cli(capsys, "wait", "ws", "--timeout", "20", code=1)
    killer.join()
    assert (done["state"], done["error"]["kind"]) == ("failed", "vm")
    assert time.monotonic() - began < 10, "noticed at once, not at the timeout"
