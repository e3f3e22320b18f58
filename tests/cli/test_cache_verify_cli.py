"""``microagent cache verify [--repair] [-y]``: the document CI reads, the exit codes, the text,
and the question ``--repair`` asks. The store is the one a real ``create`` made (fake backend,
busybox stand-in), damaged on disk.
"""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from microagent.cli import main
from microagent.commands import confirm
from microagent.commands.envelope import schema
from microagent.store.content import Store
from microagent.store.retention import builds_in_flight
from testenv.clitools import cli_json

SPEC = "name: ws\nimage: oci:layout:latest\nsetup: [mkdir -p /workspace]\nentrypoint: 'true'\n"
pytestmark = pytest.mark.tools("mke2fs", "e2fsck")
PROBLEM_KEYS = {"kind", "name", "problem", "detail"}


@pytest.fixture
def store(busybox_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    (busybox_project / "microagent.yaml").write_text(SPEC)
    cli_json(capsys, "create", "-f", str(busybox_project / "microagent.yaml"))
    return tmp_path / "home" / "store"


def damage(store: Path) -> tuple[str, str]:
    """A step record that is not JSON and a flipped byte in a layer blob: their names."""
    (store / "keys" / "junk.json").write_text("[]")
    record = json.loads(next((store / "keys").glob("*.json")).read_text())
    blob = store / "blobs" / record["layers"][0]["digest"].replace(":", "/")
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    return "keys/junk.json", blob.relative_to(store).as_posix()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_clean_store_is_ok_with_exit_0(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = cli_json(capsys, "cache", "verify", code=0)
    jsonschema.validate(doc, schema())
    assert doc == {
        "ok": True,
        "schemaVersion": 1,
        "checked": {"blobs": 4, "keys": 2, "entries": 2},
        "problems": [],
        "repaired": [],
    }
    code, out, _ = run(capsys, "cache", "verify")
    assert (code, out) == (0, "checked 4 blobs, 2 step records, 2 built entries: no problems\n")


def test_problems_are_listed_for_ci_with_exit_1(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk, blob = damage(store)
    doc = cli_json(capsys, "cache", "verify", code=1)
    jsonschema.validate(doc, schema())
    assert list(doc) == ["ok", "schemaVersion", "checked", "problems", "repaired", "error"]
    assert doc["ok"] is False and doc["repaired"] == []
    assert doc["checked"] == {"blobs": 4, "keys": 3, "entries": 2}
    assert all(set(p) == PROBLEM_KEYS for p in doc["problems"])
    kinds = [(p["kind"], p["name"], p["problem"]) for p in doc["problems"]]
    # the base layer is in both records' chains: both records go with it
    assert ("key", junk, "orphaned") in kinds
    assert [k for k in kinds if k[0] == "blob"] == [("blob", blob, "corrupt")]
    assert sum(1 for k in kinds if k[2] == "missing") == 2
    assert doc["error"]["kind"] == "integrity"
    assert doc["error"]["message"].startswith("the cache has 4 problems: key keys/")
    assert "--repair" in doc["error"]["hint"]
    assert (store / junk).exists() and (store / blob).exists()  # verify alone removes nothing


def test_the_text_says_what_is_wrong_and_what_was_checked(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk, blob = damage(store)
    code, out, err = run(capsys, "cache", "verify")
    lines = out.splitlines()
    assert code == 1 and "error: the cache has 4 problems" in err and "hint:" in err
    assert f"ORPHANED  key {junk}: not a step record name (<64 hex>.json)" in lines
    assert any(line.startswith(f"CORRUPT   blob {blob}: content hashes to") for line in lines)
    assert sum(line.startswith("MISSING   key keys/") for line in lines) == 2
    assert lines[-1] == "checked 4 blobs, 3 step records, 2 built entries: 4 problems"


def test_repair_needs_a_yes_off_a_terminal(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk, _ = damage(store)
    code, _, err = run(capsys, "cache", "verify", "--repair")
    assert code == 2 and "not confirmed" in err and "pass -y" in err
    assert (store / junk).exists()


def test_repair_with_yes_removes_what_is_wrong_and_then_all_is_clean(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk, blob = damage(store)
    doc = cli_json(capsys, "cache", "verify", "--repair", "-y", code=0)
    jsonschema.validate(doc, schema())
    assert doc["ok"] is True and "error" not in doc
    assert sorted(doc["repaired"]) == sorted(p["name"] for p in doc["problems"])
    assert junk in doc["repaired"] and blob in doc["repaired"]
    assert not (store / junk).exists() and not (store / blob).exists()
    assert cli_json(capsys, "cache", "verify", code=0)["problems"] == []


def test_repair_text_marks_what_it_removed(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk, _ = damage(store)
    code, out, _ = run(capsys, "cache", "verify", "--repair", "--yes")
    lines = out.splitlines()
    assert code == 0
    assert f"REMOVED   key {junk}: orphaned (not a step record name (<64 hex>.json))" in lines
    assert lines[-1] == "checked 4 blobs, 3 step records, 2 built entries: 4 problems, 4 removed"


def test_on_a_terminal_repair_lists_what_would_go_and_asks(
    store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    junk, blob = damage(store)
    monkeypatch.setattr(confirm, "interactive", lambda: True)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    code, _, err = run(capsys, "cache", "verify", "--repair")
    assert code == 1  # answered no: aborted, nothing removed
    assert f"  key {junk}: orphaned" in err and f"  blob {blob}: corrupt" in err
    assert "remove these cache entries?" in err
    assert (store / junk).exists() and (store / blob).exists()
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    doc: dict[str, Any] = cli_json(capsys, "cache", "verify", "--repair", code=0)
    assert junk in doc["repaired"]


def test_nothing_wrong_means_nothing_to_ask(
    store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(confirm, "interactive", lambda: True)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # an answer would be read from here
    code, out, err = run(capsys, "cache", "verify", "--repair")
    assert code == 0 and "?" not in err and out.endswith("no problems\n")


def test_repair_waits_for_builds_in_flight_as_prune_does(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A create holds the builds lock shared until its workspace is recorded; what it uses is
    in no record yet, so --repair (which removes) waits for it; a plain verify does not."""
    junk, _ = damage(store)
    release = threading.Event()
    held = threading.Event()

    def build_in_flight() -> None:
        with builds_in_flight(Store(store)):
            held.set()
            release.wait(30)

    builder = threading.Thread(target=build_in_flight)
    builder.start()
    try:
        assert held.wait(10)
        assert cli_json(capsys, "cache", "verify", code=1)["repaired"] == []  # reads, no wait
        with ThreadPoolExecutor(1) as pool:
            repair = pool.submit(run, capsys, "cache", "verify", "--repair", "-y")
            time.sleep(1.0)
            assert not repair.done()
            assert (store / junk).exists()
            release.set()
            code, _, err = repair.result(timeout=60)
    finally:
        release.set()
        builder.join()
    assert code == 0
    assert "waiting for the builds in progress to finish" in err
    assert not (store / junk).exists()
