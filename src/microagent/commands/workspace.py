"""Workspace commands: create, start, status, result, halt/stop, kill, wait, delete, list, ps,
logs, events, audit, pause, resume, snapshot create/ls/rm, suspend, fork (``cp``: :mod:`.copy`).

What the guest wrote is shown inert: ``status``, ``result`` and ``events`` text goes through
``sanitize_for_terminal`` always (``--json`` is the exact form); ``logs`` passes the console's
bytes on exactly to a file or pipe, and sanitized to a terminal; ``audit`` strips control
characters from every field, so each entry stays one line.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from microagent.commands import envelope
from microagent.commands.build import cache_control, cache_control_options
from microagent.commands.completion import workspace_names
from microagent.commands.confirm import confirm, yes_option
from microagent.commands.context import (
    Ctx,
    GuestOutput,
    cache_from_option,
    cache_to_option,
    host_forward_option,
    override_options,
    pass_ctx,
    sanitize_for_terminal,
    seconds_option,
    spec_file_option,
    spec_inputs,
    stream_to_stderr,
    timeout_option,
    warn_key_env,
)
from microagent.commands.group import CommandGroup
from microagent.commands.table import Column, plural, render
from microagent.errors import UsageError

if TYPE_CHECKING:
    from microagent.workspace.reports import StartReport
    from microagent.workspace.snapshots import SnapshotReport
    from microagent.workspace.templates import WarmReport


@click.command()
@spec_file_option
@override_options
@timeout_option
@host_forward_option
@cache_from_option
@cache_to_option
@cache_control_options
@click.option(
    "--warm",
    is_flag=True,
    help="Start from the spec's warm template (made by booting once until ready if there is "
    "none): `start` resumes a ready agent instead of booting. Same as `warm: true`.",
)
@pass_ctx
def create(
    ctx: Ctx,
    /,
    *,
    spec_file: Path,
    timeout: float | None,
    host_forward: tuple[str, ...],
    cache_from: tuple[str, ...],
    cache_to: str | None,
    warm: bool,
    **kwargs: Any,
) -> None:
    """Build (or reuse) the spec's steps and make a persistent workspace."""
    control = cache_control(kwargs)
    overrides, env = spec_inputs(kwargs)
    warn_key_env(env.names)
    report = ctx.api(output=stream_to_stderr).create(
        spec_file,
        overrides,
        env,
        forwards=host_forward,
        timeout=timeout,
        cache_from=cache_from,
        cache_to=cache_to,
        control=control,
        warm=warm,
    )
    text = (
        f"created {report.workspace.name} in {report.seconds:.2f}s "
        f"({report.rootfs.built} setup steps built, {report.rootfs.cached} cached, "
        f"{report.boots} setup boots)"
    )
    ctx.emit(report.to_json(), text + _warm_text(report.warm))


def _warm_text(warm: WarmReport | None) -> str:
    if warm is None:
        return ""
    key = warm.key.removeprefix("sha256:")[:12]
    if warm.error:
        return f"; template {key} not made (the workspace boots cold): {warm.error}"
    if warm.made:
        return (
            f"; template {key} made (ready after {warm.ready_seconds:.1f}s); "
            "suspended: `start` resumes it"
        )
    return f"; warm: forked from template {key}; suspended: `start` resumes it"


@click.command()
@click.argument("name", shell_complete=workspace_names)
@click.option("--wait", "wait_", is_flag=True, help="Block until the entrypoint exits.")
@seconds_option(
    "With --wait: stop waiting after this many seconds (the workspace keeps running); "
    "0: do not wait.",
    zero="do not wait",
)
@click.option(
    "--from",
    "from_tag",
    metavar="TAG",
    help="Restore snapshot TAG (memory and disks as they were) instead of booting.",
)
@pass_ctx
def start(ctx: Ctx, /, name: str, wait_: bool, timeout: float | None, from_tag: str | None) -> None:
    """Boot a workspace; its disk is kept from earlier runs. A suspended one resumes."""
    if timeout and not wait_:
        hint = f"microagent start {name} --wait --timeout {timeout:g}"
        raise UsageError("--timeout needs --wait", hint=hint)
    report = ctx.api().start(name, wait=wait_ and timeout != 0, timeout=timeout, from_tag=from_tag)
    text = f"{name}: {report.state}"
    if report.timed_out:
        text = f"{name}: still {report.state} after {timeout or 0:g}s; it keeps running"
    elif wait_ and timeout == 0:
        text += " (not waited for: --timeout 0); it keeps running"
    elif report.exit_code is not None:
        text += f" (exit code {report.exit_code})"
    data = report.to_json()
    ctx.emit(data, text, error=envelope.workspace_outcome(data, name, timeout=timeout))
    if not ctx.json:
        _start_next_steps(report)
    if report.timed_out:
        raise click.exceptions.Exit(124)
    if report.failed:
        raise click.exceptions.Exit(report.exit_code or 1)


