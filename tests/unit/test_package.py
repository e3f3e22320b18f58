"""Package surface: the public names, the shipped schema, and the generated spec reference."""

from __future__ import annotations

from pathlib import Path

import microagent
from microagent.compiler import specdoc as _docs

ROOT = Path(__file__).parents[2]


def test_public_api() -> None:
    assert sorted(microagent.__all__) == sorted(
        [
            "BuildPlan",
            "Diagnostic",
            "Microagent",
            "MicroagentError",
            "ResolvedImage",
            "Settings",
            "Spec",
            "SpecError",
            "Step",
            "StepKind",
            "__version__",
            "compile_plan",
            "load_spec",
        ]
    )
    for name in microagent.__all__:
        assert getattr(microagent, name) is not None


def test_docs_spec_md_is_current() -> None:
    expected = _docs.render()
    actual = (ROOT / "docs" / "spec.md").read_text()
    assert actual == expected, "regenerate: python -m microagent.compiler.specdoc > docs/spec.md"


def test_py_typed_is_shipped() -> None:
    assert (Path(microagent.__file__).parent / "py.typed").exists()
