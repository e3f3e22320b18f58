"""Credentials a workspace's broker holds for it: the pure model, never a secret.

A credential is a *reference* to a secret on the host (``env:VAR`` or ``file:PATH``) and where
the broker sends it: the upstream URL, the header and its format, and the two guest variables
that point the agent's SDK at the broker (``baseUrlEnv``) and give it a placeholder key
(``keyEnv``). The value itself is read on the host at each start by the broker
(``broker.credentials.resolve_source``), never here, and never stored.

A spec from a cloned repository is untrusted: it must not be able to send a host secret to a
host of its choosing. :attr:`Credential.needs_confirmation` says which spec entries the user
has to name on the command line (``--credential NAME``) before ``create`` activates them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from microagent.errors import InvalidInputError
from microagent.frozen import Frozen

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")  # fullmatch, never match/search
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # an RFC 9110 token
MAX_CREDENTIALS = 8
MAX_SOURCE = 4096
MAX_UPSTREAM = 2048
MAX_FORMAT = 256
PLACEHOLDER = "{value}"
SOURCE_FORMS = "env:VAR or file:PATH (absolute, or ~/ for your home folder)"
# Headers that frame the request or name its target: the broker sets these itself.
FRAMING_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "expect",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Guest variables the workspace layer sets itself (the egress proxy, microagent's own).
PROXY_ENV = frozenset(
    {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"}
    | {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}
)
RESERVED_ENV_PREFIX = "MICROAGENT_"
# Variables an SDK reads its key from: passing one with --env puts the key in the guest.
KEY_ENV_NAMES = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, eq=False, repr=False)
class Credential(Frozen):
    """One brokered credential: the host reference ``source`` and where its value goes."""

    name: str
    source: str  # env:VAR | file:/abs/path | file:~/path (expanded when resolved)
    upstream: str  # normalised: lowercase scheme and host, no trailing slash
    header: str
    format: str  # contains PLACEHOLDER exactly once
    base_url_env: str
    key_env: str

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "source": self.source,
            "upstream": self.upstream,
            "header": self.header,
            "format": self.format,
            "baseUrlEnv": self.base_url_env,
            "keyEnv": self.key_env,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Credential:
        """A credential read back (a record, a boot document), checked like a spec entry."""
        keys = ("name", "source", "upstream", "header", "format", "baseUrlEnv", "keyEnv")
        if not isinstance(data, Mapping) or not all(isinstance(data.get(k), str) for k in keys):
            raise InvalidInputError(f"a credential needs the string fields {', '.join(keys)}")
        name = check_name(data["name"])
        cred = cls(
            name=name,
            source=check_source(data["source"]),
            upstream=check_upstream(data["upstream"]),
            header=check_header(data["header"]),
            format=check_format(data["format"]),
            base_url_env=check_env_name(data["baseUrlEnv"]),
            key_env=check_env_name(data["keyEnv"]),
        )
        if cred.base_url_env == cred.key_env:
            raise InvalidInputError(f"credential {name!r}: baseUrlEnv and keyEnv are the same")
        return cred

    @property
    def preset(self) -> Credential | None:
        """The preset of the same name, if there is one."""
        return PRESETS.get(self.name)

    @property
    def needs_confirmation(self) -> bool:
        """Whether a spec may not activate this credential on its own: it is no preset, or
        it sends the key elsewhere or otherwise than its preset does, or it reads a file.

        A stock preset only ever sends a host value to that preset's own service, in the
        preset's own header; everything else could carry a secret to a host the spec's author
        picked, so the user names it on the command line first."""
        preset = self.preset
        if preset is None or self.source.startswith("file:"):
            return True
        same = (self.upstream, self.header, self.format)
        return same != (preset.upstream, preset.header, preset.format)

    def describe(self) -> str:
        """``name (source -> upstream)``, for messages: references only, never a value."""
        return f"{self.name} ({self.source} -> {self.upstream})"


def _preset(name: str, upstream: str, header: str, fmt: str, envs: tuple[str, str]) -> Credential:
    base_url_env, key_env = envs
    return Credential(name, f"env:{key_env}", upstream, header, fmt, base_url_env, key_env)


PRESETS: Mapping[str, Credential] = MappingProxyType(
    {
        "anthropic": _preset(
            "anthropic",
            "https://api.anthropic.com",
            "x-api-key",
            PLACEHOLDER,
            ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"),
        ),
        "openai": _preset(
            "openai",
            "https://api.openai.com/v1",
            "Authorization",
            "Bearer {value}",
            ("OPENAI_BASE_URL", "OPENAI_API_KEY"),
        ),
        "gemini": _preset(
            "gemini",
            "https://generativelanguage.googleapis.com",
            "x-goog-api-key",
            PLACEHOLDER,
            ("GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY"),
        ),
    }
)
PRESET_LIST = ", ".join(PRESETS)


# -- single values ------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid credential name {name[:40]!r}",
            hint="lowercase letters, digits, `_` and `-`, starting with a letter or digit, "
            "at most 32 characters",
        )
    return name


def check_source(text: str) -> str:
    """``env:VAR`` or ``file:PATH`` (absolute or ``~/``), as written. A literal is refused
    without being repeated: it would be a key, and messages end up in logs."""
    if len(text) > MAX_SOURCE:
        raise InvalidInputError(f"a credential source is at most {MAX_SOURCE} characters")
    kind, sep, rest = text.partition(":")
    if sep and kind == "env":
        if not ENV_NAME_RE.fullmatch(rest):
            raise InvalidInputError(
                "`env:` must be followed by a variable name",
                hint="letters, digits and `_`, not starting with a digit: env:ANTHROPIC_API_KEY",
            )
        return text
    if sep and kind == "file":
        if _CONTROL.search(rest):
            raise InvalidInputError("a `file:` path must not contain control characters")
        if not (rest.startswith("/") or rest.startswith("~/")) or rest.rstrip("/") in ("", "~"):
            raise InvalidInputError(
                "a `file:` path must be absolute or start with ~/",
                hint="e.g. file:~/.config/anthropic/key (read on the host at each start)",
            )
        return text
    raise InvalidInputError(
        "a credential source must be a reference, not the key itself",
        hint=f"write {SOURCE_FORMS}: a key written here ends up in git or shell history",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_upstream(url: str) -> str:
    """An ``https`` URL, or ``http`` to a loopback host (tests, local gateways); no user
    info, query or fragment. Returned normalised (lowercase scheme and host, no trailing
    slash), so a preset's upstream compares equal however it is spelled."""
    if len(url) > MAX_UPSTREAM or not url.isascii() or _CONTROL.search(url) or " " in url:
        raise InvalidInputError(
            "an upstream must be an ASCII URL without spaces or control characters, "
            f"at most {MAX_UPSTREAM} characters"
        )
    shown = re.sub(r"//[^/]*@", "//…@", url)[:80]  # never repeat user info (a password)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInputError(f"upstream {shown!r} is not a URL: {exc}") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("https", "http") or not host:
        raise InvalidInputError(
            f"upstream {shown!r} is not an https URL", hint="e.g. https://api.example.com/v1"
        )
    if port == 0:
        raise InvalidInputError(f"upstream {shown!r}: port 0 is not a port")
    if "@" in parts.netloc:
        raise InvalidInputError(
            f"upstream {shown!r} carries user info (user:password@)",
            hint="the broker adds the key as a header",
        )
    if "?" in url or "#" in url:
        raise InvalidInputError(f"upstream {shown!r} must not have a query or fragment")
    if scheme == "http" and not _is_loopback(host):
        raise InvalidInputError(
            f"upstream {shown!r}: plain http is only for a loopback host",
            hint="use https (127.0.0.0/8, ::1 and localhost may use http)",
        )
    shown_host = f"[{host}]" if ":" in host else host
    netloc = shown_host if port is None else f"{shown_host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def check_header(header: str) -> str:
    if not HEADER_RE.fullmatch(header):
        raise InvalidInputError(
            f"invalid header name {header[:40]!r}",
            hint="an HTTP header name such as Authorization or x-api-key",
        )
    if header.lower() in FRAMING_HEADERS:
        raise InvalidInputError(
            f"header {header!r} frames the request; the broker sets it itself",
            hint="name the header the upstream reads its key from, e.g. Authorization",
        )
    return header


