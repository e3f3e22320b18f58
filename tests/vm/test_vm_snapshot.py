"""Snapshots in a real guest (issue 18): a counter loop in the guest survives snapshot + kill +
``start --from`` (it counts on from where the snapshot caught it, not from zero, and the
guest clock is the host's again), also after a second save of the same tag was killed
(``kill -9`` of the CLI while QEMU wrote the new state: the first one is still the tag's);
a ``fork`` of that snapshot counts on beside it with writes of its own; ``pause`` stops it
advancing and ``resume`` lets it go on; a corrupt snapshot is refused and the workspace still
starts cold.

One workspace serves the module (a TCG boot of the busybox image costs ~15 s): the
entrypoint counts once a second in a shell variable (memory) and writes it to /tmp/count.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from microagent import Microagent, Settings
from microagent.errors import IntegrityError
from microagent.kit.guestkit import GuestKit
from testenv import standin

pytestmark = pytest.mark.vm
NAME = "snap-vm"
FORK = "snap-vm-fork"
BOOT_TIMEOUT = 300.0
COUNTER = "i=0; while :; do i=$((i+1)); echo $i >/tmp/c; mv /tmp/c /tmp/count; sleep 1; done"
MICROAGENT = str(Path(sys.executable).with_name("microagent"))


def _until(check: Callable[[], bool], what: str, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def _exec_ready(api: Microagent, name: str = NAME) -> bool:
    return bool(api.status(name)["readiness"]["execReady"]["ready"])


def _count(api: Microagent, name: str = NAME) -> int:
    done = api.exec(name, ["sh", "-c", "cat /tmp/count 2>/dev/null || echo 0"], timeout=60)
    assert done.exit_code == 0, done.stderr
    return int(done.stdout)


def _guest_clock_skew(api: Microagent) -> float:
    """How far the guest's clock is outside the host's time around the exec (0: within; the
    guest clock is set to the second, and an exec takes a while under TCG)."""
    before = time.time()
    done = api.exec(NAME, ["/run/microagent/busybox", "date", "+%s"], timeout=60)
    after = time.time()
    assert done.exit_code == 0, done.stderr
    guest = int(done.stdout)
    return max(0.0, before - 1 - guest, guest - after)


def _state_bytes(folder: Path, tag: str) -> int:
    """Bytes of VM state a save of ``tag`` in progress has written (its temp folder)."""
    sizes = [0]
    for path in folder.glob(f".tmp-{tag}-*/vmstate"):
        with contextlib.suppress(FileNotFoundError):  # published meanwhile
            sizes.append(path.stat().st_size)
    return max(sizes)


def _kill_a_save(api: Microagent, tag: str) -> int:
    """``microagent snapshot create NAME TAG`` in a process of its own, killed with SIGKILL
    once QEMU has written part of the new VM state; the bytes written by then."""
    settings = api.settings
    env = {**os.environ, "MICROAGENT_HOME": str(settings.home)}
    env["MICROAGENT_KERNEL"], env["MICROAGENT_INITRD"] = str(settings.kernel), str(settings.initrd)
    folder = api.workspace(NAME).root / "snapshots"
    writer = subprocess.Popen(
        [MICROAGENT, "snapshot", "create", NAME, tag],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (written := _state_bytes(folder, tag)):
            assert writer.poll() is None, "the save ended before it could be killed"
            assert time.monotonic() < deadline, "no VM state was being written"
            time.sleep(0.002)
    finally:
        writer.kill()  # SIGKILL
        writer.wait()
    return written


@pytest.fixture(scope="module")
def api(
    kit: GuestKit, busybox_layout: standin.BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Microagent]:
    home = tmp_path_factory.mktemp("snap-home")
    folder = tmp_path_factory.mktemp("snap-proj")
    shutil.copytree(busybox_layout.layout, folder / "layout")
    (folder / "microagent.yaml").write_text(
        f"name: {NAME}\nimage: oci:layout:latest\nprofile: tiny\n"
        f"network: {{mode: isolated}}\nentrypoint: '{COUNTER}'\n"
    )
    api = Microagent(Settings(home=home, kernel=kit.kernel, initrd=kit.initrd))
    api.create(folder / "microagent.yaml")
    began = time.monotonic()
    api.start(NAME)
    _until(lambda: _exec_ready(api), "the guest agent")
    print(f"cold start to exec-ready: {time.monotonic() - began:.2f}s")
    _until(lambda: _count(api) >= 3, "the counter")
    yield api
    api.delete([NAME], force=True)


def test_pause_stops_the_counter_and_resume_continues(api: Microagent) -> None:
    before = _count(api)
    assert api.pause(NAME).value == "paused"
    time.sleep(6)
    state, clock = api.resume(NAME)
    assert state.value == "running" and clock == "guest clock set to the host's"
    after = _count(api)
    assert after - before <= 3, (before, after)  # 6 s paused: a running loop would count 6+
    assert _guest_clock_skew(api) <= 1
    _until(lambda: _count(api) >= after + 2, "the counter after resume", timeout=60)


def test_the_counter_survives_snapshot_kill_and_start_from(api: Microagent) -> None:
    at_least = _count(api)
    made = api.snapshot_create(NAME, "counting")
    print(f"snapshot: {made.state_bytes} bytes of VM state, {made.disk_bytes} on disk in all, "
          f"vCPUs stopped {made.seconds:.2f}s")  # fmt: skip
    assert made.state == "running"
    _until(lambda: _count(api) >= at_least + 12, "the counter after the snapshot", timeout=90)
    later = _count(api)
    # a second save of the tag, killed (-9) while QEMU writes it: the first stays the tag's
    written = _kill_a_save(api, "counting")
    print(f"save killed after {written} bytes of VM state")
    assert api.status(NAME)["event"]["state"] == "paused"  # stopped for the save, left so
    assert [row["tag"] for row in api.snapshot_list(NAME)] == ["counting"]
    api.kill(NAME)
    began = time.monotonic()
    assert api.start(NAME, from_tag="counting").state == "running"
    _until(lambda: _exec_ready(api), "the guest agent after the restore", timeout=120)
    print(f"start --from to exec-ready: {time.monotonic() - began:.2f}s")
    resumed = _count(api)
    assert at_least <= resumed < later, (at_least, resumed, later)  # not 0, not the killed run
    events = [e["event"] for e in api.events(NAME)]
    assert "restored" in events
    _until(lambda: "clock" in [e["event"] for e in api.events(NAME)], "the clock event", 60)
    assert _guest_clock_skew(api) <= 1
    _until(lambda: _count(api) > resumed, "the restored counter to go on", timeout=60)
    # a fork of the same snapshot counts on beside it, and its writes stay its own
    assert api.fork(NAME, "counting", FORK).state == "running"
    try:
        _until(lambda: _exec_ready(api, FORK), "the fork's guest agent", timeout=120)
        assert _count(api, FORK) >= at_least
        api.exec(FORK, ["sh", "-c", "echo fork >/tmp/fork-only; sync"], timeout=60)
        mine = api.exec(NAME, ["cat", "/tmp/fork-only"], timeout=60)
        assert mine.exit_code == 1 and _count(api) > resumed
    finally:
        api.delete([FORK], force=True)


def test_a_corrupt_snapshot_is_refused_and_the_workspace_starts_cold(api: Microagent) -> None:
    api.halt(NAME, timeout=30)
    state = api.workspace(NAME).root / "snapshots" / "counting" / "vmstate"
    with state.open("r+b") as fh:  # one flipped byte in the middle of the memory image
        fh.seek(state.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x55]))
    with pytest.raises(IntegrityError, match="corrupt"):
        api.start(NAME, from_tag="counting")
    assert api.start(NAME).state == "running"
    _until(lambda: _exec_ready(api), "the guest agent after a cold start")
    _until(lambda: _count(api) >= 1, "the counter of the cold boot", timeout=60)
    assert _count(api) < 30  # counting from the start again
