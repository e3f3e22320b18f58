"""``kernel ls|install|prune``: the guest kits microVMs boot."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from microagent.commands.confirm import confirm, yes_option
from microagent.commands.context import Ctx, pass_ctx
from microagent.commands.group import CommandGroup
from microagent.commands.table import Column, render

if TYPE_CHECKING:
    from microagent.kit.guestkit import GuestKit


@click.group(cls=CommandGroup)
def kernel() -> None:
    """Guest kits: the kernel and initramfs microVMs boot."""


@kernel.command("ls")
@pass_ctx
def kernel_ls(ctx: Ctx) -> None:
    """List the guest kits in the store (newest first)."""
    kits = [k.to_json() for k in ctx.api().kernel_list()]
    columns = [Column("KEY", shrink=False), Column("KERNEL"), Column("RECIPE", shrink=False)]
    columns.append(Column("INSTALLED", shrink=False))
    cells = [
        (k["key"][:12], k["kernelVersion"], "current" if k["current"] else "old", k["installedAt"])
        for k in kits
    ]
    ctx.emit({"ok": True, "kits": kits}, render(columns, cells) if kits else "no kits")


@kernel.command("install")
@click.option(
    "--mirror", help="Debian mirror URL (default: $MICROAGENT_DEBIAN_MIRROR or deb.debian.org)."
)
@click.option("--suite", help="Debian suite (default: $MICROAGENT_DEBIAN_SUITE or bookworm).")
@pass_ctx
def kernel_install(ctx: Ctx, mirror: str | None, suite: str | None) -> None:
    """Download the newest Debian cloud kernel and busybox and build a guest kit."""
    kit = ctx.api().kernel_install(mirror, suite)
    ctx.emit(
        {"ok": True, "kit": kit.to_json()},
        f"{kit.key[:12]}  {kit.kernel_version}  {kit.kernel.parent}",
    )


@kernel.command("prune")
@yes_option
@pass_ctx
def kernel_prune(ctx: Ctx, yes: bool) -> None:
    """Remove guest kits built by an older microagent (the current ones stay).

    Asks first on a terminal; anywhere else give -y."""
    api = ctx.api()
    confirm(
        "remove these guest kits",
        yes=yes,
        preview=lambda: [_kit_line(k) for k in api.kernel_list() if not k.to_json()["current"]],
    )
    gone = api.kernel_prune()
    lines = [f"removed {_kit_line(k)}" for k in gone] or ["nothing to remove"]
    ctx.emit({"ok": True, "removed": [k.key for k in gone]}, "\n".join(lines))


def _kit_line(kit: GuestKit) -> str:
    return f"{kit.key[:12]}  {kit.kernel_version}"


COMMANDS = [kernel]
