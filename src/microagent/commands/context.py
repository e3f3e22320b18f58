"""What every command module shares: the context object, output, and spec/override flags."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Ctx:
    json: bool = False
    debug: bool = False
    home: Path | None = None

    def emit(self, data: dict[str, Any], text: str) -> None:
        """Print ``data`` as JSON in --json mode, else ``text``."""
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=False))
        elif text:
            click.echo(text)


pass_ctx = click.make_pass_decorator(Ctx)


def spec_file_option(func: F) -> F:
    return click.option(
        "--file",
        "-f",
        "spec_file",
        type=click.Path(path_type=Path),
        default=Path("microagent.yaml"),
        show_default=True,
        help="The spec file (or a folder holding microagent.yaml).",
    )(func)


def override_options(func: F) -> F:
    """Flags that override the spec: the same on plan, build and create."""
    options = [
        click.option("--name", help="Workspace name (overrides `name`)."),
        click.option("--image", help="Base image (overrides `image`)."),
        click.option("--profile", help="Resource profile: tiny, small, medium, large."),
        click.option("--memory", "memory_mib", type=int, help="Guest memory in MiB."),
        click.option("--cpus", "cpu_count", type=int, help="Virtual CPUs."),
        click.option("--size-mib", "size_mib", type=int, help="Writable disk size in MiB."),
        click.option("--entrypoint", help="Command every start runs (shell string)."),
        click.option("--hostname", help="Guest hostname."),
        click.option("--network", help="Network mode: user or isolated."),
        click.option("--setup", multiple=True, help="Extra setup command (repeatable, appended)."),
        click.option(
            "--env",
            "-e",
            "env",
            multiple=True,
            help="Runtime variable NAME=VALUE (or NAME from this shell); never cached or logged.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def overrides_from(kwargs: dict[str, Any]) -> Any:
    from microagent.compiler.overrides import Overrides

    return Overrides(
        name=kwargs.get("name"),
        image=kwargs.get("image"),
        profile=kwargs.get("profile"),
        memory_mib=kwargs.get("memory_mib"),
        cpu_count=kwargs.get("cpu_count"),
        size_mib=kwargs.get("size_mib"),
        entrypoint=kwargs.get("entrypoint"),
        hostname=kwargs.get("hostname"),
        network=kwargs.get("network"),
        setup=tuple(kwargs.get("setup") or ()),
    )
