"""Command-line overrides on top of a spec, and ``--env`` runtime variables.

Flags win over the spec (``--setup`` appends). ``--env`` values are kept apart from the spec in a
:class:`RuntimeEnv`: they reach the guest at boot and nothing else — no key, plan, layer or log.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from microagent.compiler.schema import check_value
from microagent.compiler.spec import (
    NetworkMode,
    Profile,
    Resources,
    SetupStep,
    Spec,
)
from microagent.errors import InvalidInputError

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: ``$`` accepts "NAME\n"


@dataclass(frozen=True)
class Overrides:
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


def _checked(flag: str, field: str, value: object) -> None:
    problems = check_value(field, value)
    if problems:
        raise InvalidInputError(f"{flag} {value!r}: {problems[0]}")


def _resources(spec: Spec, o: Overrides) -> Resources:
    r = spec.resources
    return Resources(
        memory_mib=o.memory_mib if o.memory_mib is not None else r.memory_mib,
        cpu_count=o.cpu_count if o.cpu_count is not None else r.cpu_count,
        size_mib=o.size_mib if o.size_mib is not None else r.size_mib,
        headroom_mib=r.headroom_mib,
    )


def apply_overrides(spec: Spec, o: Overrides) -> Spec:
    """A new spec with the flags applied, each validated against the same schema."""
    for flag, field, value in (
        ("--name", "name", o.name),
        ("--image", "image", o.image),
        ("--profile", "profile", o.profile),
        ("--entrypoint", "entrypoint", o.entrypoint),
        ("--hostname", "hostname", o.hostname),
        ("--network", "network.mode", o.network),
    ):
        if value is not None:
            _checked(flag, field, value)
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
    if o.network is not None:
        changes["network"] = dataclasses.replace(spec.network, mode=NetworkMode(o.network))
    if o.setup:
        extra = tuple(SetupStep(cmd, f"--setup[{i}]") for i, cmd in enumerate(o.setup))
        changes["setup"] = spec.setup + extra
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RuntimeEnv:
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
