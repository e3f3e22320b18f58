"""``cache ls|du|prune|verify|export|import``: the content-addressed build cache."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from microagent.commands.confirm import confirm, yes_option
from microagent.commands.context import Ctx, cache_from_option, pass_ctx
from microagent.commands.group import CommandGroup
from microagent.commands.image import mb
from microagent.commands.table import Column, plural, render
from microagent.errors import IntegrityError, UsageError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from microagent.store.content import Entry, PruneReport
    from microagent.store.verify import Problem, VerifyReport


@click.group(cls=CommandGroup)
def cache() -> None:
    """Inspect, prune, export and import the content-addressed build cache."""


@cache.command("ls")
@pass_ctx
def cache_ls(ctx: Ctx, /) -> None:
    """Every cached entry: blobs, step keys, root filesystems, with size and last use."""
    entries = ctx.api().cache_entries()
    rows = [_entry_row(e) for e in entries]
    columns = [Column("LAST USED", shrink=False), Column("SIZE", right=True), Column("NAME")]
    text = render(columns, [(r["lastUsed"], mb(r["diskBytes"]), r["name"]) for r in rows])
    ctx.emit({"ok": True, "entries": rows}, text if rows else "(cache is empty)")


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


_SIZE = re.compile(r"(\d{1,15}(?:\.\d{1,6})?)\s*([KMGT]?)(?:I?B|I)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_AGE = re.compile(r"(\d{1,9}(?:\.\d{1,6})?)\s*([smhdw])", re.IGNORECASE)
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """``500M``, ``2G``, ``1.5GiB``, ``4096`` (bytes; K, M, G, T are powers of 1024) -> bytes,
    more than 0; anything else is a usage error."""
    found = _SIZE.fullmatch(text.strip())
    size = int(float(found[1]) * _SIZE_UNITS[found[2].upper()]) if found else 0
    if size <= 0:
        negative = found or text.strip().startswith("-")
        why = "a size must be more than 0" if negative else "not a size"
        raise UsageError(
            f"--max-size {text!r}: {why}",
            hint="give a size like 500M or 2G; to remove every entry not in use, pass --all",
        )
    return size


def parse_age(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` -> seconds, more than 0."""
    found = _AGE.fullmatch(text.strip())
    seconds = float(found[1]) * _AGE_UNITS[found[2].lower()] if found else 0.0
    if seconds <= 0:
        negative = found or text.strip().startswith("-")
        why = "an age must be more than 0" if negative else "not an age"
        raise UsageError(
            f"--older-than {text!r}: {why}",
            hint="give an age like 12h, 7d or 2w (units s, m, h, d, w)",
        )
    return seconds


def _entry_row(entry: Entry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "kind": entry.kind,
        "size": entry.size,
        "diskBytes": entry.disk_bytes,
        "lastUsed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.last_used)),
    }


@cache.command("prune")
@click.option(
    "--max-size", metavar="SIZE", help="Keep the cache under SIZE (e.g. 2G), dropping LRU first."
)
@click.option(
    "--older-than",
    metavar="AGE",
    help="Remove entries not used for AGE (e.g. 7d); with --max-size, only those may go.",
)
@click.option("--all", "everything", is_flag=True, help="Remove every entry not in use.")
@click.option("--kits", is_flag=True, help="Guest kits may go too (kept otherwise).")
@click.option("--dry-run", "-n", is_flag=True, help="Only list what would be removed.")
@yes_option
@pass_ctx
def cache_prune(
    ctx: Ctx, /, *, max_size: str | None, older_than: str | None, everything: bool,
    kits: bool, dry_run: bool, yes: bool,
) -> None:  # fmt: skip
    """Free space: least recently used first; never what a workspace uses, nor a guest kit
    (unless --kits). Lists every entry removed. Asks first on a terminal; elsewhere give -y."""
    if max_size is None and older_than is None and not everything:
        raise UsageError(
            "cache prune needs a limit", hint="give --max-size SIZE, --older-than AGE or --all"
        )
    if everything and max_size is not None:
        raise UsageError("--all and --max-size exclude each other", hint="give one of them")
    limit = None if max_size is None else parse_size(max_size)
    age = None if older_than is None else parse_age(older_than)
    api = ctx.api()

    def prune(dry: bool) -> PruneReport:
        return api.cache_prune(limit, everything=everything, older_than=age, kits=kits,
                               dry_run=dry)  # fmt: skip

    if not dry_run:
        confirm(
            "remove these cache entries",
            yes=yes,
            preview=lambda: [_entry_line(e) for e in prune(True).removed],
        )
    report = prune(dry_run)
    data = {
        "ok": True,
        "dryRun": dry_run,
        "removed": [_entry_row(e) for e in report.removed],
        "freedBytes": report.freed_bytes,
        "garbage": [str(p) for p in report.garbage],
    }
    ctx.emit(data, _prune_text(report, dry_run))


