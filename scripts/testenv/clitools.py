"""The CLI in this process, for tests: ``cli_json(capsys, "status", "ws")`` runs
``microagent --json status ws`` through :func:`microagent.cli.main` and returns its JSON
document, after checking the exit code."""

from __future__ import annotations

import json
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
