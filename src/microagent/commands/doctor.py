"""``doctor``: can this host run microVMs, and how well?"""

from __future__ import annotations

import click

from microagent.commands.context import Ctx, pass_ctx


@click.command()
@pass_ctx
def doctor(ctx: Ctx) -> None:
    """Check this host: QEMU, KVM/TCG, networking tools, the guest kit, the store."""
    report = ctx.api().doctor()
    ctx.emit(report.to_json(), report.render())
    if report.verdict == "failed":
        raise click.exceptions.Exit(1)


COMMANDS = [doctor]
