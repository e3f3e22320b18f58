"""Flatten stages in RAM when there is room, in the store otherwise; stale ones collected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microagent.ext4 import ramstage
from microagent.settings import Settings
from microagent.store.content import Store


def test_stage_in_ram_when_there_is_room(tmp_path: Path) -> None:
    ram = tmp_path / "shm"
    ram.mkdir()
    with ramstage.stage_dir(Store(tmp_path / "store"), 1000, directory=ram) as stage:
        assert stage.parent.parent == ram and stage.parent.name.startswith(ramstage.PREFIX)
        assert stage.parent.stat().st_mode & 0o777 == 0o700
        stage.mkdir()
        (stage / "f").write_text("x")
    assert list(ram.iterdir()) == []


def test_stage_in_the_store_when_ram_is_off_or_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ram, store = tmp_path / "shm", Store(tmp_path / "store")
    ram.mkdir()
    monkeypatch.setenv("MICROAGENT_RAM_STAGE", "0")
    off = Settings.from_environ().ram_stage
    with ramstage.stage_dir(store, 1000, ram=off, directory=ram) as stage:
        assert not off and store.root in stage.parents
    with ramstage.stage_dir(store, 1 << 60, directory=ram) as stage:
        assert store.root in stage.parents


def test_stages_of_dead_processes_are_collected(tmp_path: Path) -> None:
    mine = tmp_path / f"{ramstage.PREFIX}{os.getpid()}-abc"
    dead = tmp_path / f"{ramstage.PREFIX}999999999-abc"
    other = tmp_path / "unrelated"
    for path in (mine, dead, other):
        path.mkdir()
    ramstage.collect_stale(tmp_path)
    assert mine.exists() and other.exists() and not dead.exists()
