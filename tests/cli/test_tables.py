"""Output that fits and guides: tables sized to content and terminal, `start --wait` failures
with the output's tail and the next command, `cp` into a missing directory refused.

Workspaces come from the fake backend over the busybox stand-in layout (no VM).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microagent.cli import main
from microagent.commands.doctor import render_report
from microagent.commands.table import Column, plural, render
from testenv.clitools import cli_json as cli

LONG = "a-workspace-name-much-longer-than-the-old-28-character-column"  # at most 63


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
    )
    return proj


def text(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> tuple[str, str]:
    capsys.readouterr()
    assert main(list(args)) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def outcome(monkeypatch: pytest.MonkeyPatch, **fields: Any) -> None:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(fields))


def fits(out: str, width: int) -> None:
    too_wide = [line for line in out.splitlines() if len(line) > width]
    assert not too_wide, too_wide


# -- the table helper ------------------------------------------------------------------------


def test_columns_are_sized_to_their_content() -> None:
    out = render(["NAME", "STATE"], [("ws", "running"), ("other", "stopped")], width=0)
    assert out.splitlines() == ["NAME   STATE", "ws     running", "other  stopped"]


def test_a_long_cell_wraps_inside_its_column() -> None:
    cols = [Column("NAME"), Column("STATE", shrink=False), Column("OBSERVED", shrink=False)]
    out = render(cols, [(LONG, "running", "2026-01-01T00:00:00Z")], width=50)
    fits(out, 50)
    lines = out.splitlines()
    state_at = lines[0].index("STATE")
    assert lines[1][state_at:].startswith("running"), "the name ran into the next column"
    assert lines[1][state_at - 2 : state_at] == "  "
    pieces = [line[:state_at].strip() for line in lines[1:]]
    assert "".join(pieces) == LONG, "every character of the name is shown, in order"


def test_right_aligned_columns_and_empty_cells() -> None:
    out = render([Column("SIZE", right=True), Column("NAME")], [("1.0 MB", None)], width=0)
    assert out.splitlines() == ["  SIZE  NAME", "1.0 MB  -"]


def test_plural() -> None:
    assert [plural(n, "entry") for n in (0, 1, 2)] == ["0 entries", "1 entry", "2 entries"]
    assert plural(1, "step") == "1 step" and plural(3, "line") == "3 lines"


cells = st.text(st.characters(codec="utf-8", exclude_categories=("C", "Z")), max_size=60)


@given(
    rows=st.lists(st.lists(cells, min_size=3, max_size=3), max_size=5),
    width=st.integers(min_value=20, max_value=120),
)
def test_never_wider_than_the_width(rows: list[list[str]], width: int) -> None:
    cols = [Column("NAME"), Column("STATE", shrink=False), Column("DETAIL")]
    fits(render(cols, rows, width=width), width)


def test_columns_env_sets_the_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "30")
    fits(render(["NAME", "DETAIL"], [(LONG, "x " * 40)]), 30)


def test_doctor_table_fits_and_keeps_hints() -> None:
    data = {
        "verdict": "degraded",
        "checks": [
            {"name": "kvm", "status": "warn", "detail": "/dev/kvm opens but " + "y" * 90,
             "hint": "use the tcg accelerator, or a host where KVM can boot guests"},
            {"name": "qemu", "status": "ok", "detail": "/usr/bin/qemu-system-x86_64", "hint": ""},
        ],
    }  # fmt: skip
    out = render_report(data, width=60)
    fits(out, 60)
    lines = out.splitlines()
    assert lines[0].split() == ["STATUS", "CHECK", "DETAIL"]
    assert "hint: use the tcg" in out and lines[-1] == "verdict: degraded"


# -- list, events, plan through the CLI ------------------------------------------------------


def test_list_with_a_long_name_fits_the_terminal(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = str(project / "microagent.yaml")
    cli(capsys, "create", "-f", spec, "--name", LONG)
    cli(capsys, "create", "-f", spec)
    monkeypatch.setenv("COLUMNS", "48")
    out, _ = text(capsys, "list")
    fits(out, 48)
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "OBSERVED"]
    state_at = lines[0].index("STATE")
    for line in lines:  # a name wraps inside its column, never into STATE
        assert len(line) <= state_at - 2 or line[state_at - 2 : state_at] == "  ", line
    assert "".join(line[:state_at].strip() for line in lines[1:-1]) == LONG
    assert "prepared" in lines[1][state_at:]
    monkeypatch.setenv("COLUMNS", "200")  # room: one line per workspace, no fixed 28 columns
    lines = text(capsys, "list")[0].splitlines()
    assert len(lines) == 3 and lines[1].startswith(LONG + "  prepared")
    assert lines[2].startswith("ws" + " " * len(LONG) + "prepared")


def test_events_fit_the_terminal(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    outcome(monkeypatch, exitCode=3, stderr="failed\n")
    text(capsys, "start", "ws", "--wait", code=3)
    monkeypatch.setenv("COLUMNS", "50")
    out, _ = text(capsys, "events", "ws")
    fits(out, 50)
    assert out.splitlines()[0].split() == ["TIME", "EVENT", "DETAIL"]
    assert "failed" in out


def test_plan_has_a_header_and_marks_per_workspace_steps(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = str(project / "microagent.yaml")
    monkeypatch.setenv("COLUMNS", "200")
    lines = text(capsys, "plan", "-f", spec)[0].splitlines()
    assert lines[2].split() == ["STEP", "KEY", "STATUS", "WHAT", "WHY"]
    assert [line.split()[0] for line in lines[3:7]] == ["base", "setup", "files", "config"]
    assert "1 entry, 6 bytes" in lines[5]  # not "1 entries"
    assert lines[-1] == "4 steps: 2 to build, 2 per workspace"
    cli(capsys, "create", "-f", spec)
    out = text(capsys, "plan", "-f", spec)[0]
    lines = out.splitlines()
    assert [line.split()[2] for line in lines[3:7]] == ["CACHED", "CACHED", "PER-WS", "PER-WS"]
    assert "not built yet" not in out and "BUILD" not in out
    assert "per workspace, at create" in lines[5]
    monkeypatch.setenv("COLUMNS", "60")
    table = text(capsys, "plan", "-f", spec)[0].splitlines()[2:]  # after the spec and image
    fits("\n".join(table), 60)
    assert table[0].split() == ["STEP", "KEY", "STATUS", "WHAT", "WHY"]


# -- start --wait ----------------------------------------------------------------------------


def test_start_wait_failure_shows_the_tail_and_the_next_commands(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    outcome(monkeypatch, exitCode=5, stderr="".join(f"line {i}\n" for i in range(1, 16)))
    out, err = text(capsys, "start", "ws", "--wait", code=5)
    assert out.strip() == "ws: failed (exit code 5)"
    assert "ws: entrypoint exited with code 5" in err
    assert "last 10 lines of the output:" in err
    assert "  | line 15" in err and "  | line 6\n" in err and "line 5\n" not in err
    assert "`microagent logs ws`" in err and "`microagent result ws`" in err
    data = cli(capsys, "start", "ws", "--wait", code=5)
    assert (data["ok"], data["state"], data["exitCode"]) == (False, "failed", 5)
    assert data["outputTail"][-1] == "line 15" and len(data["outputTail"]) == 10


def test_start_wait_success_prints_no_hints(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    out, err = text(capsys, "start", "ws", "--wait")
    assert out.strip() == "ws: stopped (exit code 0)" and err == ""


def test_start_wait_timeout_says_the_workspace_keeps_running(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    outcome(monkeypatch, hang=True)
    out, err = text(capsys, "start", "ws", "--wait", "--timeout", "0.3", code=124)
    assert "still running after 0.3s; it keeps running" in out
    assert "`microagent halt ws`" in err and "`microagent wait ws`" in err
    assert cli(capsys, "status", "ws")["event"]["state"] == "running"
    error = cli(capsys, "start", "ws", code=1)["error"]  # the start-twice hint names it
    assert "microagent halt ws" in error["hint"]
    cli(capsys, "halt", "ws")
    out, _ = text(capsys, "start", "ws", "--wait", "--timeout", "0")
    assert "it keeps running" in out
    cli(capsys, "halt", "ws")


# -- cp --------------------------------------------------------------------------------------


def test_cp_into_a_missing_directory_is_an_error(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:  # fmt: skip
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "note.txt").write_text("hello\n")
    cli(capsys, "cp", "note.txt", "ws:/tmp/note.txt")
    error = cli(capsys, "cp", "ws:/tmp/note.txt", "missingdir/", code=1)["error"]
    assert "missingdir/ does not exist" in error["message"] and "mkdir -p" in error["hint"]
    assert not (tmp_path / "missingdir").exists(), "a file named missingdir was written"
    error = cli(capsys, "cp", "ws:/tmp/note.txt", "nodir/sub/note.txt", code=1)["error"]
    assert "nodir/sub does not exist" in error["message"] and "mkdir -p nodir/sub" in error["hint"]
    assert not (tmp_path / "nodir").exists()
    (tmp_path / "there").mkdir()
    assert cli(capsys, "cp", "ws:/tmp/note.txt", "there/")["bytes"] == 6
    assert (tmp_path / "there" / "note.txt").read_text() == "hello\n"
