"""Published snapshot files are shared by hard links (a workspace's snapshot, its forks, the
store's warm template and every workspace forked from it): one inode, many folders. Nothing a
workspace does may write one in place, or a change made through one workspace (its guest
writes its disks; ``cp`` writes a stopped one's state disk) would land in every other's
snapshot and in the template the next warm create forks. And the memory image holds the
guest's memory: no folder or file of a template or snapshot is open to other local users.

Driven through the CLI with real supervisors and the fake backend (its VM saves and restores
a fake state; ``cp`` writes the real ext4 state disk with debugfs), as tests/cli/test_warm_cli.py.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.runtime import snapshot
from testenv.agent_standin import standin_argv
from testenv.clitools import cli_json as cli
from testenv.supervised import end_leftovers


@pytest.fixture
def home(busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"hang": True, "agent": standin_argv()}))
    (busybox_project / "maker.yaml").write_text(
        "name: maker\nimage: oci:layout:latest\nentrypoint: sleep 600\n"
    )
    yield tmp_path / "home"
    end_leftovers(tmp_path / "home")


def published(folder: Path) -> dict[str, tuple[int, int, int, str]]:
    """Each published file of the snapshot ``folder``: inode, size, mtime and sha256."""
    out = {}
    for path in sorted(folder.resolve().iterdir()):
        if path.name in ("vmstate", "manifest.json") or path.name.startswith("disk-"):
            st = path.stat()
            digest = snapshot.sparse_sha256(path)  # holes read as zeros, not read
            out[path.name] = (st.st_ino, st.st_size, st.st_mtime_ns, digest)
    return out


def closed_to_others(top: Path) -> list[str]:
    """What under ``top`` (itself included) group or others may read, write or enter."""
    found = []
    for root, dirs, files in os.walk(top):
        for path in [Path(root)] + [Path(root, n) for n in dirs + files]:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                found.append(f"{path.relative_to(top)} {stat.filemode(mode)}")
    return found


def test_no_workspace_writes_the_shared_snapshot_files_and_none_is_open_to_others(
    home: Path, busybox_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = str(busybox_project / "maker.yaml")
    assert cli(capsys, "create", "-f", spec, "--warm")["template"]["made"] is True
    forked = cli(capsys, "create", "-f", spec, "--warm", "--name", "user")
    assert forked["template"]["made"] is False
    [entry] = (home / "store" / "templates").iterdir()
    template = entry / "snapshots" / "template"
    before = published(template)
    assert set(before) == {"vmstate", "disk-state", "manifest.json"}

    # the fork resumes the template (its disk copy put in place), halts, gets a file by cp
    # (debugfs writes its state disk), is forked in turn and that fork does the same
    assert cli(capsys, "start", "user")["state"] == "running"
    cli(capsys, "halt", "user")
    planted = tmp_path / "planted"
    planted.write_bytes(b"written through the fork\n" * 1000)
    cli(capsys, "cp", str(planted), "user:/planted")
    assert cli(capsys, "fork", "user", "template", "twin")["state"] == "running"
    cli(capsys, "halt", "twin")
    cli(capsys, "cp", str(planted), "twin:/planted")
    back = tmp_path / "back"
    cli(capsys, "cp", "twin:/planted", str(back))
    assert back.read_bytes() == planted.read_bytes()

    # every published file is still the very inode, bytes and time it was
    assert published(template) == before
    for name in ("maker", "user", "twin"):
        mine = home / "workspaces" / name / "snapshots" / "template"
        shared = published(mine)
        assert {f: v[0] for f, v in shared.items() if f != "manifest.json"} == {
            f: v[0] for f, v in before.items() if f != "manifest.json"
        }, name
    checked = cli(capsys, "cache", "verify")
    assert checked["ok"] is True, checked["problems"]

    # the template entry and every snapshot folder: the owner's alone
    assert closed_to_others(entry) == []
    for name in ("maker", "user", "twin"):
        assert closed_to_others(home / "workspaces" / name / "snapshots") == [], name


def test_a_manifest_with_an_absurd_number_is_reported_not_a_crash(tmp_path: Path) -> None:
    """``seconds`` as a 400-digit integer (valid JSON, within the manifest's bounds) made
    ``float()`` overflow out of the manifest reader: ``snapshot ls`` and ``start`` died with
    a traceback instead of naming the damaged snapshot."""
    folder = snapshot.snapshots_dir(tmp_path) / "t"
    folder.mkdir(parents=True)
    identity = {"vmm": "", "shape": {}, "kernel": "", "initrd": "", "rootfsKey": ""}
    state = {"file": "vmstate", "size": 1, "sha256": "0" * 64}
    manifest = {"format": 1, "tag": "t", "identity": identity, "state": state, "disks": []}
    (folder / "manifest.json").write_text(json.dumps({**manifest, "seconds": 10**400}))
    [row] = snapshot.listing(tmp_path)
    assert row["tag"] == "t" and "unreadable" in row["error"]
