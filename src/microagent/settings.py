"""Settings: everything the environment and the user config file say, resolved once.

The CLI (and the supervisor, the other process entry point) builds one frozen
:class:`Settings` from ``os.environ`` and the user config file and passes it down; nothing
below reads ``MICROAGENT_*`` variables or the config file itself.

The user config (``$MICROAGENT_CONFIG``, else ``<user config dir>/microagent/config.yaml``)::

    registries:
      docker.io:
        mirrors: ["http://127.0.0.1:5000"]    # tried in order before the registry itself
      registry.internal:5000:
        insecure: true                       # plain HTTP
    cache:
      from: [ghcr.io/acme/agent-cache]       # remote caches to take built steps from
      to: ghcr.io/acme/agent-cache           # where build/create publish (usually only CI)
    guest:
      extraCA: host                          # or a PEM file: extra CAs for guests

A broken file is an error naming the file, line and column. Environment variables win over
the file: ``MICROAGENT_REGISTRY_MIRRORS="docker.io=http://h:5000,ghcr.io=https://m"`` (per
registry), ``MICROAGENT_INSECURE_REGISTRIES="h:5000"`` (added), ``MICROAGENT_CACHE_FROM`` /
``MICROAGENT_CACHE_TO`` (set, even empty, replaces ``cache``), ``MICROAGENT_EXTRA_CA``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import yaml

from microagent.errors import ConfigError, Diagnostic, InvalidInputError, Location

HOME_ENV = "MICROAGENT_HOME"
CONFIG_ENV = "MICROAGENT_CONFIG"
MIRRORS_ENV = "MICROAGENT_REGISTRY_MIRRORS"
INSECURE_ENV = "MICROAGENT_INSECURE_REGISTRIES"
CACHE_FROM_ENV = "MICROAGENT_CACHE_FROM"
CACHE_TO_ENV = "MICROAGENT_CACHE_TO"
EXTRA_CA_ENV = "MICROAGENT_EXTRA_CA"
BACKEND_ENV = "MICROAGENT_BACKEND"
ACCEL_ENV = "MICROAGENT_ACCEL"
KERNEL_ENV = "MICROAGENT_KERNEL"
INITRD_ENV = "MICROAGENT_INITRD"
DEBIAN_MIRROR_ENV = "MICROAGENT_DEBIAN_MIRROR"
DEBIAN_SUITE_ENV = "MICROAGENT_DEBIAN_SUITE"
DEBIAN_KEYRING_ENV = "MICROAGENT_DEBIAN_KEYRING"
RAM_STAGE_ENV = "MICROAGENT_RAM_STAGE"
CACHE_ROOTFS_ENV = "MICROAGENT_CACHE_ROOTFS"
FAKE_ENV = "MICROAGENT_FAKE"
RESTART_BACKOFF_ENV = "MICROAGENT_RESTART_BACKOFF"
SERVICE_PORT_BASE_ENV = "MICROAGENT_SERVICE_PORT_BASE"
SERVICE_PORT_BASE = 18780
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MAX_CONFIG_BYTES = 1 << 20
_OFF = ("0", "no", "false", "off")
_SECTIONS = ("registries", "cache", "guest")


@dataclass(frozen=True)
class Settings:
    """Where things live and how to reach the outside world; see the module docstring."""

    home: Path
    config_file: Path | None = None
    registry_mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    insecure_registries: frozenset[str] = frozenset()
    auth_files: tuple[Path, ...] = ()
    cache_from: tuple[str, ...] = ()
    cache_to: str | None = None
    extra_ca: str | None = None  # "host" (this machine's bundle) or a PEM file
    backend: str = "qemu"
    accel: str = "auto"
    kernel: Path | None = None
    initrd: Path | None = None
    debian_mirror: str | None = None
    debian_suite: str | None = None
    debian_keyring: Path | None = None  # keys the mirror's InRelease must be signed by
    ram_stage: bool = True  # flatten layers in /dev/shm when there is room
    cache_rootfs: bool = True  # publish and use packed rootfs images in remote caches
    fake_outcome: str | None = None  # tests: what the fake backend's guest does (JSON)
    restart_backoff: float = 1.0  # seconds before the first automatic restart (doubling)
    # The first guest loopback port of the host services (credential brokers, egress proxy).
    service_port_base: int = SERVICE_PORT_BASE

    @property
    def store_dir(self) -> Path:
        """The content-addressed store (blobs, step keys, root filesystems, guest kits)."""
        return self.home / "store"

    @property
    def workspaces_dir(self) -> Path:
        """Workspace records and their disks (never pruned by the cache)."""
        return self.home / "workspaces"

    @property
    def probes_dir(self) -> Path:
        """Cached host probes (KVM test boot, TSC rate)."""
        return self.store_dir / "probes"

    def with_changes(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def extra_ca_file(self) -> Path | None:
        """The PEM file of extra CA certificates (``host``: this machine's bundle), if any."""
        raw = self.extra_ca
        if not raw or raw.lower() in ("none", *_OFF):
            return None
        return HOST_CA_BUNDLE if raw == "host" else Path(raw).expanduser()

    def extra_ca_bundle(self) -> bytes | None:
        """The extra CA certificates guests trust (runtime configuration, never in a layer)."""
        path = self.extra_ca_file()
        if path is None:
            return None
        return read_ca_bundle(path, hint=f"set {EXTRA_CA_ENV}=host, a PEM file, or unset it")

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, home: Path | str | None = None
    ) -> Settings:
        """Read the environment and the user config file (once)."""
        env = os.environ if environ is None else environ
        path = config_path(env)
        config = read_config(path)
        cache_from = split_list(env[CACHE_FROM_ENV]) if CACHE_FROM_ENV in env else None
        return cls(
            home=_home(home or env.get(HOME_ENV)),
            config_file=path,
            registry_mirrors=_mirrors(config, env),
            insecure_registries=_insecure(config, env),
            auth_files=_auth_files(env),
            cache_from=config.cache_from if cache_from is None else cache_from,
            cache_to=_first(env[CACHE_TO_ENV]) if CACHE_TO_ENV in env else config.cache_to,
            extra_ca=env.get(EXTRA_CA_ENV, config.extra_ca),
            backend=env.get(BACKEND_ENV) or "qemu",
            accel=(env.get(ACCEL_ENV) or "auto").strip().lower(),
            kernel=_path(env.get(KERNEL_ENV)),
            initrd=_path(env.get(INITRD_ENV)),
            debian_mirror=env.get(DEBIAN_MIRROR_ENV) or None,
            debian_suite=env.get(DEBIAN_SUITE_ENV) or None,
            debian_keyring=_path(env.get(DEBIAN_KEYRING_ENV)),
            ram_stage=_flag(env.get(RAM_STAGE_ENV)),
            cache_rootfs=_flag(env.get(CACHE_ROOTFS_ENV)),
            fake_outcome=env.get(FAKE_ENV) or None,
            restart_backoff=_seconds(RESTART_BACKOFF_ENV, env.get(RESTART_BACKOFF_ENV), 1.0),
            service_port_base=_port_base(env.get(SERVICE_PORT_BASE_ENV)),
        )


