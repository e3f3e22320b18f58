"""Workspace commands: create, start, status, result, halt, delete, list, logs, events, cp."""

from __future__ import annotations

import sys
import time
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


def _home(ctx: Ctx) -> Path:
    from microagent.settings import home_dir

    return home_dir(ctx.home)


def _backend_name() -> str:
    import os

    return os.environ.get("MICROAGENT_BACKEND", "qemu")


def _workspaces(ctx: Ctx) -> Any:
    from microagent.settings import workspaces_dir
    from microagent.workspace.records import Workspaces

    return Workspaces(workspaces_dir(_home(ctx)))


def _runtime(ctx: Ctx) -> Any:
    from microagent.settings import extra_ca_bundle, store_dir
    from microagent.store.content import Store
    from microagent.workspace.lifecycle import Runtime

    say = (lambda m: click.echo(m, err=True)) if not ctx.json else (lambda _m: None)
    return Runtime(Store(store_dir(_home(ctx))), _backend_name(), extra_ca_bundle(), say)


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@spec_file_option
@override_options
@click.option("--timeout", type=float, help="Bound each setup step's VM run (seconds).")
@click.option(
    "--host-forward",
    "host_forward",
    multiple=True,
    help="GUEST_PORT=HOST_PORT: the guest reaches host 127.0.0.1:HOST_PORT at "
    "10.0.2.100:GUEST_PORT (e.g. a model proxy). Nothing else on the host is reachable.",
)
@click.option("--cache-from", "cache_from", multiple=True, metavar="REF",
              help="Remote cache (registry repository or oci:DIR) to take built steps from; "
              "repeatable (default $MICROAGENT_CACHE_FROM / `cache.from`).")  # fmt: skip
@click.option("--cache-to", "cache_to", metavar="REF",
              help="Publish the built steps to this registry repository or oci:DIR.")  # fmt: skip
@pass_ctx
def create(
    ctx: Ctx,
    /,
    spec_file: Path,
    timeout: float | None,
    host_forward: tuple[str, ...],
    **kwargs: Any,
) -> None:
    """Build (or reuse) the spec's steps and make a persistent workspace."""
    from microagent.build.pipeline import Creator, parse_host_forwards
    from microagent.compiler.overrides import parse_env

    env = parse_env(kwargs.get("env") or ())
    quiet = ctx.json
    say = (lambda _m: None) if quiet else _err
    output = None if quiet else _stream_to_stderr
    remote = {"cache_from": kwargs["cache_from"], "cache_to": kwargs["cache_to"]}
    creator = Creator(_home(ctx), say, output, _backend_name(), timeout, **remote)
    forwards = parse_host_forwards(host_forward)
    report = creator.create(spec_file, overrides_from(kwargs), env, forwards)
    text = (
        f"created {report.workspace.name} in {report.seconds:.2f}s "
        f"({report.rootfs.built} setup steps built, {report.rootfs.cached} cached, "
        f"{report.boots} setup boots)"
    )
    ctx.emit(report.to_json(), text)


def _stream_to_stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.flush()


