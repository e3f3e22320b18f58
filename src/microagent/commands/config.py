"""``config show``: the effective settings and where each one came from.

Every setting comes from one of: a flag (``--home``), an environment variable
(``MICROAGENT_*``), the user config file (with the line it is written on) or the default.
The config file is read strictly, so this is also the way to check it: a typo or a YAML error
is reported with FILE:LINE:COL and a hint, and exits 2.
"""

from __future__ import annotations

import os
from typing import Any

import click

from microagent.commands.context import Ctx, pass_ctx
from microagent.commands.group import CommandGroup


@click.group(cls=CommandGroup)
def config() -> None:
    """The user config file and the environment: what microagent will use."""


@config.command("show")
@pass_ctx
def config_show(ctx: Ctx) -> None:
    """Print the effective settings and where each came from (default, config file,
    environment variable or flag)."""
    # deferred: the settings are read here, not when the CLI starts
    from microagent.settings import CONFIG_ENV, explain

    settings, rows = explain(home=ctx.home)
    path = settings.config_file
    assert path is not None
    from_env = bool(os.environ.get(CONFIG_ENV))
    config_file = {
        "path": str(path),
        "exists": path.is_file(),
        "source": "environment" if from_env else "default",
        "origin": CONFIG_ENV if from_env else "",
    }
    shown = [_with_default(row.to_json()) for row in rows]
    data = {"ok": True, "configFile": config_file, "settings": shown}
    ctx.emit(data, _render(config_file, shown))


def _with_default(row: dict[str, Any]) -> dict[str, Any]:
    """A setting left to the guest kit's own default (the Debian mirror, suite, keyring)
    shows that default, not null."""
    if row["value"] is not None or row["source"] != "default":
        return row
    # deferred: the guest kit's defaults are needed only here
    from microagent.kit import debian

    defaults = {
        "debianMirror": debian.DEFAULT_MIRROR,
        "debianSuite": debian.DEFAULT_SUITE,
        "debianKeyring": str(debian.DEFAULT_KEYRING),
    }
    if row["name"] in defaults:
        return {**row, "value": defaults[row["name"]]}
    return row


def _value_text(name: str, value: Any) -> str:
    if value is None:
        return "(the guest kit's)" if name in ("kernel", "initrd") else "(none)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "(none)"
    return str(value)


def _source_text(row: dict[str, Any]) -> str:
    if row["source"] == "default":
        return "default"
    return f"{row['source']} ({row['origin']})"


def _render(config_file: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    where = "" if config_file["source"] == "default" else f", from ${config_file['origin']}"
    state = "" if config_file["exists"] else " (not found: nothing set there)"
    head = f"config file: {config_file['path']}{where}{state}"
    cells = [("SETTING", "VALUE", "SOURCE")]
    cells += [(r["name"], _value_text(r["name"], r["value"]), _source_text(r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in cells]
    return "\n".join([head, *lines])


COMMANDS = [config]
