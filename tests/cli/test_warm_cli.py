"""Warm templates through the CLI (issue 18 item 4) with real supervisors and the fake backend
(its machine serves QMP and saves/restores a fake VM state; the stand-in guest agent makes
it exec-ready, which is when a template without a health probe is taken).

What is checked here is the host's side: the template key (what changes it and what does
not), the store entry and its lock, the workspace's states and events, the refusals (a
corrupt or mismatched template: a visible notice and a cold boot; ``--env`` with ``--warm``),
``cache prune`` and ``cache verify`` on templates. tests/vm/test_vm_warm.py boots QEMU.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.fsutil import flocked
from microagent.store.content import Store
from microagent.workspace.records import Workspace
from testenv.agent_standin import standin_argv
from testenv.clitools import cli_json as cli
from testenv.ports import free_ports
from testenv.supervised import end_leftovers

SPEC = "name: {name}\nimage: oci:layout:latest\nentrypoint: sleep 600\n{extra}"


@pytest.fixture
def project(
    busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"hang": True, "agent": standin_argv()}))
    yield busybox_project
    end_leftovers(tmp_path / "home")


def spec(project: Path, name: str, extra: str = "") -> str:
    path = project / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, extra=extra))
    return str(path)


def events(capsys: pytest.CaptureFixture[str], name: str) -> list[str]:
    return [e["event"] for e in cli(capsys, "events", name)["events"]]


def templates(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "home" / "store" / "templates"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def verified(capsys: pytest.CaptureFixture[str], name: str) -> tuple[list[str], list[str]]:
    """The last ``verified`` event of ``name``: the files hashed, those unchanged since."""
    found = [e for e in cli(capsys, "events", name)["events"] if e["event"] == "verified"]
    return found[-1]["hashed"], found[-1]["unchanged"]


def overwrite_keeping_mtime(path: Path, data: bytes) -> None:
    """Change the bytes in place, same size, with the mtime set back (the ctime moves)."""
    st = path.stat()
    with path.open("r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def warm_create(capsys: pytest.CaptureFixture[str], path: str, *args: str) -> dict[str, Any]:
    made = cli(capsys, "create", "-f", path, "--warm", *args)
    assert made["state"] == "suspended", made
    return made


def test_the_first_warm_create_makes_the_template_the_second_forks_it(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = warm_create(capsys, spec(project, "one"))["template"]
    assert first["made"] is True and first["readySeconds"] > 0
    assert [p.name for p in templates(tmp_path)] == [first["key"].removeprefix("sha256:")]
    assert {"template-made", "snapshot"} <= set(events(capsys, "one"))
    # another name, same spec otherwise: the same template (the default hostname is not in it)
    second = warm_create(capsys, spec(project, "two"), "--name", "two")["template"]
    assert second == {"key": first["key"], "made": False, "seconds": second["seconds"]}
    status = cli(capsys, "status", "two")
    assert status["template"] == first["key"] and status["event"]["state"] == "suspended"
    two = Workspace(tmp_path / "home" / "workspaces" / "two")
    vmstate = two.root / "snapshots" / "template" / "vmstate"
    stored = templates(tmp_path)[0] / "snapshots" / "template" / "vmstate"
    assert vmstate.stat().st_ino == stored.stat().st_ino  # a hard link, not a copy
    assert cli(capsys, "start", "two")["state"] == "running"
    seen = events(capsys, "two")
    assert seen.index("warm-create") < seen.index("warm-start") < seen.index("restored")
    assert "cold" not in seen
    # the template was hashed once, when it was saved: its stamps came along with the links
    assert verified(capsys, "two") == ([], ["vmstate", "disk-state"])
    exec_ok = cli(capsys, "exec", "two", "--", "true")
    assert exec_ok["exitCode"] == 0
    # the workspace that made it resumes its own template too
    assert cli(capsys, "start", "one")["state"] == "running"
    assert "warm-start" in events(capsys, "one")


def test_what_the_guest_sees_changes_the_key(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = warm_create(capsys, spec(project, "a"))["template"]["key"]
    keys = {
        warm_create(capsys, spec(project, "b"), "--memory", "768")["template"]["key"],
        warm_create(capsys, spec(project, "c", "env: {MODE: fast}\n"))["template"]["key"],
        warm_create(capsys, spec(project, "d", "hostname: fixed\n"))["template"]["key"],
    }
    assert base not in keys and len(keys) == 3


def test_env_values_are_refused_with_warm(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = spec(project, "sec")
    refused = cli(capsys, "create", "-f", path, "--warm", "--env", "API_KEY=s3cret", code=2)
    assert refused["error"]["kind"] == "invalid_input"
    assert "--env API_KEY" in refused["error"]["message"]
    assert "credential" in refused["error"]["hint"]
    assert "s3cret" not in json.dumps(refused)
    assert not (tmp_path / "home" / "workspaces" / "sec").exists()
    # the spec field asks for the same
    path = spec(project, "sec2", "warm: true\n")
    cli(capsys, "create", "-f", path, "--env", "API_KEY=x", code=2)


def test_a_corrupt_template_is_refused_and_the_workspace_boots_cold(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warm_create(capsys, spec(project, "maker"))
    warm_create(capsys, spec(project, "user"), "--name", "user")
    stored = templates(tmp_path)[0]
    vmstate = stored / "snapshots" / "template" / "vmstate"
    data = bytearray(vmstate.read_bytes())
    data[-2] ^= 0xFF
    # in place (the workspace's hard link sees it too), and the mtime set back: the stamp the
    # link carried no longer fits (the ctime moved), so the start hashes it
    overwrite_keeping_mtime(vmstate, bytes(data))
    started = cli(capsys, "start", "user")
    assert started["state"] == "running"
    seen = events(capsys, "user")
    assert "warm-start-refused" in seen and "cold" in seen and "restored" not in seen
    refusal = [e for e in cli(capsys, "events", "user")["events"] if e["event"].endswith("refused")]
    assert "corrupt" in refusal[0]["detail"]
    assert templates(tmp_path) == []  # the corrupt template is gone from the store
    assert cli(capsys, "status", "user")["snapshots"] == []
    # the next warm create makes it anew
    assert warm_create(capsys, spec(project, "next"))["template"]["made"] is True


def test_a_hard_link_made_by_another_process_ends_the_stamps_it_carried(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warm_create(capsys, spec(project, "l1"))
    warm_create(capsys, spec(project, "l2"), "--name", "l2")
    stored = templates(tmp_path)[0] / "snapshots" / "template" / "vmstate"
    os.link(stored, tmp_path / "elsewhere")  # the inode's ctime moves
    assert cli(capsys, "start", "l2")["state"] == "running"
    assert verified(capsys, "l2") == (["vmstate"], ["disk-state"])  # hashed: sound, restored
    assert "restored" in events(capsys, "l2")


def test_a_template_for_another_vm_shape_is_refused_at_start(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warm_create(capsys, spec(project, "shape"))
    warm_create(capsys, spec(project, "other"), "--name", "other")
    path = tmp_path / "home" / "workspaces" / "other" / "snapshots" / "template" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["identity"]["shape"]["options"]["-m"] = "4096"
    path.write_text(json.dumps(manifest))
    assert cli(capsys, "start", "other")["state"] == "running"
    refusal = [
        e for e in cli(capsys, "events", "other")["events"] if e["event"].endswith("refused")
    ]
    assert '"-m": "4096"' in refusal[0]["detail"]
    assert len(templates(tmp_path)) == 1  # the store's own is sound: kept


def test_a_missing_template_file_is_refused_at_create_and_made_anew(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = warm_create(capsys, spec(project, "m1"))["template"]["key"]
    (templates(tmp_path)[0] / "snapshots" / "template" / "vmstate").unlink()
    again = warm_create(capsys, spec(project, "m2"), "--name", "m2")["template"]
    assert again["made"] is True and again["key"] == key and "vmstate" in again["refused"]
    assert "template-refused" in events(capsys, "m2")
    # a file changed in place (its mtime set back) is refused at create too: its stamp no
    # longer fits, so the fork hashes it
    vmstate = templates(tmp_path)[0] / "snapshots" / "template" / "vmstate"
    data = bytearray(vmstate.read_bytes())
    data[0] ^= 0xFF
    overwrite_keeping_mtime(vmstate, bytes(data))
    third = warm_create(capsys, spec(project, "m3"), "--name", "m3")["template"]
    assert third["made"] is True and "vmstate does not match its digest" in third["refused"]


def test_cache_prune_and_verify_know_templates(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warm_create(capsys, spec(project, "p"))
    store = Store(tmp_path / "home" / "store")
    [folder] = templates(tmp_path)
    name = f"templates/{folder.name}"
    checked = cli(capsys, "cache", "verify")
    assert checked["ok"] is True, checked["problems"]
    listed = {row["name"] for row in cli(capsys, "cache", "ls")["entries"]}
    assert name in listed
    with flocked(store.lock_path(name)):  # a create forking it right now
        pruned = cli(capsys, "cache", "prune", "--all", "-y")
    assert name not in {row["name"] for row in pruned["removed"]} and folder.is_dir()
    pruned = cli(capsys, "cache", "prune", "--all", "-y")
    assert name in {row["name"] for row in pruned["removed"]} and not folder.exists()
    # the workspace keeps its own copy: it still resumes
    assert cli(capsys, "start", "p")["state"] == "running"
    assert "restored" in events(capsys, "p")


def test_cache_verify_reports_a_corrupt_template(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warm_create(capsys, spec(project, "v"))
    [folder] = templates(tmp_path)
    (folder / "template.json").write_text("{}")
    checked = cli(capsys, "cache", "verify", code=None)
    found = [p for p in checked["problems"] if p["kind"] == "template"]
    assert found and found[0]["problem"] == "corrupt"


# A serve-mode agent's first move, as the health probe of the fake guest (run on the host by
# the stand-in agent): connect to the mediation port, say ready, and see whether the
# connection is held (open and silent for a second) or closed; the verdict goes to a file.
HOLD_PROBE = """\
import pathlib, socket, sys
verdict = pathlib.Path(sys.argv[2])
if not verdict.exists():
    conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    conn.sendall(b'{"signal":"ready"}\\n')
    conn.settimeout(1.0)
    try:
        verdict.write_text(f"closed {conn.recv(100)!r}")
    except TimeoutError:
        verdict.write_text("held")
