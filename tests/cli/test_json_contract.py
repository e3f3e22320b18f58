"""The `--json` contract: every document a command prints validates against
`schemas/cli-envelope.schema.json`, in success and in failure.

Each command runs in-process through `microagent.cli.main` with the fake backend (no VM) over
the busybox stand-in layout. Every document is checked against the envelope schema: `ok`,
`schemaVersion: 1`, and on failure an `error` object `{kind, message, hint?, location?}` whose
message never holds the hint. `--json` works after the command too; usage errors are JSON
with a hint; streams (`logs -f`, `audit -f`) print one record per line.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from jsonschema import Draft202012Validator

import microagent
from microagent import errors
from microagent.cli import cli, main
from microagent.commands import confirm, envelope
from microagent.commands.workspace import console_records
from microagent.workspace.records import Workspaces

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
SCHEMA = envelope.schema()
VALIDATOR = Draft202012Validator(SCHEMA)
SPEC = "name: ws\nimage: oci:layout:latest\nsetup: [mkdir -p /workspace]\nentrypoint: 'true'\n"


@pytest.fixture
def project(busybox_project: Path) -> Path:
    """A folder with a spec for workspace `ws` over the busybox layout; an empty home."""
    (busybox_project / "microagent.yaml").write_text(SPEC)
    return busybox_project


def checked(out: str) -> dict[str, Any]:
    """One JSON document that validates against the envelope schema."""
    data: dict[str, Any] = json.loads(out)
    VALIDATOR.validate(data)
    return data


def cli_json(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> dict[str, Any]:
    """``microagent --json ARGS``: exit code ``code`` and a valid envelope (ok iff code 0,
    except the commands whose exit code is a guest's)."""
    capsys.readouterr()
    got = main(["--json", *args])
    out = capsys.readouterr().out
    assert got == code, out
    return checked(out)


def failure(capsys: pytest.CaptureFixture[str], *args: str, code: int, kind: str) -> dict[str, Any]:
    """A failing command's ``error`` object: the kind asked for, a message without the hint."""
    data = cli_json(capsys, *args, code=code)
    assert data["ok"] is False
    error: dict[str, Any] = data["error"]
    assert error["kind"] == kind, error
    assert "hint" not in error or error["hint"] not in error["message"]
    return error


def test_the_schema_is_valid_and_its_kinds_are_the_error_classes() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    for module in pkgutil.walk_packages(microagent.__path__, "microagent."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)  # every MicroagentError subclass is defined

    def subclasses(cls: type[errors.MicroagentError]) -> Iterator[type[errors.MicroagentError]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from subclasses(sub)

    kinds = {cls.kind for cls in subclasses(errors.MicroagentError)}
    assert kinds == set(SCHEMA["$defs"]["error"]["properties"]["kind"]["enum"])


def test_the_schema_refuses_what_the_contract_forbids() -> None:
    good = {"ok": False, "schemaVersion": 1, "error": {"kind": "usage", "message": "m"}}
    VALIDATOR.validate(good)
    bad = [
        {"ok": True},  # no version
        {"ok": False, "schemaVersion": 1},  # a failure without an error
        {"ok": True, "schemaVersion": 1, "error": {"kind": "vm", "message": "m"}},
        {"ok": False, "schemaVersion": 1, "error": {"kind": "oops", "message": "m"}},
        {"ok": False, "schemaVersion": 1, "error": {"kind": "vm", "message": "m\nhint: h"}},
        {"ok": False, "schemaVersion": 1, "error": {"kind": "vm", "message": "m", "x": 1}},
        {"ok": False, "schemaVersion": 1, "error": {"kind": "invalid_spec", "message": "m",
                                                    "location": "f:1:2"}},
    ]  # fmt: skip
    for document in bad:
        assert not VALIDATOR.is_valid(document), document


def test_an_outcome_failure_never_goes_without_an_error_object() -> None:
    assert envelope.document({"ok": True, "a": 1}) == {"ok": True, "schemaVersion": 1, "a": 1}
    data = envelope.document({"ok": False, "error": {"message": "gone"}})
    assert data["error"] == {"kind": "internal", "message": "gone"}
    VALIDATOR.validate(data)
    failed = envelope.document({"ok": True, "error": None}, errors.VMError("x", hint="y"))
    assert failed == {"ok": False, "schemaVersion": 1,
                      "error": {"kind": "vm", "message": "x", "hint": "y"}}  # fmt: skip


def test_spec_commands(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(project / "microagent.yaml")
    assert cli_json(capsys, "validate", "-f", spec)["name"] == "ws"
    plan = cli_json(capsys, "plan", "-f", spec)
    assert {"name", "spec", "image", "steps"} <= set(plan)
    assert {"lock", "changed", "images"} <= set(cli_json(capsys, "lock", "-f", spec))
    built = cli_json(capsys, "build", "-f", spec)
    assert {"rootfsKey", "configKey", "stepsBuilt", "steps"} <= set(built)


def test_spec_errors_carry_a_location_object_and_the_hint_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "microagent.yaml"
    bad.write_text("name: x\nimgae: python\nprofile: big\n")
    error = failure(capsys, "validate", "-f", str(bad), code=2, kind="invalid_spec")
    assert error["location"] == {"file": str(bad), "line": 2, "column": 1}
    assert error["message"].startswith(f"2 problems in spec; first: {bad}:2:1: imgae:")
    assert error["hint"] == "did you mean 'image'?"
    assert "hint" not in error["message"]
    assert [d["path"] for d in error["diagnostics"]] == ["imgae", "profile"]

    single = tmp_path / "one.yaml"
    single.write_text("name: x\nimage: python\nprofile: big\n")
    error = failure(capsys, "validate", "-f", str(single), code=2, kind="invalid_spec")
    assert error["message"].startswith(f"{single}:3:10: profile: ")
    assert "hint" not in error["message"]

    missing = failure(capsys, "plan", "-f", str(tmp_path / "none.yaml"), code=2,
                      kind="invalid_input")  # fmt: skip
    assert missing["message"] == f"spec file not found: {tmp_path / 'none.yaml'}"
    assert "examples/minimal-agent/microagent.yaml" in missing["hint"]


def test_workspace_commands(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    created = cli_json(capsys, "create", "-f", str(project / "microagent.yaml"))
    assert created["workspace"] == "ws"
    assert [w["name"] for w in cli_json(capsys, "list")["workspaces"]] == ["ws"]
    assert cli_json(capsys, "ps")["workspaces"] == []
    source = tmp_path / "in.json"
    source.write_text('{"n": 1}\n')
    copied = cli_json(capsys, "cp", str(source), "ws:/etc/in.json")
    assert copied["bytes"] == source.stat().st_size
    back = cli_json(capsys, "cp", "ws:/etc/in.json", str(tmp_path / "out.json"))
    assert back["direction"] == "from-workspace"

    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"exitCode": 0, "stdout": "done\n"}))
    waited = cli_json(capsys, "start", "ws", "--wait")
    assert (waited["state"], waited["exitCode"]) == ("stopped", 0)
    assert cli_json(capsys, "status", "ws")["event"]["state"] == "stopped"
    assert cli_json(capsys, "status", "ws")["error"] is None
    assert cli_json(capsys, "result", "ws")["result"]["exitCode"] == 0
    assert cli_json(capsys, "wait", "ws")["state"] == "stopped"
    assert {"workspace", "records"} <= set(cli_json(capsys, "logs", "ws"))
    assert cli_json(capsys, "events", "ws")["events"]
    audit = cli_json(capsys, "audit", "ws")
    assert (audit["entries"], audit["summary"]["requests"]) == ([], 0)
    assert cli_json(capsys, "halt", "ws")["workspace"] == "ws"
    assert cli_json(capsys, "stop", "ws")["workspace"] == "ws"
    assert cli_json(capsys, "kill", "ws")["killed"] is False
    assert cli_json(capsys, "delete", "-y", "ws")["results"] == [
        {"workspace": "ws", "deleted": True}
    ]


def test_workspace_failures(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli_json(capsys, "create", "-f", str(project / "microagent.yaml"))
    taken = failure(capsys, "create", "-f", str(project / "microagent.yaml"), code=1,
                    kind="conflict")  # fmt: skip
    assert taken["message"]

    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"exitCode": 3, "stderr": "boom\n"}))
    failed = failure(capsys, "start", "ws", "--wait", code=3, kind="vm")
    assert failed["message"].startswith("workspace 'ws' failed")
    assert "microagent logs ws" in failed["hint"]
    status = failure(capsys, "status", "ws", code=0, kind="vm")  # it reported: exit 0
    assert status["message"].startswith("workspace 'ws' failed")
    failure(capsys, "wait", "ws", code=1, kind="vm")

    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"hang": True}))
    cli_json(capsys, "start", "ws")
    try:
        again = failure(capsys, "start", "ws", code=1, kind="conflict")
        assert "microagent halt ws" in again["hint"]
        late = failure(capsys, "wait", "ws", "--timeout", "0.2", code=124, kind="timeout")
        assert "keeps running" in late["hint"]
        busy = failure(capsys, "cp", "ws:/etc/hostname", "x", code=1, kind="conflict")
        assert busy["hint"]
    finally:
        cli_json(capsys, "halt", "ws")
    failure(capsys, "exec", "ws", "--", "true", code=1, kind="conflict")

    for args in (["status", "nope"], ["logs", "nope"], ["audit", "nope"], ["events", "nope"],
                 ["result", "nope"], ["halt", "nope"], ["start", "nope"]):  # fmt: skip
        missing = failure(capsys, *args, code=1, kind="not_found")
        assert missing["message"] == "workspace 'nope' not found"


