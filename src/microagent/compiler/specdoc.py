"""Render ``docs/spec.md`` from the JSON Schema, so the reference never drifts from the code.

Run ``python -m microagent.compiler.specdoc > docs/spec.md``; a test fails when it is stale.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from microagent.compiler.schema import load_schema

HEADER = """# `microagent.yaml` reference

<!-- Generated from src/microagent/schemas/microagent.schema.json by
     `python -m microagent.compiler.specdoc`. Do not edit by hand. -->

{description}

Unknown keys are errors anywhere in the file. Every problem is reported at once as
`FILE:LINE:COL: path: message`, with a hint where one helps.

| key | type | default | meaning |
|---|---|---|---|
"""


def _resolve(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        resolved: Mapping[str, Any] = root["$defs"][ref.removeprefix("#/$defs/")]
        return resolved
    return node


def _type_of(node: Mapping[str, Any], root: Mapping[str, Any]) -> str:
    node = _resolve(node, root)
    if "enum" in node:
        return " | ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "oneOf" in node:
        return " or ".join(_type_of(branch, root) for branch in node["oneOf"])
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type_of(node.get('items', {}), root)}"
    if kind == "object" and "properties" in node:
        keys = ", ".join(f"`{k}`" for k in node["properties"])
        return f"mapping ({keys})"
    word = {"object": "mapping", "integer": "integer", "string": "string"}.get(kind, str(kind))
    return word + _range_of(node)


def _range_of(node: Mapping[str, Any]) -> str:
    """`` (64 to 1048576)``, `` (at least 0)`` or ``""``: a number's bounds from the schema."""
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None and high is not None:
        return f" ({low} to {high})"
    if low is not None:
        return f" (at least {low})"
    return f" (at most {high})" if high is not None else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(props: Mapping[str, Any], root: Mapping[str, Any], prefix: str) -> Iterator[str]:
    for key, raw in props.items():
        node = _resolve(raw, root)
        path = f"{prefix}{key}"
        default = f"`{json.dumps(node['default'])}`" if "default" in node else ""
        about = _cell(str(node.get("description", "")))
        yield f"| `{path}` | {_cell(_type_of(node, root))} | {default} | {about} |"
        child = node.get("items") if node.get("type") == "array" else node
        child = _resolve(child, root) if isinstance(child, Mapping) else {}
        if isinstance(child.get("properties"), Mapping):
            sub = "[]." if node.get("type") == "array" else "."
            yield from _rows(child["properties"], root, f"{path}{sub}")


def render() -> str:
    """The whole Markdown reference."""
    schema = load_schema()
    text = HEADER.format(description=schema["description"])
    return text + "\n".join(_rows(schema["properties"], schema, "")) + "\n"


if __name__ == "__main__":
    print(render(), end="")