"""


def _relayed(server: socket.socket, guest_port: int, data: bytes) -> bytes:
    """Send ``data`` into the guest's mediation port; what ``server`` (the target) gets.
    Connections that bring nothing (reachability checks) are skipped."""
    deadline = time.monotonic() + 15
    while True:  # until the fork's guest agent listens
        try:
            guest = socket.create_connection(("127.0.0.1", guest_port), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline, "the fork's mediation port never listened"
            time.sleep(0.1)
    with guest:
        guest.sendall(data)
        server.settimeout(10)
        while True:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                got = conn.recv(100)
            if got:
                return got


def test_a_template_boot_holds_the_mediation_channel_and_each_fork_reaches_its_own_target(
    project: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guest_port, target, other = free_ports(3)  # nothing listens on either target
    monkeypatch.setenv(
        "MICROAGENT_FAKE", json.dumps({"hang": True, "agent": standin_argv(guest_port)})
    )
    (tmp_path / "probe.py").write_text(HOLD_PROBE)
    verdict = tmp_path / "verdict"
    argv = [sys.executable, str(tmp_path / "probe.py"), str(guest_port), str(verdict)]
    health = f"health: {{exec: {json.dumps(argv)}, intervalSeconds: 1, timeoutSeconds: 10}}\n"
    path = spec(project, "held", health)
    made = warm_create(capsys, path, "--mediation", f"{guest_port}=127.0.0.1:{target}")
    assert made["template"]["made"] is True and "error" not in made["template"], made
    # the agent's connection was taken and left silent, with nothing listening on the target
    assert verdict.read_text() == "held"
    log = {e["event"]: e for e in cli(capsys, "events", "held")["events"]}
    assert f"port {guest_port} is held by the host" in log["mediation-held"]["detail"]
    released = log["mediation-released"]
    assert (released["connections"], released["bytes"], released["refused"]) == (1, 19, 0)
    # another dispatcher address, same guest: the same template (the target is the host's)
    fork = warm_create(
        capsys, path, "--name", "fork", "--mediation", f"{guest_port}=127.0.0.1:{other}"
    )
    assert fork["template"]["made"] is False
    assert fork["template"]["key"] == made["template"]["key"]
    # the fork's start reaches its real target: fail closed while nothing listens there
    refused = cli(capsys, "start", "fork", code=None)["error"]
    assert refused["kind"] == "conflict"
    assert f"required mediation target 127.0.0.1:{other} is unreachable" in refused["message"]
    assert cli(capsys, "status", "fork")["event"]["state"] == "suspended"
    with socket.create_server(("127.0.0.1", other)) as dispatcher:
        assert cli(capsys, "start", "fork")["state"] == "running"
        assert "restored" in events(capsys, "fork")
        assert _relayed(dispatcher, guest_port, b"request\n") == b"request\n"
    cli(capsys, "halt", "fork")  # its stand-in agent holds the guest port on this host
    # a guest port of its own is another guest: another template
    other_port = spec(project, "port", health)
    moved = warm_create(capsys, other_port, "--mediation", f"{guest_port + 1}=127.0.0.1:{target}")
    assert moved["template"]["key"] != made["template"]["key"]
