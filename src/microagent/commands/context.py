"""What every command module shares: the context object, output, and the common flags.

Commands parse flags, call the library (:class:`microagent.api.Microagent`) and render text or
``--json``. The settings are read once, on first use, from the environment and the user
config file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from microagent.api import Microagent
    from microagent.compiler.overrides import Overrides, RuntimeEnv
    from microagent.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


def _quiet(_message: str) -> None:
    return None


def _to_stderr(message: str) -> None:
    click.echo(message, err=True)


def _tty_only(message: str) -> None:
    if sys.stderr.isatty():
        click.echo(message, err=True)


def stream_to_stderr(data: bytes) -> None:
    """A guest's live output (setup steps) goes to stderr, keeping stdout for results."""
    sys.stderr.buffer.write(data)
    sys.stderr.flush()


def stream_to_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@dataclass
class Ctx:
    json: bool = False
    debug: bool = False
    home: Path | None = None
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        """Environment and user config, read once (a broken config file is an error here)."""
        if self._settings is None:
            from microagent.settings import Settings  # deferred: --help needs no settings

            self._settings = Settings.from_environ(home=self.home)
        return self._settings

    def say(self, message: str) -> None:
        """Progress for humans on stderr; nothing in --json mode."""
        if not self.json:
            _to_stderr(message)

    def api(
        self, *, say: Callable[[str], None] | None = None, output: Any = None, quiet: bool = False
    ) -> Microagent:
        """The library over this invocation's settings."""
        from microagent.api import Microagent  # deferred: the library is heavy; --help is not

        chosen = _quiet if quiet or self.json else (say or _to_stderr)
        return Microagent(self.settings, say=chosen, output=None if self.json else output)

    def emit(self, data: dict[str, Any], text: str) -> None:
        """Print ``data`` as JSON in --json mode, else ``text``."""
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=False))
        elif text:
            click.echo(text)


pass_ctx = click.make_pass_decorator(Ctx)
tty_only = _tty_only


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
    """Flags that override the spec: the same on validate, plan, build and create."""
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


def spec_inputs(kwargs: dict[str, Any]) -> tuple[Overrides, RuntimeEnv]:
    """The override flags and the ``--env`` variables of a command that reads a spec."""
    from microagent.compiler.overrides import parse_env  # deferred: imports the schema

    return overrides_from(kwargs), parse_env(kwargs.get("env") or ())


def overrides_from(kwargs: dict[str, Any]) -> Overrides:
    from microagent.compiler.overrides import Overrides  # deferred: imports the schema

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


def cache_from_option(func: F) -> F:
    return click.option(
        "--cache-from",
        "cache_from",
        multiple=True,
        metavar="REF",
        help="Remote cache to take built steps from: a registry repository or oci:DIR "
        "(repeatable; default $MICROAGENT_CACHE_FROM or `cache.from` in the user config).",
    )(func)


def cache_to_option(func: F) -> F:
    return click.option(
        "--cache-to",
        "cache_to",
        metavar="REF",
        help="Publish every built step to this registry repository or oci:DIR "
        "(default $MICROAGENT_CACHE_TO or `cache.to` in the user config).",
    )(func)


HOST_FORWARD_HELP = (
    "GUEST_PORT=HOST_PORT: the guest reaches host 127.0.0.1:HOST_PORT at 10.0.2.100:GUEST_PORT "
    "(e.g. a model proxy). Nothing else on the host is reachable."
)


def host_forward_option(func: F) -> F:
    return click.option(
        "--host-forward",
        "host_forward",
        multiple=True,
        metavar="GUEST=HOST",
        help=HOST_FORWARD_HELP,
    )(func)


def timeout_option(func: F) -> F:
    return click.option("--timeout", type=float, help="Bound each setup step's VM run (seconds).")(
        func
    )
