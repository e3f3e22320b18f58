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
    registry:                                # how registry traffic rides out faults
      attempts: 4                            # tries of each request, the first included
      deadline: 120                          # seconds: no new try starts later
      connectTimeout: 5                      # seconds to open a connection
      readTimeout: 60                        # seconds without a byte: a stall

The file is read strictly when a command starts: a YAML error, an unknown key (``mirors:``,
with a did-you-mean), a repeated key or a wrong type is an error naming the file, line and
column, with a hint (exit 2). ``microagent config show`` prints every setting and where it
came from (:func:`explain`).

Environment variables win over the file:
``MICROAGENT_REGISTRY_MIRRORS="docker.io=http://h:5000,ghcr.io=https://m"`` (per registry),
``MICROAGENT_INSECURE_REGISTRIES="h:5000"`` (added), ``MICROAGENT_CACHE_FROM`` /
``MICROAGENT_CACHE_TO`` (set, even empty, replaces ``cache``), ``MICROAGENT_EXTRA_CA``,
``MICROAGENT_REGISTRY_ATTEMPTS`` / ``_DEADLINE`` / ``_CONNECT_TIMEOUT`` / ``_READ_TIMEOUT``
(``registry``). Every variable is listed in docs/cli.md ("Environment").
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microagent.errors import ConfigError, Diagnostic, InvalidInputError, Location
from microagent.frozen import Frozen

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
LAYER_DISKS_ENV = "MICROAGENT_LAYER_DISKS"
FAKE_ENV = "MICROAGENT_FAKE"
RESTART_BACKOFF_ENV = "MICROAGENT_RESTART_BACKOFF"
SERVICE_PORT_BASE_ENV = "MICROAGENT_SERVICE_PORT_BASE"
REGISTRY_ATTEMPTS_ENV = "MICROAGENT_REGISTRY_ATTEMPTS"
REGISTRY_DEADLINE_ENV = "MICROAGENT_REGISTRY_DEADLINE"
REGISTRY_CONNECT_TIMEOUT_ENV = "MICROAGENT_REGISTRY_CONNECT_TIMEOUT"
REGISTRY_READ_TIMEOUT_ENV = "MICROAGENT_REGISTRY_READ_TIMEOUT"
RESOLVE_TTL_ENV = "MICROAGENT_RESOLVE_TTL"
RESOLVE_TTL = 300.0  # seconds; see docs/cli.md (Environment) for the staleness rule
# Registry traffic (oci.RetryPolicy takes its defaults from here): tries of one request, the
# first included; seconds after the first try that no new one starts; connect and read
# (no byte for this long: a stall) timeouts. The bounds each setting is checked against.
REGISTRY_ATTEMPTS = 4
REGISTRY_DEADLINE = 120.0
REGISTRY_CONNECT_TIMEOUT = 5.0
REGISTRY_READ_TIMEOUT = 60.0
MAX_REGISTRY_ATTEMPTS = 20
MAX_SECONDS = 3600.0
SERVICE_PORT_BASE = 18780
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MAX_CONFIG_BYTES = 1 << 20
_OFF = ("0", "no", "false", "off")
_SECTIONS = ("registries", "cache", "guest", "registry")


@dataclass(frozen=True, eq=False, repr=False)
class Settings(Frozen):
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
    layer_disks: bool = True  # a setup step's root as its parent's + its own layer disk
    fake_outcome: str | None = None  # tests: what the fake backend's guest does (JSON)
    restart_backoff: float = 1.0  # seconds before the first automatic restart (doubling)
    # The first guest loopback port of the host services (credential brokers, egress proxy).
    service_port_base: int = SERVICE_PORT_BASE
    registry_attempts: int = REGISTRY_ATTEMPTS
    registry_deadline: float = REGISTRY_DEADLINE
    registry_connect_timeout: float = REGISTRY_CONNECT_TIMEOUT
    registry_read_timeout: float = REGISTRY_READ_TIMEOUT
    # Seconds a tag's resolution to a digest is reused without asking the registry (0: never).
    resolve_ttl: float = RESOLVE_TTL

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
            layer_disks=_flag(env.get(LAYER_DISKS_ENV)),
            fake_outcome=env.get(FAKE_ENV) or None,
            restart_backoff=_seconds(RESTART_BACKOFF_ENV, env.get(RESTART_BACKOFF_ENV), 1.0),
            service_port_base=_port_base(env.get(SERVICE_PORT_BASE_ENV)),
            **_registry_tuning(config, env),
            resolve_ttl=_ttl(env.get(RESOLVE_TTL_ENV)),
        )


