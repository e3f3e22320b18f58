"""The import contract of src/microagent, checked on the source (AST), not by convention.

1. One-way doors: a package imports only from packages below it in LAYERS (or itself).
2. No cycles between modules, counting every import (function-level and TYPE_CHECKING too).
3. No ``_private`` module or name is imported from another package.
4. An import inside a function says why (a ``# deferred: <reason>`` comment on it or on the
   line above its block): it is for keeping a heavy dependency off a hot path, never for
   hiding a cycle.

The checker also runs on a small synthetic package with one violation of each kind, so a
checker that cannot fail fails here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import microagent

SRC = Path(microagent.__file__).parent

# Bottom to top. The package root (microagent/__init__.py) is the lazy public facade and may
# name anything; nothing may import it except for __version__.
LAYERS = (
    "frozen",
    "errors",
    "backoff",
    "digests",
    "fsutil",
    "progress",
    "runner",
    "settings",
    "compiler",
    "store",
    "oci",
    "layers",
    "ext4",
    "broker",
    "runtime",
    "kit",
    "remotecache",
    "build",
    "workspace",
    "api",
    "commands",
    "cli",
)


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name imported (or the module a name comes from)
    names: tuple[str, ...]  # names taken from the target ("" for a whole module)
    line: int
    in_function: bool
    explained: bool


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def package_of(module: str, top: str) -> str:
    """``top.X...`` -> ``X`` (the layer a module belongs to); the root itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == top else ""


def _function_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside.update(id(sub) for sub in ast.walk(node) if sub is not node)
    return inside


def _explained(lines: list[str], lineno: int) -> bool:
    """A ``deferred`` comment on the import's line or above its block of imports."""
    index = lineno - 1
    if "deferred" in lines[index]:
        return True
    while index > 0:
        index -= 1
        text = lines[index].strip()
        if text.startswith("#"):
            return "deferred" in text
        if not text.startswith(("from ", "import ")):
            return False
    return False


def imports(root: Path) -> Iterator[Import]:
    """Every import statement of the package at ``root`` (other packages' too)."""
    top = root.name
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        inside = _function_nodes(tree)
        importer = module_name(path, root)
        for node in ast.walk(tree):
            for target, names in _targets(node, top, modules):
                yield Import(
                    importer,
                    target,
                    names,
                    node.lineno,  # type: ignore[attr-defined]
                    id(node) in inside,
                    _explained(lines, node.lineno),  # type: ignore[attr-defined]
                )


def _targets(node: ast.AST, top: str, modules: set[str]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(module, names) an import statement takes; other packages' modules included."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, ("",)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module.split(".")[0] != top:
            yield node.module, tuple(alias.name for alias in node.names)
            return
        plain: list[str] = []
        for alias in node.names:
            sub = f"{node.module}.{alias.name}"
            if sub in modules:
                yield sub, ("",)
            else:
                plain.append(alias.name)
        if plain:
            yield node.module, tuple(plain)


@dataclass
class Report:
    upward: list[str]
    private: list[str]
    unexplained: list[str]
    cycles: list[list[str]]
    unknown: list[str]


def check(root: Path, layers: tuple[str, ...]) -> Report:
    top = root.name
    rank = {name: i for i, name in enumerate(layers)}
    report = Report([], [], [], [], [])
    graph: dict[str, set[str]] = {}
    for imp in imports(root):
        where = f"{imp.importer}:{imp.line} -> {imp.target}"
        if imp.in_function and not imp.explained:
            report.unexplained.append(where)
        if imp.target.split(".")[0] != top:
            continue
        src, dst = package_of(imp.importer, top), package_of(imp.target, top)
        graph.setdefault(imp.importer, set())
        if dst:
            graph[imp.importer].add(imp.target)
        if src and src not in rank:
            report.unknown.append(src)
        if src and dst and dst in rank and src in rank and rank[dst] > rank[src]:
            report.upward.append(where)
        if src and not dst and imp.names != ("__version__",):
            report.upward.append(f"{where} (only __version__ may come from the root)")
        if src != dst and _is_private(imp, top):
            report.private.append(where)
    report.cycles = _cycles(graph)
    return report


def _is_private(imp: Import, top: str) -> bool:
    parts = imp.target.split(".")[1:]
    private_module = any(p.startswith("_") and p != "__init__" for p in parts)
    private_name = any(n.startswith("_") and n != "__version__" for n in imp.names)
    return private_module or private_name


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# -- the contract -------------------------------------------------------------------------------


def test_every_package_has_a_place_in_the_layers() -> None:
    packages = {package_of(module_name(p, SRC), SRC.name) for p in SRC.rglob("*.py")}
    assert packages - {""} <= set(LAYERS), sorted(packages - {""} - set(LAYERS))


def test_doors_open_one_way_only() -> None:
    report = check(SRC, LAYERS)
    assert report.unknown == []
    assert report.upward == [], "\n".join(report.upward)


def test_no_cycles_between_modules() -> None:
    assert check(SRC, LAYERS).cycles == []


def test_no_private_module_or_name_crosses_a_package_wall() -> None:
    private = check(SRC, LAYERS).private
    assert private == [], "\n".join(private)


def test_imports_inside_functions_say_why() -> None:
    unexplained = check(SRC, LAYERS).unexplained
    assert unexplained == [], "\n".join(unexplained)


# -- the checker itself -------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_catches_each_kind_of_violation(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    _write(
        root,
        {
            "__init__.py": "",
            "low/__init__.py": "",
            "low/a.py": "from pkg.high.b import thing\n",  # upward
            "low/c.py": "from pkg.low.d import x\n",  # cycle c <-> d
            "low/d.py": "from pkg.low.c import y\n",
            "high/__init__.py": "",
            "high/b.py": (
                "from pkg.low._hidden import z\n"  # private module
                "from pkg.low.c import _secret\n"  # private name
                "def f():\n"
                "    import pkg.low.d\n"  # unexplained
                "    import json\n"  # unexplained, third-party or not
                "    # deferred: heavy\n"
                "    from pkg.low import c\n"  # explained
            ),
            "low/_hidden.py": "",
        },
    )
    report = check(root, ("low", "high"))
    assert report.upward == ["pkg.low.a:1 -> pkg.high.b"]
    assert report.cycles == [["pkg.low.c", "pkg.low.d"]]
    assert report.private == ["pkg.high.b:1 -> pkg.low._hidden", "pkg.high.b:2 -> pkg.low.c"]
    assert report.unexplained == ["pkg.high.b:4 -> pkg.low.d", "pkg.high.b:5 -> json"]
