"""The fast schema check (no jsonschema) gives jsonschema's verdict on every spec we can find.

``microagent.compiler._fastschema`` decides "valid?" so that a CLI start-up that reads a valid
spec never imports jsonschema; jsonschema is still what words the errors. These tests hold the
two to the same verdict: on the shipped examples, on every file of the invalid corpus, and on
hypothesis documents generated from the schema itself (mostly near-valid ones, so each keyword
is exercised on both sides of its boundary). ``is_valid`` is called directly: if it raised
``Unsupported`` for the shipped schema, the tests fail rather than fall back silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microagent.compiler import _fastschema, schema
from microagent.compiler._yaml import parse
from microagent.compiler.loader import load_spec
from microagent.errors import SpecError

ROOT = Path(__file__).parents[3]
SCHEMA = schema.load_schema()
INVALID = sorted((ROOT / "tests" / "specs" / "invalid").glob("*.yaml"))
VALID = sorted((ROOT / "examples").glob("*/microagent.yaml"))


def _jsonschema_verdict(value: object, node: Mapping[str, Any] = SCHEMA) -> bool:
    validator = schema._validator() if node is SCHEMA else schema._validator_class()(dict(node))
    return not any(True for _ in validator.iter_errors(value))


def _fast_verdict(value: object, node: Mapping[str, Any] = SCHEMA) -> bool:
    return _fastschema.is_valid(node, value, schema.ecma_regex)


def _document(path: Path) -> object:
    doc, _duplicates = parse(path.read_text(), path.name)
    return doc.value


def test_corpora_are_there() -> None:
    assert len(VALID) >= 3 and len(INVALID) >= 25


@pytest.mark.parametrize("path", VALID, ids=[p.parent.name for p in VALID])
def test_valid_examples_agree(path: Path) -> None:
    value = _document(path)
    assert _fast_verdict(value) is True
    assert _jsonschema_verdict(value) is True


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_corpus_agrees(path: Path) -> None:
    try:
        value = _document(path)
    except Exception:  # a YAML-level problem: never reaches the schema stage
        return
    assert _fast_verdict(value) is _jsonschema_verdict(value)


def test_schema_rejections_in_the_corpus_are_seen_by_the_fast_check() -> None:
    """Not a vacuous agreement: the corpus holds many schema-invalid documents."""
    rejected = 0
    for path in INVALID:
        try:
            value = _document(path)
        except Exception:
            continue
        rejected += not _fast_verdict(value)
    assert rejected >= 30


def test_an_unknown_keyword_is_not_guessed() -> None:
    with pytest.raises(_fastschema.Unsupported):
        _fast_verdict("x", {"type": "string", "format": "email"})
    with pytest.raises(_fastschema.Unsupported):
        _fast_verdict({"a": 1}, {"patternProperties": {"^a$": {}}, "additionalProperties": False})


@pytest.mark.parametrize(
    ("node", "value", "expected"),
    [
        ({"type": "integer"}, 1.0, True),  # Draft 2020-12: 1.0 is an integer
        ({"type": "integer"}, True, False),  # a bool is not a number
        ({"type": "number"}, False, False),
        ({"const": False}, 0, False),
        ({"const": False}, False, True),
        ({"enum": ["tcp"]}, "tcp", True),
        ({"minimum": 1}, math.nan, True),  # nan < 1 is false, as in jsonschema
        ({"pattern": "^a$"}, "a\n", False),  # ECMA-262 `$`
        ({"maxLength": 2}, "\U0001f600\U0001f600", True),  # code points, not UTF-16 units
    ],
)
def test_edge_verdicts_match_jsonschema(
    node: dict[str, Any], value: object, expected: bool
) -> None:
    assert _fast_verdict(value, node) is expected
    assert _jsonschema_verdict(value, node) is expected


def test_the_loader_skips_jsonschema_on_a_valid_spec_and_words_invalid_ones_the_same(
    tmp_path: Path,
) -> None:
    """Errors are still jsonschema's, translated as before (one corpus case, end to end)."""
    case = ROOT / "tests" / "specs" / "invalid" / "bad-profile.yaml"
    with pytest.raises(SpecError) as raised:
        load_spec(case, display=case.name)
    assert "profile" in raised.value.render()


# -- hypothesis: documents drawn from the schema, valid and almost valid ------------------------

