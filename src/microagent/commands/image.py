"""``image pull|ls|rm``: base images as ready-to-boot root filesystems."""

from __future__ import annotations

import click

from microagent.commands.context import Ctx, pass_ctx, tty_only


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@click.group()
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
    lines = [f"{'KEY':<14}{'PLATFORM':<14}{'SIZE':>10}  REFERENCE"]
    for r in rows:
        name = r["reference"].split("@")[0]
        lines.append(f"{r['key'][7:19]:<14}{r['platform']:<14}{mb(r['size']):>10}  {name}")
    ctx.emit({"ok": True, "images": rows}, "\n".join(lines))


@image.command("rm")
@click.argument("what")
@pass_ctx
def image_rm(ctx: Ctx, /, what: str) -> None:
    """Remove a pulled image by reference, digest or key (blobs go with `cache prune`)."""
    removed = ctx.api().image_remove(what)
    ctx.emit({"ok": True, "removed": removed}, "\n".join(f"removed {k}" for k in removed))


COMMANDS = [image]
