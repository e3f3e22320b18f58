"""Remote cache commands: ``build`` (and ``--push``), ``cache export`` and ``cache import``.

``export``/``import`` are added to the ``cache`` group of :mod:`image_cmds`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from microagent.commands.context import (
    Ctx,
    override_options,
    overrides_from,
    pass_ctx,
    spec_file_option,
)
from microagent.commands.image_cmds import cache


def _home(ctx: Ctx) -> Path:
    from microagent.settings import home_dir

    return home_dir(ctx.home)


def _say(ctx: Ctx) -> Any:
    return (lambda _m: None) if ctx.json else (lambda m: click.echo(m, err=True))


def _output(ctx: Ctx) -> Any:
    def stream(data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.flush()

    return None if ctx.json else stream


def _creator(ctx: Ctx, timeout: float | None, **remote: Any) -> Any:
    from microagent.build.pipeline import Creator
    from microagent.commands.workspace_cmds import _backend_name

    return Creator(_home(ctx), _say(ctx), _output(ctx), _backend_name(), timeout, **remote)


def cache_from_option(func: Any) -> Any:
    return click.option(
        "--cache-from",
        "cache_from",
        multiple=True,
        metavar="REF",
        help="Remote cache to take built steps from: a registry repository or oci:DIR "
        "(repeatable; default $MICROAGENT_CACHE_FROM or `cache.from` in the user config).",
    )(func)


def cache_to_option(func: Any) -> Any:
    return click.option(
        "--cache-to",
        "cache_to",
        metavar="REF",
        help="Publish every built step to this registry repository or oci:DIR "
        "(default $MICROAGENT_CACHE_TO or `cache.to` in the user config).",
    )(func)


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
@click.option("--timeout", type=float, help="Bound each setup step's VM run (seconds).")
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
    import time

    from microagent import api
    from microagent.compiler.overrides import parse_env
    from microagent.remotecache.publish import record_files_and_config

    began = time.monotonic()
    env = parse_env(kwargs.get("env") or ())
    creator = _creator(ctx, timeout, cache_from=cache_from, cache_to=cache_to, platform=platform)
    spec = api.load(spec_file, overrides_from(kwargs))
    outcome = creator.build_all(spec, env)
    record_files_and_config(creator.store(), outcome.plan)
    published = creator.publish(outcome.plan, push=push)
    data = _build_json(outcome, published, time.monotonic() - began)
    ctx.emit(data, _build_text(data))


def _build_json(outcome: Any, published: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    plan, built = outcome.plan, outcome.built
    return {
        "ok": True,
        "image": plan.image.to_json(),
        "rootfsKey": built.key,
        "configKey": plan.config_step.key,
        "stepsBuilt": built.built,
        "stepsCached": built.cached,
        "setupBoots": outcome.boots,
        "steps": [{"kind": s.kind.value, "key": s.key, "label": s.label} for s in plan.steps],
        "remote": outcome.remote,
        "published": published,
        "seconds": round(seconds, 3),
    }


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
    from microagent.remotecache.publish import prepare, publish
    from microagent.remotecache.refs import open_target, parse_cache_ref

    key, directory = _export_args(args, spec_file)
    if spec_file is not None:
        key = _build_for_export(ctx, spec_file, cache_from)
    store = _creator(ctx, None).store()
    assert key is not None
    key = _full_key(store, key)
    target = open_target(parse_cache_ref(f"oci:{directory.resolve()}"))
    report = publish(prepare(store, key, image_tag=tag), target, _say(ctx))
    data = {"ok": True, "key": key, "layout": str(directory), **report.to_json()}
    ctx.emit(data, f"exported {len(report.manifests)} manifests to {directory} ({tag} + steps)")


def _export_args(args: tuple[str, ...], spec_file: Path | None) -> tuple[str | None, Path]:
    if spec_file is not None and len(args) == 1:
        return None, Path(args[0])
    if spec_file is None and len(args) == 2:
        return args[0], Path(args[1])
    raise click.UsageError("give KEY DIR, or --file SPEC DIR")


def _build_for_export(ctx: Ctx, spec_file: Path, cache_from: tuple[str, ...]) -> str:
    from microagent import api
    from microagent.compiler.overrides import RuntimeEnv
    from microagent.remotecache.publish import record_files_and_config

    creator = _creator(ctx, None, cache_from=cache_from)
    outcome = creator.build_all(api.load(spec_file), RuntimeEnv({}))
    record_files_and_config(creator.store(), outcome.plan)
    key: str = outcome.plan.config_step.key
    return key


def _full_key(store: Any, text: str) -> str:
    """A step key from ``sha256:<hex>``, bare hex, or a unique prefix of 12+ hex digits."""
    from microagent.errors import InvalidInputError, NotFoundError

    hexpart = text.removeprefix("sha256:").lower()
    if len(hexpart) < 12 or hexpart.strip("0123456789abcdef"):
        raise InvalidInputError(f"bad key {text!r}", hint="give at least 12 hex digits of a key")
    keys = store.root / "keys"
    found: list[str] = (
        sorted(p.stem for p in keys.glob(f"{hexpart}*.json")) if keys.is_dir() else []
    )
    if len(found) != 1:
        why = "matches no step" if not found else f"matches {len(found)} steps"
        raise NotFoundError(f"key {text!r} {why} in the local store", hint="see `cache ls`")
    return "sha256:" + found[0]


@cache.command("import")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@pass_ctx
def cache_import(ctx: Ctx, /, directory: Path) -> None:
    """Load the published steps of an OCI image layout (from `cache export`) into the store."""
    from microagent.remotecache.exchange import import_layout

    store = _creator(ctx, None).store()
    report = import_layout(store, directory, _say(ctx))
    data = {"ok": True, "layout": str(directory), **report.to_json()}
    ctx.emit(
        data,
        f"imported {len(report.restored)} steps from {directory} "
        f"({len(report.present)} already present, {len(report.skipped)} skipped)",
    )


COMMANDS = [build]
