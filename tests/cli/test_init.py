"""`microagent init` and shell completion.

init: for each provider the project it writes validates, plans (offline, over the busybox
stand-in layout) and runs the walkthrough's host side with the fake backend (create, cp,
start with the key read on the host, result); it is the example agent of the sources file for
file (the templates cannot drift from examples/); it never overwrites a file and writes
nothing when it refuses. Completion: `completion SHELL` prints click's script, and bash,
sourcing it, completes workspace names from the store.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.shell_completion import ShellComplete

from microagent.cli import cli, main
from microagent.commands.completion import SHELLS
from microagent.commands.init import PROVIDERS
from microagent.compiler.loader import load_spec
from testenv.clitools import cli_json
from testenv.prereq import require_tools

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
FILES = [
    "README.md",
    "agent.py",
    "demo/constraints.json",
    "demo/input-001.json",
    "demo/input-002.json",
    "demo/system_prompt.md",
    "microagent.yaml",
    "protocol.py",
]
KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY"}
EXAMPLE = {
    "anthropic": "minimal-agent",
    "openai": "minimal-agent-openai",
    "gemini": "minimal-agent-gemini",
}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path → bytes); folders as ``path/``."""
    out: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel + "/" if path.is_dir() else rel] = b"" if path.is_dir() else path.read_bytes()
    return out


def init(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> dict[str, Any]:
    return cli_json(capsys, "init", *args, code=code)


def test_providers_are_the_examples_and_the_broker_presets() -> None:
    assert sorted(PROVIDERS) == sorted(KEY_ENV)
    for name, provider in PROVIDERS.items():
        assert provider.key_env == KEY_ENV[name]
        assert provider.example == EXAMPLE[name]


@pytest.mark.parametrize("provider", sorted(KEY_ENV))
def test_a_project_validates_and_plans(
    provider: str, busybox_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proj = busybox_project
    made = init(capsys, str(proj), "--provider", provider, "--name", "helper")
    assert made["files"] == FILES
    assert made["name"] == "helper" and made["provider"] == provider
    assert made["directory"] == str(proj.resolve())
    checked = cli_json(capsys, "validate", "-f", str(proj))
    assert checked["name"] == "helper"
    spec = load_spec(proj / "microagent.yaml")
    assert [c.name for c in spec.credentials] == [provider]  # the key stays on the host
    assert spec.network.allow == ("pypi.org", "files.pythonhosted.org")
    assert [o.name for o in spec.outputs] == ["result"]
    plan = cli_json(capsys, "plan", "--offline", "-f", str(proj), "--image", "oci:layout:latest")
    kinds = [s["kind"] for s in plan["steps"]]
    assert kinds == ["base", "setup", "setup", "files", "config"]
    assert PROVIDERS[provider].requirement in json.dumps(plan["steps"][1]["inputs"])
    # the tag in the spec is not pinned: offline, plan says how to pin it
    error = cli_json(capsys, "plan", "--offline", "-f", str(proj), code=2)["error"]
    assert "python:3.13-slim" in error["message"] and "lock" in error["hint"]


@pytest.mark.parametrize("provider", sorted(KEY_ENV))
def test_the_walkthrough_runs_on_the_fake_backend(
    provider: str,
    busybox_project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proj = busybox_project
    made = init(capsys, str(proj), "--provider", provider, "--name", "walk")
    assert [s.split()[:2] for s in made["next"]] == [
        ["microagent", "create"],
        ["export", f"{KEY_ENV[provider]}=..."],
        ["microagent", "cp"],
        ["microagent", "start"],
        ["microagent", "result"],
    ]
    # the fake guest runs no setup command: it leaves /workspace as `mkdir -p` would
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"writes": {"/workspace/.keep": ""}}))
    cli_json(capsys, "create", "-f", str(proj), "--image", "oci:layout:latest")
    monkeypatch.delenv("MICROAGENT_FAKE")
    cli_json(capsys, "cp", str(proj / "demo/input-001.json"), "walk:/workspace/input.json")

    monkeypatch.delenv(KEY_ENV[provider], raising=False)
    error = cli_json(capsys, "start", "walk", "--wait", code=2)["error"]
    assert f"env:{KEY_ENV[provider]}" in error["message"]  # the spec's credential, read at start

    work = {"request_id": "req-001", "status": "completed", "content": "the table"}
    result = {"path": "/workspace/result.json", "truncated": False, "content": json.dumps(work)}
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"outputs": {"result": result}}))
    monkeypatch.setenv(KEY_ENV[provider], "sk-test")
    started = cli_json(capsys, "start", "walk", "--wait")
    assert started["state"] == "stopped" and started["exitCode"] == 0
    outputs = cli_json(capsys, "result", "walk")["result"]["outputs"]
    assert [(o["name"], o["value"]) for o in outputs] == [("result", work)]
    back = proj / "back.json"
    cli_json(capsys, "cp", "walk:/workspace/input.json", str(back))
    assert back.read_bytes() == (proj / "demo/input-001.json").read_bytes()


