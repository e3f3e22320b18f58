"""While ``create --warm`` makes a template, the host holds the mediation channel itself: the
workspace's ``status`` says the channel is held (``mediationReady.held``), not that its target
is unreachable, and contacts no target; once the workspace starts for real, the channel is
the target's again. Real supervisors, fake backend with the stand-in guest agent; ``status``
is asked at the moment the template's boot is ready (before its snapshot)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.api import Microagent
from microagent.settings import Settings
from microagent.workspace import templates
from microagent.workspace.lifecycle import HELD_DETAIL
from microagent.workspace.records import Workspace
from testenv.agent_standin import standin_argv
from testenv.clitools import cli_json as cli
from testenv.ports import free_ports
from testenv.supervised import end_leftovers


@pytest.fixture
def project(busybox_project: Path, tmp_path: Path) -> Iterator[Path]:
    yield busybox_project
    end_leftovers(tmp_path / "home")


def test_status_says_the_mediation_is_held_while_a_template_is_made(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    guest_port, target = free_ports(2)
    monkeypatch.setenv(
        "MICROAGENT_FAKE", json.dumps({"hang": True, "agent": standin_argv(guest_port)})
    )
    seen: list[dict[str, Any]] = []
    ready = templates.wait_ready

    def ready_then_status(ws: Workspace, timeout: float) -> None:
        ready(ws, timeout)
        seen.append(Microagent(Settings.from_environ()).status(ws.name))

    monkeypatch.setattr(templates, "wait_ready", ready_then_status)
    spec = project / "held.yaml"
    spec.write_text("name: held\nimage: oci:layout:latest\nentrypoint: sleep 600\n")
    with socket.create_server(("127.0.0.1", target)) as dispatcher:
        dispatcher.setblocking(False)
        where = f"{guest_port}=127.0.0.1:{target}"
        made = cli(capsys, "create", "-f", str(spec), "--warm", "--mediation", where)
        assert made["state"] == "suspended" and made["template"]["made"] is True, made
        assert len(seen) == 1
        during = seen[0]
        assert during["event"]["state"] == "running"
        assert during["readiness"]["mediationReady"] == {
            "ready": False,
            "held": True,
            "target": f"127.0.0.1:{target}",
            "required": True,
            "detail": HELD_DETAIL,
        }
        with pytest.raises(BlockingIOError):
            dispatcher.accept()  # nobody contacted the target: not the boot, not status
        after = cli(capsys, "status", "held")["readiness"]["mediationReady"]
        assert after["ready"] is False and "held" not in after  # suspended: not running
        assert cli(capsys, "start", "held")["state"] == "running"
        now = cli(capsys, "status", "held")["readiness"]["mediationReady"]
        assert now == {"ready": True, "target": f"127.0.0.1:{target}", "required": True}
        cli(capsys, "halt", "held")
