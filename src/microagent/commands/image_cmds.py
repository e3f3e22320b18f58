"""Commands for base images and the build cache: image pull/ls/rm, cache ls/du/prune."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from microagent.commands.context import Ctx, pass_ctx


def _store(ctx: Ctx) -> Any:
    from microagent.settings import home_dir, store_dir
    from microagent.store.content import Store

    return Store(store_dir(home_dir(ctx.home)))


def _mb(size: int) -> str:
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
    from microagent.build.base import pull_base, tty_progress

    base = pull_base(
        _store(ctx),
        ref,
        base_dir=Path.cwd(),
        platform=platform,
        progress=None if ctx.json else tty_progress,
    )
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
    from microagent.build.base import list_bases

    store = _store(ctx)
    rows = []
    for record in list_bases(store):
        rootfs = store.entry_path(record["rootfs"])
        rows.append(
            {
                "key": record["key"],
                "reference": record["reference"],
                "digest": record["inputs"]["digest"],
                "platform": record["inputs"]["platform"],
                "rootfs": str(rootfs),
                "size": rootfs.stat().st_blocks * 512,
                "lastUsed": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(rootfs.stat().st_mtime)
                ),
            }
        )
    lines = [f"{'KEY':<14}{'PLATFORM':<14}{'SIZE':>10}  REFERENCE"]
    for r in rows:
        name = r["reference"].split("@")[0]
        lines.append(f"{r['key'][7:19]:<14}{r['platform']:<14}{_mb(r['size']):>10}  {name}")
    ctx.emit({"ok": True, "images": rows}, "\n".join(lines))


@image.command("rm")
@click.argument("what")
@pass_ctx
def image_rm(ctx: Ctx, /, what: str) -> None:
    """Remove a pulled image by reference, digest or key (blobs go with `cache prune`)."""
    from microagent.build.base import remove_base

    removed = remove_base(_store(ctx), what)
    ctx.emit({"ok": True, "removed": removed}, "\n".join(f"removed {k}" for k in removed))


@click.group()
def cache() -> None:
    """Inspect and prune the content-addressed build cache."""


@cache.command("ls")
@pass_ctx
def cache_ls(ctx: Ctx, /) -> None:
    """Every cached entry: blobs, step keys, root filesystems, with size and last use."""
    entries = _store(ctx).entries()
    rows = [
        {
            "name": e.name,
            "kind": e.kind,
            "size": e.size,
            "diskBytes": e.disk_bytes,
            "lastUsed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.last_used)),
        }
        for e in entries
    ]
    lines = [f"{r['lastUsed']}  {_mb(r['diskBytes']):>10}  {r['name']}" for r in rows]
    ctx.emit({"ok": True, "entries": rows}, "\n".join(lines) or "(cache is empty)")


@cache.command("du")
@pass_ctx
def cache_du(ctx: Ctx, /) -> None:
    """Disk used by the cache, per kind of entry."""
    store = _store(ctx)
    kinds: dict[str, int] = {}
    for entry in store.entries():
        kinds[entry.kind] = kinds.get(entry.kind, 0) + entry.disk_bytes
    total = sum(kinds.values())
    lines = [f"{_mb(size):>10}  {kind}" for kind, size in sorted(kinds.items())]
    lines.append(f"{_mb(total):>10}  total ({store.root})")
    ctx.emit(
        {"ok": True, "root": str(store.root), "total": total, "kinds": kinds}, "\n".join(lines)
    )


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (clean[:-1], clean[-1]) if clean and clean[-1] in units else (clean, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 500M or 2G") from None


@cache.command("prune")
@click.option("--max-size", help="Keep the cache under this size (e.g. 2G), dropping LRU first.")
@click.option("--all", "everything", is_flag=True, help="Remove every entry not in use.")
@pass_ctx
def cache_prune(ctx: Ctx, /, max_size: str | None, everything: bool) -> None:
    """Free space: least recently used first; never what a workspace uses."""
    if not max_size and not everything:
        raise click.UsageError("give --max-size SIZE or --all")
    store = _store(ctx)
    limit = _parse_size(max_size) if max_size else None
    report = store.prune(limit, all=everything, keep=in_use_by_workspaces(ctx, store))
    data = {
        "ok": True,
        "removed": [e.name for e in report.removed],
        "freedBytes": report.freed_bytes,
        "garbage": [str(p) for p in report.garbage],
    }
    ctx.emit(data, f"removed {len(report.removed)} entries, freed {_mb(report.freed_bytes)}")


def in_use_by_workspaces(ctx: Ctx, store: Any) -> Any:
    """Protect every entry an existing workspace still needs (rootfs chain, layers, files)."""
    from microagent.settings import home_dir, workspaces_dir
    from microagent.store.retention import keeper, names_in_use
    from microagent.workspace.records import Workspaces

    keys, blobs = [], []
    for ws in Workspaces(workspaces_dir(home_dir(ctx.home))):
        record = ws.record()
        keys.append(record.rootfs_key)
        blobs += [f.blob for f in record.files]
    return keeper(names_in_use(store, keys, blobs))


COMMANDS = [image, cache]
