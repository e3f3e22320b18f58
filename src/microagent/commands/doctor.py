"""``doctor``: can this host run microVMs, and how well?"""

from __future__ import annotations

from typing import Any

import click

from microagent.commands.context import Ctx, pass_ctx
from microagent.commands.table import Column, render
from microagent.errors import ToolError

_MARKS = {"ok": "ok", "warn": "warn", "fail": "FAIL"}


@click.command()
@pass_ctx
def doctor(ctx: Ctx) -> None:
    """Check this host: QEMU, KVM/TCG, networking tools, the guest kit, the store."""
    report = ctx.api().doctor()
    data = report.to_json()
    ctx.emit(data, render_report(data), error=_failed(data))
    if report.verdict == "failed":
        raise click.exceptions.Exit(1)


def _failed(data: dict[str, Any]) -> ToolError | None:
    """A host that cannot run microVMs: the required checks that failed, the first one's hint."""
    failed = [c for c in data["checks"] if c["status"] == "fail" and c["required"]]
    if data["verdict"] != "failed" or not failed:
        return None
    what = "; ".join(f"{c['name']}: {c['detail']}" for c in failed)
    return ToolError(f"this host cannot run microVMs ({what})", hint=failed[0]["hint"])


def render_report(data: dict[str, Any], width: int | None = None) -> str:
    """A STATUS / CHECK / DETAIL table (a hint under the detail of a check that is not ok),
    then the verdict."""
    columns = [Column("STATUS", shrink=False), Column("CHECK"), Column("DETAIL")]
    rows = []
    for check in data["checks"]:
        detail = str(check["detail"])
        if check.get("hint") and check["status"] != "ok":
            detail += f"\nhint: {check['hint']}"
        rows.append((_MARKS.get(check["status"], check["status"]), check["name"], detail))
    return render(columns, rows, width=width) + f"\nverdict: {data['verdict']}"


COMMANDS = [doctor]
