"""The fake guest does real work: what its command writes lands in the state disk's overlay
upper (read back by the exporter a setup step's upper goes through), and the control lines it
sends are read by the host's own line reader and ``exited`` parser, malformed ones included.
"""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from microagent.errors import VMError
from microagent.ext4.mkfs import make_state_disk
from microagent.ext4.upper import export_upper_image
from microagent.kit.guestkit import GuestKit
from microagent.runner import run
from microagent.runtime import control
from microagent.runtime.backend import BootStalled, GuestResult
from microagent.runtime.boot import SETUP_BOOT, RunRequest, run_once
from microagent.runtime.fake import FakeBackend, FakeOutcome, outcome_handler, setup_marker
from testenv.clitools import cli_json as cli

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")


@pytest.fixture
def kit(tmp_path: Path) -> GuestKit:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"i")
    return GuestKit(tmp_path / "vmlinuz", tmp_path / "initrd.img", key="k")


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A small real root filesystem: /etc (0750) with a file, /usr/bin, and /srv a file."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc").chmod(0o750)
    (tree / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "srv").write_text("not a directory\n")
    image = tmp_path / "root.ext4"
    with image.open("wb") as fh:
        fh.truncate(32 << 20)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image)])
    return image


def boot(
    kit: GuestKit,
    rootfs: Path,
    outcome: FakeOutcome,
    *,
    name: str = "microagent",
    command: tuple[str, ...] = ("true",),
) -> tuple[GuestResult, Path]:
    """Run ``command`` once on a fresh state disk; the result and that disk."""
    state = make_state_disk(rootfs.parent / f"state-{time.monotonic_ns()}.ext4", 64)
    request = RunRequest(rootfs=rootfs, command=command, state_disk=state, name=name)
    result = run_once(request, backend=FakeBackend(lambda _c: outcome), kit=kit)
    return result, state


