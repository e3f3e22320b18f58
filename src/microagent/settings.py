"""Where microagent keeps things: the store (``MICROAGENT_HOME``) and the user config."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "MICROAGENT_HOME"
CONFIG_ENV = "MICROAGENT_CONFIG"


def home_dir(override: Path | str | None = None) -> Path:
    """The store root: ``--home``, else ``$MICROAGENT_HOME``, else the user cache dir."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("microagent"))


def store_dir(home: Path) -> Path:
    """The content-addressed store (blobs, step keys, root filesystems, guest kits)."""
    return home / "store"


def workspaces_dir(home: Path) -> Path:
    """Workspace records and their disks (never pruned by the cache)."""
    return home / "workspaces"


def config_file() -> Path:
    """The user config (registries, mirrors): ``$MICROAGENT_CONFIG`` or the user config dir."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("microagent")) / "config.yaml"


EXTRA_CA_ENV = "MICROAGENT_EXTRA_CA"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _user_setting(*keys: str) -> object:
    import yaml

    try:
        node: object = yaml.safe_load(config_file().read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def extra_ca_bundle() -> bytes | None:
    """Extra CA certificates for guests: ``$MICROAGENT_EXTRA_CA`` or ``guest.extraCA`` in the
    user config, either ``host`` (this machine's bundle, for TLS-intercepting proxies) or a
    file path. They are runtime configuration: delivered on each boot's config disk, never
    stored in a layer or cache key."""
    from microagent.errors import InvalidInputError

    raw = os.environ.get(EXTRA_CA_ENV)
    if raw is None:
        setting = _user_setting("guest", "extraCA")
        raw = str(setting) if setting else ""
    if not raw or raw.lower() in ("none", "off", "false"):
        return None
    path = HOST_CA_BUNDLE if raw == "host" else Path(raw).expanduser()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read the extra CA bundle {path}: {exc.strerror}",
            hint=f"set {EXTRA_CA_ENV}=host, a PEM file, or unset it",
        ) from exc
