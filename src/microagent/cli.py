"""Command-line interface: a thin layer that parses flags, calls the library and prints.

This is the only module that turns :class:`MicroagentError` into text or a JSON error
envelope and a process exit code. Heavy imports happen inside commands.
"""

from __future__ import annotations

import errno
import json
import sys
import traceback
from pathlib import Path

import click

from microagent import __version__
from microagent.commands import (
    build,
    cache,
    config,
    doctor,
    guest,
    image,
    kernel,
    run,
    spec,
    workspace,
)
from microagent.commands.context import Ctx, sanitize_for_terminal
from microagent.errors import EXIT_FAILURE, MicroagentError, UsageError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    help="Store root (default: $MICROAGENT_HOME or the user cache dir).",
)
@click.version_option(__version__, prog_name="microagent")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, debug: bool, home: Path | None) -> None:
    """Run AI-agent workspaces in Linux microVMs from one microagent.yaml."""
    ctx.obj = Ctx(json=as_json, debug=debug, home=home)


for _module in (spec, build, workspace, guest, run, image, cache, kernel, doctor, config):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def _print_error(exc: MicroagentError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": exc.to_json()}, indent=2))
    elif sys.stderr.isatty():  # messages can carry guest output (a failed setup step)
        click.echo(sanitize_for_terminal(exc.render()), err=True)
    else:
        click.echo(exc.render(), err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map errors to exit codes (0 ok, 2 invalid, 1 other)."""
    args = sys.argv[1:] if argv is None else argv
    as_json, debug = "--json" in args, "--debug" in args
    try:
        code = cli.main(args=args, prog_name="microagent", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every failure ends here: one message, traceback only with --debug
        return _report(exc, as_json, debug)
    return code if isinstance(code, int) else 0  # a command's Exit(code), e.g. `run`


def _as_error(exc: Exception) -> MicroagentError:
    if isinstance(exc, MicroagentError):
        return exc
    if isinstance(exc, click.ClickException):
        return UsageError(exc.format_message())
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return MicroagentError(
                f"no space left on device{where}",
                hint="free disk space, e.g. `microagent cache prune --max-size 10G`, then retry",
            )
        return MicroagentError(f"{exc.strerror or exc}{where}")
    return MicroagentError(f"internal error: {exc!r}", hint="rerun with --debug and report it")


def _report(exc: Exception, as_json: bool, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
    error = _as_error(exc)
    if isinstance(exc, click.ClickException) and not as_json:
        exc.show()
    else:
        _print_error(error, as_json)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
