"""pause/resume, snapshot create/ls/rm, suspend and start --from through the CLI (issue 18),
with real supervisors and the fake backend (its machine serves QMP like QEMU: stop, cont,
getfd + migrate to the passed descriptor, quit; see runtime.fake).

What the VM tier shows with QEMU (tests/vm/test_vm_snapshot.py) is the guest's side; here the
host's: states, events, the snapshot folder and its atomic publication, refusals (exec and cp
while paused, a corrupt or mismatched snapshot, a bad tag) and that a refused snapshot leaves
the workspace startable cold.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent import runner
from microagent.runtime import snapshot, stamps
from microagent.workspace import snapshots
from microagent.workspace.lifecycle import leftovers
from microagent.workspace.records import Workspace
from testenv.clitools import cli_json as cli

NAME = "snap"
HANG = {"hang": True, "process": ["sleep", "600"]}


def until(check: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never: {what}")
        time.sleep(0.05)


@pytest.fixture
def ws(
    busybox_project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Workspace]:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(HANG))
    # The fake has no guest agent: each resume and snapshot would wait 5 s for one to set
    # the clock (the outcome, "not set", is what the tests see either way).
    monkeypatch.setattr(snapshots, "CLOCK_WAIT", 0.3)
    spec = busybox_project / "microagent.yaml"
    spec.write_text(f"name: {NAME}\nimage: oci:layout:latest\nentrypoint: sleep 600\n")
    cli(capsys, "create", "-f", str(spec))
    cli(capsys, "start", NAME)
    workspace = Workspace(tmp_path / "home" / "workspaces" / NAME)
    until(lambda: workspace.run.runtime().get("commandStartedAt"), "the command started")
    yield workspace
    for process in leftovers(workspace):
        with contextlib.suppress(Exception):
            os.kill(process.pid, signal.SIGCONT)
            runner.kill_process(process)


def events(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [e["event"] for e in cli(capsys, "events", NAME)["events"]]


def test_pause_and_resume(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "pause", NAME)["state"] == "paused"
    assert cli(capsys, "status", NAME)["event"]["state"] == "paused"
    assert cli(capsys, "--json", "ps")["workspaces"][0]["state"] == "paused"
    assert cli(capsys, "pause", NAME)["state"] == "paused"  # again: no change
    refused = cli(capsys, "exec", NAME, "--", "true", code=1)
    assert refused["error"]["kind"] == "conflict" and "paused" in refused["error"]["message"]
    assert "microagent resume" in refused["error"]["hint"]
    refused = cli(capsys, "cp", f"{NAME}:/etc/passwd", str(ws.root.parent), code=1)
    assert "paused" in refused["error"]["message"]
    resumed = cli(capsys, "resume", NAME)
    assert resumed["state"] == "running"
    assert "clock" in resumed  # the fake has no guest agent: the clock is said to be unset
    assert cli(capsys, "status", NAME)["event"]["detail"].startswith("resumed after")
    assert {"paused", "running", "clock"} <= set(events(capsys))


def test_halt_of_a_paused_workspace_thaws_it_first(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    cli(capsys, "pause", NAME)
    assert cli(capsys, "halt", NAME, "--timeout", "10")["state"] == "halted"


def test_snapshot_create_ls_rm(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    made = cli(capsys, "snapshot", "create", NAME, "first")
    assert made["tag"] == "first" and made["state"] == "running"
    assert made["stateBytes"] > 0 and made["bytes"] > made["stateBytes"]  # + the state disk
    folder = ws.root / "snapshots" / "first"
    assert folder.is_symlink() and folder.resolve().name.startswith(".v-first-")
    assert (folder / "vmstate").read_bytes().startswith(b"microagent-fake-vmstate/1")
    assert oct(folder.resolve().stat().st_mode & 0o777) == "0o700"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [d["disk"] for d in manifest["disks"]] == ["state"]
    assert manifest["identity"]["vmm"] == "fake"
    # the vCPUs ran on once the state and the disk copy were written: before the digests
    # and the publication (the "snapshot" event), not after
    rows = cli(capsys, "events", NAME)["events"]
    ran_on = [i for i, e in enumerate(rows) if e["detail"] == "snapshot first saved, running on"]
    assert ran_on and ran_on[0] < [e["event"] for e in rows].index("snapshot")
    default = cli(capsys, "snapshot", "create", NAME)["tag"]
    assert default.startswith("snap-")
    tags = [row["tag"] for row in cli(capsys, "snapshot", "ls", NAME)["snapshots"]]
    assert tags == sorted(["first", default])
    status = cli(capsys, "status", NAME)
    assert status["event"]["state"] == "running" and status["snapshots"] == tags
    assert cli(capsys, "snapshot", "rm", NAME, "first")["removed"] is True
    assert cli(capsys, "snapshot", "rm", NAME, "first")["removed"] is False
    assert [p.name for p in (ws.root / "snapshots").iterdir() if "first" in p.name] == []


def test_a_second_snapshot_of_a_tag_replaces_the_first_whole(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    cli(capsys, "snapshot", "create", NAME, "t")
    first = (ws.root / "snapshots" / "t").resolve()
    cli(capsys, "snapshot", "create", NAME, "t")
    second = (ws.root / "snapshots" / "t").resolve()
    assert first != second and not first.exists() and second.is_dir()
    # what a write killed midway leaves is collected by the next one, never listed
    (ws.root / "snapshots" / ".tmp-t-dead").mkdir()
    (ws.root / "snapshots" / ".v-t-orphan").mkdir()
    assert [r["tag"] for r in cli(capsys, "snapshot", "ls", NAME)["snapshots"]] == ["t"]
    cli(capsys, "snapshot", "create", NAME, "u")
    left = sorted(p.name for p in (ws.root / "snapshots").iterdir())
    assert not [n for n in left if n.startswith(".tmp-") or n == ".v-t-orphan"]


def test_suspend_then_start_resumes(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    done = cli(capsys, "suspend", NAME)
    assert done["state"] == "suspended" and done["tag"] == "suspended"
    status = cli(capsys, "status", NAME)
    assert status["event"]["state"] == "suspended" and status["ok"] is True
    assert cli(capsys, "list")["workspaces"][0]["state"] == "suspended"
    assert cli(capsys, "ps")["workspaces"] == []
    refused = cli(capsys, "cp", str(ws.root / "workspace.json"), f"{NAME}:/x", code=1)
    assert "suspended" in refused["error"]["message"]
    assert cli(capsys, "start", NAME)["state"] == "running"
    until(lambda: "restored" in events(capsys), "the restore event")
    assert cli(capsys, "status", NAME)["event"]["detail"] == "vm restored from a snapshot"
    checked = [e for e in cli(capsys, "events", NAME)["events"] if e["event"] == "verified"]
    assert checked[-1]["hashed"] == []  # stamped as the save wrote it: no byte read again
    assert checked[-1]["unchanged"] == ["vmstate", "disk-state"]


def test_start_from_a_tag_after_a_kill(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cli(capsys, "snapshot", "create", NAME, "keep")
    cli(capsys, "kill", NAME)
    assert cli(capsys, "start", NAME, "--from", "keep")["state"] == "running"
    assert "restore" in events(capsys) and "fsck" not in events(capsys)


def test_a_corrupt_snapshot_is_refused_and_a_cold_start_works(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    cli(capsys, "snapshot", "create", NAME, "bad")
    cli(capsys, "kill", NAME)
    state = ws.root / "snapshots" / "bad" / "vmstate"
    book = stamps.Book.of_folder(state.parent.resolve())
    assert book.lookup(stamps.Version.of(state.stat()), "sha256")  # stamped when saved
    data = bytearray(state.read_bytes())
    data[-2] ^= 0xFF
    before = state.stat()
    state.write_bytes(bytes(data))  # the same size, and the mtime set back: the ctime moved
    os.utime(state, ns=(before.st_atime_ns, before.st_mtime_ns))
    refused = cli(capsys, "start", NAME, "--from", "bad", code=1)
    assert refused["error"]["kind"] == "integrity"
    assert "corrupt" in refused["error"]["message"] and "start NAME" in refused["error"]["hint"]
    assert cli(capsys, "status", NAME)["event"]["state"] == "stopped"  # nothing was started
    assert cli(capsys, "start", NAME)["state"] == "running"  # cold
    assert "restored" not in events(capsys)


def test_a_mismatched_snapshot_is_refused(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    cli(capsys, "snapshot", "create", NAME, "other")
    cli(capsys, "kill", NAME)
    path = ws.root / "snapshots" / "other" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["identity"]["shape"]["options"]["-m"] = "4096"
    path.write_text(json.dumps(manifest))
    refused = cli(capsys, "start", NAME, "--from", "other", code=1)
    assert refused["error"]["kind"] == "conflict"
    assert '"-m": "4096"' in refused["error"]["message"]
    assert not (ws.run.config_disk).exists()  # the environment did not stay on disk


def test_bad_tags_are_refused(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    for tag in ("../x", ".hidden", "a" * 64, "a b", "x\n", "-rf"):
        refused = cli(capsys, "snapshot", "create", NAME, "--", tag, code=2)
        assert refused["error"]["kind"] == "invalid_input", tag
        assert cli(capsys, "start", NAME, "--from", tag, code=None)["ok"] is False
        assert cli(capsys, "snapshot", "rm", NAME, "--", tag, code=2)["ok"] is False
    assert not (ws.root / "snapshots").exists() or not list((ws.root / "snapshots").iterdir())


def test_a_snapshot_needs_a_live_workspace(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    cli(capsys, "halt", NAME)
    refused = cli(capsys, "snapshot", "create", NAME, code=1)
    assert refused["error"]["kind"] == "conflict" and "halted" in refused["error"]["message"]
    assert cli(capsys, "resume", NAME, code=1)["error"]["kind"] == "conflict"
    assert cli(capsys, "start", NAME, "--from", "nothing", code=1)["error"]["kind"] == "not_found"


def test_delete_removes_the_snapshots(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cli(capsys, "snapshot", "create", NAME, "gone")
    cli(capsys, "delete", "-y", "--force", NAME)
    assert not ws.root.exists()


def test_a_manifest_from_elsewhere_is_bounded(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    folder = root / "snapshots" / "big"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(" " * (snapshot.MANIFEST_MAX + 1))
    rows = list(snapshot.listing(root))
    assert rows[0]["tag"] == "big" and "larger than" in rows[0]["error"]


def test_fork_runs_beside_the_original_on_its_own_disks(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    cli(capsys, "snapshot", "create", NAME, "base")
    made = cli(capsys, "fork", NAME, "base", "twin")
    assert (made["workspace"], made["state"], made["source"]) == ("twin", "running", NAME)
    twin = Workspace(ws.root.parent / "twin")
    assert {r["name"] for r in cli(capsys, "ps")["workspaces"]} == {NAME, "twin"}
    assert twin.state_disk.stat().st_ino != ws.state_disk.stat().st_ino
    assert (twin.root / "snapshots" / "base" / "manifest.json").is_file()
    # the published snapshot files are shared (never written), the live disks are not
    mine, theirs = (w.root / "snapshots" / "base" for w in (ws, twin))
    saved = [p.name for p in mine.resolve().iterdir() if p.suffix != ".json"]  # not the books
    assert "vmstate" in saved
    for name in saved:
        assert (theirs / name).samefile(mine / name), name
    assert twin.run.runtime()["vmDir"] != ws.run.runtime()["vmDir"]
    assert "restored" in [e["event"] for e in cli(capsys, "events", "twin")["events"]]
    assert cli(capsys, "fork", NAME, "base", "twin", code=1)["error"]["kind"] == "conflict"
    assert cli(capsys, "fork", NAME, "nope", "other", code=1)["error"]["kind"] == "not_found"
    assert not (ws.root.parent / "other").exists()
    cli(capsys, "delete", "-y", "--force", "twin")
    assert cli(capsys, "status", NAME)["event"]["state"] == "running"


def test_a_snapshot_killed_midway_leaves_the_previous_one_usable(
    ws: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli(capsys, "snapshot", "create", NAME, "t")
    cli(capsys, "halt", NAME)
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({**HANG, "saveSeconds": 60}))
    cli(capsys, "start", NAME, "--from", "t")  # its VMM now takes a minute to save
    microagent = str(Path(sys.executable).with_name("microagent"))
    writer = subprocess.Popen(
        [microagent, "snapshot", "create", NAME, "t"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = ws.root / "snapshots"
    until(lambda: any(p.stat().st_size for p in folder.glob(".tmp-t-*/vmstate")), "a half save")
    writer.kill()
    writer.wait()
    assert cli(capsys, "status", NAME)["event"]["state"] == "paused"
    assert [r["tag"] for r in cli(capsys, "snapshot", "ls", NAME)["snapshots"]] == ["t"]
    assert cli(capsys, "resume", NAME)["state"] == "running"
    cli(capsys, "kill", NAME)
    assert cli(capsys, "start", NAME, "--from", "t")["state"] == "running"
    assert list(folder.glob(".tmp-*")) != []  # left until the next snapshot collects it
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(HANG))
