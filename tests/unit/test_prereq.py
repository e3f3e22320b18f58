"""No silent skips. A test missing a tool, a mount, root or a Python package goes through
``testenv.prereq``: skipped locally, failed under ``CI=true`` with what to install; no test
skips any other way, and every package the tests name is one CI's bootstrap installs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from microagent.runner import PACKAGES
from testenv.prereq import (
    check_markers,
    importable,
    require_modules,
    require_root,
    require_tools,
    unavailable,
)

ROOT = Path(__file__).resolve().parents[2]
# Conditions no package can fix, which CI's machine (x86_64, the project's Python) never meets.
ALLOWED = {
    ("tests/unit/runtime/test_hostclock.py", 'reason="rdtsc is x86 only"'),
    ("tests/security/test_network_policy.py", '"this Python keeps no table of private IPv4'),
}
SKIP = re.compile(r"\bpytest\s*\.\s*(skip\b|importorskip\b|mark\s*\.\s*(skip|skipif|xfail)\b)")
TOOLS = re.compile(r"(?:mark\.tools|require_tools)\(([^)]*)\)")


def sources() -> list[tuple[str, str]]:
    """Test and test-environment sources, without prereq itself and this file."""
    paths = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
    skip = {"scripts/testenv/prereq.py", "tests/unit/test_prereq.py"}
    rels = [(p, p.relative_to(ROOT).as_posix()) for p in sorted(paths)]
    return [(rel, p.read_text()) for p, rel in rels if rel not in skip]


def test_no_test_skips_except_through_prereq() -> None:
    found = []
    for rel, text in sources():
        for number, line in enumerate(text.splitlines(), 1):
            if SKIP.search(line) and not any(rel == f and why in line for f, why in ALLOWED):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert found == [], "skip through testenv.prereq (unavailable, require_*, markers)"
    assert SKIP.search("pytest.skip('x')") and SKIP.search("@pytest.mark.skipif(c, reason='')")


def test_every_tool_the_tests_need_is_installed_by_the_bootstrap() -> None:
    script = (ROOT / "scripts" / "bootstrap.sh").read_text()
    listed = re.search(r"APT_PACKAGES=\((.*?)\)", script, re.S)
    assert listed is not None
    apt = set(re.sub(r"#.*", "", listed[1]).split())
    named = {
        tool
        for _, text in sources()
        for args in TOOLS.findall(text)
        for tool in re.findall(r'"([^"]+)"', args)
    }
    assert {"debugfs", "openssl", "skopeo", "docker-registry"} <= named
    assert sorted(t for t in named if PACKAGES.get(t, t) not in apt) == []


def test_unavailable_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no frobnicator"):
        unavailable("no frobnicator")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as failed:
        unavailable("no frobnicator")
    assert str(failed.value) == "no frobnicator (CI=true: failing instead of skipping)"


def test_each_prerequisite_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr("microagent.runner.shutil.which", lambda *_a, **_k: None)
    with pytest.raises(pytest.fail.Exception, match=r"'debugfs' is not installed; install it, "
                       r"e\.g\. `apt-get install e2fsprogs`"):  # fmt: skip
        require_tools("debugfs")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.fail.Exception, match=r"needs root: chown \(run the tests as root"):
        require_root("chown")
    with pytest.raises(pytest.fail.Exception) as failed:
        require_modules("json", "no_such_module_h45", "google.no_such_h45")
    message = str(failed.value)
    assert "Python packages not installed: no_such_module_h45, google.no_such_h45;" in message
    assert "pip install -e '.[dev,examples]'" in message and "json" not in message
    assert importable("json") and not importable("no_such_parent_h45.child")


class _Item:
    """Just enough of a pytest item for :func:`check_markers`."""

    def __init__(self, *marks: Any) -> None:
        self.marks = [m.mark for m in marks]

    def iter_markers(self, name: str) -> list[Any]:
        return [m for m in self.marks if m.name == name]


def test_markers_are_checked_before_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    check_markers(_Item(pytest.mark.tools("sh"), pytest.mark.modules("json")))  # type: ignore[arg-type]
    with pytest.raises(pytest.fail.Exception, match="'no-such-tool-h45' is not installed"):
        check_markers(_Item(pytest.mark.tools("sh", "no-such-tool-h45")))  # type: ignore[arg-type]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.fail.Exception, match="needs root: whiteouts"):
        check_markers(_Item(pytest.mark.root("whiteouts")))  # type: ignore[arg-type]
