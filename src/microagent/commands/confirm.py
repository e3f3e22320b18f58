"""Asking before a destructive command (``delete``, ``cache prune``, ``image rm``,
``kernel prune``).

The question is asked only when someone can answer it: stdin and stderr are terminals.
Anywhere else (a script, a pipe, CI) the command needs ``-y``/``--yes`` and, without it, stops
with a usage error (exit 2) before it changes anything. ``--force`` never answers the question
(it means "even if running"), and neither does ``--json`` (the question goes to stderr).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import click

from microagent.errors import UsageError

yes_option = click.option(
    "--yes", "-y", is_flag=True, help="Do not ask (required when stdin is not a terminal)."
)


def interactive() -> bool:
    """Whether a person can answer a question: stdin and stderr are terminals."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def confirm(
    action: str,
    *,
    yes: bool,
    preview: Callable[[], Sequence[str]] | None = None,
) -> None:
    """Go ahead only with ``yes``, or when the user says so on a terminal.

    ``action`` is the question without its question mark (``delete workspace ws``).
    ``preview`` lists what would go, shown before the question; when it lists nothing there
    is nothing to ask. Without a terminal and without ``yes``: :class:`UsageError`, and the
    preview is not even computed.
    """
    if yes:
        return
    if not interactive():
        raise UsageError(
            f"{action}: not confirmed (stdin is not a terminal, so nobody can be asked)",
            hint="pass -y (--yes) to go ahead without a question",
        )
    lines = preview() if preview is not None else ()
    if preview is not None and not lines:
        return  # nothing would change: nothing to ask
    for line in lines:
        click.echo(f"  {line}", err=True)
    click.confirm(f"{action}?", abort=True, err=True)
