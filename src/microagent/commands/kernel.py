"""``kernel ls|install|prune``: the guest kits microVMs boot."""

from __future__ import annotations

import click

from microagent.commands.context import Ctx, pass_ctx


@click.group()
def kernel() -> None:
    """Guest kits: the kernel and initramfs microVMs boot."""


@kernel.command("ls")
@pass_ctx
def kernel_ls(ctx: Ctx) -> None:
    """List the guest kits in the store (newest first)."""
    kits = ctx.api().kernel_list()
    lines = [
        f"{k.key[:12]}  {k.kernel_version:<24} {'current' if k.to_json()['current'] else 'old'}"
        f"  {k.manifest.get('installedAt', '')}"
        for k in kits
    ]
    ctx.emit({"ok": True, "kits": [k.to_json() for k in kits]}, "\n".join(lines) or "no kits")


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
@pass_ctx
def kernel_prune(ctx: Ctx) -> None:
    """Remove guest kits built by an older microagent (the current ones stay)."""
    gone = ctx.api().kernel_prune()
    lines = [f"removed {k.key[:12]}  {k.kernel_version}" for k in gone] or ["nothing to remove"]
    ctx.emit({"ok": True, "removed": [k.key for k in gone]}, "\n".join(lines))


COMMANDS = [kernel]
