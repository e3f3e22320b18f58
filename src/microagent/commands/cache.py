"""``cache ls|du|prune|export|import``: the content-addressed build cache."""

from __future__ import annotations

import time
from pathlib import Path

import click

from microagent.commands.context import Ctx, cache_from_option, pass_ctx
from microagent.commands.image import mb


@click.group()
def cache() -> None:
    """Inspect, prune, export and import the content-addressed build cache."""


@cache.command("ls")
@pass_ctx
def cache_ls(ctx: Ctx, /) -> None:
    """Every cached entry: blobs, step keys, root filesystems, with size and last use."""
    entries = ctx.api().cache_entries()
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
    lines = [f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(e.last_used))}  "
             f"{mb(e.disk_bytes):>10}  {e.name}" for e in entries]  # fmt: skip
    ctx.emit({"ok": True, "entries": rows}, "\n".join(lines) or "(cache is empty)")


@cache.command("du")
@pass_ctx
def cache_du(ctx: Ctx, /) -> None:
    """Disk used by the cache, per kind of entry."""
    api = ctx.api()
    kinds: dict[str, int] = {}
    for entry in api.cache_entries():
        kinds[entry.kind] = kinds.get(entry.kind, 0) + entry.disk_bytes
    total = sum(kinds.values())
    lines = [f"{mb(size):>10}  {kind}" for kind, size in sorted(kinds.items())]
    lines.append(f"{mb(total):>10}  total ({api.store.root})")
    data = {"ok": True, "root": str(api.store.root), "total": total, "kinds": kinds}
    ctx.emit(data, "\n".join(lines))


def parse_size(text: str) -> int:
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
    limit = parse_size(max_size) if max_size else None
    report = ctx.api().cache_prune(limit, everything=everything)
    data = {
        "ok": True,
        "removed": [e.name for e in report.removed],
        "freedBytes": report.freed_bytes,
        "garbage": [str(p) for p in report.garbage],
    }
    ctx.emit(data, f"removed {len(report.removed)} entries, freed {mb(report.freed_bytes)}")


@cache.command("export")
@click.argument("args", nargs=-1, metavar="(KEY | --file SPEC) DIR")
@click.option(
    "--file",
    "-f",
    "spec_file",
    type=click.Path(path_type=Path),
    help="Build this spec (cache hits are free) and export its image and steps.",
)
@click.option("--tag", default="latest", show_default=True, help="Name of the image in DIR.")
@cache_from_option
@pass_ctx
def cache_export(
    ctx: Ctx, /, *, args: tuple[str, ...], spec_file: Path | None, tag: str,
    cache_from: tuple[str, ...],
) -> None:  # fmt: skip
    """Write built steps (and the image) into an OCI image layout folder DIR."""
    key, directory = _export_args(args, spec_file)
    full, report = ctx.api().cache_export(
        directory, key=key, spec=spec_file, tag=tag, cache_from=cache_from
    )
    data = {"ok": True, "key": full, "layout": str(directory), **report.to_json()}
    ctx.emit(data, f"exported {len(report.manifests)} manifests to {directory} ({tag} + steps)")


def _export_args(args: tuple[str, ...], spec_file: Path | None) -> tuple[str | None, Path]:
    if spec_file is not None and len(args) == 1:
        return None, Path(args[0])
    if spec_file is None and len(args) == 2:
        return args[0], Path(args[1])
    raise click.UsageError("give KEY DIR, or --file SPEC DIR")


@cache.command("import")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@pass_ctx
def cache_import(ctx: Ctx, /, directory: Path) -> None:
    """Load the published steps of an OCI image layout (from `cache export`) into the store."""
    report = ctx.api().cache_import(directory)
    data = {"ok": True, "layout": str(directory), **report.to_json()}
    ctx.emit(
        data,
        f"imported {len(report.restored)} steps from {directory} "
        f"({len(report.present)} already present, {len(report.skipped)} skipped)",
    )


COMMANDS = [cache]
