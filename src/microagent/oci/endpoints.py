"""Registry settings: mirrors and plain-HTTP (insecure) hosts, from the user config and env.

The user config (``$MICROAGENT_CONFIG`` or ``<config dir>/microagent/config.yaml``)::

    registries:
      docker.io:
        mirrors: ["http://127.0.0.1:5000"]    # tried in order before the registry itself
      registry.internal:5000:
        insecure: true                       # plain HTTP

Environment (wins over the file): ``MICROAGENT_REGISTRY_MIRRORS="docker.io=http://h:5000,
ghcr.io=https://m.example"`` and ``MICROAGENT_INSECURE_REGISTRIES="h:5000,other:80"``.
Loopback registries (localhost, 127.x, [::1]) always use plain HTTP.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from microagent.errors import InvalidInputError
from microagent.settings import config_file

MIRRORS_ENV = "MICROAGENT_REGISTRY_MIRRORS"
INSECURE_ENV = "MICROAGENT_INSECURE_REGISTRIES"
DOCKER_HUB_HOST = "registry-1.docker.io"


@dataclass(frozen=True)
class Endpoint:
    """Somewhere to fetch a registry's content from: the registry itself or a mirror."""

    host: str
    scheme: str
    mirror: bool = False

    @property
    def insecure(self) -> bool:
        return self.scheme == "http"

    def url(self, repository: str, kind: str, reference: str) -> str:
        return f"{self.scheme}://{self.host}/v2/{repository}/{kind}/{reference}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}" + (" (mirror)" if self.mirror else "")


def is_loopback(host: str) -> bool:
    """localhost, 127.x.x.x or [::1], with or without a port."""
    bracketed = host.startswith("[")
    name = host.split("]", maxsplit=1)[0] + "]" if bracketed else host.rsplit(":", 1)[0]
    return name in ("localhost", "[::1]") or name.startswith("127.")


@dataclass(frozen=True)
class RegistryConfig:
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    insecure: frozenset[str] = frozenset()

    def _scheme(self, host: str) -> str:
        return "http" if host in self.insecure or is_loopback(host) else "https"

    def _mirror(self, text: str) -> Endpoint:
        if "://" in text:
            scheme, _, host = text.partition("://")
            return Endpoint(host.rstrip("/"), scheme, mirror=True)
        return Endpoint(text.rstrip("/"), self._scheme(text), mirror=True)

    def endpoints(self, registry: str) -> list[Endpoint]:
        """Mirrors first (in order), then the registry itself."""
        found = [self._mirror(m) for m in self.mirrors.get(registry, ())]
        host = DOCKER_HUB_HOST if registry == "docker.io" else registry
        found.append(Endpoint(host, self._scheme(host)))
        return found


def _bad(where: str, why: str) -> InvalidInputError:
    return InvalidInputError(f"{where}: {why}", hint="see the registry section of the README")


def _from_file(path: Path) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return {}, set()
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _bad(str(path), f"cannot read config: {exc}") from exc
    registries = raw.get("registries", {}) if isinstance(raw, dict) else None
    if not isinstance(registries, dict):
        raise _bad(str(path), "`registries` must be a mapping of registry host to settings")
    mirrors: dict[str, tuple[str, ...]] = {}
    insecure: set[str] = set()
    for host, settings in registries.items():
        if not isinstance(settings, dict):
            raise _bad(str(path), f"settings of {host!r} must be a mapping")
        listed = settings.get("mirrors", [])
        if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
            raise _bad(str(path), f"registries.{host}.mirrors must be a list of strings")
        mirrors[str(host)] = tuple(listed)
        if settings.get("insecure") is True:
            insecure.add(str(host))
    return mirrors, insecure


def _pairs(text: str, env: str) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        registry, sep, mirror = item.partition("=")
        if not sep or not registry or not mirror:
            raise _bad(env, f"expected REGISTRY=MIRROR, got {item!r}")
        out.setdefault(registry, []).append(mirror)
    return {k: tuple(v) for k, v in out.items()}


def load_registry_config(
    path: Path | None = None, env: Mapping[str, str] | None = None
) -> RegistryConfig:
    """Settings from the config file, overridden per registry by the environment."""
    source = os.environ if env is None else env
    mirrors, insecure = _from_file(path or config_file())
    mirrors.update(_pairs(source.get(MIRRORS_ENV, ""), MIRRORS_ENV))
    insecure |= {h.strip() for h in source.get(INSECURE_ENV, "").split(",") if h.strip()}
    return RegistryConfig(mirrors, frozenset(insecure))
