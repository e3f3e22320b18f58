"""Command groups that help a new user: did-you-mean for a mistyped command, aliases, help
with full one-line summaries in sections, help (exit 0) for a group given no command, and
``--json`` accepted after any command as well as before it; and :class:`LazyCommands`, which
imports a command's module only when that command is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import click

from microagent.commands import envelope
from microagent.commands.context import Ctx
from microagent.errors import UsageError

JSON_HELP = "Print one JSON document (like --json before the command)."
SUMMARY_LIMIT = 1000  # a command's summary is its help's first sentence, never cut


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        state = ctx.find_object(Ctx)
        if state is not None:
            state.json = True


def add_json_option(command: click.Command) -> None:
    """Let ``command`` (and, for a group, every command under it) take ``--json`` itself."""
    if not any(isinstance(p, click.Option) and "--json" in p.opts for p in command.params):
        option = click.Option(
            ["--json"], is_flag=True, expose_value=False, callback=_set_json, help=JSON_HELP
        )
        command.params.append(option)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_json_option(sub)


def suggestions(word: str, choices: Iterable[str], limit: int = 3) -> list[str]:
    """The ``choices`` closest to a mistyped ``word`` (difflib), best first."""
    import difflib  # deferred: only a mistyped word needs it

    return difflib.get_close_matches(word, sorted(set(choices)), n=limit, cutoff=0.6)


def did_you_mean(matches: Sequence[str], render: str = "{}") -> str:
    """``did you mean X?`` / ``did you mean X or Y?``, or "" without a match."""
    shown = [render.format(m) for m in matches]
    if not shown:
        return ""
    if len(shown) == 1:
        return f"did you mean {shown[0]}?"
    return f"did you mean {', '.join(shown[:-1])} or {shown[-1]}?"


class LazyCommands(MutableMapping[str, click.Command]):
    """A group's commands by name, each module imported only when one of its commands is
    looked up (run, or its help shown): a command line pays for one command module, not for
    all of them. ``homes`` maps each name to the module whose ``COMMANDS`` defines it; names
    and their order are known without an import. ``prepare`` runs once on each command loaded
    (what ``add_command`` would have done to it)."""

    def __init__(self, homes: Mapping[str, str], prepare: Callable[[click.Command], None]) -> None:
        self._homes = dict(homes)
        self._prepare = prepare
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded and name in self._homes:
            self._load(self._homes[name])
        return self._loaded[name]

    def _load(self, module_name: str) -> None:
        # __import__, not importlib.import_module: the latter bypasses `python -X importtime`
        module = __import__(module_name, fromlist=["COMMANDS"])
        for command in module.COMMANDS:
            name = command.name
            if self._homes.get(name) == module_name and name not in self._loaded:
                self._prepare(command)
                self._loaded[name] = command
        missing = [n for n, home in self._homes.items() if home == module_name]
        missing = [n for n in missing if n not in self._loaded]
        if missing:  # the table in cli.py names a command the module does not define
            raise LookupError(f"{module_name}.COMMANDS has no {', '.join(missing)}")

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._loaded[name] = command  # replaces what its home would have given

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._homes.pop(name, None)
        self._loaded.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._homes or name in self._loaded

    def __iter__(self) -> Iterator[str]:
        yield from self._homes
        yield from (name for name in self._loaded if name not in self._homes)

    def __len__(self) -> int:
        return len(self._homes) + sum(1 for name in self._loaded if name not in self._homes)


class CommandGroup(click.Group):
    """A :class:`click.Group` with aliases (``aliases={"rm": "delete"}``), help sections
    (``sections=(("Title", ("cmd", ...)), ...)``; commands in none go under "Other commands"),
    did-you-mean, and ``--json`` on every command added."""

    def __init__(
        self,
        *args: Any,
        aliases: Mapping[str, str] | None = None,
        sections: Sequence[tuple[str, Sequence[str]]] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.aliases = dict(aliases or {})
        self.sections = tuple(sections)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        add_json_option(cmd)
        super().add_command(cmd, name)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        word = args[0] if args else ""
        unknown = word and not word.startswith("-") and self.get_command(ctx, word) is None
        if unknown and not ctx.resilient_parsing:  # completing: no error on the terminal
            raise self.unknown(ctx, word)
        name, cmd, rest = super().resolve_command(ctx, args)
        return (cmd.name if cmd is not None else name), cmd, rest

    def unknown(self, ctx: click.Context, word: str) -> UsageError:
        """The error for a command that does not exist, with the closest ones as a hint."""
        path = ctx.command_path
        known = [*self.list_commands(ctx), *self.aliases]
        matches = [self.aliases.get(m, m) for m in suggestions(word, known)]
        hint = did_you_mean(list(dict.fromkeys(matches)), f"`{path} {{}}`")
        return UsageError(
            f"no such command {word!r}", hint=hint or f"`{path} --help` lists the commands"
        )

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if self.no_args_is_help and not ctx.resilient_parsing and set(args) <= {"--json"}:
            if args:
                click.Command.parse_args(self, ctx, args)  # the group's own --json
            self.show_commands(ctx)  # asked for nothing: show what there is, and succeed
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def show_commands(self, ctx: click.Context) -> None:
        """The group's help, or with --json ``{ok, schemaVersion, commands[{name, summary}]}``."""
        state = ctx.find_object(Ctx)
        if state is None or not state.json:
            click.echo(ctx.get_help())
            return
        commands = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                commands.append({"name": name, "summary": cmd.get_short_help_str(SUMMARY_LIMIT)})
        click.echo(envelope.dumps({"commands": commands}))

    def alias_names(self, name: str) -> list[str]:
        return sorted(alias for alias, target in self.aliases.items() if target == name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        listed: dict[str, click.Command] = {}
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                listed[name] = cmd
        placed: set[str] = set()
        sections: list[tuple[str, list[str]]] = []
        for title, members in self.sections:
            names = [n for n in members if n in listed]
            placed.update(names)
            sections.append((title, names))
        rest = [n for n in listed if n not in placed]
        sections.append(("Other commands" if self.sections else "Commands", rest))
        for title, names in sections:
            if names:
                with formatter.section(title):
                    formatter.write_dl([self._row(n, listed[n]) for n in names])

    def _row(self, name: str, cmd: click.Command) -> tuple[str, str]:
        aliases = self.alias_names(name)
        label = f"{name} ({', '.join(aliases)})" if aliases else name
        return label, cmd.get_short_help_str(SUMMARY_LIMIT)
