"""YAML to plain values, remembering where every key and value came from.

PyYAML's node graph carries marks; we convert it ourselves so that we can reject duplicate
keys (reporting both lines), keep keys as their literal text, bound the work an alias bomb
could cause, and hand the schema stage a table from JSON paths to file positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from microagent.errors import Diagnostic, Location
from microagent.frozen import Frozen

JsonPath = tuple[str | int, ...]
MAX_NODES = 50_000
MAX_DEPTH = 64


@dataclass(frozen=True, eq=False, repr=False)
class Marks(Frozen):
    """Positions of one JSON path: its key (if it is a mapping value) and its value."""

    key: Location | None
    value: Location


@dataclass
class Document:
    """A parsed YAML document: the plain value and the position of every path in it."""

    file: str
    value: Any
    marks: dict[JsonPath, Marks] = field(default_factory=dict)

    def location(self, path: JsonPath, *, of_key: bool = False) -> Location:
        """Best position for ``path``: itself, else its nearest ancestor, else the file."""
        for cut in range(len(path), -1, -1):
            found = self.marks.get(path[:cut])
            if found is not None:
                if of_key and cut == len(path) and found.key is not None:
                    return found.key
                return found.value
        return Location(self.file)


class _Abort(Exception):
    def __init__(self, diagnostic: Diagnostic) -> None:
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


def format_path(path: JsonPath) -> str:
    """``("setup", 2, "run")`` -> ``setup[2].run``; a key with a control character in it
    (a newline) is quoted: ``env['KEY\\n']``, so a message stays on one line."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not part.isprintable():
            text += f"[{part!r}]"
        else:
            text += f".{part}" if text else part
    return text


class _Converter:
    def __init__(self, file: str) -> None:
        self.file = file
        self.doc = Document(file=file, value=None)
        self.nodes = 0
        self.duplicates: list[Diagnostic] = []
        self._constructor = yaml.SafeLoader("")

    def loc(self, mark: yaml.Mark | None) -> Location:
        if mark is None:
            return Location(self.file)
        return Location(self.file, mark.line + 1, mark.column + 1)

    def convert(self, node: yaml.Node, path: JsonPath, key: Location | None) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES or len(path) > MAX_DEPTH:
            raise _Abort(
                Diagnostic(
                    "document is too large or too deeply nested",
                    self.loc(node.start_mark),
                    hint="a microagent spec is a small mapping; check for runaway aliases",
                )
            )
        self.doc.marks.setdefault(path, Marks(key, self.loc(node.start_mark)))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, i), None) for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _scalar(self, node: yaml.Node) -> Any:
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            raise _Abort(Diagnostic(f"invalid value: {exc}", self.loc(node.start_mark))) from exc
        except (IndexError, KeyError, TypeError, AttributeError) as exc:
            # PyYAML's constructors index and look up without checking: `!!int ''` raises
            # IndexError, `!!bool x` KeyError, `!!timestamp x` AttributeError
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            raise _Abort(
                Diagnostic(
                    f"invalid value for {tag}: {str(node.value)[:40]!r}",
                    self.loc(node.start_mark),
                    hint="drop the explicit tag or write a value of that type",
                )
            ) from exc

    def _pairs(self, node: yaml.MappingNode) -> Iterator[tuple[yaml.Node, yaml.Node]]:
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Abort(
                    Diagnostic(
                        "YAML merge keys (<<) are not supported",
                        self.loc(key_node.start_mark),
                        hint="write the keys out; anchors and aliases of whole values are fine",
                    )
                )
            yield key_node, value_node

    def _mapping(self, node: yaml.MappingNode, path: JsonPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        seen: dict[str, yaml.Mark] = {}
        for key_node, value_node in self._pairs(node):
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Abort(
                    Diagnostic("mapping keys must be plain strings", self.loc(key_node.start_mark))
                )
            name = str(key_node.value)
            if name in seen:
                first = self.loc(seen[name])
                self.duplicates.append(
                    Diagnostic(
                        f"duplicate key {name!r} (first defined at line {first.line})",
                        self.loc(key_node.start_mark),
                        format_path((*path, name)),
                        hint="remove one of the two; YAML would silently keep only the last",
                    )
                )
                continue
            seen[name] = key_node.start_mark
            out[name] = self.convert(value_node, (*path, name), self.loc(key_node.start_mark))
        return out


def _compose(text: str, file: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.composer.ComposerError as exc:
        if "expected a single document" in str(exc):
            raise _Abort(
                Diagnostic(
                    "the spec must be a single YAML document",
                    _mark(exc.problem_mark, file),
                    hint="remove the extra `---` separator",
                )
            ) from exc
        raise _Abort(_yaml_diagnostic(exc, file, text)) from exc
    except yaml.YAMLError as exc:
        raise _Abort(_yaml_diagnostic(exc, file, text)) from exc
    except (RecursionError, ValueError) as exc:
        raise _Abort(Diagnostic(f"cannot parse YAML: {exc}", Location(file))) from exc


def _mark(mark: yaml.Mark | None, file: str) -> Location:
    if mark is None:
        return Location(file)
    return Location(file, mark.line + 1, mark.column + 1)


def _yaml_diagnostic(exc: yaml.YAMLError, file: str, text: str) -> Diagnostic:
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "invalid YAML"
        return Diagnostic(f"YAML syntax error: {problem}", _mark(exc.problem_mark, file))
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses: no mark, a position
        at = exc.position
        line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return Diagnostic(
            f"YAML syntax error: unacceptable character {char}: {exc.reason}",
            Location(file, line, column),
            hint="remove it: a spec is UTF-8 text without control characters",
        )
    return Diagnostic(f"YAML syntax error: {exc}", Location(file))


def parse(text: str, file: str) -> tuple[Document, list[Diagnostic]]:
    """Parse ``text``; return the document and any duplicate-key problems.

    Problems that make the document unusable raise :class:`_Abort`, wrapped by the caller.
    """
    converter = _Converter(file)
    node = _compose(text, file)
    if node is None:
        raise _Abort(
            Diagnostic("the spec is empty", Location(file), hint="start with `name:` and `image:`")
        )
    converter.doc.value = converter.convert(node, (), None)
    return converter.doc, converter.duplicates


def parse_or_diagnose(text: str, file: str) -> tuple[Document | None, list[Diagnostic]]:
    """Like :func:`parse` but turns fatal problems into a diagnostic instead of raising."""
    try:
        return parse(text, file)
    except _Abort as abort:
        return None, [abort.diagnostic]