def test_images_cache_kernel_and_doctor(
    project: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    layout = f"oci:{project / 'layout'}:latest"
    pulled = cli_json(capsys, "image", "pull", layout)
    assert {"key", "digest", "platform", "rootfs"} <= set(pulled)
    assert [i["key"] for i in cli_json(capsys, "image", "ls")["images"]] == [pulled["key"]]
    cli_json(capsys, "build", "-f", str(project / "microagent.yaml"))
    assert cli_json(capsys, "cache", "ls")["entries"]
    assert cli_json(capsys, "cache", "du")["total"] > 0
    exported = cli_json(capsys, "cache", "export", "-f", str(project / "microagent.yaml"),
                        str(tmp_path / "export"))  # fmt: skip
    assert exported["layout"] == str(tmp_path / "export")
    assert "restored" in cli_json(capsys, "cache", "import", str(tmp_path / "export"))
    assert cli_json(capsys, "image", "rm", "-y", pulled["key"])["removed"] == [pulled["key"]]
    assert "removed" in cli_json(capsys, "cache", "prune", "--all", "-y")
    assert "kits" in cli_json(capsys, "kernel", "ls")
    assert "removed" in cli_json(capsys, "kernel", "prune", "-y")
    failure(capsys, "image", "rm", "-y", "sha256:" + "0" * 64, code=1, kind="not_found")
    failure(capsys, "cache", "import", str(tmp_path / "nowhere"), code=1, kind="not_found")

    capsys.readouterr()
    code = main(["--json", "doctor"])
    doctor = checked(capsys.readouterr().out)
    assert code == (0 if doctor["ok"] else 1)
    assert doctor["ok"] == (doctor["verdict"] != "failed")


def test_one_shot_run(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = f"oci:{project / 'layout'}:latest"
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"exitCode": 5, "stdout": "out\n"}))
    ran = cli_json(capsys, "run", image, "--", "true", code=5)
    assert (ran["ok"], ran["result"]["exitCode"], ran["result"]["stdout"]) == (True, 5, "out\n")
    printed = cli_json(capsys, "run", "--print-command", image, "--", "true")
    assert printed["argv"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["validate", "--jsn"], ["no such option: --jsn", "--json"]),
        (["validate", "--file"], ["--file", "requires an argument"]),
        (["plan", "--memory", "lots"], ["'lots' is not a valid integer", "plan --help"]),
        (["status"], ["missing argument 'NAME'", "status --help"]),
        (["stauts", "ws"], ["no such command 'stauts'", "`microagent status`"]),
        (["cache", "lss"], ["no such command 'lss'", "`microagent cache ls`"]),
        (["run", "--network", "bridge", "img", "--", "true"], ["'bridge' is not one of", "run"]),
    ],
)
def test_usage_errors_are_json_with_a_hint(
    args: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    error = failure(capsys, *args, code=2, kind="usage")
    text = error["message"] + "\n" + error["hint"]
    for word in words:
        assert word in text, error
    assert not error["message"].endswith(".") and not error["message"][0].isupper()


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "-f", "{spec}", "--json"],
        ["validate", "--json", "-f", "{spec}"],
        ["plan", "-f", "{spec}", "--json"],
        ["list", "--json"],
        ["cache", "ls", "--json"],
        ["cache", "--json", "ls"],
        ["kernel", "ls", "--json"],
    ],
)
def test_json_after_the_command(
    args: list[str], project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.format(spec=project / "microagent.yaml") for a in args]
    assert main(argv) == 0
    assert checked(capsys.readouterr().out)["ok"] is True


