"""Shell completion: ``completion bash|zsh|fish`` prints the script, and
:func:`workspace_names` completes a workspace NAME argument from the store.

The script calls ``microagent`` back with ``_<PROG>_COMPLETE=<shell>_complete`` set (click's
protocol); :func:`microagent.cli.main` hands that to click before any command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from microagent.commands.context import Ctx, pass_ctx
from microagent.errors import MicroagentError

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

PROG = "microagent"
COMPLETE_VAR = f"_{PROG.upper()}_COMPLETE"  # click's name for it, from the program's
SHELLS = ("bash", "zsh", "fish")
INSTALL = {
    "bash": 'eval "$(microagent completion bash)"   # in ~/.bashrc',
    "zsh": 'eval "$(microagent completion zsh)"    # in ~/.zshrc',
    "fish": "microagent completion fish > ~/.config/fish/completions/microagent.fish",
}


def workspace_names(
    ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """The workspaces in the store (``--home`` if it was typed) whose name starts with
    ``incomplete``; nothing when the store cannot be read (completion never fails)."""
    # deferred: click loads its completion module only when completing; so does this
    from click.shell_completion import CompletionItem

    home = ctx.find_root().params.get("home")
    try:
        workspaces = Ctx(home=home if isinstance(home, Path) else None).api(quiet=True).workspaces
        names = [ws.name for ws in workspaces]
    except (MicroagentError, OSError):
        return []
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]


def script(root: click.Command, shell: str) -> str:
    """The completion script ``shell`` sources for the ``microagent`` command ``root``."""
    # deferred: only this command and completing need click's completion module
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    if cls is None:  # click.Choice has already refused any other shell
        raise MicroagentError(f"click has no completion for {shell}")
    return cls(root, {}, PROG, COMPLETE_VAR).source()


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@pass_ctx
def completion(ctx: Ctx, /, shell: str) -> None:
    """Print the shell completion script for bash, zsh or fish.

    \b
    bash: eval "$(microagent completion bash)"   (in ~/.bashrc)
    zsh:  eval "$(microagent completion zsh)"    (in ~/.zshrc)
    fish: microagent completion fish > ~/.config/fish/completions/microagent.fish

    Commands, options and workspace names complete."""
    root = click.get_current_context().find_root().command
    text = script(root, shell)
    ctx.emit({"ok": True, "shell": shell, "install": INSTALL[shell], "script": text}, text.rstrip())


COMMANDS = [completion]