def check_format(fmt: str) -> str:
    """The header value with ``{value}`` standing for the key (never repeated in messages:
    whatever else it holds goes to the upstream as written)."""
    if len(fmt) > MAX_FORMAT or not fmt.isascii() or _CONTROL.search(fmt):
        raise InvalidInputError(
            f"a header format is printable ASCII, at most {MAX_FORMAT} characters"
        )
    if fmt.count(PLACEHOLDER) != 1:
        raise InvalidInputError(
            f"a header format must contain {PLACEHOLDER} exactly once",
            hint='e.g. "Bearer {value}"',
        )
    return fmt


def check_env_name(name: str) -> str:
    if not ENV_NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid variable name {name[:40]!r}",
            hint="letters, digits and `_`, not starting with a digit",
        )
    if name.startswith(RESERVED_ENV_PREFIX) or name in PROXY_ENV:
        raise InvalidInputError(
            f"{name} is set by microagent itself", hint="pick another variable name"
        )
    return name


# -- spec entries -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class Problem(Frozen):
    """One problem of a spec entry: ``key`` is the entry's key it is about ("" = the entry)."""

    key: str
    message: str
    hint: str = ""


_CHECKS = (
    ("from", "source", check_source),
    ("upstream", "upstream", check_upstream),
    ("header", "header", check_header),
    ("format", "format", check_format),
    ("baseUrlEnv", "base_url_env", check_env_name),
    ("keyEnv", "key_env", check_env_name),
)
_GENERIC_KEYS = ("from", "upstream", "header", "baseUrlEnv", "keyEnv")