def test_errors_with_json_after_the_command(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, code, kind in (
        (["status", "nope", "--json"], 1, "not_found"),
        (["validate", "-f", str(project / "none.yaml"), "--json"], 2, "invalid_input"),
        (["validate", "--bogus", "--json"], 2, "usage"),
        (["stauts", "--json"], 2, "usage"),
    ):
        assert main(argv) == code
        assert checked(capsys.readouterr().out)["error"]["kind"] == kind
    # after `--` it is the guest command's word, not ours: no JSON
    capsys.readouterr()
    assert main(["exec", "nope", "--", "echo", "--json"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "error: workspace 'nope' not found" in out.err


def test_every_command_takes_json() -> None:
    def walk(command: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
        yield path, command
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, f"{path} {name}".strip())

    for path, command in walk(cli, ""):
        if path:
            opts = [o for p in command.params if isinstance(p, click.Option) for o in p.opts]
            assert opts.count("--json") == 1, path


def test_version_and_bare_json(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--version", "--json"], ["--json", "--version"]):
        assert main(argv) == 0
        assert checked(capsys.readouterr().out) == {
            "ok": True,
            "schemaVersion": 1,
            "version": microagent.__version__,
        }
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"microagent, version {microagent.__version__}\n"
    assert main(["--json"]) == 0
    bare = checked(capsys.readouterr().out)
    assert [step["command"].split()[1] for step in bare["workflow"]] == [
        "validate", "plan", "create", "cp", "start", "status"
    ]  # fmt: skip
    assert {"create", "start", "status", "logs"} <= {c["name"] for c in bare["commands"]}


def test_logs_json_is_records(
    project: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cli_json(capsys, "create", "-f", str(project / "microagent.yaml"))
    cli_json(capsys, "start", "--wait", "ws")  # stopped: `logs -f` ends at once
    log = Workspaces(tmp_path / "home" / "workspaces").get("ws").run.serial_log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"boot\r\n\x1b[31mred\x1b[0m\n\xffbad\nno newline")
    records = cli_json(capsys, "logs", "ws")["records"]
    assert records == [
        {"line": 1, "text": "boot"},
        {"line": 2, "text": "\x1b[31mred\x1b[0m"},  # exact: JSON escapes it
        {"line": 3, "text": "\ufffdbad"},
        {"line": 4, "text": "no newline"},
    ]
    capsys.readouterr()
    assert main(["--json", "logs", "-f", "ws"]) == 0  # stopped: prints what there is and ends
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == records


def test_console_records_join_chunks_across_lines() -> None:
    chunks = [b"a", b"b\nc", b"d\n", b"", b"\xe2\x82", b"\xac\n"]
    assert list(console_records(chunks)) == [
        {"line": 1, "text": "ab"},
        {"line": 2, "text": "cd"},
        {"line": 3, "text": "\u20ac"},
    ]
    assert list(console_records([])) == []


def test_docs_show_the_contract_and_every_command() -> None:
    text = DOCS.read_text()
    assert "schemaVersion" in text and "cli-envelope.schema.json" in text
    for kind in SCHEMA["$defs"]["error"]["properties"]["kind"]["enum"]:
        assert f"`{kind}`" in text, kind

    def paths(command: click.Command, path: str) -> Iterator[str]:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from paths(sub, f"{path} {name}".strip())
        else:
            yield path

    rows = [line for line in text.splitlines() if line.startswith("| ")]

    def has_row(path: str) -> bool:
        return any(re.search(rf"`{re.escape(path)}[ `]", row) for row in rows)

    missing = [p for p in paths(cli, "") if not has_row(p)]
    assert not missing, f"docs/cli.md has no table row for: {missing}"


def test_a_question_answered_no_is_a_document_too(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli_json(capsys, "create", "-f", str(project / "microagent.yaml"))

    def say_no(*_args: Any, **_kwargs: Any) -> bool:
        raise click.exceptions.Abort

    monkeypatch.setattr(confirm, "interactive", lambda: True)
    monkeypatch.setattr(click, "confirm", say_no)
    error = failure(capsys, "delete", "ws", code=1, kind="usage")
    assert error == {
        "kind": "usage",
        "message": "aborted: not confirmed",
        "hint": "nothing was changed; -y goes ahead without a question",
    }
    assert [w["name"] for w in cli_json(capsys, "list")["workspaces"]] == ["ws"]
