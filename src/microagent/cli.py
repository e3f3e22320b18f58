"""Command-line interface: a thin layer that parses flags, calls the library and prints.

This is the only module that turns :class:`MicroagentError` into text or a JSON error
envelope and a process exit code. Heavy imports happen inside commands.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from microagent import __version__
from microagent.errors import EXIT_FAILURE, EXIT_INVALID, MicroagentError

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="MICROAGENT_HOME",
    help="Store root (default: $MICROAGENT_HOME or the user cache dir).",
)
@click.version_option(__version__, prog_name="microagent")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, debug: bool, home: Path | None) -> None:
    """Run AI-agent workspaces in Linux microVMs from one microagent.yaml."""
    ctx.obj = Ctx(json=as_json, debug=debug, home=home)


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


def _overrides(kwargs: dict[str, Any]) -> Any:
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


@cli.command()
@spec_file_option
@override_options
@pass_ctx
def validate(ctx: Ctx, /, spec_file: Path, **kwargs: Any) -> None:
    """Check a spec and report every problem with file:line:col."""
    from microagent import api
    from microagent.compiler.overrides import parse_env

    parse_env(kwargs.get("env") or ())
    spec = api.load(spec_file, _overrides(kwargs))
    text = f"{spec_file}: ok ({spec.name or 'unnamed'}, {len(spec.setup_steps)} setup steps, "
    text += f"{len(spec.files)} files)"
    ctx.emit({"ok": True, "name": spec.name, "spec": str(spec.source)}, text)


@cli.command()
@spec_file_option
@override_options
@pass_ctx
def plan(ctx: Ctx, /, spec_file: Path, **kwargs: Any) -> None:
    """Show the build steps, their keys, and what is cached or must be built (and why)."""
    from microagent import api
    from microagent.compiler.overrides import parse_env

    env = parse_env(kwargs.get("env") or ())
    report = api.plan(spec_file, _overrides(kwargs), env)
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


def _print_error(exc: MicroagentError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": exc.to_json()}, indent=2))
    else:
        click.echo(exc.render(), err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map errors to exit codes (0 ok, 2 invalid, 1 other)."""
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="microagent", standalone_mode=False)
    except MicroagentError as exc:
        if debug:
            traceback.print_exc()
        _print_error(exc, as_json)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        if as_json:
            error = {"kind": "usage", "message": exc.format_message()}
            click.echo(json.dumps({"ok": False, "error": error}, indent=2))
        else:
            exc.show()
        return EXIT_INVALID
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