_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str):
        target: Any = SCHEMA
        for part in ref[2:].split("/"):
            target = target[part]
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _strings(node: Mapping[str, Any]) -> st.SearchStrategy[str]:
    if "pattern" in node:
        regex = schema.ecma_regex(node["pattern"])
        return st.one_of(st.from_regex(regex), st.from_regex(regex), st.text(max_size=6))
    low = node.get("minLength", 0)
    high = node.get("maxLength", low + 12)
    return st.one_of(st.text(min_size=max(0, low - 1), max_size=high + 1), st.text(max_size=3))


def _numbers(node: Mapping[str, Any], integer: bool) -> st.SearchStrategy[Any]:
    low, high = node.get("minimum"), node.get("maximum")
    edges = [v + d for v in (low, high) if v is not None for d in (-1, 0, 1)]
    base: st.SearchStrategy[Any] = st.integers(-5, 5000)
    if edges:
        base = st.one_of(base, st.sampled_from(edges))
    if integer:
        return st.one_of(base, base.map(float))
    return st.one_of(base, st.floats(allow_nan=False))


def _from_schema(node: Mapping[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    node = _resolve(node)
    choices: list[st.SearchStrategy[Any]] = []
    if "enum" in node:
        choices.append(st.sampled_from(node["enum"]))
    if "const" in node:
        choices.append(st.just(node["const"]))
    for branch in node.get("oneOf", []):
        choices.append(_from_schema(branch, depth + 1))
    kinds = node.get("type", [])
    if not ("enum" in node or "const" in node):
        choices.extend(
            _typed(node, k, depth) for k in ([kinds] if isinstance(kinds, str) else kinds)
        )
    if not choices or depth > 4:
        return _junk
    valid = st.one_of(*choices)
    if not depth:
        return valid
    # junk is one value in sixteen: most drawn documents are near-valid, some are not
    return st.integers(0, 15).flatmap(lambda roll: _junk if roll == 0 else valid)


def _typed(node: Mapping[str, Any], kind: str, depth: int) -> st.SearchStrategy[Any]:
    if kind == "string":
        return _strings(node)
    if kind in ("integer", "number"):
        return _numbers(node, kind == "integer")
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = node.get("items", {})
        low = node.get("minItems", 0)
        return st.lists(_from_schema(items, depth + 1), min_size=max(0, low - 1), max_size=3)
    return _objects(node, depth)


def _objects(node: Mapping[str, Any], depth: int) -> st.SearchStrategy[Any]:
    props: Mapping[str, Any] = node.get("properties", {})
    required = list(node.get("required", []))
    fixed = {name: _from_schema(props[name], depth + 1) for name in required if name in props}
    optional = {
        name: _from_schema(sub, depth + 1) for name, sub in props.items() if name not in fixed
    }
    extra = node.get("additionalProperties", True)
    extra_values = _from_schema(extra, depth + 1) if isinstance(extra, Mapping) else _junk
    names = st.one_of(st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,6}\Z"), st.text(max_size=5))
    extras = st.dictionaries(names, extra_values, max_size=2 if extra is not False else 1)
    documents = st.fixed_dictionaries(fixed, optional=optional)  # type: ignore[arg-type]
    dropped = documents.flatmap(
        lambda d: (
            st.sampled_from([*d, None]).map(lambda k: {n: v for n, v in d.items() if n != k})
            if d
            else st.just(d)
        )
    )
    return st.one_of(
        st.tuples(documents, extras).map(lambda pair: {**pair[1], **pair[0]}),
        documents,
        documents,
        dropped,
    )


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(_from_schema(SCHEMA))
def test_generated_specs_get_jsonschemas_verdict(value: Any) -> None:
    assert _fast_verdict(value) is _jsonschema_verdict(value)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(sorted(SCHEMA["properties"])).flatmap(
        lambda name: st.tuples(st.just(name), _from_schema(SCHEMA["properties"][name], 1))
    )
)
def test_generated_fields_get_jsonschemas_verdict(pair: tuple[str, Any]) -> None:
    """Each field alone, as ``check_field`` (flag overrides) validates it."""
    name, value = pair
    node = schema._subschema(name)
    if "$ref" in str(node):
        return  # check_field never sees these (disks/bundles have no flag)
    assert _fast_verdict(value, node) is _jsonschema_verdict(value, node)


def test_generated_documents_are_often_valid() -> None:
    """The strategy is near the boundary: a good share of drawn specs are valid, so the
    property test compares verdicts on both sides, not only on rejections."""
    seen: list[bool] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_from_schema(SCHEMA))
    def draw(value: Any) -> None:
        seen.append(_jsonschema_verdict(value))

    draw()
    assert sum(seen) >= 10 and len(seen) - sum(seen) >= 10, (sum(seen), len(seen))
