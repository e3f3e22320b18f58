"""The one exception tree of microagent.

Library code raises these; only :mod:`microagent.cli` turns them into text, a JSON error
envelope and a process exit code. Foreign exceptions are translated at the boundary with
``raise ... from exc`` so the original stays available under ``--debug``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from microagent.frozen import Frozen, FrozenOrdered

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2


@dataclass(frozen=True, eq=False, repr=False)
class Location(FrozenOrdered):
    """Where in an input file something is: 1-based line and column."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"

    def to_json(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "column": self.column}


@dataclass(frozen=True, eq=False, repr=False)
class Diagnostic(Frozen):
    """One problem found in an input, with where it is and an optional hint."""

    message: str
    location: Location | None = None
    path: str = ""
    hint: str = ""

    def sort_key(self) -> tuple[str, int, int, str, str]:
        loc = self.location or Location("")
        return (loc.file, loc.line, loc.column, self.path, self.message)

    def headline(self) -> str:
        """``FILE:LINE:COL: path: message``, without the hint."""
        prefix = f"{self.location}: " if self.location else ""
        where = f"{self.path}: " if self.path else ""
        return f"{prefix}{where}{self.message}"

    def render(self) -> str:
        text = self.headline()
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"message": self.message, "path": self.path}
        if self.location:
            out["location"] = self.location.to_json()
        if self.hint:
            out["hint"] = self.hint
        return out


class MicroagentError(Exception):
    """Base of every error microagent raises on purpose.

    ``kind`` names the class of problem in a ``--json`` error object (the enum of
    ``schemas/cli-envelope.schema.json``); ``message`` says what went wrong and ``hint`` what
    to do about it, never inside ``message``. The base class itself stands for a bug.
    """

    exit_code = EXIT_FAILURE
    kind = "internal"

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        return out


class InvalidInputError(MicroagentError):
    """The user gave us something we cannot accept (bad flag value, bad reference)."""

    exit_code = EXIT_INVALID
    kind = "invalid_input"


class UsageError(InvalidInputError):
    """The command line itself is wrong (unknown flag, missing argument)."""

    kind = "usage"


class SpecError(InvalidInputError):
    """A spec file has one or more problems; all of them are carried, sorted."""

    kind = "invalid_spec"
    subject = "spec"

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics: Sequence[Diagnostic] = tuple(sorted(diagnostics, key=Diagnostic.sort_key))
        count = len(self.diagnostics)
        first = self.diagnostics[0].headline() if count else f"invalid {self.subject}"
        summary = first if count == 1 else f"{count} problems in {self.subject}; first: {first}"
        super().__init__(summary, hint=self.diagnostics[0].hint if count else "")

    def render(self) -> str:
        lines = [f"error: {d.render()}" for d in self.diagnostics]
        if len(self.diagnostics) > 1:
            lines.append(f"{len(self.diagnostics)} errors")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        out = super().to_json()
        out["diagnostics"] = [d.to_json() for d in self.diagnostics]
        if self.diagnostics and self.diagnostics[0].location:
            out["location"] = self.diagnostics[0].location.to_json()
        return out


class ConfigError(SpecError):
    """The user config file has problems (reported like a spec's: file, line, column)."""

    kind = "invalid_config"
    subject = "config file"


class NotFoundError(MicroagentError):
    """A named thing (workspace, image, cache key, file) does not exist."""

    kind = "not_found"


class SpecNotFoundError(InvalidInputError):
    """No spec file where one was asked for (the CLI adds how to get one)."""


class HostIOError(MicroagentError):
    """The host's file system refused (disk full, permission denied, ...)."""

    kind = "io"


class ConflictError(MicroagentError):
    """The request clashes with the current state (name taken, VM already running)."""

    kind = "conflict"


class ToolError(MicroagentError):
    """An external program is missing or failed."""

    kind = "tool"


class RegistryError(MicroagentError):
    """Talking to an OCI registry or reading an image layout failed."""

    kind = "registry"


class IntegrityError(MicroagentError):
    """Content did not match its digest or is otherwise unsafe to use."""

    kind = "integrity"


class BuildError(MicroagentError):
    """Building a step (layer, rootfs, guest kit) failed."""

    kind = "build"


class VMError(MicroagentError):
    """Booting or talking to a microVM failed, or what runs in it did."""

    kind = "vm"


class TimedOutError(MicroagentError):
    """Something did not finish in the time it was given."""

    kind = "timeout"
