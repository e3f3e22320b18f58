"""The host services of a workspace's boot: one credential broker per declared credential and,
with ``network.allow``, the egress proxy (docs/broker.md).

At ``start`` this module chooses each service's guest port, the guest environment that points
the workspace's programs at them (base-URL variables, a placeholder in place of each key, the
proxy variables), the gateway's configuration (no secret in it), and resolves every
credential's value on the host. The values travel to the gateway through a pipe only: never
into a record, the boot document, the config disk, an argv or an environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from microagent.broker.credentials import resolve_source
from microagent.broker.gateway import CredentialRoute, EgressRoute, GatewayConfig, Limits
from microagent.compiler.credentials import Credential
from microagent.errors import InvalidInputError
from microagent.runtime.backend import ServiceChannel
from microagent.workspace.audit import AUDIT_NAME

PLACEHOLDER = "microagent-brokered"  # what a key variable holds in the guest
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")
NO_PROXY = "127.0.0.1,localhost"
SECRETS_MAX = 60 << 10  # fits a pipe's buffer: written before the reader exists


@dataclass(frozen=True)
class Services:
    """What a boot gets from its host services (all empty when the spec declares none)."""

    gateway: GatewayConfig | None = None
    channels: tuple[ServiceChannel, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


def _ports(base: int, count: int, taken: int | None) -> list[int]:
    ports: list[int] = []
    port = base
    while len(ports) < count:
        if port != taken:
            ports.append(port)
        port += 1
    return ports


def plan_services(
    credentials: Sequence[Credential],
    allow: Sequence[str],
    *,
    vm_dir: Path,
    run_dir: Path,
    port_base: int,
    mediation_port: int | None = None,
    cafile: Path | None = None,
) -> Services:
    """The services of one boot: guest ports from ``port_base`` (skipping the mediation port),
    sockets in ``vm_dir``, the audit log in ``run_dir``."""
    if not credentials and not allow:
        return Services()
    ports = iter(_ports(port_base, len(credentials) + (1 if allow else 0), mediation_port))
    routes, channels, env = [], [], {}
    for index, cred in enumerate(credentials):
        port, sock = next(ports), vm_dir / f"cred{index}.sock"
        routes.append(CredentialRoute(cred.name, cred.upstream, cred.header, cred.format, sock))
        channels.append(ServiceChannel(port, sock, f"broker:{cred.name}"))
        env[cred.base_url_env] = f"http://127.0.0.1:{port}"
        env[cred.key_env] = PLACEHOLDER
    egress = None
    if allow:
        port, sock = next(ports), vm_dir / "egress.sock"
        egress = EgressRoute(tuple(allow), sock)
        channels.append(ServiceChannel(port, sock, "egress-proxy"))
        env.update(dict.fromkeys(PROXY_VARIABLES, f"http://127.0.0.1:{port}"))
        env.update(dict.fromkeys(NO_PROXY_VARIABLES, NO_PROXY))
    gateway = GatewayConfig(
        audit=run_dir / AUDIT_NAME,
        cafile=cafile,
        credentials=tuple(routes),
        egress=egress,
        limits=Limits(),
    )
    return Services(gateway, tuple(channels), env)


def resolve_secrets(credentials: Sequence[Credential]) -> dict[str, str]:
    """Each credential's value, read on the host now (InvalidInputError names a missing
    reference, never a value)."""
    values: dict[str, str] = {}
    for cred in credentials:
        try:
            values[cred.name] = resolve_source(cred.source)
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"credential {cred.name!r}: {exc.message}",
                hint=exc.hint or "set the variable or create the file, then start again",
            ) from exc
    return values


def secrets_pipe(values: Mapping[str, str]) -> int:
    """A pipe holding ``values`` as one JSON object, its write end closed; returns the read
    end, for the supervisor's stdin (the caller closes it once the child has it)."""
    data = json.dumps(dict(values)).encode()
    if len(data) > SECRETS_MAX:
        raise InvalidInputError(
            f"the credentials' values are {len(data)} bytes together; at most {SECRETS_MAX}",
            hint="a credential value is a key or token, at most 4096 bytes",
        )
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    except OSError:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end
