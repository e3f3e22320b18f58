"""Live workspaces through the CLI with the fake backend (no VM, real supervisor): stop, kill
(and the repairing check of the disk on the next start), wait, ps, and the restart policy.

Restarts back off from ``MICROAGENT_RESTART_BACKOFF`` (set small here), doubling.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent import runner
from microagent.cli import main
from microagent.compiler.spec import Restart
from microagent.runtime.backend import BootConfig, Disk
from microagent.runtime.rundir import BootDocument
from microagent.runtime.supervisor import BACKOFF_CAP, STABLE_RUN, Backoff
from testenv.clitools import cli_json as cli

HANG_WITH_VMM = {"hang": True, "process": ["sleep", "600"]}  # a stand-in VMM process


@pytest.fixture
def project(
    busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    monkeypatch.setenv("MICROAGENT_RESTART_BACKOFF", "0.05")
    yield busybox_project
    _stop_supervisors(tmp_path / "home")


def _stop_supervisors(home: Path) -> None:
    """Whatever a test left running (a restart policy restarts for ever) is stopped."""
    for path in home.glob("workspaces/*/runtime/runtime.json"):
        pid = json.loads(path.read_text()).get("supervisorPid")
        if isinstance(pid, int) and runner.pid_alive(pid):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


def create(capsys: pytest.CaptureFixture[str], proj: Path, name: str, restart: str) -> None:
    spec = proj / f"{name}.yaml"
    spec.write_text(
        f"name: {name}\nimage: oci:layout:latest\nentrypoint: echo hi\nrestart: {restart}\n"
    )
    cli(capsys, "create", "-f", str(spec))


def text(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> str:
    capsys.readouterr()
    assert main(list(args)) == code
    return capsys.readouterr().out


def outcome(monkeypatch: pytest.MonkeyPatch, **fields: Any) -> None:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(fields))


def status_until(
    capsys: pytest.CaptureFixture[str], name: str, done: Any, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = cli(capsys, "status", name)
        if done(status):
            return status
        time.sleep(0.05)
    pytest.fail(f"{name} never got {what}: {status['event']}")


def state_of(status: dict[str, Any]) -> str:
    return str(status["event"]["state"])


def runtime_json(name: str) -> dict[str, Any]:
    home = Path(os.environ["MICROAGENT_HOME"])
    data: dict[str, Any] = json.loads(
        (home / "workspaces" / name / "runtime" / "runtime.json").read_text()
    )
    return data


def events(capsys: pytest.CaptureFixture[str], name: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in cli(capsys, "events", name)["events"] if e["event"] == kind]


def running(capsys: pytest.CaptureFixture[str], name: str) -> dict[str, Any]:
    return status_until(capsys, name, lambda s: state_of(s) == "running", "running")


# -- stop, kill ---------------------------------------------------------------------------------


def test_stop_is_an_alias_of_halt(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    create(capsys, project, "ws", "never")
    outcome(monkeypatch, hang=True)
    cli(capsys, "start", "ws")
    running(capsys, "ws")
    assert cli(capsys, "stop", "ws") == {
        "ok": True,
        "schemaVersion": 1,
        "workspace": "ws",
        "state": "halted",
    }
    assert cli(capsys, "status", "ws")["event"]["detail"] == "halted on request"
    assert text(capsys, "stop", "ws") == text(capsys, "halt", "ws") == "ws: halted\n"
    assert "--timeout" in text(capsys, "stop", "--help")


def test_kill_stops_now_and_the_next_start_repairs_the_disk(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    create(capsys, project, "ws", "always")  # a kill is never followed by a restart
    outcome(monkeypatch, **HANG_WITH_VMM)
    cli(capsys, "start", "ws")
    running(capsys, "ws")
    before = runtime_json("ws")
    vmm = runner.ProcessIdentity.from_json(before["vmm"])
    assert vmm is not None and runner.is_running(vmm)

    killed = cli(capsys, "kill", "ws")
    assert killed == {
        "ok": True,
        "schemaVersion": 1,
        "workspace": "ws",
        "state": "stopped",
        "killed": True,
    }
    assert not runner.is_running(vmm)
    assert not runner.pid_alive(before["supervisorPid"])
    status = cli(capsys, "status", "ws")
    assert (state_of(status), status["event"]["detail"], status["ok"]) == (
        "stopped",
        "killed",
        True,
    )
    (event,) = events(capsys, "ws", "killed")
    assert event["supervisorPid"] == before["supervisorPid"]
    assert runtime_json("ws")["stateDiskDirty"] == "a kill"
    time.sleep(0.3)
    assert state_of(cli(capsys, "status", "ws")) == "stopped", "no restart after a kill"

    again = cli(capsys, "kill", "ws")
    assert again == {
        "ok": True,
        "schemaVersion": 1,
        "workspace": "ws",
        "state": "stopped",
        "killed": False,
    }
    assert text(capsys, "kill", "ws") == "ws: nothing to kill (already stopped)\n"

    # what a VM killed mid-write can leave: a wrong link count, which e2fsck -fy must fix
    disk = Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / "ws" / "state.ext4"
    subprocess.run(["debugfs", "-w", "-R", "sif <2> links_count 9", str(disk)], check=True)
    monkeypatch.delenv("MICROAGENT_FAKE")
    cli(capsys, "start", "ws")
    (fsck,) = events(capsys, "ws", "fsck")
    assert fsck["detail"] == "state disk checked after a kill: repaired"
    assert fsck["exitCode"] == 1
    assert not runtime_json("ws").get("stateDiskDirty")
    cli(capsys, "halt", "ws")
    assert (
        subprocess.run(["e2fsck", "-fn", str(disk)], check=False, capture_output=True).returncode
        == 0
    )
    cli(capsys, "start", "ws")
    assert len(events(capsys, "ws", "fsck")) == 1, "a clean stop needs no check"
    cli(capsys, "halt", "ws")  # `always`: left alone it would restart for ever


def test_kill_of_a_workspace_that_never_ran(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create(capsys, project, "ws", "never")
    assert cli(capsys, "kill", "ws")["killed"] is False
    assert events(capsys, "ws", "killed") == []
    assert cli(capsys, "kill", "nope", code=1)["error"]["kind"] == "not_found"


# -- wait ---------------------------------------------------------------------------------------


def test_wait_exit_codes(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    create(capsys, project, "ws", "never")
    assert cli(capsys, "wait", "ws") == {
        "ok": True,
        "schemaVersion": 1,
        "workspace": "ws",
        "state": "prepared",
    }
    cli(capsys, "start", "ws")
    assert cli(capsys, "wait", "ws") == {
        "ok": True,
        "schemaVersion": 1,
        "workspace": "ws",
        "state": "stopped",
    }

    outcome(monkeypatch, exitCode=3)
    cli(capsys, "start", "ws")
    failed = cli(capsys, "wait", "ws", code=1)
    assert failed.pop("error")["kind"] == "vm"
    assert failed == {"ok": False, "schemaVersion": 1, "workspace": "ws", "state": "failed"}

    outcome(monkeypatch, hang=True)
    cli(capsys, "start", "ws")
    began = time.monotonic()
    late = cli(capsys, "wait", "ws", "--timeout", "0.5", code=124)
    assert late.pop("error")["kind"] == "timeout"
    assert late == {
        "ok": False,
        "schemaVersion": 1,
        "workspace": "ws",
        "state": "running",
        "timedOut": True,
    }
    assert 0.5 <= time.monotonic() - began < 5
    assert text(capsys, "wait", "ws", "--timeout", "0.1", code=124).startswith("ws: still running")
    cli(capsys, "halt", "ws")
    assert text(capsys, "wait", "ws") == "ws: halted\n"


# -- ps -----------------------------------------------------------------------------------------


def test_ps_lists_only_live_workspaces(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("busy", "done", "orphan"):
        create(capsys, project, name, "never")
    cli(capsys, "start", "done")
    cli(capsys, "wait", "done")
    outcome(monkeypatch, **HANG_WITH_VMM)
    for name in ("busy", "orphan"):
        cli(capsys, "start", name)
        running(capsys, name)
    os.killpg(runtime_json("orphan")["supervisorPid"], signal.SIGKILL)  # dies unnoticed
    time.sleep(0.3)

    (row,) = cli(capsys, "ps")["workspaces"]
    assert set(row) == {
        "name",
        "state",
        "pid",
        "supervisorPid",
        "startedAt",
        "uptimeSeconds",
        "restarts",
    }
    busy = runtime_json("busy")
    assert (row["name"], row["state"], row["restarts"]) == ("busy", "running", 0)
    assert row["pid"] == busy["vmm"]["pid"] and row["supervisorPid"] == busy["supervisorPid"]
    assert row["startedAt"] == busy["startedAt"] and 0 <= row["uptimeSeconds"] < 60
    assert state_of(cli(capsys, "status", "orphan")) == "failed", "reconciled by ps"

    lines = text(capsys, "ps").splitlines()
    assert lines[0].split() == ["NAME", "STATE", "PID", "UPTIME", "RESTARTS"]
    assert [line.split()[:3] for line in lines[1:]] == [["busy", "running", str(row["pid"])]]
    cli(capsys, "halt", "busy")
    assert cli(capsys, "ps")["workspaces"] == []
    assert len(text(capsys, "ps").splitlines()) == 1


# -- restart policy -----------------------------------------------------------------------------


def test_on_failure_n_restarts_exactly_n_times_then_fails(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    create(capsys, project, "ws", "on-failure:2")
    outcome(monkeypatch, exitCode=3)
    cli(capsys, "start", "ws")
    assert cli(capsys, "wait", "ws", code=1)["state"] == "failed"
    status = cli(capsys, "status", "ws")
    assert (status["restarts"], status["restartPolicy"]) == (2, "on-failure:2")
    assert status["event"]["detail"] == "entrypoint exited with code 3 (after 2 restarts)"
    restarts = events(capsys, "ws", "restart")
    assert [e["attempt"] for e in restarts] == [1, 2]
    assert {e["reason"] for e in restarts} == {"entrypoint exited with code 3"}
    assert [e["delaySeconds"] for e in restarts] == [0.05, 0.1]
    booted = [e for e in cli(capsys, "events", "ws")["events"] if e["detail"] == "vm started"]
    assert len(booted) == 3
    assert "restarts: 2 (policy on-failure:2)" in text(capsys, "status", "ws")

    monkeypatch.delenv("MICROAGENT_FAKE")  # a new start counts from zero
    cli(capsys, "start", "ws")
    assert cli(capsys, "wait", "ws")["state"] == "stopped"
    assert cli(capsys, "status", "ws")["restarts"] == 0


def test_on_failure_does_not_restart_a_clean_exit(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create(capsys, project, "ws", "on-failure")
    cli(capsys, "start", "ws")
    assert cli(capsys, "wait", "ws")["state"] == "stopped"
    assert cli(capsys, "status", "ws")["restartPolicy"] == "on-failure:5"
    assert events(capsys, "ws", "restart") == []


def test_always_restarts_after_exit_0_until_halted(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create(capsys, project, "ws", "always")
    cli(capsys, "start", "ws")
    status_until(capsys, "ws", lambda s: s["restarts"] >= 3, "three restarts")
    assert state_of(cli(capsys, "status", "ws")) in ("starting", "running")
    assert cli(capsys, "halt", "ws")["state"] == "halted"
    attempts = [e["attempt"] for e in events(capsys, "ws", "restart")]
    assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) >= 3
    assert {e["reason"] for e in events(capsys, "ws", "restart")} == {"entrypoint exited 0"}
    assert cli(capsys, "status", "ws")["restarts"] == len(attempts)


@pytest.mark.parametrize("policy", ["never", "no", "'no'"])
def test_never_and_no_do_not_restart(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
) -> None:
    create(capsys, project, "ws", policy)
    outcome(monkeypatch, exitCode=3)
    cli(capsys, "start", "ws")
    assert cli(capsys, "wait", "ws", code=1)["state"] == "failed"
    time.sleep(0.3)
    status = cli(capsys, "status", "ws")
    assert (state_of(status), status["restarts"], status["restartPolicy"]) == ("failed", 0, "never")
    assert status["event"]["detail"] == "entrypoint exited with code 3"
    assert events(capsys, "ws", "restart") == []


def test_halt_during_the_back_off_ends_it(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_RESTART_BACKOFF", "30")
    create(capsys, project, "ws", "on-failure:5")
    outcome(monkeypatch, exitCode=3)
    cli(capsys, "start", "ws")
    status = status_until(capsys, "ws", lambda s: s["restarts"] == 1, "the first restart")
    assert state_of(status) == "starting"
    assert status["event"]["detail"] == "restart 1 in 30s (entrypoint exited with code 3)"
    assert [r["name"] for r in cli(capsys, "ps")["workspaces"]] == ["ws"]
    began = time.monotonic()
    assert cli(capsys, "halt", "ws")["state"] == "halted"
    assert time.monotonic() - began < 5, "the halt waited for the back-off"
    status = cli(capsys, "status", "ws")
    assert status["event"]["detail"] == "halted on request during the restart back-off"
    assert status["restarts"] == 1
    supervisor = runtime_json("ws")["supervisorPid"]
    assert not runner.pid_alive(supervisor)
    assert [e["event"] for e in cli(capsys, "events", "ws")["events"]][-1] == "supervisor-exit"


def test_kill_during_the_back_off(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_RESTART_BACKOFF", "30")
    create(capsys, project, "ws", "always")
    cli(capsys, "start", "ws")
    status_until(capsys, "ws", lambda s: s["restarts"] == 1, "the first restart")
    assert cli(capsys, "kill", "ws")["state"] == "stopped"
    assert cli(capsys, "wait", "ws", "--timeout", "1")["state"] == "stopped"
    assert runtime_json("ws")["restarts"] == 1


# -- the pieces ---------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_starts_over_after_a_stable_run() -> None:
    backoff = Backoff(1.0)
    delays = [backoff.after(0.1) for _ in range(7)]
    assert delays == [1, 2, 4, 8, 16, BACKOFF_CAP, BACKOFF_CAP]
    assert backoff.after(STABLE_RUN) == 1.0
    assert backoff.after(0.1) == 2.0


def test_boot_document_carries_the_policy(tmp_path: Path) -> None:
    config = BootConfig(tmp_path / "k", tmp_path / "i", (Disk(tmp_path / "d", False),), tmp_path)
    doc = BootDocument(config, "fake", restart=Restart.parse("on-failure:3"), restart_backoff=0.5)
    back = BootDocument.from_json(json.loads(json.dumps(doc.to_json())))
    assert (back.restart, back.restart_backoff) == (Restart.parse("on-failure:3"), 0.5)
    old = {k: v for k, v in doc.to_json().items() if k not in ("restart", "restartBackoff")}
    assert BootDocument.from_json(old).restart == Restart()  # a boot.json from before


# -- a boot that stalls before the guest's first event ------------------------------------------


def test_a_stalled_boot_is_booted_again_without_counting_a_restart(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    create(capsys, project, "ws", "never")
    outcome(monkeypatch, stalls=1, stdout="hi\n")
    cli(capsys, "start", "ws")
    assert cli(capsys, "wait", "ws")["state"] == "stopped"
    stalls = events(capsys, "ws", "boot-stall")
    assert [e["attempt"] for e in stalls] == [1]
    assert stalls[0]["detail"].startswith("the guest did not boot within 120s")
    assert stalls[0]["detail"].endswith("; booting again")
    assert [e["detail"] for e in events(capsys, "ws", "fsck")] == [
        "state disk checked after a VM that stopped without a clean shutdown: clean"
    ], "the killed VM's disk is checked before the second boot"
    status = cli(capsys, "status", "ws")
    assert (status["restarts"], state_of(status)) == (0, "stopped")


def test_a_second_stall_fails_the_start_with_the_reason(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    create(capsys, project, "ws", "never")
    outcome(monkeypatch, stalls=2)
    cli(capsys, "start", "ws")
    assert cli(capsys, "wait", "ws", code=1)["state"] == "failed"
    assert len(events(capsys, "ws", "boot-stall")) == 1
    detail = cli(capsys, "status", "ws")["event"]["detail"]
    assert detail.startswith("the guest did not boot within 120s"), detail
