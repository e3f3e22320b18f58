"""What every command module shares: the context object, output, and the common flags.

Commands parse flags, call the library (:class:`microagent.api.Microagent`) and render text or
``--json``. The settings are read once, on first use, from the environment and the user
config file.

What a guest wrote (its console, its output, its result) never reaches a terminal as control
or escape sequences: text meant for people goes through :func:`sanitize_for_terminal`, and a
guest's raw bytes through :class:`GuestOutput`, which keeps them exact only for a file or a
pipe. ``--json`` is exact: JSON escapes every control character.
"""

from __future__ import annotations

import codecs
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click

from microagent.commands import envelope
from microagent.commands.progress import LiveReporter, PlainReporter, ProgressMode, reporter_for

if TYPE_CHECKING:
    from microagent.api import Microagent
    from microagent.compiler.overrides import Overrides, RuntimeEnv
    from microagent.errors import MicroagentError
    from microagent.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


def _quiet(_message: str) -> None:
    return None


def _to_stderr(message: str) -> None:
    click.echo(message, err=True)


def _tty_only(message: str) -> None:
    if sys.stderr.isatty():
        click.echo(message, err=True)


# C0 controls but newline and tab (ESC starts every escape sequence; a lone CR rewrites the
# line), DEL, C1 controls (8-bit CSI, OSC), and the bidi overrides that reorder what is shown.
# Compiled by re on first use (~0.3 ms), not at import: most runs print nothing through it.
_TERMINAL_UNSAFE = r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def sanitize_for_terminal(text: str) -> str:
    """``text`` safe to print on a terminal: every control character it could act on (escape
    sequences such as colours, screen clears or OSC 52 clipboard writes; C1 controls; bidi
    overrides) is shown as a visible escape (``\\x1b``); newlines and tabs stay, a CR before a
    newline is dropped."""
    return re.sub(_TERMINAL_UNSAFE, _visible, text.replace("\r\n", "\n"))


class GuestOutput:
    """Writes a guest's raw bytes to a stream: exactly as they are for a file or a pipe, and
    decoded (invalid UTF-8 replaced) and put through :func:`sanitize_for_terminal` for a
    terminal, so a guest can never drive the user's terminal."""

    def __init__(self, stream: Callable[[], TextIO]) -> None:
        self._stream = stream  # looked up on each write: tests swap sys.stdout
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._cr = ""  # a CR that ended the last piece: the start of a CRLF, or a lone one

    def __call__(self, data: bytes) -> None:
        stream = self._stream()
        if stream.isatty():
            text = self._cr + self._decoder.decode(data)
            self._cr = "\r" if text.endswith("\r") else ""
            stream.write(sanitize_for_terminal(text.removesuffix("\r")))
        else:
            stream.flush()
            stream.buffer.write(data)
        stream.flush()


def _stderr() -> TextIO:
    return sys.stderr


def _stdout() -> TextIO:
    return sys.stdout


# A guest's live output: setup steps to stderr (stdout is for results), `run` to stdout.
stream_to_stderr = GuestOutput(_stderr)
stream_to_stdout = GuestOutput(_stdout)


@dataclass
class Ctx:
    json: bool = False
    debug: bool = False
    home: Path | None = None
    progress: ProgressMode = ProgressMode.AUTO
    _settings: Settings | None = field(default=None, repr=False)
    _reporter: PlainReporter | LiveReporter | None = field(default=None, repr=False)

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
            self.reporter()(message)

    def reporter(self) -> PlainReporter | LiveReporter:
        """Where progress goes (``--progress``): a live view on a terminal, else lines on
        stderr; made once, and closed when the command ends (failed or not)."""
        if self._reporter is None:
            self._reporter = reporter_for(
                self.progress, sanitize_for_terminal, _to_stderr, isatty=sys.stderr.isatty()
            )
            click_ctx = click.get_current_context(silent=True)
            if click_ctx is not None:
                click_ctx.find_root().call_on_close(self._reporter.close)
        return self._reporter

    def api(
        self, *, say: Callable[[str], None] | None = None, output: Any = None, quiet: bool = False
    ) -> Microagent:
        """The library over this invocation's settings. Progress (``say``: the reporter
        unless given) and a setup step's output go to the reporter; nothing with --json."""
        from microagent.api import Microagent  # deferred: the library is heavy; --help is not

        return Microagent(
            self.settings,
            say=_quiet if quiet or self.json else self._say(say),
            output=None if self.json else self._output(output),
            notice=_quiet if quiet else self._notice(),  # retries: on stderr, even with --json
        )

    def _say(self, say: Callable[[str], None] | None) -> Callable[[str], None]:
        if say is None:
            return self.reporter()
        if say is _tty_only:  # progress only where someone watches: a terminal, or asked for
            live = self.progress is not ProgressMode.AUTO or sys.stderr.isatty()
            return self.reporter() if live else _quiet
        return say

    def _output(self, output: Any) -> Any:
        """A setup step's output: under its row in the live view, else as it comes."""
        reporter = self.reporter() if output in (stream_to_stderr, stream_to_stdout) else None
        if not isinstance(reporter, LiveReporter):
            return output
        return reporter.output if output is stream_to_stderr else reporter.ending_before(output)

    def _notice(self) -> Callable[[str], None]:
        return _to_stderr if self.json else self.reporter()

    def emit(
        self, data: dict[str, Any], text: str, *, error: MicroagentError | None = None
    ) -> None:
        """Print ``data`` as the ``--json`` envelope (see :mod:`.envelope`), else ``text``.
        ``error``: the outcome failed (``ok: false`` with this error object)."""
        if self._reporter is not None:
            self._reporter.close()  # the live view ends before the outcome is printed
        if self.json:
            click.echo(envelope.dumps(data, error))
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


