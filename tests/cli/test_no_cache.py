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

from microagent.cli import main
from microagent.store.content import Store
from microagent.store.records import read_record
from testenv.clitools import cli_json

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


def test_no_cache_rebuilds_every_setup_step(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    verified = cli_json(capsys, "cache", "verify", code=None)
    assert verified["problems"] == [], verified  # the replaced entries are coherent
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
    base = next(s for s in everything["steps"] if s["kind"] == "base")
    assert base["cached"] is True  # the base image is pinned by digest: never re-pulled
    capsys.readouterr()
    assert main(["plan", "-f", str(spec), "--no-cache-from", "2"]) == 0
    text = capsys.readouterr().out
    assert "--no-cache-from 2: rebuilt (cached, not reused)" in text
    assert "5 steps: 2 cached, 1 to build, 2 per workspace" in text  # base + setup 1


def test_progress_says_which_steps_are_rebuilt(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _create(capsys, spec, "a")
    capsys.readouterr()
    assert main(["create", "-f", str(spec), "--name", "b", "--no-cache-from", "2"]) == 0
    err = capsys.readouterr().err
    assert "[1/2] setup echo one  CACHED" in err
    assert "[2/2] setup echo two  (rebuilt: cache not used)" in err
    assert "[2/2] setup echo two  DONE" in err


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


# -- the resolution cache: a tag's digest reused for a while, --refresh, the TTL -----------------


def _move_tag(registry_url: str, image: Any, tag: str, note: str) -> str:
    """Point ``tag`` at a new manifest (the pushed one plus an annotation): the digest of the
    same content changes, as when a tag is pushed again upstream."""
    import requests

    base = f"{registry_url}/v2/{image.repository}/manifests"
    accept = "application/vnd.oci.image.manifest.v1+json"
    got = requests.get(f"{base}/{image.digest}", headers={"Accept": accept}, timeout=10)
    got.raise_for_status()
    manifest = got.json()
    manifest.setdefault("annotations", {})["test.note"] = note
    kind = manifest.get("mediaType") or got.headers["Content-Type"]
    put = requests.put(
        f"{base}/{tag}",
        data=json.dumps(manifest).encode(),
        headers={"Content-Type": kind},
        timeout=10,
    )
    put.raise_for_status()
    return str(put.headers["Docker-Content-Digest"])


@pytest.fixture
def moving(busybox_project: Path, registry: Any, busybox_image: Any) -> tuple[Path, Any]:
    path = busybox_project / "microagent.yaml"
    ref = f"{busybox_image.host}/{busybox_image.repository}:moving"
    path.write_text(f"name: mv\nimage: {ref}\n")
    return path, lambda note: _move_tag(registry.url, busybox_image, "moving", note)


def _digest(capsys: pytest.CaptureFixture[str], spec: Path, *flags: str) -> str:
    return str(cli_json(capsys, "plan", "-f", str(spec), *flags)["image"]["digest"])


def test_a_recent_resolution_is_reused_until_refresh(
    moving: tuple[Path, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    spec, move = moving
    first = move("one")
    assert _digest(capsys, spec) == first
    second = move("two")
    assert second != first
    assert _digest(capsys, spec) == first  # within the TTL: the registry is not asked
    assert _digest(capsys, spec, "--refresh") == second
    assert _digest(capsys, spec) == second  # the refreshed answer is remembered
    created = cli_json(capsys, "create", "-f", str(spec))
    assert created["setupBoots"] == 0
    move("three")
    assert (
        cli_json(capsys, "create", "-f", str(spec), "--name", "mv2")["steps"][0]["key"]
        == (created["steps"][0]["key"])
    )  # a cache-hit create within the TTL: the same base, no registry


def test_a_ttl_of_zero_asks_every_time(
    moving: tuple[Path, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, move = moving
    monkeypatch.setenv("MICROAGENT_RESOLVE_TTL", "0")
    first = move("one")
    assert _digest(capsys, spec) == first
    latest = move("two")
    assert _digest(capsys, spec) == latest


def test_an_expired_resolution_is_asked_again(
    moving: tuple[Path, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, move = moving
    move("one")
    _digest(capsys, spec)
    latest = move("two")
    records = list((spec.parent.parent / "home" / "store" / "resolved").glob("*.json"))
    assert len(records) == 1
    data = json.loads(records[0].read_text())
    data["resolvedAt"] -= 301  # older than the default TTL
    records[0].write_text(json.dumps(data))
    assert _digest(capsys, spec) == latest


def test_a_damaged_resolution_record_is_a_miss(
    moving: tuple[Path, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    spec, move = moving
    move("one")
    _digest(capsys, spec)
    latest = move("two")
    (record,) = (spec.parent.parent / "home" / "store" / "resolved").glob("*.json")
    record.write_text('{"source": 1, "resolvedAt": "soon"')
    assert _digest(capsys, spec) == latest


def test_a_bad_ttl_is_located(
    spec: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_RESOLVE_TTL", "-5")
    error = cli_json(capsys, "plan", "-f", str(spec), code=2)
    assert "MICROAGENT_RESOLVE_TTL='-5'" in error["error"]["message"]


def test_a_resolution_that_cannot_be_kept_is_no_error(
    moving: tuple[Path, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    spec, move = moving
    store = spec.parent.parent / "home" / "store"
    store.mkdir(parents=True)
    (store / "resolved").write_text("not a folder")  # nowhere to keep answers
    first = move("one")
    assert _digest(capsys, spec) == first
    latest = move("two")
    assert _digest(capsys, spec) == latest  # nothing was kept: the registry is asked again