@click.command()
@click.argument("name")
@click.option("--wait", "wait_", is_flag=True, help="Block until the entrypoint exits.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@pass_ctx
def start(ctx: Ctx, /, name: str, wait_: bool, timeout: float | None) -> None:
    """Boot a workspace; its disk is kept from earlier runs."""
    from microagent.workspace import lifecycle

    ws = _workspaces(ctx).get(name)
    runtime = lifecycle.start(_runtime(ctx), ws)
    if not wait_:
        ctx.emit(
            {"ok": True, "workspace": name, "state": runtime.get("state")},
            f"{name}: {runtime.get('state')}",
        )
        return
    state = lifecycle.wait(ws, timeout)
    payload = lifecycle.result_payload(ws) or {}
    code = int(payload.get("exitCode", 0 if state.value != "failed" else 1))
    ctx.emit(
        {"ok": state.value != "failed", "workspace": name, "state": state.value, "exitCode": code},
        f"{name}: {state.value} (exit code {code})",
    )
    if code:
        raise click.exceptions.Exit(code)


@click.command()
@click.argument("name")
@pass_ctx
def status(ctx: Ctx, /, name: str) -> None:
    """State, readiness and (once ready) the result of a workspace."""
    from microagent.workspace import lifecycle

    data = lifecycle.status(_workspaces(ctx).get(name), _backend_name())
    event = data["event"]
    text = f"{name}: {event['state']}" + (f" ({event['detail']})" if event["detail"] else "")
    if data["result"] is not None:
        text += f"\nresult: exit code {data['result'].get('exitCode')}"
    ctx.emit(data, text)


@click.command()
@click.argument("name")
@pass_ctx
def result(ctx: Ctx, /, name: str) -> None:
    """The guest's report and the declared outputs (the agent's WorkResult)."""
    from microagent.workspace import lifecycle

    payload = lifecycle.result(_workspaces(ctx).get(name))
    ctx.emit({"ok": True, "workspace": name, "result": payload}, _result_text(payload))


def _result_text(payload: dict[str, Any]) -> str:
    work = payload.get("workResult")
    head = f"exit code {payload.get('exitCode')}"
    if not isinstance(work, dict):
        tail = payload.get("stderr") or payload.get("stdout") or ""
        return f"{head}; no WorkResult (declared output `result`)\n{tail}".rstrip()
    lines = [f"{work.get('request_id', '?')}: {work.get('status', '?')} ({head})"]
    if work.get("error"):
        lines.append(f"error: {work['error']}")
    lines.append(str(work.get("content") or ""))
    return "\n".join(lines)


@click.command()
@click.argument("name")
@click.option("--timeout", type=float, default=30.0, show_default=True)
@pass_ctx
def halt(ctx: Ctx, /, name: str, timeout: float) -> None:
    """Shut the VM down cleanly (the disk is kept)."""
    from microagent.workspace import lifecycle

    state = lifecycle.halt(_workspaces(ctx).get(name), timeout=timeout)
    ctx.emit({"ok": True, "workspace": name, "state": state.value}, f"{name}: {state.value}")


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@click.option("--force", "-f", is_flag=True, help="Kill a running workspace first.")
@pass_ctx
def delete(ctx: Ctx, /, names: tuple[str, ...], yes: bool, force: bool) -> None:
    """Remove workspaces: record, disk and logs (idempotent)."""
    from microagent.workspace import lifecycle

    if not (yes or force or ctx.json) and sys.stdin.isatty():
        click.confirm(f"delete {', '.join(names)}?", abort=True)
    results = []
    for name in names:
        ws = _workspaces(ctx).path(name)
        results.append({"workspace": name, "deleted": lifecycle.delete(ws, force=force)})
    lines = [f"{r['workspace']}: {'deleted' if r['deleted'] else 'not found'}" for r in results]
    ctx.emit({"ok": True, "results": results}, "\n".join(lines))


@click.command("list")
@pass_ctx
def list_(ctx: Ctx, /) -> None:
    """All workspaces and their states."""
    from microagent.workspace.lifecycle import reconcile

    rows = []
    for ws in _workspaces(ctx):
        runtime = ws.runtime()
        rows.append(
            {"name": ws.name, "state": reconcile(ws).value, "observedAt": runtime.get("observedAt")}
        )
    lines = [f"{'NAME':<28}{'STATE':<10}OBSERVED"]
    lines += [f"{r['name']:<28}{r['state']:<10}{r['observedAt'] or ''}" for r in rows]
    ctx.emit({"ok": True, "workspaces": rows}, "\n".join(lines))


@click.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the workspace stops.")
@pass_ctx
def logs(ctx: Ctx, /, name: str, follow: bool) -> None:
    """The serial console: guest boot messages and the entrypoint's output."""
    from microagent.workspace.lifecycle import reconcile

    ws = _workspaces(ctx).get(name)
    offset = 0
    while True:
        try:
            with ws.serial_log.open("rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        if not follow or reconcile(ws).terminal:
            return
        time.sleep(0.3)


@click.command()
@click.argument("name")
@pass_ctx
def events(ctx: Ctx, /, name: str) -> None:
    """The workspace's lifecycle history."""
    items = _workspaces(ctx).get(name).events()
    lines = [f"{e.get('observedAt')}  {e.get('event'):<10} {e.get('detail', '')}" for e in items]
    ctx.emit({"ok": True, "events": items}, "\n".join(lines))


def _remote(text: str) -> tuple[str, str] | None:
    name, sep, path = text.partition(":")
    if sep and path.startswith("/") and name and "/" not in name:
        return name, path
    return None


@click.command()
@click.argument("source")
@click.argument("target")
@pass_ctx
def cp(ctx: Ctx, /, source: str, target: str) -> None:
    """Copy a file between the host and a stopped workspace: NAME:/path on one side."""
    from microagent.errors import InvalidInputError
    from microagent.ext4 import overlay as diskcopy
    from microagent.workspace import lifecycle

    src, dst = _remote(source), _remote(target)
    if (src is None) == (dst is None):
        raise InvalidInputError("exactly one of SOURCE and TARGET must be NAME:/absolute/path")
    name = (src or dst)[0]  # type: ignore[index]
    ws = _workspaces(ctx).get(name)
    record = lifecycle.ensure_offline(ws, "copy files")
    rootfs = Path(record.rootfs)
    if dst is not None:
        size = diskcopy.copy_in(ws.state_disk, rootfs, Path(source), dst[1])
        direction, guest = "to-workspace", dst[1]
    else:
        assert src is not None
        size = diskcopy.copy_out(ws.state_disk, rootfs, src[1], Path(target))
        direction, guest = "from-workspace", src[1]
    data = {
        "ok": True,
        "workspace": name,
        "direction": direction,
        "source": source,
        "target": target,
        "guestPath": guest,
        "bytes": size,
    }
    ctx.emit(data, f"copied {size} bytes {direction.replace('-', ' ')}")


COMMANDS = [create, start, status, result, halt, delete, list_, logs, events, cp]