def credential_from_spec(entry: Mapping[str, Any]) -> tuple[Credential | None, list[Problem]]:
    """A spec's ``credentials[]`` entry: a preset with any of its fields overridden, or a
    generic credential with ``from``, ``upstream``, ``header``, ``baseUrlEnv`` and ``keyEnv``
    (``format`` defaults to ``{value}``). Every problem is returned, none raised."""
    name = str(entry.get("name", ""))
    preset = PRESETS.get(name)
    problems: list[Problem] = []
    try:
        check_name(name)
    except InvalidInputError as exc:
        return None, [Problem("name", exc.message, exc.hint)]
    if preset is None:
        missing = [k for k in _GENERIC_KEYS if k not in entry]
        if missing:
            problems.append(
                Problem(
                    "",
                    f"credential {name!r} is not a preset ({PRESET_LIST}), so it needs "
                    + ", ".join(f"`{k}`" for k in missing),
                    "give the upstream URL, the header and format the key goes in, and the "
                    "two guest variables",
                )
            )
            return None, problems
    base = preset or Credential(name, "", "", "", PLACEHOLDER, "", "")
    values: dict[str, str] = {}
    for key, attr, check in _CHECKS:
        raw = entry.get(key, getattr(base, attr))
        try:
            values[attr] = check(raw)
        except InvalidInputError as exc:
            problems.append(Problem(key, exc.message, exc.hint))
    if problems:
        return None, problems
    cred = Credential(name=name, **values)
    if cred.base_url_env == cred.key_env:
        return None, [Problem("keyEnv", "keyEnv is the same variable as baseUrlEnv")]
    return cred, []


def env_clashes(
    credentials: Sequence[Credential], taken: Iterable[str] = ()
) -> list[tuple[int, str, str]]:
    """``(index, key, message)`` for each guest variable a credential sets that another one,
    or the workspace's ``env`` (``taken``), sets too."""
    seen = dict.fromkeys(taken, "env")
    out: list[tuple[int, str, str]] = []
    for i, cred in enumerate(credentials):
        for key, var in (("baseUrlEnv", cred.base_url_env), ("keyEnv", cred.key_env)):
            if var in seen:
                out.append((i, key, f"{var} is already set by {seen[var]}"))
            else:
                seen[var] = f"credential {cred.name!r}"
    return out


# -- command-line flags -------------------------------------------------------------------


def parse_credential_flag(text: str) -> tuple[str, str | None]:
    """``--credential NAME[=SOURCE]``: the name, and the source that replaces the spec's or
    the preset's (None: keep it). A literal SOURCE is refused without being repeated."""
    name, sep, source = text.partition("=")
    try:
        check_name(name)
        return name, (check_source(source) if sep else None)
    except InvalidInputError as exc:
        message = f"--credential {name[:40]!r}: {exc.message}"
        raise InvalidInputError(message, hint=exc.hint) from None


def parse_upstream_flag(text: str) -> tuple[str, str]:
    """``--credential-upstream NAME=URL``: the name and the checked, normalised URL."""
    name, sep, url = text.partition("=")
    if not sep:
        raise InvalidInputError(
            f"--credential-upstream {text[:80]!r}: expected NAME=URL",
            hint="e.g. anthropic=http://127.0.0.1:9000",
        )
    try:
        return check_name(name), check_upstream(url)
    except InvalidInputError as exc:
        raise InvalidInputError(f"--credential-upstream: {exc.message}", hint=exc.hint) from None


def key_env_warnings(names: Iterable[str]) -> list[str]:
    """Warnings for ``--env`` variables that SDKs read an API key from."""
    return [
        f"--env {name} puts the key inside the guest, where the agent (and anything it runs) "
        f"can read it; pass --credential instead (e.g. --credential {_preset_for(name)}), "
        "so a host-side broker holds the key and the guest gets a placeholder"
        for name in sorted(set(names))
        if name in KEY_ENV_NAMES
    ]


def _preset_for(key_env: str) -> str:
    if key_env == "GOOGLE_API_KEY":
        return "gemini=env:GOOGLE_API_KEY"
    return next(p.name for p in PRESETS.values() if p.key_env == key_env)
