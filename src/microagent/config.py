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