def layer(state: Path) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    """The state disk's upper as the layer a setup step would store: path -> (entry, data)."""
    out_tar = state.with_suffix(".tar")
    export_upper_image(state, out_tar)
    with tarfile.open(out_tar) as tar:
        return {
            m.name: (m, tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


# -- writes ---------------------------------------------------------------------------------------


def test_writes_land_in_the_upper_with_parents_copied_up(kit: GuestKit, rootfs: Path) -> None:
    writes = {"/etc/app/conf": "level=1\n", "/opt/tool/bin/run": "#!/bin/sh\n", "/top": ""}
    result, state = boot(kit, rootfs, FakeOutcome(writes=writes))
    assert result.exit_code == 0
    got = layer(state)
    assert sorted(got) == [
        "etc", "etc/app", "etc/app/conf", "opt", "opt/tool", "opt/tool/bin", "opt/tool/bin/run",
        "top",
    ]  # fmt: skip
    assert got["etc/app/conf"][1] == b"level=1\n"
    assert got["opt/tool/bin/run"][1] == b"#!/bin/sh\n"
    assert got["top"][0].isfile() and got["top"][1] == b""
    assert got["etc"][0].mode == 0o750, "a parent only the lower has is copied up as it is"
    assert got["opt/tool"][0].mode == 0o755 and got["opt/tool"][0].uid == 0
    assert "etc/passwd" not in got, "the lower's files stay in the lower"


def test_a_setup_boot_leaves_its_marker_and_other_boots_write_nothing(
    kit: GuestKit, rootfs: Path
) -> None:
    command = ("sh", "-eu", "-c", "apt-get install -y tool")
    _, state = boot(kit, rootfs, FakeOutcome(), name=SETUP_BOOT, command=command)
    path, text = setup_marker(command)
    assert path.startswith("/etc/microagent-fake-setup/")
    assert text == "sh -eu -c 'apt-get install -y tool'\n"
    got = layer(state)
    assert got[path.lstrip("/")][1] == text.encode()
    _, plain = boot(kit, rootfs, FakeOutcome(), command=command)
    assert layer(plain) == {}
    assert setup_marker(("sh", "-c", "other"))[0] != path


def test_a_write_the_guest_could_not_make_is_a_vm_error(kit: GuestKit, rootfs: Path) -> None:
    with pytest.raises(VMError, match=r"fake guest: cannot write /srv/x: .*/srv is not a dir"):
        boot(kit, rootfs, FakeOutcome(writes={"/srv/x": "x"}))
    with pytest.raises(VMError, match=r"cannot write etc/x: guest path 'etc/x' must be absolute"):
        boot(kit, rootfs, FakeOutcome(writes={"etc/x": "x"}))


def test_a_command_that_never_ran_writes_nothing(kit: GuestKit, rootfs: Path) -> None:
    outcome = FakeOutcome(error="tool: not found", writes={"/x": "x"})
    result, state = boot(kit, rootfs, outcome, name=SETUP_BOOT)
    assert result.exit_code == 127 and layer(state) == {}


def test_writes_and_events_from_json() -> None:
    raw = {"writes": {"/a": "1"}, "events": [{"event": "x"}, "not json"]}
    outcome = outcome_handler(json.dumps(raw))(None)  # type: ignore[arg-type]
    assert outcome.writes == {"/a": "1"}
    assert outcome.events == ('{"event": "x"}', "not json")


# -- events ---------------------------------------------------------------------------------------


def play(kit: GuestKit, rootfs: Path, *events: Any) -> tuple[GuestResult, FakeBackend]:
    lines = tuple(e if isinstance(e, str) else json.dumps(e) for e in events)
    backend = FakeBackend(lambda _c: FakeOutcome(stdout="default\n", events=lines))
    result = run_once(RunRequest(rootfs=rootfs, command=("x",)), backend=backend, kit=kit)
    return result, backend


EXITED = {"event": "exited", "exit_code": 0}


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"exit_code": "x"}, "exit_code: expected an integer from 0 to 255, got str 'x'"),
        ({"exit_code": True}, "exit_code: expected an integer from 0 to 255, got bool True"),
        ({"exit_code": 256}, "exit_code: expected an integer from 0 to 255, got int 256"),
        ({"exit_code": 1.5}, "exit_code: expected an integer from 0 to 255, got float 1.5"),
        ({"outputs": ["result"]}, "outputs: expected an object of at most 64 outputs, got list"),
        ({"outputs": {"result": "text"}}, "outputs.result: expected null or {path, content, "),
        ({"outputs": {"r": {"content": 5}}}, "outputs.r: expected null or {path, content, "),
        ({"stdout": ["a"]}, "stdout: expected a string, got list ['a']"),
        ({"stopped": "yes"}, "stopped: expected true or false, got str 'yes'"),
        ({"error": 1}, "error: expected a string, got int 1"),
        ({"marks": {"init": "soon"}}, "marks.init: expected a number, got str 'soon'"),
        ({"marks": {str(i): i for i in range(65)}}, "marks: expected an object of at most 64"),
        ({"stderr": "x" * 100, "stdout": 7}, "stdout: expected a string, got int 7"),
    ],
)
def test_a_malformed_exited_event_is_a_clear_error(
    kit: GuestKit, rootfs: Path, fields: dict[str, Any], problem: str
) -> None:
    with pytest.raises(VMError) as raised:
        play(kit, rootfs, {**EXITED, **fields})
    message = raised.value.message
    assert message.startswith("the guest's exited event is malformed: ")
    assert problem in message
    assert "control port" in raised.value.hint


def test_every_problem_of_an_exited_event_is_named_at_once(kit: GuestKit, rootfs: Path) -> None:
    with pytest.raises(VMError) as raised:
        play(kit, rootfs, {"event": "exited", "stdout": 1, "stderr_truncated": 0, "marks": []})
    assert raised.value.message.split(": ", 1)[1].split("; ") == [
        "exit_code: missing",
        "stdout: expected a string, got int 1",
        "stderr_truncated: expected true or false, got int 0",
        "marks: expected an object of at most 64 numbers, got list []",
    ]