def _start_next_steps(report: StartReport) -> None:
    """After ``start --wait``: what failed (the output's last lines) and what to run next."""
    name = report.workspace
    if report.timed_out:
        lines = [
            f"`microagent wait {name}` blocks until it ends, `microagent logs -f {name}` "
            f"follows its console, `microagent halt {name}` stops it"
        ]
    elif report.failed:
        lines = [f"{name}: {report.detail}"] if report.detail else []
        if report.output_tail:
            lines.append(f"last {plural(len(report.output_tail), 'line')} of the output:")
            lines += [f"  | {line}" for line in report.output_tail]
        lines.append(
            f"next: `microagent logs {name}` (the whole console), "
            f"`microagent result {name}` (the report and outputs)"
        )
    else:
        return
    click.echo(sanitize_for_terminal("\n".join(lines)), err=True)


@click.command()
@click.argument("name", shell_complete=workspace_names)
@pass_ctx
def status(ctx: Ctx, /, name: str) -> None:
    """State, readiness and (once ready) the result of a workspace."""
    data = ctx.api().status(name)
    event = data["event"]
    text = f"{name}: {event['state']}" + (f" ({event['detail']})" if event["detail"] else "")
    for port in data.get("network", {}).get("ports", []):
        where = f"{port['host']}:{port['hostPort']} -> guest {port['guestPort']}/{port['protocol']}"
        text += f"\npublished: {where}" + (" (listening)" if port["live"] else "")
    if data.get("restarts"):
        text += f"\nrestarts: {data['restarts']} (policy {data['restartPolicy']})"
    if data.get("snapshots"):
        text += f"\nsnapshots: {', '.join(data['snapshots'])}"
    if data.get("template"):
        text += f"\ntemplate: {data['template']}"
    if data["result"] is not None:
        text += f"\nresult: exit code {data['result'].get('exitCode')}"
    error = envelope.workspace_outcome(data, name, detail=event["detail"])
    ctx.emit(data, sanitize_for_terminal(text), error=error)


@click.command()
@click.argument("name", shell_complete=workspace_names)
@pass_ctx
def result(ctx: Ctx, /, name: str) -> None:
    """The guest's report and the declared outputs (the agent's WorkResult)."""
    payload = ctx.api().result(name)
    text = sanitize_for_terminal(_result_text(payload))
    ctx.emit({"ok": True, "workspace": name, "result": payload}, text)


def _result_text(payload: dict[str, Any]) -> str:
    work = payload.get("workResult")
    head = f"exit code {payload.get('exitCode')}"
    if not isinstance(work, dict):
        why = next((f": {o['error']}" for o in payload.get("outputs") or () if o.get("error")), "")
        tail = payload.get("stderr") or payload.get("stdout") or ""
        return f"{head}; no WorkResult (declared output `result`){why}\n{tail}".rstrip()
    lines = [f"{work.get('request_id', '?')}: {work.get('status', '?')} ({head})"]
    if work.get("error"):
        lines.append(f"error: {work['error']}")
    lines.append(str(work.get("content") or ""))
    return "\n".join(lines)


def _halt_command(verb: str, about: str) -> click.Command:
    @click.command(verb, help=about)
    @click.argument("name", shell_complete=workspace_names)
    @seconds_option(
        "Seconds to wait for a clean shutdown before the VM is killed (more than 0).",
        default=30.0,
        hint="to stop at once without a clean shutdown: microagent kill NAME",
    )
    @pass_ctx
    def command(ctx: Ctx, /, name: str, timeout: float) -> None:
        state = ctx.api().halt(name, timeout=timeout)
        ctx.emit({"ok": True, "workspace": name, "state": state.value}, f"{name}: {state.value}")

    return command


halt = _halt_command("halt", "Shut the VM down cleanly (the disk is kept).")
stop = _halt_command("stop", "Alias of halt: shut the VM down cleanly (the disk is kept).")


