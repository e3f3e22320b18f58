"""Command-line values: overrides on top of a spec, the limits of every numeric flag, and
``--env`` runtime variables.

Flags win over the spec (``--setup`` appends). A flag that overrides a spec field is checked
against that field's own JSON Schema (:func:`check_flag`), so ``--memory`` accepts exactly what
``resources.memoryMiB`` does; a bad value is an error (exit 2) whose hint names the allowed range.
Durations (``--timeout``) go through :func:`check_seconds`. ``--env`` values are kept apart from
the spec in a :class:`RuntimeEnv`: they reach the guest at boot and nothing else — no key, plan,
layer or log.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from microagent.compiler.credentials import (
    MAX_CREDENTIALS,
    PRESET_LIST,
    PRESETS,
    Credential,
    env_clashes,
    parse_credential_flag,
    parse_upstream_flag,
)
from microagent.compiler.schema import check_field, check_value, field_range
from microagent.compiler.spec import (
    MAX_ALLOW,
    Forward,
    Mediation,
    Network,
    NetworkMode,
    Profile,
    Resources,
    SetupStep,
    Spec,
    check_allow_entry,
    parse_target,
    publish_host_problem,
)
from microagent.errors import InvalidInputError
from microagent.frozen import Frozen

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: ``$`` accepts "NAME\n"
PORT_RE = re.compile(r"0|[1-9][0-9]{0,4}")  # ASCII digits only (str.isdigit takes "²" too)
PUBLISH_FORM = "[HOST:]HOSTPORT:GUESTPORT[/tcp]"
MAX_SECONDS = 30 * 86400  # every --timeout: 30 days (exec's guest counts milliseconds)


def _shown(value: object) -> str:
    """A flag's value for a message: short strings quoted, long ones cut (a key pasted where
    a name belongs must not be echoed whole)."""
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:20]) + "…"
    return repr(value)


def check_flag(flag: str, dotted: str, value: object) -> None:
    """Refuse a flag's value that the spec field it stands for (``"resources.memoryMiB"``)
    would refuse: an invalid-input error (exit 2) whose hint names the allowed values."""
    problems = check_field(dotted, value)
    if not problems:
        return
    problem = problems[0]
    bounds = field_range(dotted)
    if bounds is not None:
        low, high = (f"{b:g}" if isinstance(b, float) else str(b) for b in bounds)
        hint = f"{flag} takes {low} to {high}, like `{dotted}` in a spec"
    else:
        hint = problem.hint or f"{flag} takes what `{dotted}` takes in a spec (docs/spec.md)"
    raise InvalidInputError(f"{flag} {_shown(value)}: {problem.message}", hint=hint)


def check_seconds(flag: str, value: float, *, zero: str = "", hint: str = "") -> None:
    """A duration flag: finite, at most :data:`MAX_SECONDS`, more than 0 — or 0 too when
    ``zero`` says what 0 means. Negative is always an error (exit 2)."""
    above_low = value >= 0 if zero else value > 0
    if math.isfinite(value) and above_low and value <= MAX_SECONDS:
        return
    allowed = (
        f"0 to {MAX_SECONDS} seconds (0: {zero})"
        if zero
        else f"more than 0 and at most {MAX_SECONDS} seconds"
    )
    raise InvalidInputError(
        f"{flag} {value:g}: must be {allowed}",
        hint=hint or f"give a number of seconds, e.g. {flag} 60",
    )


@dataclass(frozen=True, eq=False, repr=False)
class Overrides(Frozen):
    """Values given on the command line; ``None``/empty means "keep the spec's"."""

    name: str | None = None
    image: str | None = None
    profile: str | None = None
    memory_mib: int | None = None
    cpu_count: int | None = None
    size_mib: int | None = None
    entrypoint: str | None = None
    hostname: str | None = None
    network: str | None = None
    setup: tuple[str, ...] = ()
    mediation: str | None = None  # --mediation PORT=HOST:PORT (required, fails closed)
    publish: tuple[str, ...] = ()  # --publish [HOST:]HOSTPORT:GUESTPORT[/tcp], added
    credentials: tuple[str, ...] = ()  # --credential NAME[=SOURCE]: activates, confirms
    credential_upstreams: tuple[str, ...] = ()  # --credential-upstream NAME=URL
    allow: tuple[str, ...] = ()  # --allow HOST, appended to network.allow

    def __post_init__(self) -> None:
        """Each value against the schema of the field it overrides."""
        for flag, field, value in (
            ("--name", "name", self.name),
            ("--image", "image", self.image),
            ("--profile", "profile", self.profile),
            ("--memory", "resources.memoryMiB", self.memory_mib),
            ("--cpus", "resources.cpuCount", self.cpu_count),
            ("--size-mib", "resources.sizeMiB", self.size_mib),
            ("--entrypoint", "entrypoint", self.entrypoint),
            ("--hostname", "hostname", self.hostname),
            ("--network", "network.mode", self.network),
        ):
            if value is not None:
                check_flag(flag, field, value)


def _resources(spec: Spec, o: Overrides) -> Resources:
    r = spec.resources
    return Resources(
        memory_mib=o.memory_mib if o.memory_mib is not None else r.memory_mib,
        cpu_count=o.cpu_count if o.cpu_count is not None else r.cpu_count,
        size_mib=o.size_mib if o.size_mib is not None else r.size_mib,
        headroom_mib=r.headroom_mib,
    )


def apply_overrides(spec: Spec, o: Overrides) -> Spec:
    """A new spec with the flags applied (each one was checked against the spec's schema
    when ``o`` was made)."""
    changes: dict[str, object] = {"resources": _resources(spec, o)}
    if o.name is not None:
        changes["name"] = o.name
    if o.image is not None:
        changes["image"] = o.image
    if o.profile is not None:
        changes["profile"] = Profile(o.profile)
    if o.entrypoint is not None:
        changes["entrypoint"] = o.entrypoint
    if o.hostname is not None:
        changes["hostname"] = o.hostname
    changes["network"] = _network(spec.network, o)
    if o.setup:
        extra = tuple(SetupStep(cmd, f"--setup[{i}]") for i, cmd in enumerate(o.setup))
        changes["setup"] = spec.setup + extra
    if o.mediation is not None:
        changes["mediation"] = parse_mediation_flag(o.mediation)
    if o.credentials or o.credential_upstreams:
        changes["credentials"] = _credentials(spec, o)
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def _credential_flags(texts: Iterable[str]) -> dict[str, str | None]:
    flags: dict[str, str | None] = {}
    for text in texts:
        name, source = parse_credential_flag(text)
        if name in flags:
            raise InvalidInputError(f"--credential {name} is given twice")
        flags[name] = source
    return flags


def _credentials(spec: Spec, o: Overrides) -> tuple[Credential, ...]:
    """The spec's credentials with the flags applied (see :func:`credentials_with_flags`)."""
    return credentials_with_flags(
        spec.credentials, o.credentials, o.credential_upstreams, spec.env, spec=True
    )


