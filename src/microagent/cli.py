"""Command-line interface: a thin layer that parses flags, calls the library and prints.

This is the only module that turns :class:`MicroagentError` into text or a JSON error
envelope and a process exit code. Heavy imports happen inside commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from microagent import __version__
from microagent.commands import envelope
from microagent.commands.context import Ctx, sanitize_for_terminal
from microagent.commands.group import CommandGroup, LazyCommands, add_json_option, did_you_mean
from microagent.commands.progress import ProgressMode
from microagent.errors import (
    EXIT_FAILURE,
    HostIOError,
    MicroagentError,
    SpecNotFoundError,
    UsageError,
)

# The command modules (under microagent.commands) and the commands each one's COMMANDS
# defines, in registration order: a module is imported only when one of its commands runs
# or its help is shown (tests/unit/test_fast_cli.py checks this table against the modules).
COMMAND_MODULES = (
    ("init", ("init",)),
    ("spec", ("validate", "plan", "lock")),
    ("build", ("build",)),
    (
        "workspace",
        (
            *("create", "start", "status", "result", "halt", "stop", "kill", "wait"),
            *("delete", "list", "ps", "logs", "events", "audit"),
            *("pause", "resume", "snapshot", "suspend", "fork"),
        ),
    ),
    ("copy", ("cp",)),
    ("guest", ("exec",)),
    ("run", ("run",)),
    ("image", ("image",)),
    ("cache", ("cache",)),
    ("kernel", ("kernel",)),
    ("doctor", ("doctor",)),
    ("config", ("config",)),
    ("completion", ("completion",)),
)

# Help lists the commands in the order of the work, like the reference CLI's groups.
SECTIONS = (
    ("Getting started", ("init", "doctor", "completion")),
    ("Build from a spec", ("validate", "plan", "lock", "build")),
    (
        "Workspaces",
        ("create", "cp", "start", "exec", "status", "result", "wait", "halt", "stop", "kill"),
    ),
    ("Snapshots", ("pause", "resume", "suspend", "snapshot", "fork")),
    ("Observe", ("list", "ps", "logs", "events", "audit")),
    ("Clean up", ("delete",)),
    ("One-shot VMs", ("run",)),
    ("Images, cache and host", ("image", "cache", "kernel", "config")),
)
# The reference CLI's aliases that are not commands here (`stop` is one: halt's twin).
ALIASES = {"inspect": "status", "rm": "delete", "ls": "list", "log": "logs"}

WORKFLOW = (  # (the command after `microagent`, what it does); NAME is the spec's `name`
    ("validate -f microagent.yaml", "check it: every problem, file:line:col"),
    ("plan -f microagent.yaml", "the build steps; what is cached"),
    ("create -f microagent.yaml", "build (or reuse) them: workspace NAME"),
    ("cp in.json NAME:/workspace/in.json", "put a file into the stopped workspace"),
    ("start NAME --wait", "boot it; wait for the entrypoint"),
    ("status NAME", "its state (`result NAME`: its result)"),
)
MOST_USED = (
    *("validate", "plan", "create", "cp", "start", "status", "result", "logs"),
    *("exec", "halt", "delete", "list", "run", "doctor"),
)


@click.group(
    cls=CommandGroup,
    commands=LazyCommands(
        {
            name: f"microagent.commands.{module}"
            for module, names in COMMAND_MODULES
            for name in names
        },
        prepare=add_json_option,
    ),
    aliases=ALIASES,
    sections=SECTIONS,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    help="Store root (default: $MICROAGENT_HOME or the user cache dir).",
)
@click.option(
    "--progress",
    type=click.Choice([m.value for m in ProgressMode]),
    default=ProgressMode.AUTO.value,
    show_default=True,
    envvar="MICROAGENT_PROGRESS",
    help="Progress on stderr: tty (a live view), plain (lines), auto (tty on a terminal "
    "outside CI; $MICROAGENT_PROGRESS).",
)
@click.option("--version", is_flag=True, help="Show the version and exit.")
@click.pass_context
def cli(
    ctx: click.Context,
    *,
    as_json: bool,
    debug: bool,
    home: Path | None,
    progress: str,
    version: bool,
) -> None:
    """Run AI-agent workspaces in Linux microVMs from one microagent.yaml.

    `microagent` alone shows the workflow; `microagent COMMAND --help` a command's flags.
    """
    state = ctx.find_object(Ctx)
    if state is None:
        state = ctx.obj = Ctx()
    state.json, state.debug, state.home = as_json, debug, home
    state.progress = ProgressMode(progress)
    if version:
        _print_version(as_json)
        ctx.exit(0)
    if ctx.invoked_subcommand is None:
        _print_workflow(as_json)


def _print_version(as_json: bool) -> None:
    if as_json:
        click.echo(envelope.dumps({"version": __version__}))
    else:
        click.echo(f"microagent, version {__version__}")


def _no_spec_hint() -> str:
    """Where a first spec comes from: `init` once it exists, and the examples."""
    examples = "start from examples/minimal-agent/microagent.yaml in the microagent sources"
    if "init" in cli.commands:
        return f"run `microagent init` to scaffold one, or {examples}"
    return f"pass an existing spec with --file PATH, or {examples}"


def _print_workflow(as_json: bool) -> None:
    if as_json:
        workflow = [{"command": f"microagent {c}", "what": w} for c, w in WORKFLOW]
        commands = [
            {"name": name, "group": title, "summary": cli.commands[name].get_short_help_str(1000)}
            for title, names in SECTIONS
            for name in names
            if name in cli.commands
        ]
        click.echo(
            envelope.dumps({"version": __version__, "workflow": workflow, "commands": commands})
        )
        return
    width = max(len(c) for c, _ in WORKFLOW) + len("microagent ")
    lines = [
        "microagent runs AI-agent workspaces in Linux microVMs, from one microagent.yaml.",
        "",
        "The workflow (NAME: the spec's name):",
    ]
    lines += [f"  {f'microagent {c}':<{width}}  {w}" for c, w in WORKFLOW]
    lines += [
        "",
        "No spec yet? " + _no_spec_hint().replace(", or ", ",\n  or ") + ".",
        "New host? `microagent doctor` checks QEMU, KVM and the tools a microVM needs.",
        "",
        "Most used: " + ", ".join(n for n in MOST_USED[:8] if n in cli.commands) + ",",
        "  " + ", ".join(n for n in MOST_USED[8:] if n in cli.commands) + ".",
        "`microagent --help` lists every command, `microagent COMMAND --help` its flags;",
        "--json (before or after the command) prints one JSON document.",
    ]
    click.echo("\n".join(lines))


def _wants(flag: str, args: list[str]) -> bool:
    """Whether ``flag`` is among the options (the words before a ``--``)."""
    head = args[: args.index("--")] if "--" in args else args
    return flag in head


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map errors to exit codes (0 ok, 2 invalid, 1 other)."""
    args = sys.argv[1:] if argv is None else argv
    state = Ctx()  # filled in while the command line is parsed
    try:
        code = cli.main(args=args, prog_name="microagent", standalone_mode=False, obj=state)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:  # a group without a command: its help
        click.echo(exc.ctx.get_help() if exc.ctx is not None else "")
        return 0
    except click.exceptions.Abort:
        if state.json or _wants("--json", args):  # a question on the terminal answered no
            hint = "nothing was changed; -y goes ahead without a question"
            click.echo(envelope.failure(UsageError("aborted: not confirmed", hint=hint)))
        else:
            click.echo("aborted", err=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every failure ends here: one message, traceback only with --debug
        as_json = state.json or _wants("--json", args)
        return _report(exc, as_json, state.debug or _wants("--debug", args))
    return code if isinstance(code, int) else 0  # a command's Exit(code), e.g. `run`


def _usage_error(exc: click.ClickException) -> UsageError:
    """click's usage errors in our shape: the message, and a hint that is not inside it."""
    context = getattr(exc, "ctx", None)
    path = context.command_path if context is not None else "microagent"
    hint = f"`{path} --help` lists the flags"
    if isinstance(exc, click.NoSuchOption):
        message = f"no such option: {exc.option_name}"
        hint = did_you_mean(list(exc.possibilities or ())) or hint  # click's, closest first
    else:
        message = exc.format_message()
        if isinstance(exc, click.MissingParameter | click.BadParameter):
            hint = f"`{path} --help` describes it"
        if isinstance(exc, click.UsageError) and message.startswith("Missing command"):
            hint = f"`{path} --help` lists the commands"
    return UsageError(message[:1].lower() + message[1:].rstrip("."), hint=hint)


def _as_error(exc: Exception) -> MicroagentError:
    if isinstance(exc, SpecNotFoundError):
        exc.hint = _no_spec_hint()
        return exc
    if isinstance(exc, MicroagentError):
        return exc
    if isinstance(exc, click.ClickException):
        return _usage_error(exc)
    if isinstance(exc, OSError):
        return _host_error(exc)
    return MicroagentError(f"internal error: {exc!r}", hint="rerun with --debug and report it")


def _host_error(exc: OSError) -> HostIOError:
    """An OSError that no layer below translated (a bug there, but still said clearly)."""
    from microagent.fsutil import NO_SPACE_HINT, is_no_space, no_space  # deferred: rare path

    if is_no_space(exc):
        if exc.filename:
            return no_space(Path(exc.filename))
        return HostIOError("no space left on device", hint=NO_SPACE_HINT)
    where = f" ({exc.filename})" if exc.filename else ""
    return HostIOError(f"{exc.strerror or exc}{where}")


def _report(exc: Exception, as_json: bool, debug: bool) -> int:
    if debug:
        import traceback  # deferred: only --debug prints one

        traceback.print_exception(exc)
    error = _as_error(exc)
    if as_json:
        click.echo(envelope.failure(error))
        return error.exit_code
    if isinstance(exc, click.UsageError) and exc.ctx is not None:
        click.echo(exc.ctx.get_usage(), err=True)  # exit 2, like every usage error
    text = error.render()
    # messages can carry guest output (a failed setup step)
    click.echo(sanitize_for_terminal(text) if sys.stderr.isatty() else text, err=True)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