@click.command()
@click.argument("name", shell_complete=workspace_names)
@pass_ctx
def kill(ctx: Ctx, /, name: str) -> None:
    """Stop the VM now (SIGKILL, no clean shutdown); the next start checks the disk."""
    report = ctx.api().kill(name)
    if report.killed:
        text = f"{name}: killed ({report.state})"
    else:
        text = f"{name}: nothing to kill (already {report.state})"
    ctx.emit(report.to_json(), text)


@click.command()
@click.argument("name", shell_complete=workspace_names)
@pass_ctx
def pause(ctx: Ctx, /, name: str) -> None:
    """Freeze a running workspace's vCPUs (memory kept; exec waits for resume)."""
    state = ctx.api().pause(name)
    ctx.emit({"ok": True, "workspace": name, "state": state.value}, f"{name}: {state.value}")


@click.command()
@click.argument("name", shell_complete=workspace_names)
@pass_ctx
def resume(ctx: Ctx, /, name: str) -> None:
    """Thaw a paused workspace and set its guest clock to the host's."""
    state, clock = ctx.api().resume(name)
    data = {"ok": True, "workspace": name, "state": state.value, "clock": clock}
    ctx.emit(data, f"{name}: {state.value} ({clock})")


def _snapshot_text(report: SnapshotReport) -> str:
    return (
        f"{report.workspace}: snapshot {report.tag} ({report.state_bytes / 2**20:.1f} MiB of VM "
        f"state, {report.disk_bytes / 2**20:.1f} MiB on disk in all; vCPUs stopped "
        f"{report.seconds:.2f}s); {report.state}"
    )


@click.group(cls=CommandGroup)
def snapshot() -> None:
    """Save, list and remove a workspace's memory+disk snapshots (start --from restores)."""


@snapshot.command("create")
@click.argument("name", shell_complete=workspace_names)
@click.argument("tag", required=False)
@click.option("--stop", is_flag=True, help="Stop the VM afterwards (as suspend does).")
@pass_ctx
def snapshot_create(ctx: Ctx, /, name: str, tag: str | None, stop: bool) -> None:
    """Save a running or paused workspace as TAG (default snap-YYYYMMDD-HHMMSS)."""
    report = ctx.api().snapshot_create(name, tag, stop=stop)
    ctx.emit(report.to_json(), _snapshot_text(report))


@snapshot.command("ls")
@click.argument("name", shell_complete=workspace_names)
@pass_ctx
def snapshot_ls(ctx: Ctx, /, name: str) -> None:
    """A workspace's snapshots: tag, creation time, size."""
    rows = ctx.api().snapshot_list(name)
    columns = [Column("TAG"), Column("CREATED", shrink=False), Column("SIZE", right=True)]
    cells = [
        (r["tag"], r.get("createdAt") or "-", f"{r['size'] / 2**20:.1f} MiB")
        if "error" not in r
        else (r["tag"], "-", sanitize_for_terminal(r["error"]))
        for r in rows
    ]
    text = render(columns, cells) if rows else f"{name}: no snapshots"
    ctx.emit({"ok": True, "workspace": name, "snapshots": rows}, text)


@snapshot.command("rm")
@click.argument("name", shell_complete=workspace_names)
@click.argument("tag")
@pass_ctx
def snapshot_rm(ctx: Ctx, /, name: str, tag: str) -> None:
    """Remove snapshot TAG of a workspace (idempotent)."""
    removed = ctx.api().snapshot_remove(name, tag)
    text = f"{name}: snapshot {tag} {'removed' if removed else 'not found'}"
    ctx.emit({"ok": True, "workspace": name, "tag": tag, "removed": removed}, text)


@click.command()
@click.argument("name", shell_complete=workspace_names)
@click.argument("tag")
@click.argument("new_name", metavar="NEWNAME")
@click.option("--no-start", is_flag=True, help="Leave the new workspace suspended.")
@pass_ctx
def fork(ctx: Ctx, /, name: str, tag: str, new_name: str, no_start: bool) -> None:
    """A new workspace resumed from snapshot TAG of NAME, with its own copy of the disks."""
    report = ctx.api().fork(name, tag, new_name, start=not no_start)
    data = {**report.to_json(), "source": name, "tag": tag}
    ctx.emit(data, f"{new_name}: {report.state} (forked from {name} snapshot {tag})")


