"""Workspaces with real supervisors on the fake backend: their set-up and clean-up in tests.

- :func:`standin_home`: ``MICROAGENT_HOME``'s workspaces hang on the fake backend with the
  stand-in guest agent (:mod:`testenv.agent_standin`) and free service ports; afterwards the
  named workspace is halted if a supervisor still runs;
- :func:`end_leftovers`: every process the workspaces of a home left behind, resumed (a test
  may have stopped it) and killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent import runner
from microagent.cli import main
from microagent.workspace.lifecycle import leftovers
from microagent.workspace.records import Workspace
from testenv.agent_standin import standin_argv
from testenv.ports import free_port_pair
from testenv.prereq import unavailable


@contextlib.contextmanager
def standin_home(home: Path, monkeypatch: pytest.MonkeyPatch, *, halt: str) -> Iterator[Path]:
    """``home`` (the ``MICROAGENT_HOME`` of the test) with the stand-in guest agent in a
    hanging fake VM and two free consecutive service ports; then ``halt`` is halted if a
    supervisor of ``home`` still runs."""
    base = free_port_pair()
    if base is None:
        unavailable("no two free consecutive loopback ports in 50 tries")
    monkeypatch.setenv("MICROAGENT_SERVICE_PORT_BASE", str(base))
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"hang": True, "agent": standin_argv()}))
    yield home
    for path in home.glob("workspaces/*/runtime/runtime.json"):
        pid = json.loads(path.read_text()).get("supervisorPid")
        if isinstance(pid, int) and runner.pid_alive(pid):
            main(["halt", halt])


def end_leftovers(home: Path) -> None:
    """Resume (SIGCONT) and kill every process a workspace of ``home`` left behind."""
    spaces = home / "workspaces"
    for root in spaces.iterdir() if spaces.is_dir() else ():
        for process in leftovers(Workspace(root)):
            with contextlib.suppress(Exception):
                os.kill(process.pid, signal.SIGCONT)
                runner.kill_process(process)


def processes_naming(text: str) -> list[str]:
    """The command lines (NULs as spaces) of every process whose argv contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes()
        except OSError:
            continue
        if text.encode() in words:
            found.append(words.replace(b"\0", b" ").decode(errors="replace"))
    return found
