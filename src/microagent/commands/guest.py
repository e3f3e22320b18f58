"""``exec``: a command in a running workspace, through the guest agent.

The command's stdout and stderr stream live to the matching host streams. Without ``-t``
the guest's bytes go through :class:`GuestOutput` (exact into a pipe or file, control
sequences made visible on a terminal), and SIGINT, SIGTERM and SIGHUP here are sent on to the
command (a third Ctrl-C gives up on it). With ``-t`` the command gets a terminal whose bytes
pass to the host terminal as they are (like ``ssh -t``), its size follows the host's
(SIGWINCH), and with ``-i`` the host terminal is in raw mode so every key, Ctrl-C too, is
a byte for the guest; the terminal is restored however the command ends. ``--json`` collects
the output instead and prints ``{ok, exitCode, stdout, stderr, durationMs, ...}``. The exit
code is the command's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import tty as ttymode
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from microagent.commands.completion import workspace_names
from microagent.commands.context import (
    Ctx,
    GuestOutput,
    pass_ctx,
    sanitize_for_terminal,
    seconds_option,
)
from microagent.errors import MicroagentError, TimedOutError, VMError

if TYPE_CHECKING:
    from microagent.runtime.execclient import ExecControls, ExecIO, ExecResult

GIVE_UP_AFTER = 3  # Ctrl-C presses: the last one stops waiting for the command
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@click.command("exec")
@click.argument("name", shell_complete=workspace_names)
@click.argument("command", nargs=-1, required=True)
@click.option("-i", "--interactive", is_flag=True, help="Send stdin to the command until EOF.")
@click.option("-t", "--tty", "tty", is_flag=True, help="Run the command in a terminal.")
@click.option(
    "-e",
    "--env",
    "env",
    multiple=True,
    metavar="NAME=VALUE",
    help="Add a variable (NAME alone: its value in this shell) to the workspace's environment.",
)
@click.option(
    "-w", "--workdir", help="Working directory (default /workspace if it exists, else /)."
)
@click.option("-u", "--user", help="User name or UID[:GID] in the guest (default root).")
@seconds_option("Kill the command after this many seconds (exit code 124; more than 0).")
@pass_ctx
def exec_(ctx: Ctx, /, name: str, command: tuple[str, ...], **opts: Any) -> None:
    """Run a command in a running workspace: `exec NAME [OPTIONS] -- CMD [ARG...]`.

    The command sees the workspace's environment plus -e; its exit code is the exit code.
    """
    if opts["tty"] and ctx.json:
        raise click.UsageError("-t cannot be combined with --json (output is collected)")
    if opts["tty"] and not sys.stdin.isatty():
        raise click.UsageError("-t needs a terminal on stdin")
    call: dict[str, Any] = {
        "env": _env(opts["env"]),
        "cwd": opts["workdir"],
        "user": opts["user"],
        "tty": opts["tty"],
        "timeout": opts["timeout"],
        "stdin": sys.stdin.fileno() if opts["interactive"] else None,
    }
    api = ctx.api()
    if ctx.json:
        result = api.exec(name, command, **call)
        ctx.emit({**result.to_json(), "workspace": name}, "", error=_failure(name, result))
    else:
        result = _stream(lambda io, size: api.exec(name, command, io=io, size=size, **call), opts)
        if result.exit.error:
            ctx.say(sanitize_for_terminal(f"microagent: {result.exit.error}"))
    raise click.exceptions.Exit(result.exit_code)


def _failure(name: str, result: ExecResult) -> MicroagentError | None:
    """The error object of an exec that could not run its command or ran out of time."""
    if result.exit.error is None:
        return None
    if result.exit.timed_out:
        return TimedOutError(f"exec in {name!r}: {result.exit.error}")
    return VMError(f"exec in {name!r}: {result.exit.error}")


def _env(items: tuple[str, ...]) -> dict[str, str]:
    if not items:
        return {}
    # deferred: the parser imports the spec schema, which an exec without -e does not need
    from microagent.compiler.overrides import parse_env

    return dict(parse_env(items).values)


Run = Callable[["ExecIO", tuple[int, int]], "ExecResult"]


def _stream(run: Run, opts: dict[str, Any]) -> ExecResult:
    """Run with live output, the host's signals and terminal wired to the command."""
    from microagent.runtime.execclient import (  # deferred: --help needs no runtime
        ExecControls,
        ExecIO,
    )

    controls = ExecControls()
    terminal, raw = opts["tty"], opts["tty"] and opts["interactive"]
    if terminal:
        io = ExecIO(_raw_output(sys.stdout), _raw_output(sys.stderr), controls)
    else:
        io = ExecIO(GuestOutput(_stdout), GuestOutput(_stderr), controls)
    try:
        with _forward_signals(controls, terminal), _raw_mode(raw):
            return run(io, terminal_size() if terminal else (24, 80))
    finally:
        controls.close()


def _stdout() -> Any:
    return sys.stdout


def _stderr() -> Any:
    return sys.stderr


def _raw_output(stream: Any) -> Callable[[bytes], None]:
    """The bytes of the command's terminal, as they are (the user asked for a terminal)."""

    def write(data: bytes) -> None:
        stream.buffer.write(data)
        stream.buffer.flush()

    return write


def terminal_size() -> tuple[int, int]:
    """(rows, cols) of the host terminal (24x80 when it cannot say), within 1..65535."""
    try:
        cols, rows = os.get_terminal_size(sys.stdin.fileno())
    except OSError:
        return 24, 80
    return min(rows or 24, 65535), min(cols or 80, 65535)


@contextlib.contextmanager
def _raw_mode(enabled: bool) -> Iterator[None]:
    """The host terminal in raw mode while the command runs; restored on every way out."""
    if not enabled:
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        ttymode.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _forward_signals(controls: ExecControls, terminal: bool) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP go to the command (the third SIGINT gives up on it);
    with a terminal, SIGWINCH resizes it."""
    presses = 0

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal presses
        if signum == signal.SIGINT:
            presses += 1
            if presses >= GIVE_UP_AFTER:
                raise KeyboardInterrupt
        controls.signal(signum)

    def resize(_signum: int, _frame: FrameType | None) -> None:
        controls.resize(*terminal_size())

    handlers: dict[int, Any] = dict.fromkeys(FORWARDED, forward)
    if terminal:
        handlers[signal.SIGWINCH] = resize
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


COMMANDS = [exec_]
