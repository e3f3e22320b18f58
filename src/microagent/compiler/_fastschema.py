"""A yes/no JSON Schema check for the keywords the spec schema uses, without jsonschema.

Importing jsonschema (and referencing, attrs, rpds) is about half of a CLI start-up that reads a
spec, yet almost every spec it reads is valid. :func:`is_valid` answers "valid?" with the exact
semantics of jsonschema's Draft 2020-12 validator for the keywords below; when it says no, the
caller runs jsonschema to produce the messages. A keyword it does not know makes it raise
:class:`Unsupported` (never guess "valid"), so a schema edit that adds one falls back to
jsonschema until it is implemented here. ``tests/unit/compiler/test_fastschema.py`` checks the
verdicts equal jsonschema's on the spec corpora and on generated documents.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

# Keywords that only annotate: they never change a verdict.
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "$defs", "title", "description", "default", "examples"}
)

Matcher = Callable[[str], "re.Pattern[str]"]


class Unsupported(Exception):
    """The schema uses something this checker does not implement: ask jsonschema."""


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


# jsonschema's Draft 2020-12 type checker (a bool is not a number; 1.0 is an integer).
_TYPES: Mapping[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": _is_integer,
    "number": _is_number,
}


def _is_type(value: object, kind: str) -> bool:
    check = _TYPES.get(kind)
    if check is None:
        raise Unsupported(f"type {kind!r}")
    return check(value)


def _equal(expected: object, value: object) -> bool:
    """jsonschema's ``equal`` for a scalar ``expected``: a bool equals only a bool, 1 == 1.0,
    a list or mapping equals no scalar."""
    if isinstance(expected, (list, tuple, dict)):
        raise Unsupported("enum or const of a list or mapping")
    one, two = expected, value
    if one is two:
        return True
    if isinstance(one, str) or isinstance(two, str):
        return one == two
    if isinstance(two, (list, tuple, dict)):
        return False
    if isinstance(one, bool) or isinstance(two, bool):
        return isinstance(one, bool) and isinstance(two, bool) and one == two
    return one == two


class _Checker:
    def __init__(self, root: Mapping[str, Any], matcher: Matcher) -> None:
        self.root = root
        self.matcher = matcher

    def valid(self, schema: object, value: object) -> bool:
        if schema is True:
            return True
        if schema is False:
            return False
        if not isinstance(schema, Mapping):
            raise Unsupported(f"schema {schema!r}")
        for keyword, argument in schema.items():
            if keyword in _ANNOTATIONS or keyword.startswith("x-"):
                continue
            check = getattr(self, "k_" + keyword.lstrip("$"), None)
            if check is None:
                raise Unsupported(f"keyword {keyword!r}")
            if not check(argument, value, schema):
                return False
        return True

    # -- keywords: each answers for its own argument; non-applicable instances pass ----------

    def k_type(self, kind: object, value: object, _schema: object) -> bool:
        kinds = [kind] if isinstance(kind, str) else kind
        if not isinstance(kinds, list):
            raise Unsupported("type")
        return any(_is_type(value, str(k)) for k in kinds)

    def k_enum(self, options: list[object], value: object, _schema: object) -> bool:
        return any(_equal(option, value) for option in options)

    def k_const(self, expected: object, value: object, _schema: object) -> bool:
        return _equal(expected, value)

    def k_pattern(self, pattern: str, value: object, _schema: object) -> bool:
        return not isinstance(value, str) or self.matcher(pattern).search(value) is not None

    def k_minLength(self, low: int, value: object, _schema: object) -> bool:
        return not isinstance(value, str) or len(value) >= low

    def k_maxLength(self, high: int, value: object, _schema: object) -> bool:
        return not isinstance(value, str) or len(value) <= high

    def k_minimum(self, low: float, value: object, _schema: object) -> bool:
        return not _is_type(value, "number") or not value < low  # type: ignore[operator]

    def k_maximum(self, high: float, value: object, _schema: object) -> bool:
        return not _is_type(value, "number") or not value > high  # type: ignore[operator]

    def k_minItems(self, low: int, value: object, _schema: object) -> bool:
        return not isinstance(value, list) or len(value) >= low

    def k_maxItems(self, high: int, value: object, _schema: object) -> bool:
        return not isinstance(value, list) or len(value) <= high

    def k_items(self, item: object, value: object, _schema: object) -> bool:
        return not isinstance(value, list) or all(self.valid(item, v) for v in value)

    def k_required(self, names: list[str], value: object, _schema: object) -> bool:
        return not isinstance(value, dict) or all(name in value for name in names)

    def k_properties(self, props: Mapping[str, Any], value: object, _schema: object) -> bool:
        if not isinstance(value, dict):
            return True
        return all(self.valid(sub, value[name]) for name, sub in props.items() if name in value)

    def k_additionalProperties(self, extra: object, value: object, schema: object) -> bool:
        if not isinstance(value, dict):
            return True
        if isinstance(schema, Mapping) and "patternProperties" in schema:
            raise Unsupported("patternProperties")
        known = schema.get("properties", {}) if isinstance(schema, Mapping) else {}
        return all(self.valid(extra, v) for k, v in value.items() if k not in known)

    def k_propertyNames(self, names: object, value: object, _schema: object) -> bool:
        return not isinstance(value, dict) or all(self.valid(names, k) for k in value)

    def k_oneOf(self, branches: list[object], value: object, _schema: object) -> bool:
        return sum(1 for branch in branches if self.valid(branch, value)) == 1

    def k_anyOf(self, branches: list[object], value: object, _schema: object) -> bool:
        return any(self.valid(branch, value) for branch in branches)

    def k_allOf(self, branches: list[object], value: object, _schema: object) -> bool:
        return all(self.valid(branch, value) for branch in branches)

    def k_ref(self, ref: str, value: object, _schema: object) -> bool:
        if not ref.startswith("#/"):
            raise Unsupported(f"$ref {ref!r}")
        node: object = self.root
        for part in ref[2:].split("/"):
            if not isinstance(node, Mapping) or part not in node:
                raise Unsupported(f"$ref {ref!r}")
            node = node[part]
        return self.valid(node, value)


def is_valid(schema: Mapping[str, Any], value: object, matcher: Matcher) -> bool:
    """Whether ``value`` is valid under ``schema`` (``matcher`` compiles a ``pattern``).

    Raises :class:`Unsupported` when the schema needs a keyword not implemented here.
    """
    return _Checker(schema, matcher).valid(schema, value)