def credentials_with_flags(
    declared: Iterable[Credential],
    credentials: Iterable[str],
    upstreams: Iterable[str],
    env: Iterable[str] = (),
    *,
    spec: bool,
) -> tuple[Credential, ...]:
    """``declared`` (a spec's credentials; none for ``run``) with ``--credential`` (a new
    source; a preset not declared is added, with its default source unless one is given) and
    ``--credential-upstream`` applied, checked as a whole again (count, and the guest
    variables against each other and ``env``, the spec's variables). ``spec`` says whether
    there is a spec that could declare a credential (``run`` takes presets only)."""
    creds = {c.name: c for c in declared}
    for name, source in _credential_flags(credentials).items():
        cred = creds.get(name) or PRESETS.get(name)
        if cred is None:
            raise _not_a_credential(name, spec=spec)
        creds[name] = cred if source is None else dataclasses.replace(cred, source=source)
    seen: set[str] = set()
    for text in upstreams:
        name, url = parse_upstream_flag(text)
        if name not in creds:
            raise InvalidInputError(
                f"--credential-upstream {name}: no such credential",
                hint=f"declare it in the spec or pass --credential {name}"
                if spec
                else f"pass --credential {name} too",
            )
        if name in seen:
            raise InvalidInputError(f"--credential-upstream {name} is given twice")
        seen.add(name)
        creds[name] = dataclasses.replace(creds[name], upstream=url)
    out = tuple(creds.values())
    if len(out) > MAX_CREDENTIALS:
        raise InvalidInputError(f"at most {MAX_CREDENTIALS} credentials (got {len(out)})")
    for index, _key, message in env_clashes(out, env):
        raise InvalidInputError(f"credential {out[index].name!r}: {message}")
    return out


