"""``build``: build every step of a spec (no workspace); ``--push`` publishes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
from microagent.compiler.cachecontrol import CacheControl

F = TypeVar("F", bound=Callable[..., Any])


def cache_control_options(func: F) -> F:
    """``--no-cache``, ``--no-cache-from N`` and ``--refresh`` (build, create, plan); the
    command reads them with :func:`cache_control`."""
    func = click.option(
        "--refresh",
        is_flag=True,
        help="Ask the registry which digest the image tag names now, even if it was asked "
        "lately (see $MICROAGENT_RESOLVE_TTL); a microagent.lock pin is kept.",
    )(func)
    func = click.option(
        "--no-cache-from",
        "no_cache_from",
        type=click.IntRange(min=1),
        metavar="N",
        help="Rebuild setup step N (1-based, as `plan` numbers them) and every later one; "
        "reuse the steps before it.",
    )(func)
    return click.option(
        "--no-cache",
        is_flag=True,
        help="Rebuild every setup step even if cached (e.g. to refresh unpinned packages).",
    )(func)


def cache_control(kwargs: dict[str, Any]) -> CacheControl:
    """The cache options of :func:`cache_control_options`, taken out of ``kwargs``."""
    return CacheControl(
        no_cache=bool(kwargs.pop("no_cache", False)),
        no_cache_from=kwargs.pop("no_cache_from", None),
        refresh=bool(kwargs.pop("refresh", False)),
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
@cache_control_options
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
    control = cache_control(kwargs)
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
        control=control,
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