# -- where each setting came from (``microagent config show``) -------------------------------

# Settings only the environment sets: (name shown, Settings attribute, variable).
_ENV_ONLY: tuple[tuple[str, str, str], ...] = (
    ("backend", "backend", BACKEND_ENV),
    ("accel", "accel", ACCEL_ENV),
    ("kernel", "kernel", KERNEL_ENV),
    ("initrd", "initrd", INITRD_ENV),
    ("debianMirror", "debian_mirror", DEBIAN_MIRROR_ENV),
    ("debianSuite", "debian_suite", DEBIAN_SUITE_ENV),
    ("debianKeyring", "debian_keyring", DEBIAN_KEYRING_ENV),
    ("ramStage", "ram_stage", RAM_STAGE_ENV),
    ("cacheRootfs", "cache_rootfs", CACHE_ROOTFS_ENV),
    ("layerDisks", "layer_disks", LAYER_DISKS_ENV),
    ("fakeOutcome", "fake_outcome", FAKE_ENV),
    ("restartBackoff", "restart_backoff", RESTART_BACKOFF_ENV),
    ("servicePortBase", "service_port_base", SERVICE_PORT_BASE_ENV),
    ("resolveTtl", "resolve_ttl", RESOLVE_TTL_ENV),
)
# How registry traffic rides out faults: (key under `registry` in the config file, attribute,
# variable, hint). A variable set (not empty) wins over the file.
_REGISTRY_TUNING: tuple[tuple[str, str, str, str], ...] = (
    ("attempts", "registry_attempts", REGISTRY_ATTEMPTS_ENV, "e.g. 4 (1: no retries)"),
    ("deadline", "registry_deadline", REGISTRY_DEADLINE_ENV, "seconds, e.g. 120"),
    ("connectTimeout", "registry_connect_timeout", REGISTRY_CONNECT_TIMEOUT_ENV, "seconds, e.g. 5"),
    ("readTimeout", "registry_read_timeout", REGISTRY_READ_TIMEOUT_ENV, "seconds, e.g. 60"),
)
# Settings the config file can hold too: (name = config key, attribute, variable).
_FILE_OR_ENV: tuple[tuple[str, str, str], ...] = (
    ("cache.from", "cache_from", CACHE_FROM_ENV),
    ("cache.to", "cache_to", CACHE_TO_ENV),
    ("guest.extraCA", "extra_ca", EXTRA_CA_ENV),
)
SOURCE_DEFAULT = "default"
SOURCE_FILE = "config file"
SOURCE_ENVIRON = "environment"
SOURCE_FLAG = "flag"


@dataclass(frozen=True, eq=False, repr=False)
class Effective(Frozen):
    """One setting's value and where it came from: ``source`` is default, config file,
    environment or flag; ``origin`` the variable, the file's FILE:LINE:COL, or the flag."""

    name: str
    value: Any
    source: str = SOURCE_DEFAULT
    origin: str = ""
    env: str = ""  # the variable that sets it (whichever source set it this time)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "source": self.source,
            "origin": self.origin,
            "env": self.env,
        }