def _not_a_credential(name: str, *, spec: bool) -> InvalidInputError:
    if spec:
        return InvalidInputError(
            f"--credential {name}: not a preset ({PRESET_LIST}) and not in the spec",
            hint=f"declare {name!r} under `credentials:` with its upstream, header, "
            "baseUrlEnv and keyEnv",
        )
    return InvalidInputError(
        f"--credential {name}: not a preset ({PRESET_LIST})",
        hint="run brokers a preset (=SOURCE and --credential-upstream change where its key "
        "comes from and goes); another API needs a spec that declares it (create)",
    )


def check_runtime_env(credentials: Iterable[Credential], names: Iterable[str]) -> None:
    """``--env`` may not set a variable a credential sets: the guest would get the value
    given there instead of the broker's address or the placeholder."""
    given = set(names)
    for cred in credentials:
        for var in (cred.base_url_env, cred.key_env):
            if var in given:
                raise InvalidInputError(
                    f"--env {var}: credential {cred.name!r} sets it (the broker holds the key; "
                    "the guest gets its address and a placeholder)",
                    hint=f"drop --env {var}",
                )


def confirm_credentials(spec: Spec, o: Overrides | None) -> None:
    """Refuse a spec's credentials that need the user's word (see
    :attr:`Credential.needs_confirmation`) unless ``--credential NAME`` names them.

    ``spec`` is the spec as loaded, before the flags: what a cloned repository asks for."""
    named = set(_credential_flags((o or Overrides()).credentials))
    pending = [c for c in spec.credentials if c.needs_confirmation and c.name not in named]
    if not pending:
        return
    what = "; ".join(
        f"{c.name!r} would send {c.source} to {c.upstream} ({_why(c)})" for c in pending
    )
    flags = " ".join(f"--credential {c.name}" for c in pending)
    raise InvalidInputError(
        f"the spec declares credentials that need your confirmation: {what}",
        hint=f"a spec must not send a host secret where it likes; if this is what you want, "
        f"pass {flags} (or --credential NAME=SOURCE to choose the source yourself)",
    )


def _why(cred: Credential) -> str:
    preset = cred.preset
    if preset is None:
        return "not a preset"
    if cred.upstream != preset.upstream:
        return f"the preset's upstream is {preset.upstream}"
    if cred.source.startswith("file:"):
        return "a file on this host"
    return f"the preset sends it as {preset.header}: {preset.format}"


def parse_mediation_flag(text: str) -> Mediation:
    """``--mediation PORT=HOST:PORT``: the command-line form is required (fails closed)."""
    port, sep, target = text.partition("=")
    if not sep or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535:
        raise InvalidInputError(
            f"--mediation {text!r}: expected GUESTPORT=HOST:PORT", hint="e.g. 2048=127.0.0.1:9900"
        )
    try:
        host, target_port = parse_target(target)
    except InvalidInputError as exc:
        raise InvalidInputError(f"--mediation: {exc.message}", hint=exc.hint) from None
    return Mediation(int(port), host, target_port, required=True)


def _network(network: Network, o: Overrides) -> Network:
    """``--network`` sets the mode, ``--publish`` adds ports (a flag replaces a spec entry
    on the same host address and port); published ports need mode ``user``."""
    if o.network is not None:
        network = dataclasses.replace(network, mode=NetworkMode(o.network))
    if o.allow:
        network = dataclasses.replace(network, allow=_allow(network.allow, o.allow))
    if o.publish:
        flags = parse_publishes(o.publish)
        kept = tuple(f for f in network.forwards if not any(f.conflicts_with(g) for g in flags))
        network = dataclasses.replace(network, forwards=kept + flags)
    if network.forwards and not network.mode.has_nic:
        if o.publish:
            raise InvalidInputError(
                "--publish needs network mode 'user', but the workspace is isolated",
                hint="drop --publish or use --network user",
            )
        raise InvalidInputError(
            "--network isolated: the spec publishes ports (network.forwards), which need "
            "mode 'user'",
            hint="keep mode user, or remove network.forwards from the spec",
        )
    return network


