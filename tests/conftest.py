"""Keep every test away from the developer's own microagent configuration."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_user_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path_factory.getbasetemp() / "no-user-config.yaml"
    monkeypatch.setenv("MICROAGENT_CONFIG", str(Path(config)))
    monkeypatch.delenv("MICROAGENT_REGISTRY_MIRRORS", raising=False)
    monkeypatch.delenv("MICROAGENT_INSECURE_REGISTRIES", raising=False)