def _plain(value: Any) -> Any:
    """A settings value as JSON: paths as text, tuples and sets as (sorted) lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def explain(
    environ: Mapping[str, str] | None = None, *, home: Path | str | None = None
) -> tuple[Settings, tuple[Effective, ...]]:
    """The settings (as :meth:`Settings.from_environ` reads them) and, for each one, its value
    and where it came from: the ``--home`` flag, an environment variable, the config file
    (with the line it is on) or the default."""
    env = os.environ if environ is None else environ
    settings = Settings.from_environ(env, home=home)
    config = read_config(config_path(env))
    rows = [_home_row(settings, env, home), *_registry_rows(settings, config, env)]
    for name, attr, var in _FILE_OR_ENV:
        value = _plain(getattr(settings, attr))
        if var in env:  # set, even empty, replaces the file's value
            rows.append(Effective(name, value, SOURCE_ENVIRON, var, var))
        elif name in config.origins:
            rows.append(Effective(name, value, SOURCE_FILE, str(config.origins[name]), var))
        else:
            rows.append(Effective(name, value, env=var))
    for name, attr, var in _ENV_ONLY:
        value = _plain(getattr(settings, attr))
        if env.get(var):
            rows.append(Effective(name, value, SOURCE_ENVIRON, var, var))
        else:
            rows.append(Effective(name, value, env=var))
    rows += _tuning_rows(settings, config, env)
    rows.append(_auth_row(settings, env))
    return settings, tuple(rows)


def _tuning_rows(settings: Settings, config: UserConfig, env: Mapping[str, str]) -> list[Effective]:
    """``registry.attempts`` and the rest: from the environment, the config file or the
    default."""
    rows = []
    for key, attr, var, _hint in _REGISTRY_TUNING:
        name, value = f"registry.{key}", getattr(settings, attr)
        if env.get(var, "").strip():
            rows.append(Effective(name, value, SOURCE_ENVIRON, var, var))
        elif name in config.origins:
            rows.append(Effective(name, value, SOURCE_FILE, str(config.origins[name]), var))
        else:
            rows.append(Effective(name, value, env=var))
    return rows


def _home_row(settings: Settings, env: Mapping[str, str], flag: Path | str | None) -> Effective:
    if flag:
        return Effective("home", str(settings.home), SOURCE_FLAG, "--home", HOME_ENV)
    if env.get(HOME_ENV):
        return Effective("home", str(settings.home), SOURCE_ENVIRON, HOME_ENV, HOME_ENV)
    return Effective("home", str(settings.home), env=HOME_ENV)


def _registry_rows(
    settings: Settings, config: UserConfig, env: Mapping[str, str]
) -> list[Effective]:
    """A row per registry with mirrors and per insecure registry (one default row each when
    there are none), from the environment or the config file."""
    from_env = {item.partition("=")[0] for item in split_list(env.get(MIRRORS_ENV, ""))}
    rows = [
        _registry_row(f"registries.{host}.mirrors", list(mirrors), host in from_env, config)
        for host, mirrors in sorted(settings.registry_mirrors.items())
    ] or [Effective("registries.<host>.mirrors", [], env=MIRRORS_ENV)]
    insecure_env = set(split_list(env.get(INSECURE_ENV, "")))
    insecure = [
        _registry_row(f"registries.{host}.insecure", True, host in insecure_env, config)
        for host in sorted(settings.insecure_registries)
    ] or [Effective("registries.<host>.insecure", False, env=INSECURE_ENV)]
    return rows + insecure


def _registry_row(name: str, value: Any, from_env: bool, config: UserConfig) -> Effective:
    var = MIRRORS_ENV if name.endswith(".mirrors") else INSECURE_ENV
    if from_env:
        return Effective(name, value, SOURCE_ENVIRON, var, var)
    return Effective(name, value, SOURCE_FILE, str(config.origins.get(name)), var)


def _auth_row(settings: Settings, env: Mapping[str, str]) -> Effective:
    files = [str(path) for path in settings.auth_files]
    given = [var for var in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG") if env.get(var)]
    variables = "REGISTRY_AUTH_FILE, DOCKER_CONFIG"
    if given:
        return Effective("authFiles", files, SOURCE_ENVIRON, ", ".join(given), variables)
    return Effective("authFiles", files, env=variables)


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
    import platformdirs  # deferred: only without $MICROAGENT_HOME / --home

    return Path(platformdirs.user_cache_dir("microagent"))


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """The user config: ``$MICROAGENT_CONFIG`` or ``config.yaml`` in the user config dir."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    import platformdirs  # deferred: only without $MICROAGENT_CONFIG

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


