"""``--no-cache`` and ``--no-cache-from N`` on build, create and plan (the fake backend).

Setup boots are counted by the commands' own ``setupBoots``; what a rebuilt step left behind is
read from the store's step records: a rebuilt step's record names its new layer (same key, new
result), the steps before N keep theirs, and the next build without the flags reuses the new
one without booting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from testenv.clitools import cli_json

from microagent.cli import main
from microagent.store.content import Store
from microagent.store.records import read_record

SPEC = "name: nc\nimage: oci:layout:latest\nsetup:\n  - echo one\n  - echo two\n"


@pytest.fixture
def spec(busybox_project: Path) -> Path:
    path = busybox_project / "microagent.yaml"
    path.write_text(SPEC)
    return path


def _setup_keys(capsys: pytest.CaptureFixture[str], spec: Path) -> list[str]:
    plan = cli_json(capsys, "plan", "-f", str(spec))
    return [s["key"] for s in plan["steps"] if s["kind"] == "setup"]


def _layers(busybox_project: Path, key: str) -> list[str]:
    record = read_record(Store(busybox_project.parent / "home" / "store"), key)
    assert record is not None
    return [layer.digest for layer in record.layers]


def _create(capsys: pytest.CaptureFixture[str], spec: Path, name: str, *flags: str) -> Any:
    return cli_json(capsys, "create", "-f", str(spec), "--name", name, *flags)


def test_no_cache_rebuilds_every_setup_step(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _create(capsys, spec, "a")
    assert first["setupBoots"] == 2
    assert _create(capsys, spec, "b")["setupBoots"] == 0  # the cache works
    again = _create(capsys, spec, "c", "--no-cache")
    assert (again["setupBoots"], again["stepsBuilt"], again["stepsCached"]) == (2, 2, 0)
    assert again["rootfsKey"] == first["rootfsKey"]  # same inputs, same key
    assert _create(capsys, spec, "d")["setupBoots"] == 0  # the rebuilt steps are reused


def test_build_no_cache_rebuilds_too(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_json(capsys, "build", "-f", str(spec))["setupBoots"] == 2
    assert cli_json(capsys, "build", "-f", str(spec))["setupBoots"] == 0
    assert cli_json(capsys, "build", "-f", str(spec), "--no-cache")["setupBoots"] == 2
    rebuilt = cli_json(capsys, "build", "-f", str(spec), "--no-cache-from", "2")
    assert (rebuilt["setupBoots"], rebuilt["stepsBuilt"]) == (1, 1)


def test_no_cache_from_2_reuses_step_1_and_replaces_step_2(
    spec: Path,
    busybox_project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _create(capsys, spec, "a")
    one, two = _setup_keys(capsys, spec)
    before_one, before_two = _layers(busybox_project, one), _layers(busybox_project, two)
    # the guest's step now writes something else: an unpinned `pip install` on a later day
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"writes": {"/etc/stamp": "newer"}}))
    again = _create(capsys, spec, "b", "--no-cache-from", "2")
    assert (again["setupBoots"], again["stepsBuilt"], again["stepsCached"]) == (1, 1, 1)
    assert _layers(busybox_project, one) == before_one  # step 1 kept as it was
    after_two = _layers(busybox_project, two)
    assert after_two[:-1] == before_two[:-1]  # built on the same step 1
    assert after_two[-1] != before_two[-1]  # same key, the new result
    monkeypatch.delenv("MICROAGENT_FAKE")
    reused = _create(capsys, spec, "c")
    assert reused["setupBoots"] == 0 and reused["rootfsKey"] == two
    assert _layers(busybox_project, two) == after_two


def test_plan_says_which_steps_are_rebuilt_and_why(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _create(capsys, spec, "a")
    plan = cli_json(capsys, "plan", "-f", str(spec), "--no-cache-from", "2")
    setup = [s for s in plan["steps"] if s["kind"] == "setup"]
    assert setup[0]["cached"] is True
    assert setup[1]["cached"] is False
    assert setup[1]["reason"] == "--no-cache-from 2: rebuilt (cached, not reused)"
    everything = cli_json(capsys, "plan", "-f", str(spec), "--no-cache")
    reasons = [s["reason"] for s in everything["steps"] if s["kind"] == "setup"]
    assert reasons == ["--no-cache: rebuilt (cached, not reused)"] * 2
    base = [s for s in everything["steps"] if s["kind"] == "base"][0]
    assert base["cached"] is True  # the base image is pinned by digest: never re-pulled
    capsys.readouterr()
    assert main(["plan", "-f", str(spec), "--no-cache-from", "2"]) == 0
    text = capsys.readouterr().out
    assert "--no-cache-from 2: rebuilt (cached, not reused)" in text
    assert "5 steps: 2 cached, 1 to build, 2 per workspace" in text  # base + setup 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--no-cache-from", "3"), "--no-cache-from 3: the spec has 2 setup steps"),
        (("--no-cache-from", "0"), "--no-cache-from"),
        (("--no-cache-from", "two"), "--no-cache-from"),
        (("--no-cache", "--no-cache-from", "1"), "--no-cache and --no-cache-from are exclusive"),
    ],
)
@pytest.mark.parametrize("command", ["create", "build", "plan"])
def test_a_bad_n_is_a_usage_error(
    spec: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    flags: tuple[str, ...],
    message: str,
) -> None:
    error = cli_json(capsys, command, "-f", str(spec), *flags, code=2)
    assert error["ok"] is False
    assert error["error"]["kind"] == "usage"
    assert message in error["error"]["message"]
    assert error["error"]["hint"]
    assert not (spec.parent.parent / "home" / "workspaces" / "nc").exists()