@click.command()
@click.argument("name", shell_complete=workspace_names)
@pass_ctx
def suspend(ctx: Ctx, /, name: str) -> None:
    """Snapshot a running workspace and stop it; `start NAME` resumes it where it was."""
    report = ctx.api().suspend(name)
    ctx.emit(report.to_json(), _snapshot_text(report))


@click.command()
@click.argument("name", shell_complete=workspace_names)
@seconds_option(
    "Give up after this many seconds (exit code 124); 0: look once, do not wait.",
    zero="look once",
)
@pass_ctx
def wait(ctx: Ctx, /, name: str, timeout: float | None) -> None:
    """Block until the workspace is stopped or halted (exit 0) or failed (exit 1)."""
    report = ctx.api().wait(name, timeout=timeout)
    text = f"{name}: {report.state}"
    if report.timed_out:
        text = f"{name}: still {report.state} after {timeout:g}s"
    data = report.to_json()
    ctx.emit(data, text, error=envelope.workspace_outcome(data, name, timeout=timeout))
    if report.exit_code:
        raise click.exceptions.Exit(report.exit_code)


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=workspace_names)
@yes_option
@click.option(
    "--force", "-f", is_flag=True, help="Kill a running workspace first (still asks, see -y)."
)
@pass_ctx
def delete(ctx: Ctx, /, names: tuple[str, ...], yes: bool, force: bool) -> None:
    """Remove workspaces: record, disks and logs (idempotent).

    Asks first on a terminal; anywhere else give -y."""
    what = f"delete {'workspace' if len(names) == 1 else 'workspaces'} {', '.join(names)}"
    confirm(what + (" (killing any that runs)" if force else ""), yes=yes)
    results = ctx.api().delete(names, force=force)
    lines = [f"{r['workspace']}: {'deleted' if r['deleted'] else 'not found'}" for r in results]
    ctx.emit({"ok": True, "results": results}, "\n".join(lines))


@click.command("list")
@pass_ctx
def list_(ctx: Ctx, /) -> None:
    """All workspaces and their states."""
    rows = ctx.api().list_workspaces()
    columns = [Column("NAME"), Column("STATE", shrink=False), Column("OBSERVED", shrink=False)]
    text = render(columns, [(r["name"], r["state"], r["observedAt"]) for r in rows])
    ctx.emit({"ok": True, "workspaces": rows}, text if rows else "no workspaces")


