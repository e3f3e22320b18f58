"""``build``: build every step of a spec (no workspace); ``--push`` publishes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from microagent.commands.context import (
    Ctx,
    cache_from_option,
    cache_to_option,
    override_options,
    pass_ctx,
    spec_file_option,
    spec_inputs,
    stream_to_stderr,
    timeout_option,
)


@click.command()
@spec_file_option
@override_options
@click.option(
    "--push",
    metavar="REF[:TAG]",
    help="Publish the image (tag default: latest) and every step key to a registry "
    "repository (or oci:DIR).",
)
@cache_from_option
@cache_to_option
@click.option("--platform", help="Target platform (default: this machine's, e.g. linux/amd64).")
@timeout_option
@pass_ctx
def build(
    ctx: Ctx,
    /,
    *,
    spec_file: Path,
    push: str | None,
    cache_from: tuple[str, ...],
    cache_to: str | None,
    platform: str | None,
    timeout: float | None,
    **kwargs: Any,
) -> None:
    """Build every step of a spec (no workspace); with --push publish it to a registry."""
    overrides, env = spec_inputs(kwargs)
    report = ctx.api(output=stream_to_stderr).build(
        spec_file,
        overrides,
        env,
        push=push,
        cache_from=cache_from,
        cache_to=cache_to,
        platform=platform,
        timeout=timeout,
    )
    data = report.to_json()
    ctx.emit(data, _build_text(data))


def _build_text(data: dict[str, Any]) -> str:
    lines = [
        f"built {data['configKey'][:19]}… in {data['seconds']:.2f}s ({data['stepsBuilt']} setup "
        f"steps built, {data['stepsCached']} cached, {data['setupBoots']} setup boots)"
    ]
    for report in data["published"]:
        lines.append(
            f"  pushed {report['where']}: {', '.join(report['tags'][-1:])} + "
            f"{len(report['tags']) - 1} step tags; {report['blobsUploaded']} blobs sent, "
            f"{report['blobsSkipped']} already there"
        )
    return "\n".join(lines)


COMMANDS = [build]