@pytest.mark.parametrize("provider", sorted(KEY_ENV))
def test_the_project_is_the_example_file_for_file(
    provider: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The templates are the examples with the name put in: made with the example's name,
    every file but the README is the example's, byte for byte. (A change to an example must
    be made to src/microagent/templates/init too; this test says which file differs.)"""
    example = EXAMPLES / EXAMPLE[provider]
    init(capsys, str(tmp_path / "p"), "--provider", provider, "--name", example.name)
    made, wanted = tree(tmp_path / "p"), tree(example)
    assert sorted(made) == sorted(wanted)
    differ = [p for p in made if p != "README.md" and made[p] != wanted[p]]
    assert not differ, f"templates/init differs from {example} in: {differ}"
    readme = made["README.md"].decode()
    assert f"examples/{example.name}" in readme and KEY_ENV[provider] in readme


def test_the_name_is_put_in_everywhere_it_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init(capsys, str(tmp_path), "--provider", "openai", "--name", "scout.v2")
    assert (tmp_path / "agent.py").read_text().startswith('"""scout.v2: a small tool-using agent')
    assert load_spec(tmp_path / "microagent.yaml").name == "scout.v2"
    readme = (tmp_path / "README.md").read_text()
    assert "# scout.v2\n" in readme and "microagent start scout.v2 --wait" in readme
    assert "{{" not in readme and "minimal-agent" not in readme.replace("examples/minimal", "")


@pytest.mark.parametrize("name", ["123", "true", "1e3", "null", "0x1F"])
def test_a_name_yaml_would_read_as_no_string_stays_a_string(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init(capsys, str(tmp_path), "--name", name)
    assert cli_json(capsys, "validate", "-f", str(tmp_path))["name"] == name


def test_dir_defaults_to_here_and_the_name_to_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "My Agent!"
    here.mkdir()
    monkeypatch.chdir(here)
    made = init(capsys)
    assert made["name"] == "My-Agent" and made["provider"] == "anthropic"
    assert sorted(tree(here)) == sorted([*FILES, "demo/"])
    assert made["next"][0] == "microagent create -f microagent.yaml"
    assert "microagent cp demo/input-001.json My-Agent:/workspace/input.json" in made["next"]
    odd = tmp_path / "---"
    init(capsys, str(odd))
    assert load_spec(odd / "microagent.yaml").name == "agent"  # nothing usable in '---'


def test_text_output_lists_the_files_and_the_next_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["init", str(tmp_path / "new dir"), "--provider", "gemini"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"created new-dir (gemini) in {tmp_path / 'new dir'}: ")
    assert f"  microagent create -f '{tmp_path / 'new dir'}/microagent.yaml'\n" in out
    assert "  export GEMINI_API_KEY=..." in out
    assert out.rstrip().endswith("microagent result new-dir")


def test_refuses_to_overwrite_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proj = tmp_path / "proj"
    (proj / "demo").mkdir(parents=True)
    (proj / "agent.py").write_bytes(b"# mine\n")
    (proj / "demo" / "input-002.json").write_bytes(b"{}")
    (proj / "notes.txt").write_bytes(b"keep")
    before = tree(proj)
    error = init(capsys, str(proj), "--provider", "openai", code=1)["error"]
    assert error["kind"] == "conflict"
    assert error["message"].endswith(": agent.py, demo/input-002.json")
    assert "nothing was written" in error["hint"]
    assert tree(proj) == before
    # a file where init needs a folder is a clash too
    other = tmp_path / "other"
    other.mkdir()
    (other / "demo").write_bytes(b"a file")
    error = init(capsys, str(other), code=1)["error"]
    assert error["message"].endswith(": demo")
    assert tree(other) == {"demo": b"a file"}


def test_a_dangling_symlink_is_never_written_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "README.md").symlink_to(tmp_path / "elsewhere.md")
    error = init(capsys, str(proj), code=1)["error"]
    assert error["message"].endswith(": README.md")
    assert not (tmp_path / "elsewhere.md").exists()
    assert [p.name for p in proj.iterdir()] == ["README.md"]