def test_lines_that_are_not_events_are_dropped(kit: GuestKit, rootfs: Path) -> None:
    too_deep = '{"event":"exited","exit_code":3,"x":' + "[" * 20 + "]" * 20 + "}"
    oversized = '{"event":"exited","exit_code":4,"stdout":"' + "x" * control.MAX_LINE + '"}'
    result, backend = play(
        kit, rootfs, "not json", "[1, 2]", '{"no_event": 1}', "\udcff\udcfe", too_deep, oversized
    )
    assert (result.exit_code, result.stdout) == (0, "default\n")
    assert [e["event"] for e in backend.machines[0].events()] == ["booted", "started", "exited"]


def test_the_first_exited_event_ends_the_command(kit: GuestKit, rootfs: Path) -> None:
    first = {
        **EXITED, "exit_code": 7, "stdout": "raw\n", "stopped": False, "started_at": None,
        "outputs": {"result": {"path": "/r.json", "content": "{}", "truncated": False}, "x": None},
        "marks": {"init": 0.5, "end": 2},
    }  # fmt: skip
    result, backend = play(kit, rootfs, {"event": "note"}, first, {**EXITED, "exit_code": 9})
    assert (result.exit_code, result.stdout, result.started_at) == (7, "raw\n", None)
    assert result.outputs == {"result": first["outputs"]["result"], "x": None}  # type: ignore[index]
    assert result.timings["guest.init"] == 0.5 and result.timings["guest.end"] == 2.0
    kinds = [e["event"] for e in backend.machines[0].events()]
    assert kinds == ["booted", "started", "note", "exited", "exited"]


def test_an_event_flood_is_counted_not_kept(kit: GuestKit, rootfs: Path) -> None:
    flood = [{"event": f"e{i}"} for i in range(3 * control.MAX_EVENTS)]
    result, backend = play(kit, rootfs, *flood)
    assert result.stdout == "default\n"
    assert len(backend.machines[0].events()) == control.MAX_EVENTS


# -- through the CLI: an error envelope, a failed workspace, never a traceback ---------------------


BAD_EXIT = {"event": "exited", "exit_code": "x", "outputs": []}


@pytest.fixture
def fake_run(rootfs: Path, kit: GuestKit, monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    """``microagent run`` boots the fake backend with the kit above; call it with an outcome."""
    monkeypatch.setenv("MICROAGENT_HOME", str(rootfs.parent / "home"))
    monkeypatch.setenv("MICROAGENT_KERNEL", str(kit.kernel))
    monkeypatch.setenv("MICROAGENT_INITRD", str(kit.initrd))
    monkeypatch.setenv("MICROAGENT_BACKEND", "fake")

    def outcome(fields: dict[str, Any]) -> None:
        monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(fields))

    return outcome


FakeRun = Callable[[dict[str, Any]], None]


def test_run_reports_a_malformed_event_as_an_error(
    rootfs: Path, fake_run: FakeRun, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_run({"events": ["{oops", BAD_EXIT]})
    got = cli(capsys, "run", "--rootfs", str(rootfs), "--", "true", code=1)
    assert got["error"]["kind"] == "vm"
    assert got["error"]["message"] == (
        "the guest's exited event is malformed: exit_code: expected an integer from 0 to 255, "
        "got str 'x'; outputs: expected an object of at most 64 outputs, got list []"
    )
    capsys.readouterr()
    assert main(["run", "--rootfs", str(rootfs), "--", "true"]) == 1
    err = capsys.readouterr().err
    assert "exited event is malformed" in err and "Traceback" not in err


def test_a_workspace_whose_guest_sends_a_malformed_event_fails_with_the_reason(
    busybox_project: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = busybox_project / "microagent.yaml"
    spec.write_text("name: ws\nimage: oci:layout:latest\nentrypoint: 'true'\n")
    cli(capsys, "create", "-f", str(spec))
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"events": [BAD_EXIT]}))
    cli(capsys, "start", "ws")
    deadline = time.monotonic() + 60  # a detached supervisor on a loaded machine: generous
    while (status := cli(capsys, "status", "ws"))["event"]["state"] not in ("stopped", "failed"):
        assert time.monotonic() < deadline, "the workspace never stopped"
        time.sleep(0.1)
    assert status["event"]["state"] == "failed"
    assert "exited event is malformed: exit_code" in status["event"]["detail"]
    log = tmp_path / "home" / "workspaces" / "ws" / "runtime" / "supervisor.log"
    assert "Traceback" not in (log.read_text() if log.exists() else "")


