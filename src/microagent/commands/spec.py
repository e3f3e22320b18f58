"""Commands that read a spec: validate and plan."""

from __future__ import annotations

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
@click.option("--offline", is_flag=True, help="Never contact a registry; tags must be locked.")
@click.option("--cache-from", "cache_from", multiple=True, metavar="REF",
              help="Also look steps up in this remote cache (registry repository or oci:DIR; "
              "repeatable; default $MICROAGENT_CACHE_FROM / `cache.from`).")  # fmt: skip
@pass_ctx
def plan(
    ctx: Ctx, /, spec_file: Path, offline: bool, cache_from: tuple[str, ...], **kwargs: Any
) -> None:
    """Show the build steps, their keys, and what is cached or must be built (and why)."""
    from microagent import api
    from microagent.compiler.overrides import parse_env
    from microagent.settings import home_dir, store_dir
    from microagent.store.content import Store
    from microagent.store.stepcache import StoreStepCache

    env = parse_env(kwargs.get("env") or ())
    cache: Any = StoreStepCache(Store(store_dir(home_dir(ctx.home))))
    restorer = None if offline else _remote_lookup(ctx, cache, cache_from)
    if restorer is not None:
        from microagent.remotecache.restore import RemoteStepCache

        cache = RemoteStepCache(cache, restorer)
    report = api.plan(spec_file, overrides_from(kwargs), env, cache, offline=offline)
    data = report.to_json()
    if restorer is not None:
        data["cacheFrom"] = [source.where for source in restorer.sources]
        data["warnings"] = list(restorer.warnings)
    ctx.emit(data, _render_plan(report))


def _remote_lookup(ctx: Ctx, local: Any, flags: tuple[str, ...]) -> Any:
    """A restorer for ``--cache-from`` (or the configured default), else None."""
    from microagent.remotecache.refs import cache_from_refs, open_source
    from microagent.remotecache.restore import Restorer

    refs = cache_from_refs(flags)
    if not refs:
        return None
    say = (lambda _m: None) if ctx.json else (lambda m: click.echo(m, err=True))
    return Restorer(local.store, [open_source(ref) for ref in refs], say)


def _render_plan(report: Any) -> str:
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
    from microagent import api

    lock_file, changed = api.lock(spec_file, update=update)
    spec = api.load(spec_file)
    entry = lock_file.images[spec.image]
    verb = "wrote" if changed else "unchanged"
    text = f"{verb} {lock_file.path}: {spec.image} -> {entry.digest}"
    for platform, digest in sorted(entry.platforms.items()):
        text += f"\n  {platform:<14} {digest}"
    data = {"ok": True, "lock": str(lock_file.path), "changed": changed, **lock_file.to_json()}
    ctx.emit(data, text)


COMMANDS = [validate, plan, lock]
