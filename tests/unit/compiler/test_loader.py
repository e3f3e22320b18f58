"""Loading valid specs into typed values, and the shape of the errors for invalid ones."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from microagent.compiler.loader import load_spec, parse_spec
from microagent.compiler.schema import load_schema
from microagent.compiler.spec import (
    DiskMode,
    NetworkMode,
    Profile,
    Restart,
    RestartPolicy,
    Spec,
    default_hostname,
)
from microagent.errors import InvalidInputError, SpecError

FULL = """\
name: full-agent
image: python:3.13-slim
profile: medium
restart: on-failure
entrypoint: [python, /app/agent.py]
workdir: /workspace
shell: /bin/bash
hostname: full
setup:
  - pip install rich
  - {run: mkdir -p /app}
  - {file: scripts/install.sh}
setupFiles: [scripts/more.sh]
files:
  - {src: agent.py, dst: /app/agent.py, mode: "0755"}
  - {src: pkg, dst: /app/pkg}
env: {LOG_LEVEL: debug, A: "1"}
resources: {memoryMiB: 1024, cpuCount: 1, sizeMiB: 4096, headroomMiB: 256}
network:
  mode: user
  forwards: [{hostPort: 8080, guestPort: 80}]
outputs: [{name: result, path: /workspace/result.json}]
disks: [{name: data, path: data.ext4, mountpoint: /data, mode: rw}]
bundles: [{name: corpus, path: corpus.tar.gz, mountpoint: /corpus}]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "install.sh").write_text("echo one\necho two\n")
    (tmp_path / "scripts" / "more.sh").write_text("echo more\n")
    (tmp_path / "agent.py").write_text("print('hi')\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("X = 1\n")
    (tmp_path / "data.ext4").write_bytes(b"\0" * 1080 + b"\x53\xef")  # an ext superblock magic
    (tmp_path / "corpus.tar.gz").write_bytes(b"\0" * 10)
    spec = tmp_path / "microagent.yaml"
    spec.write_text(FULL)
    return spec


def test_full_spec_loads_into_typed_values(project: Path) -> None:
    spec = load_spec(project)
    assert spec.name == "full-agent"
    assert spec.profile is Profile.MEDIUM
    assert spec.restart == Restart(RestartPolicy.ON_FAILURE, 5)
    assert spec.command() == ("python", "/app/agent.py")
    assert [s.run for s in spec.setup_steps] == [
        "pip install rich",
        "mkdir -p /app",
        "echo one\necho two",
        "echo more",
    ]
    assert spec.files[0].src == project.parent / "agent.py"
    assert spec.files[0].mode == 0o755
    assert spec.files[1].mode is None
    assert dict(spec.env) == {"A": "1", "LOG_LEVEL": "debug"}
    assert spec.network.mode is NetworkMode.USER
    assert spec.network.forwards[0].host == "127.0.0.1"
    assert spec.disks[0].mode is DiskMode.RW and spec.bundles[0].mode is DiskMode.RO
    res = spec.effective_resources()
    assert (res.memory_mib, res.cpu_count, res.size_mib) == (1024, 1, 4096)


def test_spec_is_immutable(project: Path) -> None:
    spec = load_spec(project)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.env["NEW"] = "x"  # type: ignore[index]


def test_defaults(tmp_path: Path) -> None:
    spec = parse_spec("name: Tiny_Agent.1\n", tmp_path / "microagent.yaml", "microagent.yaml")
    assert spec.image == "python:3.13-slim"
    assert spec.profile is Profile.SMALL
    assert spec.command() is None
    assert spec.effective_hostname() == "tiny-agent-1"
    assert spec.effective_resources().memory_mib == 512


@pytest.mark.parametrize(
    ("text", "policy", "limit", "canonical"),
    [
        ("name: a\n", RestartPolicy.NEVER, None, "never"),
        ("restart: no\n", RestartPolicy.NEVER, None, "never"),  # YAML's false
        ("restart: 'no'\n", RestartPolicy.NEVER, None, "never"),
        ("restart: never\n", RestartPolicy.NEVER, None, "never"),
        ("restart: always\n", RestartPolicy.ALWAYS, None, "always"),
        ("restart: on-failure\n", RestartPolicy.ON_FAILURE, 5, "on-failure:5"),
        ("restart: on-failure:2\n", RestartPolicy.ON_FAILURE, 2, "on-failure:2"),
        ("restart: on-failure:999\n", RestartPolicy.ON_FAILURE, 999, "on-failure:999"),
    ],
)
def test_restart_policies(
    tmp_path: Path, text: str, policy: RestartPolicy, limit: int | None, canonical: str
) -> None:
    restart = parse_spec(text, tmp_path / "s.yaml", "s.yaml").restart
    assert (restart.policy, restart.max_restarts, restart.text) == (policy, limit, canonical)
    assert Restart.parse(canonical) == restart


@pytest.mark.parametrize("text", ["on-failure:1000", "on-failure:-1", "on-failure:", "No", "0"])
def test_bad_restart_policies_are_located(tmp_path: Path, text: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(f"name: a\nrestart: '{text}'\n", tmp_path / "s.yaml", "s.yaml")
    (problem,) = raised.value.diagnostics
    assert (problem.path, str(problem.location)) == ("restart", "s.yaml:2:10")
    assert "on-failure:N" in problem.hint
    with pytest.raises(ValueError, match="invalid restart policy"):
        Restart.parse(text)


def test_restart_decisions() -> None:
    never, always = Restart(), Restart(RestartPolicy.ALWAYS)
    twice = Restart(RestartPolicy.ON_FAILURE, 2)
    assert not never.allows(failed=True, restarts=0)
    assert always.allows(failed=False, restarts=1000) and always.allows(failed=True, restarts=0)
    assert not twice.allows(failed=False, restarts=0)
    assert [twice.allows(failed=True, restarts=n) for n in range(3)] == [True, True, False]


def test_string_entrypoint_runs_through_the_shell(tmp_path: Path) -> None:
    spec = parse_spec("entrypoint: python /app/a.py\n", tmp_path / "s.yaml", "s.yaml")
    assert spec.command() == ("/bin/sh", "-lc", "python /app/a.py")


def test_single_string_setup(tmp_path: Path) -> None:
    spec = parse_spec("setup: pip install x\n", tmp_path / "s.yaml", "s.yaml")
    assert [s.run for s in spec.setup] == ["pip install x"]


def test_folder_argument_finds_the_spec(project: Path) -> None:
    assert load_spec(project.parent).name == "full-agent"


def test_missing_spec_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_all_errors_reported_at_once_and_sorted(tmp_path: Path) -> None:
    text = "naem: x\nprofile: huge\nresources: {cpuCount: 0}\n"
    with pytest.raises(SpecError) as raised:
        parse_spec(text, tmp_path / "m.yaml", "m.yaml")
    lines = [d.location.line for d in raised.value.diagnostics if d.location]
    assert lines == sorted(lines) and len(lines) == 3
    rendered = raised.value.render()
    assert "m.yaml:1:1: naem: unknown key 'naem'" in rendered
    assert "hint: did you mean 'name'?" in rendered
    assert "3 errors" in rendered


def test_duplicate_keys_name_both_lines(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec("name: a\nimage: b\nname: c\n", tmp_path / "m.yaml", "m.yaml")
    (diag,) = raised.value.diagnostics
    assert diag.location is not None and diag.location.line == 3
    assert "first defined at line 1" in diag.message


def test_alias_bomb_is_bounded(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    with pytest.raises(SpecError, match="too large"):
        parse_spec("\n".join(lines), tmp_path / "m.yaml", "m.yaml")


def test_error_json_carries_location(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec("name: a\nbogus: 1\n", tmp_path / "m.yaml", "m.yaml")
    data = raised.value.to_json()
    assert data["kind"] == "invalid_spec"
    assert data["location"] == {"file": "m.yaml", "line": 2, "column": 1}
    json.dumps(data)


def _schema_fields() -> set[str]:
    props = load_schema()["properties"]
    return {"".join("_" + c.lower() if c.isupper() else c for c in k) for k in props}


def test_schema_properties_match_dataclass_fields() -> None:
    fields = {f.name for f in dataclasses.fields(Spec) if f.metadata.get("schema", True)}
    assert fields == _schema_fields()


def test_resources_schema_matches_dataclass() -> None:
    from microagent.compiler.spec import Resources

    props = load_schema()["properties"]["resources"]["properties"]
    names = {"".join("_" + c.lower() if c.isupper() else c for c in k) for k in props}
    names = {n.replace("_mi_b", "_mib") for n in names}
    assert names == {f.name for f in dataclasses.fields(Resources)}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Minimal Agent", "minimal-agent"), ("___", "microagent"), ("a" * 80, "a" * 63)],
)
def test_default_hostname(name: str, expected: str) -> None:
    assert default_hostname(name) == expected
