"""Property tests: whatever YAML comes in, the loader answers with a Spec or its own errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microagent.compiler.loader import parse_spec
from microagent.compiler.spec import Spec
from microagent.errors import MicroagentError

SOURCE = Path("/nonexistent/spec/microagent.yaml")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
)
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=12), inner, max_size=4),
    ),
    max_leaves=20,
)
FIELDS = [
    "name",
    "image",
    "profile",
    "restart",
    "entrypoint",
    "workdir",
    "shell",
    "hostname",
    "setup",
    "setupFiles",
    "files",
    "env",
    "resources",
    "network",
    "outputs",
    "disks",
    "bundles",
]
VALID: dict[str, Any] = {
    "name": "agent",
    "setup": ["pip install x", {"run": "echo"}],
    "entrypoint": "python /app/a.py",
    "env": {"A": "b"},
    "resources": {"memoryMiB": 512},
    "network": {"mode": "user", "forwards": [{"hostPort": 1, "guestPort": 2}]},
    "outputs": [{"name": "result", "path": "/w/r.json"}],
}


def _check(text: str) -> None:
    try:
        result = parse_spec(text, SOURCE, "microagent.yaml")
    except MicroagentError as exc:
        assert exc.render()
        return
    assert isinstance(result, Spec)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes(text: str) -> None:
    _check(text)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*FIELDS, "bogus"]), values, max_size=6))
def test_arbitrary_documents_never_crash(doc: dict[str, Any]) -> None:
    _check(yaml.safe_dump(doc))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(VALID)), values)
def test_mutated_valid_spec_never_crashes(field: str, replacement: Any) -> None:
    doc = dict(VALID)
    doc[field] = replacement
    _check(yaml.safe_dump(doc))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    _check(data.decode("utf-8", "replace"))
