"""Fixtures for the example-agent tests; the helpers behind them are in example_harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytest.register_assert_rewrite("example_harness", "example_providers")

from example_harness import AgentHarness, FakeModelAPI, load_agent  # noqa: E402
from example_providers import LoopRuns, Provider, cheapest_installed  # noqa: E402


@pytest.fixture(scope="session")
def core() -> ModuleType:
    """The agents' shared core, imported in-process from one agent.py (the copies are equal)."""
    return load_agent(cheapest_installed().example)


@pytest.fixture
def fake_api() -> Iterator[FakeModelAPI]:
    with FakeModelAPI() as api:
        yield api


@pytest.fixture(scope="session")
def loops(tmp_path_factory: pytest.TempPathFactory) -> LoopRuns:
    return LoopRuns(tmp_path_factory)


@pytest.fixture
def agent(provider: Provider, tmp_path: Path, fake_api: FakeModelAPI) -> AgentHarness:
    """The provider's example agent wired to the fake API, with the demo request waiting."""
    harness = provider.configure(AgentHarness(provider.example, tmp_path), fake_api)
    harness.write_request()
    return harness
