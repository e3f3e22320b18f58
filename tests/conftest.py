"""Shared test set-up: the testenv fixtures, and isolation from the user's own config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

pytest_plugins = ["testenv.pytest_plugin"]


@pytest.fixture(autouse=True)
def _isolated_user_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path_factory.getbasetemp() / "no-user-config.yaml"
    monkeypatch.setenv("MICROAGENT_CONFIG", str(Path(config)))
    monkeypatch.delenv("MICROAGENT_REGISTRY_MIRRORS", raising=False)
    monkeypatch.delenv("MICROAGENT_INSECURE_REGISTRIES", raising=False)
