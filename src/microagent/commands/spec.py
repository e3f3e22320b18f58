"""Commands that read a spec: validate and plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from microagent.commands._common import (
    Ctx,
    override_options,
    overrides_from,
    pass_ctx,
    spec_file_option,
)


@click.command()
@spec_file_option
@override_options
@pass_ctx
def validate(ctx: Ctx, /, spec_file: Path, **kwargs: Any) -> None:
    """Check a spec and report every problem with file:line:col."""
    from microagent import api
    from microagent.compiler.overrides import parse_env

    parse_env(kwargs.get("env") or ())
    spec = api.load(spec_file, overrides_from(kwargs))
    text = f"{spec_file}: ok ({spec.name or 'unnamed'}, {len(spec.setup_steps)} setup steps, "
    text += f"{len(spec.files)} files)"
    ctx.emit({"ok": True, "name": spec.name, "spec": str(spec.source)}, text)


@click.command()
@spec_file_option
@override_options
@pass_ctx
def plan(ctx: Ctx, /, spec_file: Path, **kwargs: Any) -> None:
    """Show the build steps, their keys, and what is cached or must be built (and why)."""
    from microagent import api
    from microagent.compiler.overrides import parse_env

    env = parse_env(kwargs.get("env") or ())
    report = api.plan(spec_file, overrides_from(kwargs), env)
    ctx.emit(report.to_json(), _render_plan(report))


def _render_plan(report: Any) -> str:
    image = report.plan.image
    lines = [
        f"plan for {report.spec.name or '(unnamed)'} ({report.spec.source})",
        f"image {image.reference} -> {image.digest[:19]}… ({image.platform})",
    ]
    for status in report.status:
        step = status.step
        mark = "CACHED" if status.cached else "BUILD "
        why = status.where if status.cached else status.reason
        lines.append(f"  {step.kind.value:<6} {step.short_key}  {mark}  {step.label:<44} {why}")
    return "\n".join(lines)


COMMANDS = [validate, plan]
