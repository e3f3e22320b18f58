"""What the stacked-root remote tests share: a busybox project whose setup steps stack (layer
disks on, no remote cache or packed-image setting from the caller's environment), its spec,
and the CLI as the machine of one home."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from microagent.store.content import Store
from microagent.store.records import StepRecord, read_record
from testenv.clitools import cli_json

SETUP = ["mkdir -p /w", "touch /w/x", "echo three > /w/three"]


def stacked_project(busybox_project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``busybox_project`` with the setup steps of :data:`SETUP`, built with layer disks on."""
    for name in ("MICROAGENT_LAYER_DISKS", "MICROAGENT_CACHE_ROOTFS", "MICROAGENT_CACHE_FROM"):
        monkeypatch.delenv(name, raising=False)  # layer disks on: setup steps stack
    write_spec(busybox_project, SETUP)
    return busybox_project


def write_spec(project: Path, setup: list[str]) -> str:
    spec = project / "microagent.yaml"
    spec.write_text(
        f"name: ws\nimage: oci:layout:latest\nsetup: {json.dumps(setup)}\nentrypoint: sh\n"
    )
    return str(spec)


def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], home: Path, *args: str
) -> dict[str, Any]:
    """``microagent --json ARGS`` as the machine of ``home`` (exit 0 checked)."""
    monkeypatch.setenv("MICROAGENT_HOME", str(home))
    return cli_json(capsys, *args)


def setup_records(home: Path, keys: list[str]) -> list[StepRecord]:
    store = Store(home / "store")
    records = [read_record(store, key) for key in keys]
    assert all(r is not None for r in records)
    return [r for r in records if r is not None]
