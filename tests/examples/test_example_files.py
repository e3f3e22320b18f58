"""The example directories themselves: specs, copies that must not drift, demo data, READMEs."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from example_harness import EXAMPLE_NAMES, EXAMPLES, load_protocol

import microagent
from testenv.prereq import require_modules

SHARED_BEGIN = "# >>> shared agent core >>>\n"
SHARED_END = "# <<< shared agent core <<<\n"
PRESET = {
    "minimal-agent": "anthropic",
    "minimal-agent-openai": "openai",
    "minimal-agent-gemini": "gemini",
}
SDK_REQUIREMENT = {
    "minimal-agent": '"anthropic>=0.40"',
    "minimal-agent-openai": '"openai>=1.50"',
    "minimal-agent-gemini": '"google-genai>=0.3"',
}
KEY_ENV = {
    "minimal-agent": "ANTHROPIC_API_KEY",
    "minimal-agent-openai": "OPENAI_API_KEY",
    "minimal-agent-gemini": "GEMINI_API_KEY",
}
DEMO_FILES = (
    "constraints.json",
    "system_prompt.md",
    "input-001.json",
    "input-002.json",
)

require_modules("pydantic", module_level=True)


def shared_core(example: str) -> str:
    source = (EXAMPLES / example / "agent.py").read_text()
    assert source.count(SHARED_BEGIN) == 1 and source.count(SHARED_END) == 1, example
    return source.split(SHARED_BEGIN)[1].split(SHARED_END)[0]


def test_the_three_protocol_files_are_identical() -> None:
    first, *rest = ((EXAMPLES / name / "protocol.py").read_bytes() for name in EXAMPLE_NAMES)
    assert all(other == first for other in rest)


def test_the_shared_agent_core_is_identical_in_all_agents() -> None:
    first, *rest = (shared_core(name) for name in EXAMPLE_NAMES)
    for name, other in zip(EXAMPLE_NAMES[1:], rest, strict=True):
        assert other == first, f"{name}/agent.py drifted from minimal-agent/agent.py"
    for needed in ("def resolve_in_workspace", "def run_bash", "def write_result", "def serve"):
        assert needed in first


def test_the_demo_files_are_identical_in_all_examples() -> None:
    for filename in DEMO_FILES:
        copies = {(EXAMPLES / name / "demo" / filename).read_bytes() for name in EXAMPLE_NAMES}
        assert len(copies) == 1, filename


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_spec_has_the_expected_shape(example: str) -> None:
    spec_path = EXAMPLES / example / "microagent.yaml"
    spec: dict[str, Any] = yaml.safe_load(spec_path.read_text())
    assert spec == {
        "name": example,
        "image": "python:3.13-slim",
        "setup": [
            f'pip install --no-cache-dir "pydantic>=2,<3" {SDK_REQUIREMENT[example]}',
            "mkdir -p /app /agent /workspace",
        ],
        "files": [
            {"src": "agent.py", "dst": "/app/agent.py"},
            {"src": "protocol.py", "dst": "/app/protocol.py"},
            {"src": "demo/constraints.json", "dst": "/agent/constraints.json"},
            {"src": "demo/system_prompt.md", "dst": "/agent/system_prompt.md"},
        ],
        "entrypoint": "python /app/agent.py",
        "outputs": [{"name": "result", "path": "/workspace/result.json"}],
        # ready (for a warm template) once the agent has imported its SDK
        "health": {
            "exec": ["test", "-f", "/run/agent.ready"],
            "intervalSeconds": 2,
            "timeoutSeconds": 30,
            "startPeriodSeconds": 600,
        },
        # the preset's own reference (env:<PROVIDER>_API_KEY on the host), never a value
        "credentials": [{"name": PRESET[example]}],
        "network": {"mode": "user", "allow": ["pypi.org", "files.pythonhosted.org"]},
    }
    for entry in spec["files"]:
        assert (spec_path.parent / entry["src"]).is_file()


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_spec_loads_with_microagent(example: str) -> None:
    spec = microagent.load_spec(EXAMPLES / example / "microagent.yaml")
    assert spec.name == example
    assert [(o.name, o.path) for o in spec.outputs] == [("result", "/workspace/result.json")]


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_demo_data_matches_the_protocol(example: str) -> None:
    protocol = load_protocol(example)
    demo = EXAMPLES / example / "demo"
    constraints = protocol.Constraints.model_validate_json((demo / "constraints.json").read_text())
    first = protocol.WorkRequest.model_validate_json((demo / "input-001.json").read_text())
    second = protocol.WorkRequest.model_validate_json((demo / "input-002.json").read_text())
    assert (first.request_id, second.request_id) == ("req-001", "req-002")
    for request in (first, second):
        assert request.principal.name == "alice"
        assert request.principal.verified
        assert request.principal.verified_by == "gateway-1"
        assert request.principal.authorization_scope == ("agent_work",)
        assert request.constraints_version == constraints.version == 1
        assert request.audit_ref == f"audit://{request.request_id}"
        assert "/workspace/biggest.py" in request.content
    assert "rich" in first.content and "/usr" in first.content
    assert "last-modified" in second.content


def test_protocol_models_are_frozen_and_strict() -> None:
    protocol = load_protocol("minimal-agent")
    for name in ("Principal", "WorkBounds", "WorkRequest", "Usage", "WorkResult", "Constraints"):
        config = getattr(protocol, name).model_config
        assert (config.get("frozen"), config.get("extra")) == (True, "forbid"), name
    assert protocol.LifecycleSignal.model_config.get("frozen") is True
    with pytest.raises(ValueError, match="extra"):
        protocol.Usage(turns=1, surprise=2)


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_readme_walks_through_the_whole_story(example: str) -> None:
    readme = (EXAMPLES / example / "README.md").read_text()
    commands = [
        "microagent doctor",
        f"microagent create --file examples/{example}/microagent.yaml --env {KEY_ENV[example]}=",
        f"microagent cp examples/{example}/demo/input-001.json {example}:/workspace/input.json",
        f"microagent start {example}",
        f"microagent --json status {example}",
        f"microagent --json result {example}",
        f"microagent cp {example}:/workspace/biggest.py ./biggest.py",
        f"microagent halt {example}",
        f"microagent cp examples/{example}/demo/input-002.json {example}:/workspace/input.json",
        f"microagent delete {example}",
    ]
    positions = [readme.find(command) for command in commands]
    assert -1 not in positions, [c for c, p in zip(commands, positions, strict=True) if p < 0]
    assert positions == sorted(positions), "walkthrough steps out of order"
    assert "proxy" in readme and "mediation channel" in readme


def test_examples_hold_only_the_expected_files() -> None:
    expected = {
        "README.md",
        "agent.py",
        "microagent.yaml",
        "protocol.py",
        *(f"demo/{name}" for name in DEMO_FILES),
    }
    for name in EXAMPLE_NAMES:
        root = EXAMPLES / name
        found = {
            rel.as_posix()
            for rel in (path.relative_to(root) for path in root.rglob("*") if path.is_file())
            if not any(part == "__pycache__" or part.startswith(".") for part in rel.parts)
        }
        assert found == expected, name