def _allow(spec: tuple[str, ...], flags: tuple[str, ...]) -> tuple[str, ...]:
    """``--allow HOST`` entries after the spec's (a name already listed is kept once)."""
    out = list(spec)
    for text in flags:
        try:
            host = check_allow_entry(text)
        except InvalidInputError as exc:
            raise InvalidInputError(f"--allow: {exc.message}", hint=exc.hint) from None
        if host not in out:
            out.append(host)
    if len(out) > MAX_ALLOW:
        raise InvalidInputError(f"network.allow and --allow: at most {MAX_ALLOW} names")
    return tuple(out)


def _publish_error(text: str, message: str, hint: str = "") -> InvalidInputError:
    return InvalidInputError(
        f"--publish {text[:80]!r}: {message}", hint=hint or f"expected {PUBLISH_FORM}"
    )


def parse_publish(text: str) -> Forward:
    """``[HOST:]HOSTPORT:GUESTPORT[/tcp]`` (HOST defaults to 127.0.0.1), checked as strictly
    as a spec's ``network.forwards`` entry: by the same schema, then the same host check."""
    body, slash, protocol = text.partition("/")
    if slash and protocol.lower() == "udp":
        raise _publish_error(text, "UDP is not supported: published ports are TCP only")
    if slash and protocol != "tcp":
        raise _publish_error(text, f"unknown protocol {protocol[:20]!r}", "only /tcp (the default)")
    if body.startswith("[") or body.count(":") > 2:
        raise _publish_error(
            text, "IPv6 host addresses are not supported", "e.g. 127.0.0.1:8080:80"
        )
    parts = body.split(":")
    if len(parts) < 2 or not all(PORT_RE.fullmatch(p) for p in parts[-2:]):
        raise _publish_error(text, f"expected {PUBLISH_FORM}", "e.g. 8080:80 or 127.0.0.1:8080:80")
    host = parts[0] if len(parts) == 3 else "127.0.0.1"
    host_port, guest_port = int(parts[-2]), int(parts[-1])
    for what, port in (("host port", host_port), ("guest port", guest_port)):
        if not 1 <= port <= 65535:
            raise _publish_error(text, f"{what} {port} is not 1-65535")
    item = {"protocol": "tcp", "host": host, "hostPort": host_port, "guestPort": guest_port}
    problems = check_value("network.forwards", [item])  # the spec's own rules, whole
    problem = problems[0] if problems else publish_host_problem(host)
    if problem:
        raise _publish_error(text, problem)
    return Forward(host_port, guest_port, host)


def parse_publishes(items: Iterable[str]) -> tuple[Forward, ...]:
    """Every ``--publish`` flag; two that listen on one host port are refused."""
    out: list[Forward] = []
    for text in items:
        forward = parse_publish(text)
        clash = next((f for f in out if f.conflicts_with(forward)), None)
        if clash is not None:
            same = clash.bind == forward.bind
            raise _publish_error(
                text,
                f"{forward.bind} is published twice"
                if same
                else f"{forward.bind} overlaps {clash.bind} (0.0.0.0 takes every address)",
                "publish each host address and port once",
            )
        out.append(forward)
    return tuple(out)


@dataclass(frozen=True, eq=False, repr=False)
class RuntimeEnv(Frozen):
    """``--env`` variables: secret-safe by construction (``repr`` hides the values)."""

    values: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.values))

    def __repr__(self) -> str:
        return f"RuntimeEnv(names={list(self.names)})"


def parse_env(items: Iterable[str], host_env: Mapping[str, str] | None = None) -> RuntimeEnv:
    """``K=V`` pairs; a bare ``K`` takes the value from the host environment (like docker)."""
    source = os.environ if host_env is None else host_env
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not ENV_NAME_RE.fullmatch(name):
            raise InvalidInputError(
                f"--env {name!r}: invalid variable name",
                hint="use NAME=VALUE with letters, digits and _, not starting with a digit",
            )
        if not sep:
            if name not in source:
                raise InvalidInputError(
                    f"--env {name}: not set in this shell", hint=f"pass --env {name}=VALUE"
                )
            value = source[name]
        values[name] = value
    return RuntimeEnv(values)
