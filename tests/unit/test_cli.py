"""The CLI end to end in-process: exit codes, text and JSON output, secrets kept out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microagent.cli import main

DIGEST = "sha256:" + "12" * 32


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    (tmp_path / "agent.py").write_text("print(1)\n")
    path = tmp_path / "microagent.yaml"
    path.write_text(
        "name: cli-agent\n"
        f"image: python:3.13-slim@{DIGEST}\n"
        "setup: [pip install rich]\n"
        "files: [{src: agent.py, dst: /app/agent.py}]\n"
        "entrypoint: python /app/agent.py\n"
    )
    return path


def test_validate_ok(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--file", str(spec)]) == 0
    assert "ok (cli-agent, 1 setup steps, 1 files)" in capsys.readouterr().out


def test_validate_reports_location_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "microagent.yaml"
    bad.write_text("name: x\nimgae: python\n")
    assert main(["validate", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:1: imgae: unknown key 'imgae'" in err
    assert "hint: did you mean 'image'?" in err
    assert "Traceback" not in err


def test_json_error_envelope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "microagent.yaml"
    bad.write_text("name: x\nprofile: big\n")
    assert main(["--json", "validate", "-f", str(bad)]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    assert data["error"]["kind"] == "invalid_spec"
    assert data["error"]["location"] == {"file": str(bad), "line": 2, "column": 10}
    assert "must be one of" in data["error"]["message"]


def test_missing_spec_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "-f", str(tmp_path / "none.yaml")]) == 2
    assert "spec file not found" in capsys.readouterr().err


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--no-such-flag"]) == 2


def test_plan_text(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "-f", str(spec)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("plan for cli-agent")
    assert lines[2].split() == ["STEP", "KEY", "STATUS", "WHAT", "WHY"]
    assert [line.split()[0] for line in lines[3:7]] == ["base", "setup", "files", "config"]
    assert "BUILD" in lines[4] and "pip install rich" in lines[4]


def test_plan_json_and_env_secrecy(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "sk-ant-very-secret-value-123"
    assert main(["--json", "plan", "-f", str(spec), "--env", f"ANTHROPIC_API_KEY={secret}"]) == 0
    out = capsys.readouterr().out
    assert secret not in out
    data = json.loads(out)
    assert [s["kind"] for s in data["steps"]] == ["base", "setup", "files", "config"]
    assert all(s["key"].startswith("sha256:") and s["cached"] is False for s in data["steps"])
    assert data["steps"][-1]["inputs"]["runtimeEnvKeys"] == ["ANTHROPIC_API_KEY"]


def test_env_value_does_not_change_keys(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--json", "plan", "-f", str(spec), "-e", "K=one"])
    first = json.loads(capsys.readouterr().out)
    main(["--json", "plan", "-f", str(spec), "-e", "K=two"])
    second = json.loads(capsys.readouterr().out)
    assert [s["key"] for s in first["steps"]] == [s["key"] for s in second["steps"]]


def test_overrides_are_validated(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "-f", str(spec), "--network", "bridge"]) == 2
    assert "--network 'bridge': must be one of: user, isolated" in capsys.readouterr().err


def test_setup_flag_appends_a_step(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "plan", "-f", str(spec), "--setup", "echo extra"]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert [s["label"] for s in steps if s["kind"] == "setup"] == ["pip install rich", "echo extra"]


def test_tag_without_lock_explains_how_to_pin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "microagent.yaml"
    path.write_text("name: x\nimage: python:3.13-slim\n")
    assert main(["plan", "--offline", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is a tag with no pinned digest" in err and "microagent lock" in err


def test_lock_file_pins_the_tag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "microagent.yaml"
    path.write_text("name: x\nimage: python:3.13-slim\n")
    lock = {
        "lockVersion": 1,
        "images": {
            "python:3.13-slim": {
                "reference": "docker.io/library/python:3.13-slim",
                "digest": DIGEST,
                "platforms": {},
            }
        },
    }
    (tmp_path / "microagent.lock").write_text(json.dumps(lock))
    assert main(["--json", "plan", "-f", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["image"]["digest"] == DIGEST


def test_debug_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "plan", "-f", str(tmp_path / "none.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_disk_full_is_a_clear_error(
    spec: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/store/blobs")

    monkeypatch.setattr("microagent.api.Microagent.plan", full)
    assert main(["plan", "-f", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "no space left on device (/store/blobs)" in err and "cache prune" in err
    assert "Traceback" not in err


def test_unexpected_bug_has_no_traceback_without_debug(
    spec: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*_a: object, **_k: object) -> None:
        raise KeyError("oops")

    monkeypatch.setattr("microagent.api.Microagent.plan", bug)
    assert main(["plan", "-f", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "internal error: KeyError('oops')" in err and "Traceback" not in err
    assert main(["--debug", "plan", "-f", str(spec)]) == 1
    assert "Traceback" in capsys.readouterr().err
