"""First use: `microagent` alone shows the workflow, help is grouped by the work with whole
summaries, a missing spec points at the examples, mistyped commands and workspace names get a
did-you-mean, and the reference CLI's aliases work."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import click
import pytest

from microagent.cli import ALIASES, SECTIONS, cli, main
from testenv import standin

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ["validate", "plan", "create", "cp", "start", "status"]


def run(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> tuple[str, str]:
    capsys.readouterr()
    got = main(list(args))
    out, err = capsys.readouterr()
    assert got == code, out + err
    return out, err


def run_json(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> dict[str, Any]:
    out, _err = run(capsys, "--json", *args, code=code)
    data: dict[str, Any] = json.loads(out)
    return data


def test_bare_microagent_shows_the_workflow_and_exits_0(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, err = run(capsys)
    assert err == ""
    steps = [line.split()[1] for line in out.splitlines() if line.startswith("  microagent ")]
    assert steps == WORKFLOW
    assert "`result NAME`" in out  # the end of the workflow: what the agent reported
    assert "examples/minimal-agent/microagent.yaml" in out
    assert "microagent doctor" in out
    used = re.search(r"Most used: (.*?)\.\n", out, flags=re.DOTALL)
    assert used is not None
    named = [w.strip() for w in used.group(1).replace("\n", " ").split(",")]
    assert named[:7] == ["validate", "plan", "create", "cp", "start", "status", "result"]
    assert all(name in cli.commands for name in named)
    assert max(len(line) for line in out.splitlines()) <= 90


def test_help_is_grouped_by_the_work_with_whole_summaries(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _err = run(capsys, "--help")
    titles = [title for title, names in SECTIONS if any(n in cli.commands for n in names)]
    found = [line[:-1] for line in out.splitlines() if line.endswith(":") and line[0] != " "]
    assert found[1:] == titles  # after "Options:"
    flat = " ".join(out.split())
    for name, command in cli.commands.items():
        summary = command.get_short_help_str(1000)
        assert summary in flat, name  # wrapped, never cut
        assert not summary.endswith("...")
    assert out.index("validate ") < out.index("create ") < out.index("delete (rm)")
    assert "status (inspect)" in out and "list (ls)" in out and "logs (log)" in out


def test_a_group_without_a_command_shows_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    out, _err = run(capsys, "cache")
    assert out.startswith("Usage: microagent cache") and "  prune " in out
    listed = run_json(capsys, "cache")
    names = [c["name"] for c in listed["commands"]]
    assert names == ["du", "export", "import", "ls", "prune", "verify"]
    assert run_json(capsys, "image")["schemaVersion"] == 1


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("stauts", "`microagent status`"),
        ("valdate", "`microagent validate`"),
        ("lsit", "`microagent list`"),
        ("halts", "`microagent halt`"),
        ("cache lss", "`microagent cache ls`"),
        ("image pul", "`microagent image pull`"),
    ],
)
def test_did_you_mean_for_commands(
    typed: str, meant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    words = typed.split()
    _out, err = run(capsys, *words, code=2)
    assert f"error: no such command '{words[-1]}'" in err
    assert re.search(rf"hint: did you mean .*{re.escape(meant)}", err), err
    error = run_json(capsys, *words, code=2)["error"]
    assert error["kind"] == "usage" and meant in error["hint"]
    assert meant not in error["message"]


def test_an_unknown_command_with_no_neighbour_points_at_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    error = run_json(capsys, "frobnicate", code=2)["error"]
    assert error == {
        "kind": "usage",
        "message": "no such command 'frobnicate'",
        "hint": "`microagent --help` lists the commands",
    }


def test_aliases_and_the_commands_they_do_not_shadow(capsys: pytest.CaptureFixture[str]) -> None:
    assert ALIASES == {"inspect": "status", "rm": "delete", "ls": "list", "log": "logs"}
    assert not set(ALIASES) & set(cli.commands)  # never hides a real command
    assert {"stop", "ps"} <= set(cli.commands)  # real commands, not aliases
    for alias, target in ALIASES.items():
        ctx = click.Context(cli)
        assert cli.get_command(ctx, alias) is cli.commands[target]
        out, _err = run(capsys, alias, "--help")
        assert out.startswith(f"Usage: microagent {target} ")


def test_aliases_run_their_command(
    fake_backend: None,
    tmp_path: Path,
    busybox_layout: standin.BuiltImage,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    shutil.copytree(busybox_layout.layout, tmp_path / "layout")
    spec = tmp_path / "microagent.yaml"
    spec.write_text("name: probe\nimage: oci:layout:latest\nentrypoint: 'true'\n")
    run_json(capsys, "create", "-f", str(spec))
    assert [w["name"] for w in run_json(capsys, "ls")["workspaces"]] == ["probe"]
    assert run_json(capsys, "inspect", "probe")["event"]["state"] == "prepared"
    assert run_json(capsys, "log", "probe")["records"] == []

    # did-you-mean for workspace names: `status prob` when `probe` exists
    _out, err = run(capsys, "status", "prob", code=1)
    assert "error: workspace 'prob' not found" in err
    assert "hint: did you mean 'probe'?" in err
    error = run_json(capsys, "inspect", "prob", code=1)["error"]
    assert (error["kind"], error["message"]) == ("not_found", "workspace 'prob' not found")
    assert error["hint"].startswith("did you mean 'probe'?")
    far = run_json(capsys, "status", "zzz", code=1)["error"]
    assert far["hint"] == "see `microagent list` for what exists"

    assert run_json(capsys, "rm", "-y", "probe")["results"] == [
        {"workspace": "probe", "deleted": True}
    ]


def test_a_missing_spec_points_at_the_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _out, err = run(capsys, "validate", code=2)
    assert "error: spec file not found: microagent.yaml" in err
    hint = err.split("hint: ", 1)[1]
    assert "examples/minimal-agent/microagent.yaml" in hint
    assert (ROOT / "examples" / "minimal-agent" / "microagent.yaml").is_file()
    if "init" in cli.commands:
        assert "microagent init" in hint
    else:
        assert "init" not in hint  # never points at a command that does not exist
    error = run_json(capsys, "plan", "-f", str(tmp_path), code=2)["error"]
    assert error["message"] == f"no microagent.yaml in {tmp_path}"
    assert "examples/minimal-agent/microagent.yaml" in error["hint"]


def test_usage_errors_in_text_have_the_usage_line_and_a_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _out, err = run(capsys, "validate", "--jsn", code=2)
    usage, error, hint = err.splitlines()
    assert (usage, error) == (
        "Usage: microagent validate [OPTIONS]",
        "error: no such option: --jsn",
    )
    assert hint.startswith("hint: did you mean --json")  # the closest first
    _out, err = run(capsys, "plan", "--memory", "lots", code=2)
    assert "error: invalid value for '--memory': 'lots' is not a valid integer" in err
    assert "hint: `microagent plan --help` describes it" in err
