"""The fake backend and the one-shot run lifecycle on top of it (no VM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microagent.errors import InvalidInputError, VMError
from microagent.kit.guestkit import GuestKit
from microagent.runtime.backend import GuestTimeout, Machine
from microagent.runtime.backends import get_backend
from microagent.runtime.boot import RunRequest, print_command, run_once
from microagent.runtime.configdisk import GuestFile, Output, RunConfig
from microagent.runtime.fake import FakeBackend, FakeOutcome


@pytest.fixture
def kit(tmp_path: Path) -> GuestKit:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"i")
    return GuestKit(tmp_path / "vmlinuz", tmp_path / "initrd.img", key="k")


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    path = tmp_path / "root.ext4"
    path.write_bytes(b"\0" * 4096)
    return path


def test_lifecycle_and_result(kit: GuestKit, rootfs: Path) -> None:
    seen: list[RunConfig] = []

    def handler(config: RunConfig) -> FakeOutcome:
        seen.append(config)
        return FakeOutcome(exit_code=3, stdout="out\n", stderr="err\n")

    backend = FakeBackend(handler)
    streamed: list[bytes] = []
    request = RunRequest(
        rootfs=rootfs,
        command=("sh", "-c", "exit 3"),
        env={"K": "v"},
        files=(GuestFile("/etc/x", b"x"),),
        outputs=(Output("r", "/r.json"),),
    )
    result = run_once(request, backend=backend, kit=kit, on_output=streamed.append)
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert seen[0].command == ("sh", "-c", "exit 3") and dict(seen[0].env) == {"K": "v"}
    assert seen[0].outputs == (Output("r", "/r.json"),)
    machine = backend.machines[0]
    assert isinstance(machine, Machine)
    assert [e["event"] for e in machine.events()] == ["booted", "started", "exited"]
    assert machine.shutdown_steps == ["control"]
    assert b"".join(streamed) == b"out\nerr\n"
    disks = machine.config.disks
    assert [d.readonly for d in disks] == [True, False, True]
    assert disks[0].path == rootfs.resolve()
    assert not disks[1].path.exists()  # the temp state dir is gone


def test_hang_times_out(kit: GuestKit, rootfs: Path) -> None:
    backend = FakeBackend(lambda _c: FakeOutcome(hang=True))
    request = RunRequest(rootfs=rootfs, command=("sleep", "1000"), timeout=0.05)
    with pytest.raises(GuestTimeout, match=r"timed out after 0.05s"):
        run_once(request, backend=backend, kit=kit)
    assert backend.machines[0].shutdown_steps == ["control"]


def test_crash_and_never_ran(kit: GuestKit, rootfs: Path) -> None:
    request = RunRequest(rootfs=rootfs, command=("x",))
    with pytest.raises(VMError, match="before the guest booted: boom"):
        run_once(request, backend=FakeBackend(lambda _c: FakeOutcome(crash="boom")), kit=kit)
    result = run_once(
        request, backend=FakeBackend(lambda _c: FakeOutcome(error="x: not found")), kit=kit
    )
    assert (result.exit_code, result.error) == (127, "x: not found")


def test_outcome_handler(kit: GuestKit, rootfs: Path) -> None:
    request = RunRequest(rootfs=rootfs, command=("echo", "hi"))
    assert run_once(request, backend=FakeBackend(), kit=kit).stdout == "echo hi\n"
    backend = get_backend("fake", fake_outcome=json.dumps({"exitCode": 9, "stdout": "s"}))
    result = run_once(request, backend=backend, kit=kit)
    assert (result.exit_code, result.stdout) == (9, "s")
    with pytest.raises(VMError, match="not valid JSON"):
        get_backend("fake", fake_outcome="{nope")
    with pytest.raises(InvalidInputError, match="unknown backend 'warp'"):
        get_backend("warp")


def test_missing_rootfs_and_kernel(kit: GuestKit, tmp_path: Path, rootfs: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"rootfs .* does not exist"):
        run_once(RunRequest(rootfs=tmp_path / "no", command=("x",)), backend=FakeBackend(), kit=kit)
    bad = GuestKit(tmp_path / "missing-kernel", kit.initrd)
    with pytest.raises(InvalidInputError, match=r"kernel .* does not exist"):
        run_once(RunRequest(rootfs=rootfs, command=("x",)), backend=FakeBackend(), kit=bad)


def test_print_command(kit: GuestKit, rootfs: Path) -> None:
    argv = print_command(RunRequest(rootfs=rootfs, command=("x",)), backend=FakeBackend(), kit=kit)
    assert argv[0] == "fake-vmm" and argv[1] == str(rootfs.resolve())


def test_result_json_shape(kit: GuestKit, rootfs: Path) -> None:
    result = run_once(RunRequest(rootfs=rootfs, command=("x",)), backend=FakeBackend(), kit=kit)
    assert set(result.to_json()) == {
        "exitCode", "stdout", "stderr", "stdoutTruncated", "stderrTruncated", "startedAt",
        "finishedAt", "error", "stopped", "outputs", "timings",
    }  # fmt: skip
