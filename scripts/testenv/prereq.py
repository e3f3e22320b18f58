"""What a test needs from the machine: programs, root, a working mount, Python packages.

A missing prerequisite skips the test locally but fails it when ``CI=true``: CI must never go
green by skipping, and its bootstrap (``scripts/bootstrap.sh``) installs everything named here.
Every message says what to install or change. Call the functions in a test or a fixture, or
mark the test (the markers are registered by :mod:`testenv.pytest_plugin`):

- ``@pytest.mark.tools("debugfs", ...)``: programs on PATH; the hint names the Debian package
  (``microagent.runner.PACKAGES``);
- ``@pytest.mark.root("why")``: the test must run as root;
- ``@pytest.mark.modules("pydantic", ...)``: importable Python packages (the ``examples``
  extra).

Nothing else may skip a test for a missing tool, mount or privilege (a test checks it).
"""

from __future__ import annotations

import importlib.util
import os
from typing import NoReturn

import pytest

from microagent.errors import ToolError
from microagent.runner import find_tool

EXTRAS_HINT = "install them with `pip install -e '.[dev,examples]'` (scripts/bootstrap.sh does)"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"true", "1", "yes"}


def unavailable(reason: str, *, module_level: bool = False) -> NoReturn:
    """Skip locally (the whole module with ``module_level``); fail under CI=true (a skipped
    test hides a broken CI machine)."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def tool_missing(what: str, exc: ToolError) -> NoReturn:
    """:func:`unavailable` for a tool the code under test looked for itself."""
    unavailable(f"{what}: {exc.message}" + (f"; {exc.hint}" if exc.hint else ""))


def require_tools(*names: str) -> None:
    for name in names:
        try:
            find_tool(name)
        except ToolError as exc:
            unavailable(f"{exc.message}; {exc.hint}")


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"needs root: {why} (run the tests as root, as CI does)")


def importable(name: str) -> bool:
    """Whether ``name`` (dotted names too) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


def require_modules(*names: str, module_level: bool = False) -> None:
    absent = [name for name in names if not importable(name)]
    if absent:
        unavailable(
            f"Python packages not installed: {', '.join(absent)}; {EXTRAS_HINT}",
            module_level=module_level,
        )


def check_markers(item: pytest.Item) -> None:
    """Apply the ``tools``, ``root`` and ``modules`` markers of ``item`` (before its set-up)."""
    for mark in item.iter_markers("tools"):
        require_tools(*mark.args)
    for mark in item.iter_markers("root"):
        require_root(str(mark.args[0]) if mark.args else "see the test")
    for mark in item.iter_markers("modules"):
        require_modules(*mark.args)
