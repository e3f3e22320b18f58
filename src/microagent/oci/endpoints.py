"""Where a registry's content is fetched from: mirrors first, then the registry itself.

Mirrors and plain-HTTP (insecure) hosts come from :class:`~microagent.settings.Settings`
(the user config and ``MICROAGENT_REGISTRY_MIRRORS`` / ``MICROAGENT_INSECURE_REGISTRIES``).
Loopback registries (localhost, 127.x, [::1]) always use plain HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from microagent.settings import Settings

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

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistryConfig:
        return cls(dict(settings.registry_mirrors), settings.insecure_registries)

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
