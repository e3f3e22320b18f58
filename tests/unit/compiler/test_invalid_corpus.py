"""Every file in tests/specs/invalid is rejected with the message and position it declares.

Each corpus file starts with ``# expect: LINE:COL PATH: MESSAGE [| HINT]``; the loader must
report a problem at exactly that position whose path and message start as written, and whose
hint contains HINT.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from microagent.compiler.loader import load_spec
from microagent.errors import SpecError

CORPUS = Path(__file__).parents[2] / "specs" / "invalid"
CASES = sorted(CORPUS.glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (\d+):(\d+) (.+?)(?: \| (.+))?$")


def _expectation(path: Path) -> tuple[int, int, str, str | None]:
    match = EXPECT.match(path.read_text().splitlines()[0])
    assert match, f"{path.name}: first line must be '# expect: LINE:COL MESSAGE'"
    return int(match[1]), int(match[2]), match[3], match[4]


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_invalid_spec_is_reported_where_it_is(case: Path) -> None:
    line, column, message, hint = _expectation(case)
    with pytest.raises(SpecError) as raised:
        load_spec(case, display=case.name)
    rendered = [
        (d.location.line if d.location else 0, d.location.column if d.location else 0, d)
        for d in raised.value.diagnostics
    ]
    for got_line, got_col, diag in rendered:
        text = f"{diag.path}: {diag.message}" if diag.path else diag.message
        if (got_line, got_col) == (line, column) and (
            text.startswith(message) or diag.message.startswith(message)
        ):
            assert diag.location is not None and diag.location.file == case.name
            if hint:
                assert hint in diag.hint
            return
    shown = "\n".join(d.render() for _, _, d in rendered)
    pytest.fail(f"expected {line}:{column} {message!r}; got:\n{shown}")
