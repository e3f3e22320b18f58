"""``image pull|ls|rm``: base images as ready-to-boot root filesystems."""

from __future__ import annotations

import click

from microagent.commands.confirm import confirm, yes_option
from microagent.commands.context import Ctx, pass_ctx, tty_only
from microagent.commands.group import CommandGroup
from microagent.commands.table import Column, render


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@click.group(cls=CommandGroup)
def image() -> None:
    """Pull, list and remove base images (ready-to-boot root filesystems)."""


@image.command("pull")
@click.argument("ref")
@click.option("--platform", help="Target platform (default: this machine's, e.g. linux/amd64).")
@pass_ctx
def image_pull(ctx: Ctx, /, ref: str, platform: str | None) -> None:
    """Fetch, verify and flatten REF into a base root filesystem (oci:PATH for a layout)."""
    base = ctx.api(say=tty_only).image_pull(ref, platform=platform)
    state = "cached" if base.cached else "pulled"
    data = {
        "ok": True,
        "cached": base.cached,
        "key": base.key,
        "reference": base.reference,
        "digest": base.digest,
        "platform": base.platform,
        "rootfs": str(base.rootfs),
        "seconds": round(base.seconds, 3),
    }
    ctx.emit(
        data,
        f"{state} {ref} -> {base.digest} ({base.platform}) in {base.seconds:.2f}s\n"
        f"  rootfs {base.rootfs}",
    )


@image.command("ls")
@pass_ctx
def image_ls(ctx: Ctx, /) -> None:
    """List pulled base images."""
    rows = ctx.api().image_list()
    columns = [
        Column("KEY", shrink=False),
        Column("PLATFORM", shrink=False),
        Column("SIZE", right=True, shrink=False),
        Column("REFERENCE"),
    ]
    cells = [
        (r["key"][7:19], r["platform"], mb(r["size"]), r["reference"].split("@")[0]) for r in rows
    ]
    ctx.emit({"ok": True, "images": rows}, render(columns, cells) if rows else "no images")


@image.command("rm")
@click.argument("what")
@yes_option
@pass_ctx
def image_rm(ctx: Ctx, /, what: str, yes: bool) -> None:
    """Remove a pulled image by reference, digest or key (blobs go with `cache prune`).

    Asks first on a terminal; anywhere else give -y."""
    api = ctx.api()
    confirm(
        f"remove the pulled images matching {what!r}",
        yes=yes,
        preview=lambda: api.image_remove(what, dry_run=True),
    )
    removed = api.image_remove(what)
    ctx.emit({"ok": True, "removed": removed}, "\n".join(f"removed {k}" for k in removed))


COMMANDS = [image]