def _registry_tuning(config: UserConfig, env: Mapping[str, str]) -> dict[str, Any]:
    """The registry's retry settings the environment or the config file give (the
    :class:`Settings` defaults stand for the rest)."""
    values: dict[str, Any] = {}
    for key, attr, var, hint in _REGISTRY_TUNING:
        text = env.get(var, "").strip()
        if text:
            values[attr] = _tuning_from_env(key, var, text, hint)
        elif key in config.registry:
            values[attr] = config.registry[key]
    return values


def _tuning_from_env(key: str, var: str, text: str, hint: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    problem = tuning_problem(key, value)
    if problem:
        raise InvalidInputError(
            f"{var}={text[:20]!r}: {problem}", hint=f"{hint}; or unset it for the default"
        )
    return int(value) if key == "attempts" else value


def tuning_problem(key: str, value: float) -> str | None:
    """What is wrong with ``value`` for the ``registry`` setting ``key`` (None: nothing)."""
    if not math.isfinite(value):
        value = -1.0
    if key == "attempts":
        if value != int(value) or not 1 <= value <= MAX_REGISTRY_ATTEMPTS:
            return f"must be a whole number from 1 to {MAX_REGISTRY_ATTEMPTS}"
        return None
    if not 0 < value <= MAX_SECONDS:
        return f"must be a number of seconds, more than 0 and at most {MAX_SECONDS:g}"
    return None


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


# Each section's keys; a key is known where it belongs (for "goes under ..." hints).
_KEYS: Mapping[str, tuple[str, ...]] = {
    "": _SECTIONS,
    "registries.<host>": ("mirrors", "insecure"),
    "cache": ("from", "to"),
    "guest": ("extraCA",),
    "registry": tuple(key for key, *_rest in _REGISTRY_TUNING),
}
_YAML_HINT = (
    "the config file is YAML: check the indentation (spaces, not tabs) and that every "
    "bracket and quote is closed; see `microagent config show` and docs/cli.md"
)


@dataclass(frozen=True, eq=False, repr=False)
class UserConfig(Frozen):
    """What the user config file says (empty when there is none).

    ``origins``: where each setting was written (``cache.from``,
    ``registries.docker.io.mirrors`` ...), for ``microagent config show``."""

    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    insecure: frozenset[str] = frozenset()
    cache_from: tuple[str, ...] = ()
    cache_to: str | None = None
    extra_ca: str | None = None
    registry: Mapping[str, int | float] = field(default_factory=dict)  # attempts, deadline ...
    origins: Mapping[str, Location] = field(default_factory=dict)


def read_config(path: Path) -> UserConfig:
    """Parse the user config strictly: a missing file is an empty config; a broken one (YAML
    errors, unknown or repeated keys, wrong types) a :class:`ConfigError` listing every
    problem with its line and column."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return UserConfig()
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read the config file {path}: {exc.strerror}",
            hint=f"fix its permissions, or point {CONFIG_ENV} at another file",
        ) from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidInputError(
            f"{path}: the config file is larger than 1 MiB", hint="it holds a few settings"
        )
    return _ConfigReader(str(path)).read(data)


def unknown_key_hint(key: str, section: str) -> str:
    """What an unknown ``key`` in ``section`` ("" for the top level) probably meant."""
    import difflib  # deferred: only a misspelling needs it

    known = _KEYS[section]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    listed = f"known here: {', '.join(known)}"
    if section == "registry" and ("." in key or ":" in key):
        return f"registry hosts go under `registries:` ({listed})"
    if close:
        return f"did you mean {close[0]!r}? ({listed})"
    for other, keys in _KEYS.items():
        near = difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
        if other != section and near:
            return f"{near[0]!r} belongs under {other or 'the top level'} ({listed})"
    return listed


class _ConfigReader:
    """Walks the YAML node tree, so every problem can name its line and column."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Diagnostic] = []
        self.origins: dict[str, Location] = {}

    def read(self, data: bytes) -> UserConfig:
        import yaml  # deferred: read only when a config file exists

        try:
            root = yaml.compose(data.decode("utf-8"), Loader=yaml.SafeLoader)
        except UnicodeDecodeError as exc:
            self.problems.append(
                Diagnostic(
                    f"not UTF-8 text (byte {exc.start})", Location(self.file), "", _YAML_HINT
                )
            )
            raise ConfigError(self.problems) from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            why = getattr(exc, "problem", None) or str(exc)
            hint = _YAML_HINT
            if "'\\t'" in why or "tab" in why:
                hint = "YAML indents with spaces only: replace the tab characters"
            self.problem(mark, "", f"not valid YAML: {why}", hint)
            raise ConfigError(self.problems) from exc
        config = self._top(root) if root is not None else UserConfig()
        if self.problems:
            raise ConfigError(self.problems)
        return config

    def location(self, mark: Any) -> Location:
        return Location(self.file, mark.line + 1, mark.column + 1) if mark else Location(self.file)

    def problem(self, mark: Any, path: str, message: str, hint: str = "") -> None:
        self.problems.append(Diagnostic(message, self.location(mark), path, hint))

    def mapping(self, node: Any, path: str, hint: str = "") -> dict[str, Any]:
        """Keys (scalars) to value nodes, or {} after recording a problem; a repeated key is a
        problem (YAML would silently keep the last one). An empty value (``cache:`` with its
        entries commented out) is an empty mapping."""
        import yaml  # deferred: read only when a config file exists

        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.problem(node.start_mark, path, "must be a mapping", hint)
            return {}
        items: dict[str, Any] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                self.problem(key.start_mark, path, "keys must be plain strings")
                continue
            name = str(key.value)
            if name in items:
                where = f"{path}.{name}" if path != "(top level)" else name
                self.problem(key.start_mark, where, "repeated key", "keep one of them")
            items[name] = (key, value)
        return {name: value for name, (_key, value) in items.items()}

    def keys(self, node: Any, path: str, section: str) -> None:
        """Report every key of ``node`` that ``section`` does not know, where it is written."""
        import yaml  # deferred: read only when a config file exists

        if not isinstance(node, yaml.MappingNode):
            return
        for key, _value in node.value:
            name = str(getattr(key, "value", ""))
            if isinstance(key, yaml.ScalarNode) and name not in _KEYS[section]:
                where = f"{path}.{name}" if path else name
                hint = unknown_key_hint(name, section)
                self.problem(key.start_mark, where, "unknown setting", hint)

    def string(self, node: Any, path: str) -> str | None:
        import yaml  # deferred: read only when a config file exists

        if isinstance(node, yaml.ScalarNode) and node.tag.endswith((":str", ":int")):
            return str(node.value)
        self.problem(node.start_mark, path, "must be a string")
        return None

    def strings(self, node: Any, path: str) -> tuple[str, ...]:
        """A string or a list of strings."""
        import yaml  # deferred: read only when a config file exists

        if isinstance(node, yaml.SequenceNode):
            items = [self.string(n, f"{path}[{i}]") for i, n in enumerate(node.value)]
            return tuple(item for item in items if item)
        one = self.string(node, path)
        return split_list(one) if one else ()

    def setting(self, items: Mapping[str, Any], name: str, path: str) -> Any:
        """The value node of ``name`` (None when absent), its place noted for ``origins``."""
        node = items.get(name)
        if node is not None:
            self.origins[path] = self.location(node.start_mark)
        return node

    def _top(self, root: Any) -> UserConfig:
        top = self.mapping(
            root, "(top level)", "start with `registries:`, `cache:`, `guest:` or `registry:`"
        )
        self.keys(root, "", "")
        mirrors, insecure = self._registries(top.get("registries"))
        cache = self._section(top.get("cache"), "cache")
        guest = self._section(top.get("guest"), "guest")
        to_node = self.setting(cache, "to", "cache.to")
        from_node = self.setting(cache, "from", "cache.from")
        extra_node = self.setting(guest, "extraCA", "guest.extraCA")
        to = self.strings(to_node, "cache.to") if to_node is not None else ()
        return UserConfig(
            mirrors=mirrors,
            insecure=insecure,
            cache_from=self.strings(from_node, "cache.from") if from_node is not None else (),
            cache_to=to[0] if to else None,
            extra_ca=self.string(extra_node, "guest.extraCA") if extra_node is not None else None,
            registry=self._tuning(top.get("registry")),
            origins=dict(self.origins),
        )

    def _section(self, node: Any, name: str, section: str = "") -> dict[str, Any]:
        if node is None:
            return {}
        items = self.mapping(node, name)
        self.keys(node, name, section or name)
        return items

    def _registries(self, node: Any) -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
        mirrors: dict[str, tuple[str, ...]] = {}
        insecure: set[str] = set()
        example = "e.g. registries: {docker.io: {mirrors: [http://127.0.0.1:5000]}}"
        if node is None:
            return mirrors, frozenset()
        hosts = self.mapping(node, "registries", f"map registry hosts to settings, {example}")
        for host, settings in hosts.items():
            path = f"registries.{host}"
            if host in _KEYS["registries.<host>"]:
                self.problem(settings.start_mark, path, f"{host!r} is not a registry host", example)
                continue
            items = self._section(settings, path, "registries.<host>")
            mirror_node = self.setting(items, "mirrors", f"{path}.mirrors")
            if mirror_node is not None:
                mirrors[host] = self._mirror_list(mirror_node, f"{path}.mirrors")
            flag = self.setting(items, "insecure", f"{path}.insecure")
            if flag is None:
                continue
            if getattr(flag, "tag", "").endswith(":bool"):
                if flag.value.lower() == "true":
                    insecure.add(host)
            else:
                self.problem(flag.start_mark, f"{path}.insecure", "must be true or false")
        return mirrors, frozenset(insecure)

    def _tuning(self, node: Any) -> dict[str, int | float]:
        """The ``registry`` section: retry attempts, deadline and timeouts, each checked."""
        import yaml  # deferred: read only when a config file exists

        items = self._section(node, "registry")
        found: dict[str, int | float] = {}
        for key, _attr, _var, hint in _REGISTRY_TUNING:
            path = f"registry.{key}"
            value_node = self.setting(items, key, path)
            if value_node is None:
                continue
            tag = getattr(value_node, "tag", "")
            if not isinstance(value_node, yaml.ScalarNode) or not tag.endswith((":int", ":float")):
                self.problem(value_node.start_mark, path, "must be a number", hint)
                continue
            value = float(yaml.SafeLoader("").construct_object(value_node, deep=True))
            problem = tuning_problem(key, value)
            if problem:
                self.problem(value_node.start_mark, path, problem, hint)
                continue
            found[key] = int(value) if key == "attempts" else value
        return found

    def _mirror_list(self, node: Any, path: str) -> tuple[str, ...]:
        import yaml  # deferred: read only when a config file exists

        if not isinstance(node, yaml.SequenceNode):
            hint = "e.g. mirrors: [http://127.0.0.1:5000] (tried in order)"
            self.problem(node.start_mark, path, "must be a list of strings", hint)
            return ()
        items = [self.string(n, f"{path}[{i}]") for i, n in enumerate(node.value)]
        return tuple(item for item in items if item)


def _ttl(value: str | None) -> float:
    """``$MICROAGENT_RESOLVE_TTL``: seconds from 0 (never reuse) to a day."""
    if value is None or not value.strip():
        return RESOLVE_TTL
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 86400:
        raise InvalidInputError(
            f"{RESOLVE_TTL_ENV}={value!r}: not a number of seconds",
            hint="e.g. 300, or 0 to ask the registry every time (at most 86400)",
        )
    return seconds
