"""The agents' shared core (tools, confinement, request handling), exercised in-process.

The core is identical in the three agent.py files (test_example_files checks that), so one
copy is imported here, from whichever example has its SDK installed. `serve()` is driven with
a scripted stand-in for the provider loop, so no model and no network are involved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from example_harness import EXAMPLES, MEDIATION_ENV


@pytest.fixture
def root(tmp_path: Path) -> Path:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return workspace.resolve()


def tool(core: ModuleType, root: Path, name: str, **args: Any) -> Any:
    return core.execute_tool(root, name, args)


# --- output shaping and environment ---------------------------------------------------------


def test_truncate_keeps_head_and_tail_and_counts_the_cut(core: ModuleType) -> None:
    text = "H" * 600 + "M" * 1000 + "T" * 600
    cut = core.truncate(text, limit=1000)
    assert cut.startswith("H" * 500 + "\n[... 1200 characters omitted ...]\n")
    assert cut.endswith("T" * 500)
    assert "M" not in cut
    assert core.truncate("short", limit=1000) == "short"


def test_scrubbed_env_drops_credential_names_in_any_case(core: ModuleType) -> None:
    env = {
        "PATH": "/bin",
        "HOME": "/root",
        "ANTHROPIC_API_KEY": "a",
        "openai_api_key": "b",
        "GH_TOKEN": "c",
        "AWS_SECRET_ACCESS_KEY": "d",
        "GOOGLE_APPLICATION_CREDENTIALS": "e",
        "DB_PASSWORD": "f",
    }
    assert core.scrubbed_env(env) == {"PATH": "/bin", "HOME": "/root"}


# --- path confinement -------------------------------------------------------------------------


def test_paths_inside_the_workspace_resolve(core: ModuleType, root: Path) -> None:
    (root / "sub").mkdir()
    (root / "alias").symlink_to(root / "sub")
    assert core.resolve_in_workspace(root, "a.txt") == root / "a.txt"
    assert core.resolve_in_workspace(root, "sub/../b.txt") == root / "b.txt"
    assert core.resolve_in_workspace(root, str(root / "sub" / "c")) == root / "sub" / "c"
    assert core.resolve_in_workspace(root, "alias/d") == root / "sub" / "d"
    assert core.resolve_in_workspace(root, ".") == root


@pytest.mark.parametrize(
    "raw", ["..", "../x", "sub/../../x", "/etc/passwd", "/", "escape/x", "escape", "", "a\x00b"]
)
def test_paths_leaving_the_workspace_are_refused(core: ModuleType, root: Path, raw: str) -> None:
    (root / "sub").mkdir()
    (root / "escape").symlink_to(root.parent)
    with pytest.raises(core.ToolError):
        core.resolve_in_workspace(root, raw)


def test_a_symlink_chain_out_of_the_workspace_is_refused(core: ModuleType, root: Path) -> None:
    (root.parent / "secret").write_text("s")
    (root / "hop2").symlink_to(root.parent / "secret")
    (root / "hop1").symlink_to(root / "hop2")
    outcome = tool(core, root, "read_file", path="hop1")
    assert outcome.is_error
    assert "outside the workspace" in outcome.text


# --- file tools ---------------------------------------------------------------------------------


def test_write_file_creates_parents_and_read_file_reads_back(core: ModuleType, root: Path) -> None:
    written = tool(core, root, "write_file", path="deep/er/f.txt", content="héllo\n")
    assert not written.is_error
    assert written.text == f"wrote 7 bytes to {root / 'deep/er/f.txt'}"
    assert tool(core, root, "read_file", path="deep/er/f.txt").text == "héllo\n"


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("read_file", {"path": "missing.txt"}, "does not exist"),
        ("read_file", {"path": "."}, "not a regular file"),
        ("read_file", {}, "'path' is required"),
        ("write_file", {"path": "d"}, "'content' is required"),
        ("write_file", {"path": "d", "content": "x"}, "is a directory"),
        ("bash", {"command": 42}, "'command' is required"),
        ("bash", {"command": "true", "timeout_seconds": "9"}, "must be an integer"),
        ("rm_rf", {}, "unknown tool 'rm_rf'"),
    ],
)
def test_bad_tool_calls_become_errors_for_the_model(
    core: ModuleType, root: Path, name: str, args: dict[str, Any], message: str
) -> None:
    (root / "d").mkdir()
    outcome = core.execute_tool(root, name, args)
    assert outcome.is_error
    assert outcome.text.startswith("error: ")
    assert message in outcome.text


def test_arguments_must_be_an_object(core: ModuleType, root: Path) -> None:
    outcome = core.execute_tool(root, "bash", ["ls"])
    assert outcome.is_error
    assert "JSON object" in outcome.text


# --- bash ---------------------------------------------------------------------------------------


def test_bash_reports_exit_code_and_both_streams(core: ModuleType, root: Path) -> None:
    outcome = tool(core, root, "bash", command="pwd; echo oops >&2; exit 3")
    assert not outcome.is_error  # the command ran; its failure is for the model to read
    assert outcome.text == f"exit_code=3\nstdout:\n{root}\n\nstderr:\noops\n"


def test_bash_shortens_long_output(core: ModuleType, root: Path) -> None:
    outcome = tool(core, root, "bash", command="head -c 50000 /dev/zero | tr '\\0' a; echo END")
    assert "characters omitted ..." in outcome.text
    assert "END" in outcome.text
    assert len(outcome.text) < 21_000


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not reaped


def test_bash_timeout_kills_the_whole_process_group(core: ModuleType, root: Path) -> None:
    started = time.monotonic()
    outcome = tool(core, root, "bash", command="sleep 30 & echo bg=$!; sleep 30", timeout_seconds=1)
    assert time.monotonic() - started < 10
    assert outcome.is_error
    assert "timed out after 1 s" in outcome.text
    background = int(outcome.text.split("bg=")[1].split()[0])
    deadline = time.monotonic() + 5
    while _alive(background) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(background)


def test_bash_runs_without_credentials(
    core: ModuleType, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOME_SERVICE_PASSWORD", "hunter2")
    monkeypatch.setenv("HARMLESS_SETTING", "kept")
    outcome = tool(core, root, "bash", command="env")
    assert "HARMLESS_SETTING=kept" in outcome.text
    assert "hunter2" not in outcome.text


# --- serve(): request handling around the provider loop -----------------------------------


Converse = Callable[[Any, Any, str], str]


class Served:
    """serve() run in-process against a temporary workspace and agent dir."""

    def __init__(self, core: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.core = core
        self.workspace = tmp_path / "workspace"
        self.agent_dir = tmp_path / "agent"
        self.workspace.mkdir()
        self.agent_dir.mkdir()
        demo = EXAMPLES / "minimal-agent" / "demo"
        for name in ("constraints.json", "system_prompt.md"):
            (self.agent_dir / name).write_bytes((demo / name).read_bytes())
        self.request = json.loads((demo / "input-001.json").read_text())
        monkeypatch.setenv("MICROAGENT_WORKSPACE", str(self.workspace))
        monkeypatch.setenv("MICROAGENT_AGENT_DIR", str(self.agent_dir))
        monkeypatch.setenv("MICROAGENT_AGENT_ID", "core-test")
        monkeypatch.delenv("MICROAGENT_MAX_TURNS", raising=False)
        monkeypatch.delenv(MEDIATION_ENV, raising=False)  # file mode
        self.calls: list[str] = []

    def write_request(self, **overrides: Any) -> None:
        (self.workspace / "input.json").write_text(json.dumps(self.request | overrides))

    def serve(self, converse: Converse) -> int:
        def recording(session: Any, request: Any, system_prompt: str) -> str:
            self.calls.append(system_prompt)
            return converse(session, request, system_prompt)

        return self.core.serve("fake", recording)

    @property
    def result(self) -> dict[str, Any]:
        return json.loads((self.workspace / "result.json").read_text())


def signals(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


@pytest.fixture
def served(core: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Served:
    served = Served(core, tmp_path, monkeypatch)
    served.write_request()
    return served


def test_completed_request(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    def converse(session: Any, request: Any, system_prompt: str) -> str:
        session.begin_turn()
        session.add_usage(input_tokens=7, output_tokens=3, cache_read=11, cache_creation=13)
        assert session.call_tool("bash", {"command": "echo ok > done.txt"}).is_error is False
        return f"handled {request.request_id}"

    assert served.serve(converse) == 0
    assert served.calls[0].startswith("You run inside a Linux microVM")
    raw = (served.workspace / "result.json").read_text()
    assert raw.startswith('{\n  "request_id": "req-001",') and raw.endswith("}\n")
    assert served.result["status"] == "completed"
    assert served.result["content"] == "handled req-001"
    assert served.result["usage"] == {
        "input_tokens": 7,
        "output_tokens": 3,
        "cache_read_input_tokens": 11,
        "cache_creation_input_tokens": 13,
        "tool_calls": 1,
        "turns": 1,
    }
    assert sorted(p.name for p in served.workspace.iterdir()) == [
        "done.txt",
        "input.json",
        "result.json",
    ]  # no temporary file left behind
    sigs = signals(capsys)
    assert [s["signal"] for s in sigs] == ["ready", "accepting", "working", "completed"]
    assert all(s["agent_id"] == "core-test" for s in sigs)
    assert sigs[0]["detail"] == "constraints v1 (sha256:demo-v1)"
    assert all(s["request_id"] == "req-001" for s in sigs[1:])


def never(session: Any, request: Any, system_prompt: str) -> str:
    raise AssertionError("the provider loop must not run")


def test_unverified_principal_is_denied(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    served.write_request(principal=served.request["principal"] | {"verified": False})
    assert served.serve(never) == 1
    assert served.calls == []
    assert served.result["status"] == "denied"
    assert "not verified" in served.result["error"]
    assert [s["signal"] for s in signals(capsys)] == ["ready", "failed"]


@pytest.mark.parametrize(
    ("request_text", "request_id", "message"),
    [
        (None, "unknown", "cannot read"),
        ("{not json", "unknown", "not a valid WorkRequest"),
        ('{"request_id": "req-x", "surprise": 1}', "req-x", "surprise"),
        ('{"request_id": "req-y", "principal": {"name": "bob"}}', "req-y", "principal.kind"),
    ],
)
def test_unusable_input_fails_with_the_best_request_id(
    served: Served, request_text: str | None, request_id: str, message: str
) -> None:
    input_path = served.workspace / "input.json"
    input_path.unlink()
    if request_text is not None:
        input_path.write_text(request_text)
    assert served.serve(never) == 1
    assert served.result["status"] == "failed"
    assert served.result["request_id"] == request_id
    assert message in served.result["error"]


def test_constraints_version_mismatch_fails(served: Served) -> None:
    served.write_request(constraints_version=2)
    assert served.serve(never) == 1
    assert "expects constraints v2" in served.result["error"]


def test_missing_operator_files_fail_before_ready(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    (served.agent_dir / "constraints.json").unlink()
    assert served.serve(never) == 1
    assert served.result["request_id"] == "req-001"
    assert "constraints.json" in served.result["error"]
    assert [s["signal"] for s in signals(capsys)] == ["failed"]


def test_a_crashing_loop_still_yields_a_result(served: Served) -> None:
    def converse(session: Any, request: Any, system_prompt: str) -> str:
        raise RuntimeError("connection reset")

    assert served.serve(converse) == 1
    assert served.result["status"] == "failed"
    assert served.result["error"] == "RuntimeError: connection reset"
    assert served.result["audit_ref"] == "audit://req-001"


def test_turn_limit_stops_the_loop(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROAGENT_MAX_TURNS", "3")

    def converse(session: Any, request: Any, system_prompt: str) -> str:
        while True:
            session.begin_turn()

    assert served.serve(converse) == 1
    assert "turn limit (3)" in served.result["error"]
    assert served.result["usage"]["turns"] == 3


def test_bad_turn_setting_is_reported(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROAGENT_MAX_TURNS", "lots")
    assert served.serve(never) == 1
    assert "MICROAGENT_MAX_TURNS must be an integer" in served.result["error"]


def test_tool_call_bound_refuses_further_calls(served: Served) -> None:
    served.write_request(bounds={"max_tool_calls": 1})
    outcomes = []

    def converse(session: Any, request: Any, system_prompt: str) -> str:
        outcomes.append(session.call_tool("bash", {"command": "touch one"}))
        outcomes.append(session.call_tool("bash", {"command": "touch two"}))
        return "done"

    assert served.serve(converse) == 0
    assert [o.is_error for o in outcomes] == [False, True]
    assert "allows 1 tool calls" in outcomes[1].text
    assert (served.workspace / "one").exists()
    assert not (served.workspace / "two").exists()
    assert served.result["usage"]["tool_calls"] == 1


def test_duration_bound_stops_the_loop(served: Served) -> None:
    served.write_request(bounds={"max_duration_seconds": 1})

    def converse(session: Any, request: Any, system_prompt: str) -> str:
        session.deadline = time.monotonic() - 1  # as if the time had already run out
        session.begin_turn()
        return "unreachable"

    assert served.serve(converse) == 1
    assert "max_duration_seconds" in served.result["error"]


def test_a_stale_result_is_removed_before_work_starts(served: Served) -> None:
    (served.workspace / "result.json").write_text('{"status": "completed"}')
    seen = []

    def converse(session: Any, request: Any, system_prompt: str) -> str:
        seen.append((served.workspace / "result.json").exists())
        return "fresh"

    assert served.serve(converse) == 0
    assert seen == [False]
    assert served.result["content"] == "fresh"