PUBLISH_HELP = (
    "Publish a guest port: [HOST:]HOSTPORT:GUESTPORT[/tcp] listens on the host's HOST "
    "(default 127.0.0.1) while the VM runs and reaches the guest's GUESTPORT (repeatable; "
    "user network only)."
)
publish_option = click.option(
    "--publish",
    "-p",
    "publish",
    multiple=True,
    metavar="[HOST:]HOSTPORT:GUESTPORT",
    help=PUBLISH_HELP,
)


def credential_option(names: str) -> Callable[[F], F]:
    """``--credential NAME[=SOURCE]``: ``names`` says what NAME may be."""
    return click.option(
        "--credential",
        "credentials",
        multiple=True,
        metavar="NAME[=SOURCE]",
        help=f"Broker this API key (repeatable): {names}; SOURCE (env:VAR or file:PATH) "
        "replaces where the host reads the key. The guest never gets it.",
    )


credential_upstream_option = click.option(
    "--credential-upstream",
    "credential_upstreams",
    multiple=True,
    metavar="NAME=URL",
    help="Send credential NAME's calls to URL instead (https, or http to a loopback "
    "host; repeatable).",
)


def override_options(func: F) -> F:
    """Flags that override the spec: the same on validate, plan, build and create."""
    options = [
        click.option("--name", help="Workspace name (overrides `name`)."),
        click.option("--image", help="Base image (overrides `image`)."),
        click.option("--profile", help="Resource profile: tiny, small, medium, large."),
        click.option(
            "--memory", "memory_mib", type=int, help="Guest memory in MiB (64 to 1048576)."
        ),
        click.option("--cpus", "cpu_count", type=int, help="Virtual CPUs (1 to 64)."),
        click.option(
            "--size-mib",
            "size_mib",
            type=int,
            help="Writable disk size in MiB (up to 16777216; 0: from the profile).",
        ),
        click.option("--entrypoint", help="Command every start runs (shell string)."),
        click.option("--hostname", help="Guest hostname."),
        click.option("--network", help="Network mode: user or isolated."),
        publish_option,
        click.option("--setup", multiple=True, help="Extra setup command (repeatable, appended)."),
        click.option(
            "--mediation",
            metavar="PORT=HOST:PORT",
            help="Mediation channel: guest 127.0.0.1:PORT reaches host HOST:PORT (required: "
            "start fails while the target is unreachable).",
        ),
        credential_option(
            "a preset (anthropic, openai, gemini) or a credential of the spec, which this "
            "also confirms"
        ),
        credential_upstream_option,
        click.option(
            "--allow",
            "allow",
            multiple=True,
            metavar="HOST",
            help="Allow egress to HOST (or .DOMAIN for every name under it): with any, "
            "egress is default-deny through the host's proxy (repeatable, appended to "
            "network.allow).",
        ),
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


def warn_key_env(names: Iterable[str]) -> None:
    """A warning on stderr (even with --json) for each ``--env`` an SDK reads its API key
    from: the key would be inside the guest; ``--credential`` keeps it on the host."""
    # deferred: the compiler package stays off the path of --help
    from microagent.compiler.credentials import key_env_warnings

    for warning in key_env_warnings(names):
        click.echo(f"warning: {warning}", err=True)


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
        publish=tuple(kwargs.get("publish") or ()),
        setup=tuple(kwargs.get("setup") or ()),
        mediation=kwargs.get("mediation"),
        credentials=tuple(kwargs.get("credentials") or ()),
        credential_upstreams=tuple(kwargs.get("credential_upstreams") or ()),
        allow=tuple(kwargs.get("allow") or ()),
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


def seconds_option(
    help: str, *, default: float | None = None, zero: str = "", hint: str = ""
) -> Callable[[F], F]:
    """``--timeout SECONDS``, checked while the command line is parsed (before anything
    runs): finite, at most 30 days, more than 0 — or 0 too when ``zero`` says what it means."""

    def check(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
        if value is not None:
            # deferred: the compiler package stays off the path of --help
            from microagent.compiler.overrides import check_seconds

            check_seconds("--timeout", value, zero=zero, hint=hint)
        return value

    return click.option(
        "--timeout",
        type=float,
        default=default,
        show_default=default is not None,
        metavar="SECONDS",
        callback=check,
        help=help,
    )


timeout_option = seconds_option("Bound each setup step's VM run (seconds, more than 0).")
