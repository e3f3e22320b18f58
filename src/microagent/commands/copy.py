"""``cp``: a file between the host and a stopped workspace.

A module of its own (not :mod:`.workspace`, whose twenty commands bring the build flags, the
tables and the confirmations): ``cp`` is a start-up path, and loads only what it uses.
"""

from __future__ import annotations

import click

from microagent.commands.context import Ctx, pass_ctx


@click.command()
@click.argument("source")
@click.argument("target")
@pass_ctx
def cp(ctx: Ctx, /, source: str, target: str) -> None:
    """Copy a file between the host and a stopped workspace: NAME:/path on one side.

    A host DST may be an existing directory; DIR/ or a parent that does not exist is an
    error (nothing is created)."""
    report = ctx.api().cp(source, target)
    text = f"copied {report.bytes} bytes {report.direction.replace('-', ' ')}"
    ctx.emit(report.to_json(), text)


COMMANDS = [cp]
