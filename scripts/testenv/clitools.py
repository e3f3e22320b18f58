"""The CLI in this process, for tests: ``cli_json(capsys, "status", "ws")`` runs
``microagent --json status ws`` through :func:`microagent.cli.main` and returns its JSON
document, after checking the exit code. :class:`TwoHomes` runs it as one of two machines
(two homes) that share a project."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main


def cli_json(
    capsys: pytest.CaptureFixture[str], *args: str, code: int | None = 0
) -> dict[str, Any]:
    """``microagent --json ARGS``: the document it printed, after checking that it exited
    ``code`` (``None``: any code); the output is the failure message. Every command prints a
    document with ``--json``, so printing nothing fails too."""
    capsys.readouterr()
    got = main(["--json", *args])
    out = capsys.readouterr().out
    assert code is None or got == code, f"microagent {' '.join(args)} exited {got}: {out}"
    data: dict[str, Any] = json.loads(out)
    return data


@dataclass
class TwoHomes:
    """Two machines on one host, homes ``a`` and ``b``, and the ``project`` both check out."""

    a: Path
    b: Path
    project: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    @property
    def spec(self) -> str:
        return str(self.project / "microagent.yaml")

    def cli(self, home: Path, *args: str, code: int = 0) -> dict[str, Any]:
        """``microagent --json ARGS`` as the machine of ``home``: its document (``{}`` when it
        printed nothing), after checking that it exited ``code``."""
        self.monkeypatch.setenv("MICROAGENT_HOME", str(home))
        self.capsys.readouterr()
        got = main(["--json", *args])
        captured = self.capsys.readouterr()
        assert got == code, captured.out + captured.err
        return json.loads(captured.out) if captured.out.strip() else {}

    def wait_stopped(self, home: Path, name: str, *, timeout: float) -> str:
        """The state (``stopped`` or ``failed``) workspace ``name`` of ``home`` ends in."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = str(self.cli(home, "status", name)["event"]["state"])
            if state in ("stopped", "failed"):
                return state
            time.sleep(0.1)
        pytest.fail(f"{name} never stopped")


def run_fake_guest(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    spec: Path,
    fake: Mapping[str, Any],
    *,
    timeout: float,
) -> None:
    """``create -f SPEC`` (a workspace named ``ws``) and run it once with the fake guest doing
    ``fake`` (``MICROAGENT_FAKE``, see :class:`microagent.runtime.fake.FakeOutcome`); back
    when it stopped or failed."""
    cli_json(capsys, "create", "-f", str(spec))
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(fake))
    cli_json(capsys, "start", "ws")
    deadline = time.monotonic() + timeout
    while cli_json(capsys, "status", "ws")["event"]["state"] not in ("stopped", "failed"):
        assert time.monotonic() < deadline, "the workspace never stopped"
        time.sleep(0.1)
