"""Commands that read a spec: validate, plan, lock."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from microagent.commands.build import cache_control, cache_control_options
from microagent.commands.context import (
    Ctx,
    cache_from_option,
    override_options,
    pass_ctx,
    spec_file_option,
    spec_inputs,
)
from microagent.commands.table import Column, plural, render

if TYPE_CHECKING:
    from microagent.compiler.plan import StepStatus
    from microagent.compiler.reports import PlanReport


@click.command()
@spec_file_option
@override_options
@pass_ctx
def validate(ctx: Ctx, /, spec_file: Path, **kwargs: Any) -> None:
    """Check a spec and report every problem with file:line:col."""
    overrides, _env = spec_inputs(kwargs)  # --env is checked too
    spec = ctx.api().validate(spec_file, overrides)
    text = f"{spec_file}: ok ({spec.name or 'unnamed'}, {len(spec.setup_steps)} setup steps, "
    text += f"{len(spec.files)} files)"
    ctx.emit({"ok": True, "name": spec.name, "spec": str(spec.source)}, text)


@click.command()
@spec_file_option
@override_options
@click.option("--offline", is_flag=True, help="Never contact a registry; tags must be locked.")
@cache_from_option
@cache_control_options
@pass_ctx
def plan(
    ctx: Ctx, /, spec_file: Path, offline: bool, cache_from: tuple[str, ...], **kwargs: Any
) -> None:
    """Show the build steps, their keys, and what is cached or must be built (and why);
    with --no-cache / --no-cache-from N, which steps a build with them rebuilds."""
    control = cache_control(kwargs)
    overrides, env = spec_inputs(kwargs)
    report = ctx.api().plan(
        spec_file, overrides, env, offline=offline, cache_from=cache_from, control=control
    )
    ctx.emit(report.to_json(), render_plan(report))


# Steps every workspace gets at `create` (its files copied in, its config written): nothing
# to build, so a miss is not "BUILD".
_PER_WORKSPACE = frozenset({"files", "config"})
_GENERIC_MISSES = frozenset({"not built yet", "an earlier step must be built first"})
PLAN_COLUMNS = (
    Column("STEP", shrink=False),
    Column("KEY", shrink=False),
    Column("STATUS", shrink=False),
    Column("WHAT"),
    Column("WHY"),
)


def _plan_row(status: StepStatus) -> tuple[str, str, str, str, str]:
    """STEP, KEY, STATUS (CACHED, REMOTE, BUILD or PER-WS), WHAT, WHY."""
    step = status.step
    kind = step.kind.value
    if status.cached:
        mark, why = ("CACHED" if status.where == "local" else "REMOTE"), str(status.where)
    elif kind in _PER_WORKSPACE:
        mark, why = "PER-WS", "per workspace, at create"
        if status.reason not in _GENERIC_MISSES:
            why += f" ({status.reason})"
    else:
        mark, why = "BUILD", status.reason
    return kind, step.short_key, mark, step.label, why


def render_plan(report: PlanReport, width: int | None = None) -> str:
    image = report.plan.image
    rows = [_plan_row(status) for status in report.status]
    marks = [row[2] for row in rows]
    summary = ", ".join(
        f"{marks.count(mark)} {what}"
        for mark, what in (
            ("CACHED", "cached"),
            ("REMOTE", "in a remote cache"),
            ("BUILD", "to build"),
            ("PER-WS", "per workspace"),
        )
        if mark in marks
    )
    return "\n".join(
        [
            f"plan for {report.spec.name or '(unnamed)'} ({report.spec.source})",
            f"image {report.spec.image} -> {image.digest[:19]}… ({image.platform})",
            render(PLAN_COLUMNS, rows, width=width),
            f"{plural(len(rows), 'step')}: {summary}",
        ]
    )


@click.command()
@spec_file_option
@click.option("--update", is_flag=True, help="Resolve again even if the image is locked.")
@pass_ctx
def lock(ctx: Ctx, /, spec_file: Path, update: bool) -> None:
    """Pin the spec's image tag to digests in microagent.lock beside the spec."""
    report = ctx.api().lock(spec_file, update=update)
    entry = report.entry
    verb = "wrote" if report.changed else "unchanged"
    text = f"{verb} {report.lock.path}: {report.image} -> {entry.digest}"
    for platform, digest in sorted(entry.platforms.items()):
        text += f"\n  {platform:<14} {digest}"
    ctx.emit(report.to_json(), text)


COMMANDS = [validate, plan, lock]
