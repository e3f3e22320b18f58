"""Text tables sized to their content and to the terminal.

Each column is as wide as its widest cell (or title). When the table would be wider than the
terminal, the columns that may shrink give up width first (the widest first), then the others;
a cell longer than its column wraps onto continuation lines inside that column, so a long
name never runs into the next column and no line is wider than the limit. Cells may hold
newlines (a check's hint under its detail). Text is laid out as given: sanitize what a guest
wrote before it gets here.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from microagent.frozen import Frozen

GAP = 2  # spaces between columns
SHRINK_FLOOR = 12  # a shrinkable column keeps this much while others can still give


@dataclass(frozen=True, eq=False, repr=False)
class Column(Frozen):
    title: str
    right: bool = False  # right-aligned (numbers, sizes)
    shrink: bool = True  # may be narrowed first (its cells then wrap)


def terminal_width() -> int | None:
    """The width to fit: ``$COLUMNS`` or the terminal's; None (no limit) into a pipe or file,
    so each row stays one line for ``grep``."""
    if os.environ.get("COLUMNS", "").strip().isdigit() or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 entry``, ``2 entries``, ``0 workspaces``."""
    if count == 1:
        return f"1 {word}"
    if many is None:
        many = word[:-1] + "ies" if word.endswith("y") else word + "s"
    return f"{count} {many}"


def render(
    columns: Sequence[Column | str],
    rows: Iterable[Sequence[object]],
    *,
    width: int | None = None,
    header: bool = True,
) -> str:
    """The table as text: a header row, then one (or, wrapped, more) line per row.

    ``width`` defaults to :func:`terminal_width`; pass 0 for no limit.
    """
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    body = [[_text(cell) for cell in row] for row in rows]
    for row in body:
        if len(row) != len(cols):
            raise ValueError(f"a row has {len(row)} cells for {len(cols)} columns")
    table = [[c.title for c in cols], *body] if header else body
    limit = terminal_width() if width is None else (width or None)
    widths = fit(cols, [_natural(table, i) for i in range(len(cols))], limit)
    lines: list[str] = []
    for row in table:
        lines.extend(_row_lines(cols, widths, row))
    return "\n".join(lines)


def fit(columns: Sequence[Column], natural: Sequence[int], limit: int | None) -> list[int]:
    """Column widths: the natural ones, narrowed until the table fits in ``limit``."""
    widths = list(natural)
    if limit is None:
        return widths
    excess = sum(widths) + GAP * (len(widths) - 1) - limit
    for floor, candidates in (
        (SHRINK_FLOOR, [i for i, c in enumerate(columns) if c.shrink]),
        (1, list(range(len(columns)))),
    ):
        while excess > 0:
            room = [i for i in candidates if widths[i] > floor]
            if not room:
                break
            widest = max(room, key=lambda i: (widths[i], i))
            widths[widest] -= 1
            excess -= 1
    return widths


def _text(cell: object) -> str:
    return "-" if cell is None or cell == "" else str(cell)


def _natural(table: Sequence[Sequence[str]], index: int) -> int:
    return max((len(line) for row in table for line in row[index].splitlines() or [""]), default=0)


def _wrap(cell: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in cell.splitlines() or [""]:
        if len(paragraph) <= width:
            lines.append(paragraph)
            continue
        import textwrap  # deferred: compiles its regexes on import; most cells fit

        lines += textwrap.wrap(paragraph, width, break_long_words=True, break_on_hyphens=False) or [
            ""
        ]
    return lines


def _row_lines(cols: Sequence[Column], widths: Sequence[int], row: Sequence[str]) -> list[str]:
    cells = [_wrap(cell, w) for cell, w in zip(row, widths, strict=True)]
    out = []
    for n in range(max(len(c) for c in cells)):
        parts = []
        for col, w, lines in zip(cols, widths, cells, strict=True):
            piece = lines[n] if n < len(lines) else ""
            parts.append(piece.rjust(w) if col.right else piece.ljust(w))
        out.append((" " * GAP).join(parts).rstrip())
    return out
