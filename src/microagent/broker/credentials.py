"""Secret values on the host: resolved from a reference (``env:VAR``, ``file:/abs/path``),
checked for use in an HTTP header, and kept in a mapping that never shows them.

A spec or a flag names only the reference; the value is read on the host at each start and
handed to the gateway process on its stdin. Every error names the reference, never a value:
a "source" that is neither form is refused without being echoed, as it may be the key itself.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from microagent.errors import InvalidInputError
from microagent.fsutil import load_json_bounded

SECRET_MAX = 4096  # bytes; a value goes into one header line
SECRETS_JSON_MAX = 64 << 10  # the gateway's stdin document
SOURCE_MAX = 4096 + 6  # a reference (the path of a file: one PATH_MAX)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
SOURCE_HINT = "write env:VAR (read from the host's environment) or file:/abs/path (its first line)"


def check_secret(value: str, reference: str = "the secret") -> str:
    """``value`` if it can go into a header: 1..4096 bytes of printable ASCII (so no CR/LF).
    The error names ``reference`` and says what is wrong, never what the value is."""
    if not value:
        raise InvalidInputError(f"{reference}: the value is empty")
    if len(value) > SECRET_MAX:
        raise InvalidInputError(f"{reference}: the value is longer than {SECRET_MAX} bytes")
    if not all(" " <= ch <= "~" for ch in value):
        raise InvalidInputError(
            f"{reference}: the value holds a character that is not printable ASCII "
            "(a control character, a line break or non-ASCII text)"
        )
    return value


def resolve_source(source: str, *, environ: Mapping[str, str] | None = None) -> str:
    """The secret a reference names: ``env:VAR`` (from ``environ``, default ``os.environ``)
    or ``file:/abs/path`` (a regular file's first line, whitespace stripped)."""
    if not isinstance(source, str) or len(source) > SOURCE_MAX:
        raise InvalidInputError("a credential source must be a short env:VAR or file:PATH")
    if source.startswith("env:"):
        return _from_env(source, source[4:], os.environ if environ is None else environ)
    if source.startswith("file:"):
        return _from_file(source, source[5:])
    # Never echoed: a literal here is most likely the key itself.
    raise InvalidInputError(
        "a credential source must be a reference, not a literal value", hint=SOURCE_HINT
    )


def _from_env(source: str, name: str, environ: Mapping[str, str]) -> str:
    if not ENV_NAME.fullmatch(name):
        raise InvalidInputError(
            # Not echoed either: ``env:`` followed by a key is a likely slip.
            "credential source env:...: what follows 'env:' is not an environment variable name",
            hint=SOURCE_HINT,
        )
    value = environ.get(name)
    if not value:
        state = "is empty" if value == "" else "is not set"
        raise InvalidInputError(
            f"credential source {source}: the environment variable {name} {state}",
            hint=f"export {name}=... in the shell that runs microagent",
        )
    return check_secret(value, f"credential source {source}")


def _from_file(source: str, path_text: str) -> str:
    if path_text.startswith("~/"):  # the user's home, as the spec and the flag allow
        path_text = str(Path.home() / path_text[2:])
    path = Path(path_text)
    if not path_text or not path.is_absolute() or "\0" in path_text:
        raise InvalidInputError(
            "credential source file:...: the path must be absolute", hint=SOURCE_HINT
        )
    data = _read_head(source, path, SECRET_MAX + 2)  # room for the line's own CRLF
    line = data.split(b"\n", 1)[0].strip()
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        text = "\x80"  # fails check_secret with the right message, never shown
    return check_secret(text, f"credential source {source}")


def _read_head(source: str, path: Path, limit: int) -> bytes:
    """The first ``limit`` bytes of a regular file (a FIFO or a device is refused, unopened
    for reading so that it cannot block)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError as exc:
        raise InvalidInputError(f"credential source {source}: no such file") from exc
    except OSError as exc:
        raise InvalidInputError(
            f"credential source {source}: cannot open it ({exc.strerror})"
        ) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidInputError(f"credential source {source}: not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise InvalidInputError(
            f"credential source {source}: cannot read it ({exc.strerror})"
        ) from exc
    finally:
        os.close(fd)


class Secrets(Mapping[str, str]):
    """Credential name -> secret value. Its repr and str show the names only, so a secret
    cannot reach a log or a traceback through it."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values: dict[str, str] = dict(values or {})

    def __getitem__(self, name: str) -> str:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Secrets(names={sorted(self._values)!r})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("Secrets are not picklable")


def parse_secrets(data: bytes, names: Sequence[str]) -> Secrets:
    """The gateway's stdin: one JSON object with a checked value for each of ``names`` and
    nothing else. Errors name the credential, never a value."""
    where = "secrets on stdin"
    try:
        document = (
            load_json_bounded(data, max_bytes=SECRETS_JSON_MAX, max_depth=2)
            if len(data) > SECRETS_JSON_MAX or data.strip()
            else {}  # nothing at all: as good as {} (a gateway with egress only)
        )
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc.message}") from None
    if not isinstance(document, dict):
        raise InvalidInputError(f"{where}: not a JSON object")
    unknown = sorted(str(key)[:40] for key in document if key not in names)
    if unknown:
        raise InvalidInputError(f"{where}: no credential is named {', '.join(unknown)}")
    values: dict[str, str] = {}
    for name in names:
        value = document.get(name)
        if value is None:
            raise InvalidInputError(f"{where}: no value for credential {name!r}")
        if not isinstance(value, str):
            raise InvalidInputError(f"{where}: the value for credential {name!r} is not a string")
        values[name] = check_secret(value, f"{where}: credential {name!r}")
    return Secrets(values)