def _prune_text(report: PruneReport, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {_entry_line(e)}" for e in report.removed]
    lines.append(
        f"{verb} {plural(len(report.removed), 'entry')}, "
        f"{'would free' if dry_run else 'freed'} {mb(report.freed_bytes)}"
    )
    return "\n".join(lines)


def _entry_line(entry: Entry) -> str:
    return f"{mb(entry.disk_bytes):>10}  {entry.name}"


@cache.command("verify")
@click.option("--repair", is_flag=True, help="Remove what is wrong; the next build rebuilds it.")
@yes_option
@pass_ctx
def cache_verify(ctx: Ctx, /, *, repair: bool, yes: bool) -> None:
    """Re-hash every blob, check every step record, root filesystem and shared disk against
    what it says; report corrupt, missing, orphaned and stale entries (exit 1 when there are
    any). --repair removes them (asks first on a terminal; elsewhere give -y)."""
    api = ctx.api()
    if repair:
        confirm(
            "remove these cache entries",
            yes=yes,
            preview=lambda: [_problem_line(p) for p in api.cache_verify().problems],
        )
    report = api.cache_verify(repair=repair)
    error = _verify_error(report, repair)
    ctx.emit(report.to_json(), _verify_text(report), error=error)
    if error is not None:
        if not ctx.json:
            click.echo(error.render(), err=True)
        raise click.exceptions.Exit(1)


def _verify_error(report: VerifyReport, repair: bool) -> IntegrityError | None:
    left = report.remaining
    if not left:
        return None
    hint = "`microagent cache verify --repair` removes them; the next build rebuilds them"
    if repair:
        hint = "what is left was in use by a build (its lock held): verify again once it is done"
    what = f"{plural(len(left), 'problem')}{' left' if repair else ''}"
    return IntegrityError(f"the cache has {what}: {_problem_line(left[0])}", hint=hint)


def _problem_line(problem: Problem) -> str:
    return f"{problem.kind} {problem.name}: {problem.problem} ({problem.detail})"


def _verify_text(report: VerifyReport) -> str:
    """One line per problem (``CORRUPT``, ``MISSING``, ``ORPHANED``, ``STALE``, or ``REMOVED``
    after a repair), then what was checked and what was found."""
    repaired = set(report.repaired)
    lines = [
        f"{'REMOVED':<8}  {_problem_line(p)}"
        if p.name in repaired
        else f"{p.problem.upper():<8}  {p.kind} {p.name}: {p.detail}"
        for p in report.problems
    ]
    counts = ", ".join(plural(n, what) for what, n in _checked_words(report.checked))
    found = plural(len(report.problems), "problem") if report.problems else "no problems"
    removed = f", {len(report.repaired)} removed" if report.repaired else ""
    return "\n".join([*lines, f"checked {counts}: {found}{removed}"])


def _checked_words(checked: Mapping[str, int]) -> list[tuple[str, int]]:
    words = {"blobs": "blob", "keys": "step record", "entries": "built entry"}
    return [(words.get(kind, kind), n) for kind, n in checked.items()]


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