def _port_base(value: str | None) -> int:
    """The first service port: room for 16 ports above it, clear of the privileged ones."""
    if not value:
        return SERVICE_PORT_BASE
    if not value.isdigit() or not 1024 <= int(value) <= 65535 - 16:
        raise InvalidInputError(
            f"{SERVICE_PORT_BASE_ENV}={value[:20]!r} is not a port number from 1024 to 65519",
            hint=f"unset it to use {SERVICE_PORT_BASE}",
        )
    return int(value)


def read_ca_bundle(path: Path = HOST_CA_BUNDLE, *, hint: str = "") -> bytes:
    """The certificates in a PEM file (default: this host's bundle), or a clear error."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read the CA bundle {path}: {exc.strerror}", hint=hint
        ) from exc


def _home(value: Path | str | None) -> Path:
    if value:
        return Path(value).expanduser().resolve()
    return Path(platformdirs.user_cache_dir("microagent"))


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """The user config: ``$MICROAGENT_CONFIG`` or ``config.yaml`` in the user config dir."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    return Path(platformdirs.user_config_dir("microagent")) / "config.yaml"


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _seconds(name: str, value: str | None, default: float) -> float:
    """A positive number of seconds, at most an hour (``default`` when unset)."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise InvalidInputError(
            f"{name}={value!r}: not a number of seconds", hint="e.g. 1 or 0.5 (at most 3600)"
        )
    return seconds


def _flag(value: str | None) -> bool:
    return (value or "1").strip().lower() not in _OFF


def split_list(text: str) -> tuple[str, ...]:
    """A comma (or newline) separated list, trimmed, without empty items."""
    return tuple(part.strip() for part in text.replace("\n", ",").split(",") if part.strip())


def _first(text: str) -> str | None:
    parts = split_list(text)
    return parts[0] if parts else None


def _auth_files(env: Mapping[str, str]) -> tuple[Path, ...]:
    """$REGISTRY_AUTH_FILE, then the Docker config (credentials for registries)."""
    files = [Path(env["REGISTRY_AUTH_FILE"])] if env.get("REGISTRY_AUTH_FILE") else []
    docker_dir = env.get("DOCKER_CONFIG") or str(Path(env.get("HOME") or Path.home()) / ".docker")
    files.append(Path(docker_dir) / "config.json")
    return tuple(files)


def _mirrors(config: UserConfig, env: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    mirrors = dict(config.mirrors)
    pairs: dict[str, list[str]] = {}
    for item in split_list(env.get(MIRRORS_ENV, "")):
        registry, sep, mirror = item.partition("=")
        if not sep or not registry or not mirror:
            raise InvalidInputError(
                f"{MIRRORS_ENV}: expected REGISTRY=MIRROR, got {item!r}",
                hint="e.g. docker.io=http://127.0.0.1:5000 (comma separated)",
            )
        pairs.setdefault(registry, []).append(mirror)
    mirrors.update({k: tuple(v) for k, v in pairs.items()})
    return mirrors


def _insecure(config: UserConfig, env: Mapping[str, str]) -> frozenset[str]:
    return frozenset(config.insecure) | frozenset(split_list(env.get(INSECURE_ENV, "")))


# -- the user config file ---------------------------------------------------------------------


@dataclass(frozen=True)
class UserConfig:
    """What the user config file says (empty when there is none)."""

    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    insecure: frozenset[str] = frozenset()
    cache_from: tuple[str, ...] = ()
    cache_to: str | None = None
    extra_ca: str | None = None


def read_config(path: Path) -> UserConfig:
    """Parse the user config; a missing file is an empty config, a broken one an error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return UserConfig()
    except OSError as exc:
        raise InvalidInputError(f"cannot read the config file {path}: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidInputError(f"{path}: the config file is larger than 1 MiB")
    return _ConfigReader(str(path)).read(data)


class _ConfigReader:
    """Walks the YAML node tree, so every problem can name its line and column."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Diagnostic] = []

    def read(self, data: bytes) -> UserConfig:
        try:
            root = yaml.compose(data.decode("utf-8"), Loader=yaml.SafeLoader)
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            mark = getattr(exc, "problem_mark", None)
            self.problem(mark, "", f"not valid YAML: {getattr(exc, 'problem', None) or exc}")
            raise ConfigError(self.problems) from exc
        config = self._top(root) if root is not None else UserConfig()
        if self.problems:
            raise ConfigError(self.problems)
        return config

    def problem(self, mark: Any, path: str, message: str, hint: str = "") -> None:
        where = Location(self.file, mark.line + 1, mark.column + 1) if mark else Location(self.file)
        self.problems.append(Diagnostic(message, where, path, hint))

    def mapping(self, node: Any, path: str) -> dict[str, Any]:
        """Keys (scalars) to value nodes, or {} after recording a problem."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node.start_mark, path, "must be a mapping")
            return {}
        return {str(k.value): v for k, v in node.value if isinstance(k, yaml.ScalarNode)}

    def string(self, node: Any, path: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith((":str", ":int")):
            return str(node.value)
        self.problem(node.start_mark, path, "must be a string")
        return None

    def strings(self, node: Any, path: str) -> tuple[str, ...]:
        """A string or a list of strings."""
        if isinstance(node, yaml.SequenceNode):
            items = [self.string(n, f"{path}[{i}]") for i, n in enumerate(node.value)]
            return tuple(item for item in items if item)
        one = self.string(node, path)
        return split_list(one) if one else ()

    def _top(self, root: Any) -> UserConfig:
        top = self.mapping(root, "(top level)")
        for key, node in top.items():
            if key not in _SECTIONS:
                self.problem(
                    node.start_mark, key, "unknown setting", f"known: {', '.join(_SECTIONS)}"
                )
        mirrors, insecure = self._registries(top.get("registries"))
        cache = self._section(top.get("cache"), "cache", ("from", "to"))
        guest = self._section(top.get("guest"), "guest", ("extraCA",))
        to = self.strings(cache["to"], "cache.to") if "to" in cache else ()
        extra = self.string(guest["extraCA"], "guest.extraCA") if "extraCA" in guest else None
        return UserConfig(
            mirrors=mirrors,
            insecure=insecure,
            cache_from=self.strings(cache["from"], "cache.from") if "from" in cache else (),
            cache_to=to[0] if to else None,
            extra_ca=extra,
        )

    def _section(self, node: Any, name: str, known: tuple[str, ...]) -> dict[str, Any]:
        if node is None:
            return {}
        items = self.mapping(node, name)
        for key, value in items.items():
            if key not in known:
                self.problem(
                    value.start_mark,
                    f"{name}.{key}",
                    "unknown setting",
                    f"known: {', '.join(known)}",
                )
        return items

    def _registries(self, node: Any) -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
        mirrors: dict[str, tuple[str, ...]] = {}
        insecure: set[str] = set()
        for host, settings in (self.mapping(node, "registries") if node else {}).items():
            path = f"registries.{host}"
            items = self._section(settings, path, ("mirrors", "insecure"))
            if "mirrors" in items:
                mirrors[host] = self._mirror_list(items["mirrors"], f"{path}.mirrors")
            if "insecure" in items:
                flag = items["insecure"]
                if getattr(flag, "tag", "").endswith(":bool"):
                    if flag.value.lower() == "true":
                        insecure.add(host)
                else:
                    self.problem(flag.start_mark, f"{path}.insecure", "must be true or false")
        return mirrors, frozenset(insecure)

    def _mirror_list(self, node: Any, path: str) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node.start_mark, path, "must be a list of strings")
            return ()
        items = [self.string(n, f"{path}[{i}]") for i, n in enumerate(node.value)]
        return tuple(item for item in items if item)
