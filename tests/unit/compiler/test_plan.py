"""Build-plan keys: what changes them, what must not, and golden plans for the examples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from microagent.compiler.keys import StepKind
from microagent.compiler.loader import load_spec
from microagent.compiler.lock import ResolvedImage
from microagent.compiler.plan import BuildPlan, CachedStep, compile_plan, plan_status

ROOT = Path(__file__).parents[3]
GOLDEN = Path(__file__).parent / "golden"
IMAGE = ResolvedImage("docker.io/library/python:3.13-slim", "sha256:" + "ab" * 32, "linux/amd64")
SPEC = """\
name: keyed
setup:
  - pip install one
  - pip install two
  - pip install three
files:
  - {src: agent.py, dst: /app/agent.py}
  - {src: lib, dst: /app/lib}
env: {MODE: prod}
entrypoint: python /app/agent.py
outputs: [{name: result, path: /workspace/result.json}]
"""


def _project(tmp_path: Path, text: str = SPEC) -> Path:
    (tmp_path / "agent.py").write_text("print('v1')\n")
    (tmp_path / "lib").mkdir(exist_ok=True)
    (tmp_path / "lib" / "util.py").write_text("X = 1\n")
    spec = tmp_path / "microagent.yaml"
    spec.write_text(text)
    return spec


def _keys(spec_path: Path, image: ResolvedImage = IMAGE) -> list[str]:
    return [s.key for s in compile_plan(load_spec(spec_path), image).steps]


def test_step_order_and_kinds(tmp_path: Path) -> None:
    plan = compile_plan(load_spec(_project(tmp_path)), IMAGE)
    kinds = [s.kind for s in plan.steps]
    assert kinds == [StepKind.BASE] + [StepKind.SETUP] * 3 + [StepKind.FILES, StepKind.CONFIG]
    for parent, child in zip(plan.steps, plan.steps[1:], strict=False):
        assert child.parent == parent.key
    assert plan.rootfs_step is plan.steps[3]
    assert all(s.key.startswith("sha256:") and len(s.key) == 71 for s in plan.steps)


def test_editing_one_setup_entry_changes_it_and_later_steps_only(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    before = _keys(spec)
    spec.write_text(SPEC.replace("pip install two", "pip install TWO"))
    after = _keys(spec)
    assert before[:2] == after[:2]
    assert all(b != a for b, a in zip(before[2:], after[2:], strict=True))


def test_editing_file_content_changes_files_and_config_only(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    before = _keys(spec)
    (tmp_path / "lib" / "util.py").write_text("X = 2\n")
    after = _keys(spec)
    assert before[:4] == after[:4]
    assert before[4] != after[4] and before[5] != after[5]


def test_editing_a_file_mode_changes_files(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    before = _keys(spec)
    (tmp_path / "agent.py").chmod(0o755)
    assert _keys(spec)[4] != before[4]


def test_mtime_and_key_order_change_nothing(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    before = _keys(spec)
    os.utime(tmp_path / "agent.py", (1, 1))
    os.utime(tmp_path / "lib" / "util.py", (2, 2))
    lines = SPEC.splitlines()
    shuffled = "\n".join(lines[8:] + lines[:8]) + "\n"
    spec.write_text(shuffled)
    assert _keys(spec) == before


def test_config_change_leaves_rootfs_keys(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    before = _keys(spec)
    spec.write_text(SPEC.replace("MODE: prod", "MODE: dev"))
    after = _keys(spec)
    assert before[:5] == after[:5] and before[5] != after[5]


def test_base_digest_changes_everything(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    other = ResolvedImage(IMAGE.reference, "sha256:" + "cd" * 32, IMAGE.platform)
    assert all(a != b for a, b in zip(_keys(spec), _keys(spec, other), strict=True))


def test_runtime_env_values_never_reach_the_plan(tmp_path: Path) -> None:
    spec = load_spec(_project(tmp_path))
    a = compile_plan(spec, IMAGE, runtime_env_keys=["API_KEY"])
    b = compile_plan(spec, IMAGE, runtime_env_keys=["API_KEY"])
    assert [s.key for s in a.steps] == [s.key for s in b.steps]
    assert a.config_step.inputs["runtimeEnvKeys"] == ["API_KEY"]


class _Cache:
    def __init__(self, steps: list[CachedStep]) -> None:
        self.steps = {s.key: s for s in steps}

    def lookup(self, key: str) -> CachedStep | None:
        return self.steps.get(key)

    def children(self, parent: str | None, kind: StepKind) -> list[CachedStep]:
        return [s for s in self.steps.values() if s.parent == parent and s.kind is kind]


def _cached(plan: BuildPlan, upto: int) -> list[CachedStep]:
    return [CachedStep(s.key, s.kind, s.parent, s.inputs) for s in plan.steps[:upto]]


def test_status_explains_a_changed_setup_step(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    old = compile_plan(load_spec(spec), IMAGE)
    spec.write_text(SPEC.replace("pip install two", "pip install 2"))
    new = compile_plan(load_spec(spec), IMAGE)
    status = plan_status(new, _Cache(_cached(old, 6)))
    assert [s.cached for s in status] == [True, True, False, False, False, False]
    assert "command changed (was: pip install two)" in status[2].reason
    assert status[3].reason == "an earlier step must be built first"


def test_status_names_the_changed_file(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    old = compile_plan(load_spec(spec), IMAGE)
    (tmp_path / "lib" / "new.py").write_text("")
    new = compile_plan(load_spec(spec), IMAGE)
    status = plan_status(new, _Cache(_cached(old, 6)))
    assert status[4].reason == "files changed: added /app/lib/new.py"


def test_status_of_an_empty_cache(tmp_path: Path) -> None:
    plan = compile_plan(load_spec(_project(tmp_path)), IMAGE)
    status = plan_status(plan, _Cache([]))
    assert status[0].reason == "base image not pulled yet"
    assert not any(s.cached for s in status)


EXAMPLES = sorted(p.parent.name for p in (ROOT / "examples").glob("*/microagent.yaml"))


@pytest.mark.parametrize("example", EXAMPLES)
def test_golden_plan_of_example(example: str) -> None:
    plan = compile_plan(load_spec(ROOT / "examples" / example / "microagent.yaml"), IMAGE)
    got = [
        {"kind": s.kind.value, "key": s.key, "label": s.label, "inputs": s.inputs}
        for s in plan.steps
    ]
    golden = GOLDEN / f"plan-{example}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert got == json.loads(golden.read_text()), (
        "run with UPDATE_GOLDEN=1 after a deliberate change"
    )
