"""Commands that read a spec: validate, plan, lock."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from microagent.commands.context import (
    Ctx,
    cache_from_option,
    override_options,
    pass_ctx,
    spec_file_option,
    spec_inputs,
)

if TYPE_CHECKING:
    from microagent.api import PlanReport


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
@pass_ctx
def plan(
    ctx: Ctx, /, spec_file: Path, offline: bool, cache_from: tuple[str, ...], **kwargs: Any
) -> None:
    """Show the build steps, their keys, and what is cached or must be built (and why)."""
    overrides, env = spec_inputs(kwargs)
    report = ctx.api().plan(spec_file, overrides, env, offline=offline, cache_from=cache_from)
    ctx.emit(report.to_json(), _render_plan(report))


def _render_plan(report: PlanReport) -> str:
    image = report.plan.image
    lines = [
        f"plan for {report.spec.name or '(unnamed)'} ({report.spec.source})",
        f"image {report.spec.image} -> {image.digest[:19]}… ({image.platform})",
    ]
    for status in report.status:
        step = status.step
        mark = "BUILD "
        if status.cached:
            mark = "CACHED" if status.where == "local" else "REMOTE"
        why = status.where if status.cached else status.reason
        label = step.label if len(step.label) <= 40 else step.label[:39] + "…"
        lines.append(f"  {step.kind.value:<6} {step.short_key}  {mark}  {label:<40}  {why}")
    return "\n".join(lines)


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