def test_bad_input_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "new"
    error = init(capsys, str(target), "--provider", "mistral", code=2)["error"]
    assert error["kind"] == "usage" and "mistral" in error["message"]
    assert "anthropic" in error["message"]  # click names the choices
    error = init(capsys, str(target), "--name", "-bad name", code=2)["error"]
    assert error["kind"] == "usage" and "--name" in error["message"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    error = init(capsys, str(a_file), code=2)["error"]
    assert error["kind"] == "invalid_input" and "not a directory" in error["message"]
    error = init(capsys, str(a_file / "sub"), code=2)["error"]
    assert error["kind"] == "invalid_input" and "a parent of DIR" in error["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert a_file.read_text() == "x"


def test_a_failed_write_removes_what_init_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A write that fails midway (here: a 4 KiB file size limit, so microagent.yaml is written
    and agent.py is not) leaves nothing behind: the files and the folder init made go."""
    target = tmp_path / "made" / "proj"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from microagent.cli import main\n"
        f"sys.exit(main(['--json', 'init', {str(target)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["kind"] == "io" and "agent.py" in error["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # made/ and made/proj/ are gone
    # a folder init may not make: nothing is left either
    error = init(capsys, "/proc/microagent-init-test", code=1)["error"]
    assert error["kind"] == "io"
    assert not Path("/proc/microagent-init-test").exists()


def test_every_template_ships_in_the_package() -> None:
    """pyproject's package-data globs (``*`` within one folder, as setuptools reads them)
    cover every file under src/microagent/templates/init."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["microagent"]
    package = ROOT / "src" / "microagent"
    templates = [p for p in (package / "templates" / "init").rglob("*") if p.is_file()]
    assert len(templates) == 10  # 3 agents, the spec, protocol, README, 4 demo files
    for path in templates:
        rel = path.relative_to(package).as_posix()
        assert any(
            re.fullmatch(g.replace(".", r"\.").replace("*", "[^/]*"), rel) for g in patterns
        ), rel


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_prints_the_script(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["completion", shell]) == 0
    out = capsys.readouterr().out
    assert "_MICROAGENT_COMPLETE" in out
    marker = {"bash": "_microagent_completion()", "zsh": "#compdef microagent", "fish": "complete"}
    assert marker[shell] in out
    data = cli_json(capsys, "completion", shell)
    assert data["script"].rstrip() == out.rstrip() and shell in data["install"]
    error = cli_json(capsys, "completion", "tcsh", code=2)["error"]
    assert error["kind"] == "usage"


@pytest.fixture
def two_workspaces(busybox_project: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    spec = busybox_project / "microagent.yaml"
    spec.write_text("name: ws\nimage: oci:layout:latest\nentrypoint: 'true'\n")
    for name in ("alpha", "alpine", "beta"):
        cli_json(capsys, "create", "-f", str(spec), "--name", name)
    return busybox_project


def complete(words: str, *, home: Path | None = None) -> list[str]:
    """What bash offers for the last word of ``words``, through the script `completion bash`
    prints (sourced in a real bash that calls microagent back)."""
    require_tools("bash")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    if home is not None:
        env["MICROAGENT_HOME"] = str(home)
    script = subprocess.run(
        [str(bindir / "microagent"), "completion", "bash"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    argv = words.split(" ")
    probe = (
        f"{script}\nCOMP_WORDS=({' '.join(argv)} ''); COMP_CWORD={len(argv)}\n"
        if words.endswith(" ")
        else f"{script}\nCOMP_WORDS=({words}); COMP_CWORD={len(argv) - 1}\n"
    )
    probe += '_microagent_completion microagent; printf "%s\\n" "${COMPREPLY[@]}"\n'
    done = subprocess.run(
        ["bash", "--norc", "-c", probe], check=False, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr  # nothing but the candidates reaches the terminal
    return [line for line in done.stdout.splitlines() if line]


def test_workspace_names_complete_in_every_command_that_takes_one(two_workspaces: Path) -> None:
    comp = ShellComplete(cli, {}, "microagent", "_MICROAGENT_COMPLETE")

    def offered(args: list[str], incomplete: str) -> list[str]:
        return [item.value for item in comp.get_completions(args, incomplete)]

    for command in ("start", "status", "result", "halt", "stop", "kill", "wait", "logs"):
        assert offered([command], "al") == ["alpha", "alpine"], command
    for command in ("events", "audit", "exec"):
        assert offered([command], "") == ["alpha", "alpine", "beta"], command
    assert offered(["delete", "-y", "beta"], "a") == ["alpha", "alpine"]
    assert offered(["status", "alpha"], "") == []  # one NAME only
    assert offered(["status"], "x") == []


def test_bash_completes_workspace_names_from_the_store(two_workspaces: Path) -> None:
    assert complete("microagent status al") == ["alpha", "alpine"]
    assert complete("microagent start b") == ["beta"]
    assert complete("microagent delete alpha al") == ["alpha", "alpine"]
    assert complete("microagent status zz") == []
    assert "init" in complete("microagent in")
    assert complete("microagent init --provider o") == ["openai"]
    assert complete("microagent nosuch st") == ["start", "status", "stop"]  # and no error


def test_completion_reads_the_home_typed_on_the_line(two_workspaces: Path, tmp_path: Path) -> None:
    home = os.environ["MICROAGENT_HOME"]
    empty = tmp_path / "empty-home"
    assert complete("microagent status a", home=empty) == []
    assert complete(f"microagent --home {home} status a", home=empty) == ["alpha", "alpine"]
