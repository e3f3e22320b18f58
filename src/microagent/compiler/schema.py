"""Validate a parsed spec against the JSON Schema and explain failures in plain words.

jsonschema's own messages ("... is not valid under any of the given schemas") are replaced
by messages that name the field, point at the YAML position, and suggest the likely fix.

A ``pattern`` is matched as JSON Schema means it (ECMA-262): ``$`` is the end of the string.
jsonschema hands the pattern to Python's ``re.search``, whose ``$`` also matches before a final
newline, so ``name: "agent\n"`` would pass ``^[A-Za-z0-9]...$``; see :func:`ecma_regex`.
"""

from __future__ import annotations

import json
import pkgutil
import re
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from microagent.compiler import _fastschema
from microagent.compiler._yaml import Document, JsonPath, format_path
from microagent.errors import Diagnostic

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError
    from jsonschema.protocols import Validator

_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "empty",
}


@cache
def load_schema() -> Mapping[str, Any]:
    """The spec's JSON Schema, shipped as package data (read by the package's loader:
    ``importlib.resources`` would cost a start-up ~10 ms of imports for one file)."""
    data = pkgutil.get_data("microagent", "schemas/microagent.schema.json")
    if data is None:  # a loader that cannot read data: not one Python ships
        raise FileNotFoundError("microagent/schemas/microagent.schema.json")
    schema: dict[str, Any] = json.loads(data)
    return schema


@cache
def ecma_regex(pattern: str) -> re.Pattern[str]:
    """A schema ``pattern`` compiled with ECMA-262's meaning of ``$`` (the end of the string,
    ``\\Z`` in Python) wherever it is an anchor: not escaped, not in a character class."""
    out: list[str] = []
    escaped = in_class = False
    for char in pattern:
        anchor = char == "$" and not (escaped or in_class)
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "[]":
            in_class = char == "["
        out.append(r"\Z" if anchor else char)
    return re.compile("".join(out))


