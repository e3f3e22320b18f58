"""The one subprocess runner."""

from __future__ import annotations

import pytest

from microagent.errors import ToolError
from microagent.runner import find_tool, run


def test_captures_output() -> None:
    done = run(["sh", "-c", "echo out; echo err >&2"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")


def test_failure_replays_stderr_tail() -> None:
    with pytest.raises(ToolError) as raised:
        run(["sh", "-c", "for i in $(seq 1 50); do echo line$i >&2; done; exit 3"])
    message = raised.value.message
    assert "exit code 3" in message and "line50" in message and "line10\n" not in message


def test_check_false_returns_code() -> None:
    assert run(["sh", "-c", "exit 4"], check=False).returncode == 4


def test_missing_tool_names_the_package() -> None:
    with pytest.raises(ToolError) as raised:
        find_tool("definitely-not-a-tool-xyz")
    assert "not installed" in raised.value.message


def test_known_tool_hint_names_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("microagent.runner.shutil.which", lambda *a, **k: None)
    with pytest.raises(ToolError) as raised:
        find_tool("mke2fs")
    assert raised.value.hint == "install it, e.g. `apt-get install e2fsprogs`"


def test_timeout() -> None:
    with pytest.raises(ToolError, match="timed out"):
        run(["sleep", "5"], timeout=0.2)


def test_minimal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAKY_SECRET", "x")
    assert "LEAKY_SECRET" not in run(["env"]).stdout
    assert "EXTRA=1" in run(["env"], env={"EXTRA": "1"}).stdout


def test_stdin_is_closed() -> None:
    assert run(["cat"], timeout=5).stdout == ""
    assert run(["cat"], input=b"data").stdout == "data"