# -- a boot that stalls before the guest's first event ------------------------------------------


def test_a_stalled_boot_is_tried_once_more_on_the_same_state_disk(
    kit: GuestKit, rootfs: Path
) -> None:
    result, state = boot(kit, rootfs, FakeOutcome(stalls=1, writes={"/etc/built": "yes\n"}))
    assert result.exit_code == 0
    assert result.timings["host.bootStalls"] == 1.0
    assert layer(state)["etc/built"][1] == b"yes\n", "the second boot did the step's work"


def test_a_boot_that_stalls_every_time_is_an_error_after_two_boots(
    kit: GuestKit, rootfs: Path
) -> None:
    backend = FakeBackend(lambda _c: FakeOutcome(stalls=5))
    state = make_state_disk(rootfs.parent / "state.ext4", 64)
    request = RunRequest(rootfs=rootfs, command=("true",), state_disk=state)
    with pytest.raises(BootStalled, match=r"the guest did not boot within 120s"):
        run_once(request, backend=backend, kit=kit)
    assert len(backend.machines) == 2, "one boot more, not a loop"


@pytest.mark.parametrize(("stalls", "code"), [(1, 0), (2, 1)])
def test_run_boots_again_after_a_stall_and_reports_a_second_one(
    rootfs: Path, fake_run: FakeRun, capsys: pytest.CaptureFixture[str], stalls: int, code: int
) -> None:
    fake_run({"stalls": stalls, "stdout": "done\n"})
    got = cli(capsys, "run", "--rootfs", str(rootfs), "--", "true", code=code)
    if code == 0:
        assert got["result"]["exitCode"] == 0 and got["result"]["stdout"] == "done\n"
        assert got["result"]["timings"]["host.bootStalls"] == 1.0
    else:
        assert got["error"]["kind"] == "vm"
        assert got["error"]["message"].startswith("the guest did not boot within 120s")


# -- layer disks over the rootfs ------------------------------------------------------------------


def test_writes_copy_parents_up_from_the_layer_disk_that_holds_them(
    kit: GuestKit, rootfs: Path, tmp_path: Path
) -> None:
    """The fake guest stacks layer disks as the init does: a parent only a layer has is copied
    up from that layer (its mode kept), the topmost layer first."""
    images = []
    for name, mode in (("bottom", 0o750), ("top", 0o700)):
        tree = tmp_path / f"tree-{name}"
        (tree / "opt" / "pkg").mkdir(parents=True)
        (tree / "opt" / "pkg").chmod(mode)
        image = tmp_path / f"{name}.ext4"
        with image.open("wb") as fh:
            fh.truncate(8 << 20)
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image)])
        images.append(image)
    state = make_state_disk(tmp_path / "state-layers.ext4", 64)
    request = RunRequest(rootfs=rootfs, command=("true",), state_disk=state, layers=tuple(images))
    outcome = FakeOutcome(writes={"/opt/pkg/new": "x\n"})
    result = run_once(request, backend=FakeBackend(lambda _c: outcome), kit=kit)
    assert result.exit_code == 0
    got = layer(state)
    assert got["opt/pkg/new"][1] == b"x\n"
    assert got["opt/pkg"][0].mode == 0o700, "copied up from the top layer"