def _uptime(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@click.command()
@pass_ctx
def ps(ctx: Ctx, /) -> None:
    """Live workspaces (starting, running, stopping): VMM pid, uptime, restarts."""
    rows = ctx.api().ps()
    columns = [Column("NAME"), Column("STATE", shrink=False)]
    columns += [Column(t, right=True, shrink=False) for t in ("PID", "UPTIME", "RESTARTS")]
    cells = [
        (r["name"], r["state"], r["pid"], _uptime(r["uptimeSeconds"]), r["restarts"]) for r in rows
    ]
    ctx.emit({"ok": True, "workspaces": rows}, render(columns, cells))


@click.command()
@click.argument("name", shell_complete=workspace_names)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the workspace stops.")
@pass_ctx
def logs(ctx: Ctx, /, name: str, follow: bool) -> None:
    """The serial console: guest boot messages and the entrypoint's output.

    With --json: records {line, text}, in one document, or with -f one record per line."""
    api = ctx.api()
    api.workspace(name)  # a missing workspace is an error before anything is printed
    chunks = api.logs(name, follow=follow)
    if ctx.json and follow:
        for record in console_records(chunks):  # one JSON object per line, as they come
            click.echo(json.dumps(record, separators=(",", ":")))
    elif ctx.json:
        _json_document({"workspace": name}, "records", console_records(chunks))
    else:
        write = GuestOutput(lambda: sys.stdout)  # exact to a pipe, sanitized to a terminal
        for chunk in chunks:
            write(chunk)


def console_records(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The console as records ``{line, text}``, one per line (1-based; the text decoded with
    invalid UTF-8 replaced, without its line end), the last one even without a newline."""
    pending, number = b"", 0
    for chunk in chunks:
        *complete, pending = (pending + chunk).split(b"\n")
        for raw in complete:
            number += 1
            yield {"line": number, "text": raw.removesuffix(b"\r").decode("utf-8", "replace")}
    if pending:
        yield {"line": number + 1, "text": pending.decode("utf-8", "replace")}


def _json_document(
    payload: dict[str, Any],
    key: str,
    items: Iterable[dict[str, Any]],
    after: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """The envelope of ``payload`` with ``key: [items...]`` written item by item (a log can
    be long), then the keys ``after()`` gives once the items are out."""
    head = json.dumps(envelope.document(payload))[:-1]
    click.echo(f'{head}, "{key}": [', nl=False)
    for i, item in enumerate(items):
        click.echo(("," if i else "") + "\n  " + json.dumps(item), nl=False)
    tail = "".join(
        f", {json.dumps(k)}: {json.dumps(v)}" for k, v in (after() if after else {}).items()
    )
    click.echo(f"\n]{tail}}}")


@click.command()
@click.argument("name", shell_complete=workspace_names)
@pass_ctx
def events(ctx: Ctx, /, name: str) -> None:
    """The workspace's lifecycle history."""
    items = ctx.api().events(name)
    columns = [Column("TIME", shrink=False), Column("EVENT", shrink=False), Column("DETAIL")]
    cells = [
        [sanitize_for_terminal(str(e.get(k) or "")) for k in ("observedAt", "event", "detail")]
        for e in items
    ]
    ctx.emit({"ok": True, "events": items}, render(columns, cells) if items else "no events")


# Every control character (C0 with newline and tab, DEL, C1) and the bidi overrides: an
# entry's strings come from the guest, and each entry must stay one inert line.
_AUDIT_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_AUDIT_COLUMNS = (  # (title, width); the last column is not padded
    ("TIME", 25),
    ("KIND", 7),
    ("CREDENTIAL/HOST", 28),
    ("METHOD", 8),
    ("PATH", 32),
    ("STATUS", 7),
    ("IN", 10),
    ("OUT", 10),
    ("MS", 8),
    ("DECISION", 9),
    ("REASON", 0),
)


def _audit_field(value: object) -> str:
    if value is None or value == "":
        return "-"
    return _AUDIT_UNSAFE.sub("", str(value))


def _audit_row(cells: list[str]) -> str:
    parts = [
        cell.rjust(width - 1) + " " if title in ("STATUS", "IN", "OUT", "MS") else cell.ljust(width)
        for cell, (title, width) in zip(cells, _AUDIT_COLUMNS, strict=True)
    ]
    return "".join(parts).rstrip()


def audit_line(entry: dict[str, Any]) -> str:
    """One aligned line for an audit entry, control characters stripped."""
    target = entry.get("credential") if entry.get("kind") == "broker" else entry.get("host")
    if entry.get("kind") == "egress" and entry.get("port") not in (None, ""):
        target = f"{target}:{entry.get('port')}"
    keys = ("time", "kind", None, "method", "path", "status", "bytesIn", "bytesOut")
    cells = [_audit_field(target if key is None else entry.get(key)) for key in keys]
    cells += [_audit_field(entry.get(k)) for k in ("durationMs", "decision")]
    reason = entry.get("reason")
    cells.append(_AUDIT_UNSAFE.sub("", str(reason)) if reason else "")
    return _audit_row(cells)


@click.command()
@click.argument("name", shell_complete=workspace_names)
@click.option(
    "--follow", "-f", is_flag=True, help="Keep printing new entries until the workspace stops."
)
@pass_ctx
def audit(ctx: Ctx, /, name: str, follow: bool) -> None:
    """Every brokered API call and egress decision of a workspace (its audit log)."""
    items = ctx.api().audit(name, follow=follow)
    if ctx.json and follow:
        for entry in items:  # one JSON object per line, as they come
            click.echo(json.dumps(entry, separators=(",", ":")))
    elif ctx.json:
        _audit_document(name, items)
    else:
        click.echo(_audit_row([title for title, _ in _AUDIT_COLUMNS]))
        for entry in items:
            click.echo(audit_line(entry))


def _audit_document(name: str, items: Iterator[dict[str, Any]]) -> None:
    """``{ok, workspace, entries[], summary}``, written entry by entry (a log can be long)."""
    # deferred: the workspace package is loaded by the command that reads a workspace
    from microagent.workspace.audit import Tally

    tally = Tally()

    def counted() -> Iterator[dict[str, Any]]:
        for entry in items:
            tally.add(entry)
            yield entry

    _json_document({"workspace": name}, "entries", counted(), lambda: {"summary": tally.to_json()})


COMMANDS = [
    create,
    start,
    status,
    result,
    halt,
    stop,
    kill,
    wait,
    delete,
    list_,
    ps,
    logs,
    events,
    audit,
    pause,
    resume,
    snapshot,
    suspend,
    fork,
]