def _pattern_keyword(
    validator: Validator, pattern: str, instance: object, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    """jsonschema's ``pattern`` keyword, matching with :func:`ecma_regex`."""
    # deferred: jsonschema is imported only once a spec is validated (see _validator)
    from jsonschema.exceptions import ValidationError

    if isinstance(instance, str) and not ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@cache
def _validator_class() -> type[Draft202012Validator]:
    # deferred: jsonschema costs ~60 ms to import; only commands that read a spec need it
    from jsonschema import Draft202012Validator, validators

    extended: type[Draft202012Validator] = validators.extend(  # type: ignore[no-untyped-call]
        Draft202012Validator, {"pattern": _pattern_keyword}
    )
    return extended


@cache
def _validator() -> Draft202012Validator:
    return _validator_class()(load_schema())


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for kind, types in (("integer", int), ("number", float), ("string", str), ("array", list)):
        if isinstance(value, types):
            return kind
    return "object"


def _branch_types(branch: Mapping[str, Any]) -> list[str]:
    kind = branch.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [str(k) for k in kind]
    return []


def _describe(branches: Iterable[Mapping[str, Any]]) -> str:
    words: list[str] = []
    for branch in branches:
        kinds = _branch_types(branch)
        if kinds == ["array"]:
            items = branch.get("items", {})
            inner = _branch_types(items) if isinstance(items, Mapping) else []
            words.append(f"a list of {inner[0]}s" if len(inner) == 1 else "a list")
        elif kinds:
            words.append(_TYPE_WORDS.get(kinds[0], kinds[0]))
    unique = list(dict.fromkeys(words))
    return " or ".join(unique) if unique else "a valid value"


def _hint_for_value(value: object, expected: str) -> str:
    if expected == "string" and isinstance(value, (bool, int, float)):
        return f"quote the value: unquoted, YAML reads it as {_TYPE_WORDS[_kind_of(value)]}"
    if expected == "string" and value is None:
        return "the value is empty; write it after the colon or remove the key"
    return ""


def _schema_of(error: ValidationError) -> Mapping[str, Any]:
    return error.schema if isinstance(error.schema, Mapping) else {}


def _value_of(error: ValidationError) -> Any:
    return error.validator_value


class _Translator:
    def __init__(self, doc: Document) -> None:
        self.doc = doc

    def diagnose(self, error: ValidationError) -> Iterator[Diagnostic]:
        path: JsonPath = tuple(error.absolute_path)
        handler = getattr(self, f"_{error.validator}", None)
        if handler is None:
            yield self._make(path, str(error.message))
            return
        yield from handler(error, path)

    def _make(self, path: JsonPath, message: str, hint: str = "", key: bool = False) -> Diagnostic:
        return Diagnostic(
            message,
            self.doc.location(path, of_key=key),
            format_path(path) or "(top level)",
            hint,
        )

    def _additionalProperties(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        allowed = sorted(_schema_of(error).get("properties", {}))
        instance = error.instance if isinstance(error.instance, dict) else {}
        for name in sorted(set(instance) - set(allowed)):
            yield self._make(
                (*path, name), f"unknown key {name!r}", _unknown_key_hint(name, allowed, path), True
            )

    def _required(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        missing = (
            error.message.split("'")[1] if "'" in error.message else str(error.validator_value)
        )
        yield self._make(path, f"missing required key {missing!r}")

    def _type(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        expected = str(error.validator_value)
        words = _TYPE_WORDS.get(expected, expected)
        hint = _hint_for_value(error.instance, expected)
        yield self._make(
            path, f"must be {words}, not {_TYPE_WORDS[_kind_of(error.instance)]}", hint
        )

    def _enum(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        options = [str(o) for o in _value_of(error)]
        hint = str(_schema_of(error).get("x-hint", ""))
        if isinstance(error.instance, str) and not hint:
            import difflib  # deferred: only a misspelling needs it

            close = difflib.get_close_matches(error.instance.lower(), options, n=1)
            hint = f"did you mean {close[0]!r}?" if close else ""
        yield self._make(path, f"must be one of: {', '.join(options)}", hint)

    def _pattern(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        expected = _schema_of(error).get("x-hint")
        hint = f"expected {expected}" if expected else f"must match {error.validator_value}"
        if "propertyNames" in error.schema_path:
            path = (*path, str(error.instance))
            yield self._make(path, f"invalid name {error.instance!r}", hint, key=True)
            return
        yield self._make(path, f"invalid value {error.instance!r}", hint)

    def _minimum(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        yield self._make(path, f"must be at least {error.validator_value}")

    def _maximum(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        yield self._make(path, f"must be at most {error.validator_value}")

    def _minLength(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        yield self._make(path, "must not be empty")

    def _minItems(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        yield self._make(path, "must not be an empty list")

    def _maxItems(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        yield self._make(path, f"must have at most {error.validator_value} entries")

    def _maxLength(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        # never repeats the value: it may be a key pasted where a reference belongs
        yield self._make(path, f"must be at most {error.validator_value} characters")

    def _oneOf(self, error: ValidationError, path: JsonPath) -> Iterator[Diagnostic]:
        branches: list[Mapping[str, Any]] = list(_value_of(error))
        both = _matching_key_sets(branches, error.instance)
        if len(both) > 1:
            keys = " and ".join(f"`{k}`" for k in both)
            yield self._make(path, f"set only one of {keys}")
            return
        chosen = _choose_branch(branches, error.instance)
        if chosen is None:
            kind = _TYPE_WORDS[_kind_of(error.instance)]
            hint = _hint_for_value(error.instance, "string")
            yield self._make(path, f"must be {_describe(branches)}, not {kind}", hint)
            return
        sub = [e for e in error.context or () if e.relative_schema_path[0] == chosen]
        if not sub:
            yield self._make(path, f"must be {_describe(branches)}")
            return
        for child in _deepest(sub):
            yield from self.diagnose(child)


def _matching_key_sets(branches: list[Mapping[str, Any]], instance: object) -> list[str]:
    """Required keys of every object branch whose keys are all present in ``instance``."""
    if not isinstance(instance, dict):
        return []
    found: list[str] = []
    for branch in branches:
        required = branch.get("required", [])
        if required and all(r in instance for r in required):
            found.extend(required)
    return found


def _choose_branch(branches: list[Mapping[str, Any]], instance: object) -> int | None:
    """Index of the oneOf branch the user evidently meant, judged by type and keys."""
    kind = _kind_of(instance)
    typed = [i for i, b in enumerate(branches) if kind in _branch_types(b)]
    if kind == "integer" and not typed:
        typed = [i for i, b in enumerate(branches) if "number" in _branch_types(b)]
    if len(typed) <= 1 or not isinstance(instance, dict):
        return typed[0] if typed else None
    for i in typed:
        required = branches[i].get("required", [])
        if required and all(r in instance for r in required):
            return i
    return typed[0]


def _deepest(errors: list[ValidationError]) -> list[ValidationError]:
    """Keep the errors that point deepest into the document (the most specific ones)."""
    depth = max(len(e.absolute_path) for e in errors)
    return [e for e in errors if len(e.absolute_path) == depth]


_SPECIAL_HINTS: Mapping[tuple[str, str], str] = {
    ("resources", "network"): "`network` is a top-level key: move it out of `resources`",
    ("", "command"): "use `entrypoint` for the command every start runs",
    ("", "cmd"): "use `entrypoint` for the command every start runs",
    ("", "environment"): "the key is `env`",
    ("", "memory"): "set memory under `resources: {memoryMiB: N}`",
    ("", "cpus"): "set CPUs under `resources: {cpuCount: N}`",
}


def _unknown_key_hint(name: str, allowed: list[str], path: JsonPath) -> str:
    special = _SPECIAL_HINTS.get((format_path(path), name))
    if special:
        return special
    lowered = {a.lower(): a for a in allowed}
    import difflib  # deferred: only a misspelling needs it

    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    if close:
        return f"did you mean {lowered[close[0]]!r}?"
    return f"allowed keys here: {', '.join(allowed)}" if allowed else ""


def _surely_valid(schema: Mapping[str, Any], value: object) -> bool:
    """The fast yes/no of :mod:`._fastschema`; False also when it cannot tell."""
    try:
        return _fastschema.is_valid(schema, value, ecma_regex)
    except _fastschema.Unsupported:
        return False


def validate(doc: Document) -> list[Diagnostic]:
    """All schema problems of ``doc``, translated and de-duplicated.

    A valid document is told apart without jsonschema (see :mod:`._fastschema`); only an
    invalid one pays for importing it, to word the problems.
    """
    if _surely_valid(load_schema(), doc.value):
        return []
    translator = _Translator(doc)
    found: dict[tuple[object, ...], Diagnostic] = {}
    for error in _validator().iter_errors(doc.value):
        for diagnostic in translator.diagnose(error):
            found.setdefault((diagnostic.path, diagnostic.message), diagnostic)
    return list(found.values())


def _subschema(dotted: str) -> Mapping[str, Any]:
    node: Mapping[str, Any] = load_schema()
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def field_range(dotted: str) -> tuple[int | float, int | float] | None:
    """The ``minimum`` and ``maximum`` of a numeric field (``"resources.memoryMiB"``), or
    None when the schema bounds it on neither side."""
    sub = _subschema(dotted)
    low, high = sub.get("minimum"), sub.get("maximum")
    if low is None and high is None:
        return None
    return (-float("inf") if low is None else low, float("inf") if high is None else high)


def check_field(dotted: str, value: object) -> list[Diagnostic]:
    """Problems of one field's value (``"network.mode"``), using the spec's own schema: what a
    flag that overrides the field is checked with, so both accept the same values."""
    sub = dict(_subschema(dotted))
    if _surely_valid(sub, value):
        return []
    validator = _validator_class()(sub)
    translator = _Translator(Document(file="<flag>", value=value))
    found: list[Diagnostic] = []
    for error in validator.iter_errors(value):
        found.extend(translator.diagnose(error))
    return found


def check_value(dotted: str, value: object) -> list[str]:
    """:func:`check_field` as text, each hint in parentheses after its message."""
    return [f"{d.message} ({d.hint})" if d.hint else d.message for d in check_field(dotted, value)]
