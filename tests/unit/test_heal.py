"""State that heals (issue 16 item 2): a workspace whose supervisor or VMM died (kill -9, the
OOM killer, a host restart) is reported ``failed`` with the reason, never stuck live; a pid
that now names another process is not its supervisor; a start whose launcher died fails after
the grace; an unreadable runtime.json is recovered; a stale lock never blocks; ``delete
--force`` leaves nothing (processes, network namespace, files).

Two kinds of test: run directories written by hand, with real stand-in processes (``sleep``,
a Python whose command line is a supervisor's), for the judgement itself; and real
supervisors started through the CLI with the fake backend, killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent import runner
from microagent.runner import ProcessIdentity
from microagent.runtime import network
from microagent.runtime.rundir import SUPERVISOR_MARK, RunDir, State
from microagent.workspace import liveness
from microagent.workspace.lifecycle import leftovers
from microagent.workspace.records import Workspace
from testenv.clitools import cli_json as cli
from testenv.prereq import require_root, require_tools

pytestmark = pytest.mark.tools("mke2fs", "e2fsck", "debugfs")
HANG_WITH_VMM = {"hang": True, "process": ["sleep", "600"]}  # a stand-in VMM process


def stamp(seconds_ago: float = 0) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


def until(check: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never: {what}")
        time.sleep(0.05)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed and reaped afterwards whatever happened."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def sleeper(children: list[subprocess.Popen[bytes]]) -> ProcessIdentity:
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    children.append(proc)
    identity = runner.process_identity(proc.pid)
    assert identity is not None
    return identity


def stand_in_supervisor(run: RunDir, children: list[subprocess.Popen[bytes]]) -> ProcessIdentity:
    """A process whose command line is the supervisor's of ``run`` (it only sleeps)."""
    code = f"import time; time.sleep(600)  # {SUPERVISOR_MARK}"
    proc = subprocess.Popen([sys.executable, "-c", code, str(run.path)], start_new_session=True)
    children.append(proc)
    until(lambda: run.is_supervisor(proc.pid), "the stand-in has its command line")
    identity = runner.process_identity(proc.pid)
    assert identity is not None
    return identity


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ws.run.path.mkdir(parents=True)
    return ws


def write_runtime(ws: Workspace, **fields: Any) -> None:
    ws.run.runtime_path.write_text(json.dumps({"startedAt": stamp(), **fields}))


def detail(ws: Workspace) -> str:
    return str(ws.run.runtime()["detail"])


# -- identities -----------------------------------------------------------------------------------


def test_an_identity_is_pid_start_time_and_boot(children: list[subprocess.Popen[bytes]]) -> None:
    me = sleeper(children)
    assert me.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip() != ""
    assert runner.is_running(me)
    back = ProcessIdentity.from_json(json.loads(json.dumps(me.to_json())))
    assert back == me
    reused = ProcessIdentity(me.pid, me.start_time - 1, me.boot_id)  # the number, not the process
    assert not runner.is_running(reused)
    other_boot = ProcessIdentity(me.pid, me.start_time, "0" * 8 + me.boot_id[8:])
    assert other_boot != me and not runner.is_running(other_boot)
    legacy = ProcessIdentity.from_json({"pid": me.pid, "startTime": me.start_time})
    assert legacy is not None and legacy.boot_id == "" and runner.is_running(legacy)
    children[0].kill()
    children[0].wait()
    assert not runner.is_running(me)
    assert runner.process_identity(me.pid) is None


# -- reconcile ------------------------------------------------------------------------------------


def test_a_dead_supervisor_is_failed_with_the_reason(ws: Workspace) -> None:
    proc = subprocess.Popen(["true"])
    identity = runner.process_identity(proc.pid)
    proc.wait()
    assert identity is None or not runner.is_running(identity)
    ws.run.supervisor_log.write_text("Traceback ...\nMemoryError\n")
    ws.run.config_disk.write_bytes(b"env")
    write_runtime(
        ws, state="running", supervisorPid=proc.pid, supervisor={"pid": proc.pid, "startTime": 1}
    )
    assert liveness.reconcile(ws) is State.FAILED
    assert detail(ws) == (
        f"the supervisor process died unexpectedly (pid {proc.pid}; killed, or out of memory?); "
        "its log ends: MemoryError"
    )
    assert ws.run.runtime()["stateDiskDirty"] == "its supervisor died"
    assert not ws.run.config_disk.exists(), "the environment outlives no boot"
    assert liveness.reconcile(ws) is State.FAILED
    assert [e["event"] for e in ws.run.events()] == ["failed"], "written once"

    old = ws.run.supervisor_log.stat().st_size  # a later start: its supervisor said nothing
    write_runtime(
        ws, state="running", supervisor={"pid": proc.pid, "startTime": 1}, supervisorLogOffset=old
    )
    assert liveness.reconcile(ws) is State.FAILED
    assert "its log ends" not in detail(ws), "an earlier run's last words are not this one's"


def test_a_pid_reused_by_another_process_is_not_the_supervisor(
    ws: Workspace, children: list[subprocess.Popen[bytes]]
) -> None:
    other = sleeper(children)
    stale = {"pid": other.pid, "startTime": other.start_time - 7, "bootId": other.boot_id}
    write_runtime(ws, state="running", supervisorPid=other.pid, supervisor=stale)
    assert liveness.reconcile(ws) is State.FAILED
    assert f"died unexpectedly (pid {other.pid}" in detail(ws)
    assert runner.is_running(other), "the process that has the number now is left alone"


def test_a_pid_without_an_identity_counts_only_with_the_supervisors_command_line(
    ws: Workspace, tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    other = sleeper(children)  # a record from before identities, its pid reused by a sleep
    write_runtime(ws, state="running", supervisorPid=other.pid)
    assert liveness.reconcile(ws) is State.FAILED
    assert runner.is_running(other)

    real = stand_in_supervisor(ws.run, children)
    write_runtime(ws, state="running", supervisorPid=real.pid)
    assert liveness.reconcile(ws) is State.RUNNING
    elsewhere = RunDir(tmp_path / "another-run")  # the same program for another workspace
    assert not elsewhere.is_supervisor(real.pid)


def test_a_host_restart_is_named(ws: Workspace, children: list[subprocess.Popen[bytes]]) -> None:
    me = sleeper(children)  # even the same pid and start time: another boot is another process
    before = {"pid": me.pid, "startTime": me.start_time, "bootId": "f" * 36}
    write_runtime(ws, state="starting", supervisorPid=me.pid, supervisor=before)
    assert liveness.reconcile(ws) is State.FAILED
    assert detail(ws) == "the host restarted while it was starting (its supervisor is gone)"


def test_a_start_that_never_recorded_its_supervisor_fails_after_the_grace(
    ws: Workspace,
) -> None:
    write_runtime(ws, state="starting", supervisorPid=None, startedAt=stamp())
    assert liveness.reconcile(ws) is State.STARTING, "within the grace the launcher may be slow"
    late = stamp(liveness.STARTING_GRACE + 5)
    write_runtime(ws, state="starting", supervisorPid=None, startedAt=late)
    assert liveness.reconcile(ws) is State.FAILED
    assert detail(ws).startswith("the start was interrupted: no supervisor was running 30s")
    write_runtime(ws, state="running", startedAt=None)  # no time, no pid: nothing says it runs
    assert liveness.reconcile(ws) is State.FAILED


def test_a_start_whose_launcher_died_fails_at_once(
    ws: Workspace, children: list[subprocess.Popen[bytes]]
) -> None:
    launcher = sleeper(children)
    write_runtime(ws, state="starting", supervisorPid=None, launcher=launcher.to_json())
    assert liveness.reconcile(ws) is State.STARTING, "its launcher is still at it"
    children[0].kill()
    children[0].wait()
    assert liveness.reconcile(ws) is State.FAILED
    assert detail(ws) == (
        f"the start was interrupted: the command that started it (pid {launcher.pid}) ended "
        "before it launched the supervisor"
    )


def test_a_supervisor_its_launcher_did_not_record_is_found_and_recorded(
    ws: Workspace, children: list[subprocess.Popen[bytes]]
) -> None:
    real = stand_in_supervisor(ws.run, children)
    late = stamp(liveness.STARTING_GRACE + 5)
    write_runtime(ws, state="starting", supervisorPid=None, startedAt=late)
    assert liveness.reconcile(ws) is State.STARTING
    runtime = ws.run.runtime()
    assert (runtime["supervisorPid"], runtime["supervisor"]) == (real.pid, real.to_json())
    os.kill(real.pid, signal.SIGKILL)
    children[0].wait()
    assert liveness.reconcile(ws) is State.FAILED
    assert "died unexpectedly" in detail(ws)


def test_another_users_look_alike_is_not_the_supervisor(
    ws: Workspace, children: list[subprocess.Popen[bytes]]
) -> None:
    require_root("to run a process as another user")
    require_tools("setpriv")
    script = f"sleep 600; : {SUPERVISOR_MARK}"
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = subprocess.Popen([*nobody, "sh", "-c", script, "sh", str(ws.run.path)])
    children.append(proc)
    # setpriv itself (still root) carries the same arguments until it execs sh as nobody
    until(lambda: runner.command_line(proc.pid)[:2] == ("sh", "-c"), "it runs as nobody")
    assert not runner.owned_by_me(proc.pid)
    assert ws.run.find_supervisor() is None
    late = stamp(liveness.STARTING_GRACE + 5)
    write_runtime(ws, state="starting", supervisorPid=None, startedAt=late)
    assert liveness.reconcile(ws) is State.FAILED
    write_runtime(ws, state="running", supervisorPid=proc.pid)
    assert liveness.reconcile(ws) is State.FAILED
    assert leftovers(ws) == [], "delete --force leaves another user's processes alone"


@pytest.mark.parametrize(
    "damage", [b"", b'{"state": "runn', b"\x00" * 64, b"[1, 2]", b"{" * 100_000]
)
def test_an_unreadable_runtime_json_is_moved_aside_and_reported(
    ws: Workspace, damage: bytes
) -> None:
    ws.run.runtime_path.write_bytes(damage)
    assert liveness.reconcile(ws) is State.FAILED
    assert detail(ws) == "runtime.json was unreadable (kept as runtime.json.corrupt)"
    assert (ws.run.path / "runtime.json.corrupt").read_bytes() == damage
    assert ws.run.runtime()["stateDiskDirty"] == "an unreadable runtime.json"
    assert liveness.reconcile(ws) is State.FAILED


def test_an_unreadable_runtime_json_with_its_supervisor_running_is_running(
    ws: Workspace, children: list[subprocess.Popen[bytes]]
) -> None:
    real = stand_in_supervisor(ws.run, children)
    ws.run.runtime_path.write_bytes(b"\x00garbage")
    assert liveness.reconcile(ws) is State.RUNNING
    assert ws.run.runtime()["supervisor"] == real.to_json()
    assert f"its supervisor still runs (pid {real.pid})" in detail(ws)


def test_a_writer_meeting_an_unreadable_runtime_json_recovers_it_first(
    ws: Workspace, children: list[subprocess.Popen[bytes]]
) -> None:
    ws.run.runtime_path.write_bytes(b"\x00garbage")
    ws.run.update(execReadyAt=None)  # what a running supervisor writes now and then
    runtime = ws.run.runtime()
    assert (runtime["state"], runtime["stateDiskDirty"]) == ("failed", "an unreadable runtime.json")
    assert "execReadyAt" in runtime
    real = stand_in_supervisor(ws.run, children)
    ws.run.runtime_path.write_bytes(b"{]")
    ws.run.update(execReadyAt=None)
    assert ws.run.state() is State.RUNNING, "never 'prepared': its supervisor still runs"
    assert ws.run.runtime()["supervisor"] == real.to_json()
    assert (ws.run.path / "runtime.json.corrupt").read_bytes() == b"{]"


def test_runtime_json_never_goes_missing_while_it_is_recovered(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers take no lock: a recovery that moved the damaged file aside before writing the
    new one let a concurrent ``status`` read no runtime.json, i.e. 'prepared'."""
    ws.run.runtime_path.write_bytes(b"\x00garbage")
    present: list[bool] = []
    looked_up = RunDir.find_supervisor

    def find_supervisor(run: RunDir) -> ProcessIdentity | None:
        present.append(run.runtime_path.exists())  # what a reader finds mid-recovery
        return looked_up(run)

    monkeypatch.setattr(RunDir, "find_supervisor", find_supervisor)
    ws.run.update(execReadyAt=None)
    assert present == [True]
    assert ws.run.state() is State.FAILED
    ws.run.runtime_path.write_bytes(b"{]")
    assert ws.run.set_state_if(lambda _now: False, State.STOPPED) is None
    assert ws.run.runtime_path.read_bytes() == b"{]", "left for the next reader to recover"
    assert liveness.reconcile(ws) is State.FAILED


def test_a_final_state_written_meanwhile_is_not_overwritten(ws: Workspace) -> None:
    write_runtime(ws, state="running", supervisorPid=None)
    seen = ws.run.runtime()
    ws.run.set_state(State.STOPPED, "entrypoint exited 0")  # the supervisor's last word
    assert liveness.reconcile_run(ws.run) is State.STOPPED
    same = ws.run.set_state_if(lambda now: now.get("state") == seen["state"], State.FAILED, "x")
    assert same is None and ws.run.state() is State.STOPPED


def test_a_gateway_that_outlived_its_supervisor_is_killed(
    ws: Workspace, children: list[subprocess.Popen[bytes]]
) -> None:
    gateway = sleeper(children)  # holds the credentials in memory, in real life
    write_runtime(
        ws,
        state="running",
        supervisorPid=None,
        startedAt=stamp(liveness.STARTING_GRACE + 5),
        gatewayProcess=gateway.to_json(),
    )
    assert liveness.reconcile(ws) is State.FAILED
    assert not runner.is_running(gateway)
    (event,) = [e for e in ws.run.events() if e["event"] == "gateway-killed"]
    assert str(gateway.pid) in event["detail"]


def test_what_a_dead_supervisors_session_left_is_found_only_in_its_workspace(
    ws: Workspace,
) -> None:
    code = (
        "import subprocess, sys, time\n"
        "mine = subprocess.Popen(['sleep', '600'], cwd=sys.argv[1])\n"
        "stranger = subprocess.Popen(['sleep', '600'], cwd='/')\n"
        f"print(mine.pid, stranger.pid, flush=True); time.sleep(600)  # {SUPERVISOR_MARK}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(ws.run.path)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    mine, stranger = (int(word) for word in proc.stdout.readline().split())
    helpers = [runner.process_identity(mine), runner.process_identity(stranger)]
    try:
        write_runtime(ws, state="running", supervisorPid=proc.pid)
        proc.kill()  # its helpers stay in its session, their parent now init
        proc.wait()
        lineages = [runner.lineage(pid) for pid in (mine, stranger)]
        assert [lin and lin[1] for lin in lineages] == [proc.pid, proc.pid], "its session"
        found = {p.pid for p in leftovers(ws)}
        assert found == {mine}, "a session member that works elsewhere is not taken for ours"
    finally:
        for helper in helpers:
            if helper is not None:
                runner.kill_process(helper)


# -- locks ----------------------------------------------------------------------------------------


def test_a_lock_holder_killed_mid_update_never_blocks_the_next_writer(ws: Workspace) -> None:
    lock = ws.run.path / ".lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
            " print('held', flush=True); time.sleep(600)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    with lock.open("a") as fh, pytest.raises(BlockingIOError):
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it really holds it
    holder.kill()
    holder.wait()
    done = threading.Event()

    def write() -> None:
        ws.run.set_state(State.FAILED, "after the holder died")
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(5), "a dead holder's lock blocked the writer"
    assert lock.exists(), "the lock file stays: a flock, not a pid file"


# -- real supervisors (fake backend) -------------------------------------------------------------


@pytest.fixture
def project(
    busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(HANG_WITH_VMM))
    yield busybox_project
    for path in (tmp_path / "home").glob("workspaces/*"):
        for process in leftovers(Workspace(path)):
            with contextlib.suppress(Exception):
                runner.kill_process(process)


def started(capsys: pytest.CaptureFixture[str], proj: Path, name: str = "ws") -> Workspace:
    spec = proj / f"{name}.yaml"
    spec.write_text(f"name: {name}\nimage: oci:layout:latest\nentrypoint: sleep 600\n")
    cli(capsys, "create", "-f", str(spec))
    cli(capsys, "start", name)
    ws = Workspace(Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / name)
    until(lambda: ws.run.vmm() is not None, "the VMM is recorded")
    return ws


def identities(ws: Workspace) -> tuple[ProcessIdentity, ProcessIdentity]:
    runtime = ws.run.runtime()
    supervisor = ProcessIdentity.from_json(runtime["supervisor"])
    vmm = ws.run.vmm()
    assert supervisor is not None and vmm is not None
    assert runner.is_running(supervisor) and runner.is_running(vmm)
    return supervisor, vmm


def test_kill_9_of_the_supervisor_alone(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = started(capsys, project)
    supervisor, vmm = identities(ws)
    os.kill(supervisor.pid, signal.SIGKILL)  # as the OOM killer would: not its group
    until(lambda: not runner.is_running(supervisor), "the supervisor is gone")
    status = cli(capsys, "status", "ws")
    assert status["event"]["state"] == "failed" and status["ok"] is False
    assert status["event"]["detail"].startswith(
        f"the supervisor process died unexpectedly (pid {supervisor.pid}"
    )
    assert status["error"]["message"] == f"workspace 'ws' failed: {status['event']['detail']}"
    until(lambda: not runner.is_running(vmm), "the VMM dies with its supervisor (pdeathsig)")
    assert cli(capsys, "ps")["workspaces"] == []
    assert ws.run.runtime()["stateDiskDirty"] == "its supervisor died"
    cli(capsys, "start", "ws")  # the disk is checked first, then it boots again
    (fsck,) = [e for e in ws.run.events() if e["event"] == "fsck"]
    assert fsck["detail"] == "state disk checked after its supervisor died: clean"
    assert cli(capsys, "status", "ws")["event"]["state"] == "running"


def test_kill_9_of_the_vmm_is_noticed_by_its_supervisor(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = started(capsys, project)
    supervisor, vmm = identities(ws)
    os.kill(vmm.pid, signal.SIGKILL)
    until(lambda: ws.run.state() is State.FAILED, "the supervisor records the failure", 10)
    assert ws.run.runtime()["detail"] == (
        "the VM stopped before the guest command finished (VMM exit code -9)"
    )
    until(lambda: not runner.is_running(supervisor), "the supervisor exits")
    assert [e["event"] for e in ws.run.events()][-1] == "supervisor-exit"
    assert cli(capsys, "status", "ws")["event"]["state"] == "failed"
    assert ws.run.runtime()["stateDiskDirty"] == "a VM that stopped without a clean shutdown"
    cli(capsys, "start", "ws")
    (fsck,) = [e for e in ws.run.events() if e["event"] == "fsck"]
    assert fsck["detail"] == (
        "state disk checked after a VM that stopped without a clean shutdown: clean"
    )


def _everything_of(ws: Workspace, home: Path) -> list[str]:
    """Processes naming the workspace anywhere in their command line."""
    found = []
    for pid in runner.processes():
        words = runner.command_line(pid)
        if pid != os.getpid() and any(str(home) in word for word in words):
            found.append(" ".join(words))
    return found


def test_delete_force_after_kill_9_leaves_nothing(
    project: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    require_root("to make a network namespace")
    require_tools("ip")
    ws = started(capsys, project)
    supervisor, vmm = identities(ws)
    namespace = f"{network.NETNS_PREFIX}{supervisor.pid}-{hashlib.sha256(b'x').hexdigest()[:6]}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)  # as its network setup would
    resolv = Path("/etc/netns") / namespace
    resolv.mkdir(parents=True)
    (resolv / "resolv.conf").write_text("nameserver 10.0.2.3\n")
    try:
        os.kill(supervisor.pid, signal.SIGKILL)
        until(lambda: not runner.is_running(supervisor), "the supervisor is gone")
        assert ws.run.state() is State.RUNNING, "nothing noticed yet"
        deleted = cli(capsys, "delete", "-y", "--force", "ws")
        assert deleted["results"] == [{"workspace": "ws", "deleted": True}]
        assert not ws.root.exists()
        assert not runner.is_running(vmm)
        assert _everything_of(ws, tmp_path / "home") == []
        assert (
            namespace
            not in subprocess.run(
                ["ip", "netns", "list"], check=True, capture_output=True, text=True
            ).stdout
        )
        assert not resolv.exists()
        assert cli(capsys, "delete", "-y", "--force", "ws")["results"][0]["deleted"] is False
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)


def test_delete_force_finds_the_processes_of_a_workspace_whose_files_are_damaged(
    project: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ws = started(capsys, project)
    supervisor, vmm = identities(ws)
    ws.run.runtime_path.write_bytes(b"\x00half-written")
    ws.record_path.write_text('{"name": 3}')
    assert cli(capsys, "status", "ws", code=None)["error"]["kind"] == "integrity"
    assert cli(capsys, "delete", "-y", "ws", code=1)["error"]["kind"] == "conflict"
    assert runner.is_running(supervisor), "no --force: nothing killed"
    cli(capsys, "delete", "-y", "--force", "ws")
    assert not ws.root.exists()
    assert not runner.is_running(supervisor) and not runner.is_running(vmm)
    assert _everything_of(ws, tmp_path / "home") == []


def test_an_unrepairable_state_disk_stops_the_start_and_stays_as_it_is(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = started(capsys, project)
    assert cli(capsys, "kill", "ws")["killed"] is True
    ws.state_disk.write_bytes(b"\xa5" * (1 << 20))  # no ext4 left to find: e2fsck gives up
    before = hashlib.sha256(ws.state_disk.read_bytes()).hexdigest()
    error = cli(capsys, "start", "ws", code=1)["error"]
    assert error["kind"] == "integrity"
    assert error["message"].startswith(
        f"cannot start workspace 'ws': workspace state disk {ws.state_disk} has errors "
        "e2fsck -fy could not repair (exit code 8)"
    )
    assert f"e2fsck -f {ws.state_disk}" in error["hint"] and "rdump" in error["hint"]
    assert hashlib.sha256(ws.state_disk.read_bytes()).hexdigest() == before, "data untouched"
    assert ws.run.runtime()["stateDiskDirty"] == "a kill", "checked again on the next start"
    assert cli(capsys, "status", "ws")["event"]["state"] == "stopped", "nothing booted"
    assert cli(capsys, "start", "ws", code=1)["error"]["kind"] == "integrity"
    (fsck, _again) = [e for e in ws.run.events() if e["event"] == "fsck"]
    assert fsck["detail"] == "state disk checked after a kill: not repairable"


def test_the_rw_disks_a_killed_vm_wrote_are_checked_too(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = project / "scratch.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", str(image), "8M"], check=True)
    spec = project / "disky.yaml"
    spec.write_text(
        "name: disky\nimage: oci:layout:latest\nentrypoint: sleep 600\ndisks:\n"
        "  - {name: scratch, path: scratch.ext4, mountpoint: /scratch, mode: rw}\n"
    )
    cli(capsys, "create", "-f", str(spec))
    cli(capsys, "start", "disky")
    ws = Workspace(Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / "disky")
    supervisor = ProcessIdentity.from_json(ws.run.runtime()["supervisor"])
    assert supervisor is not None
    os.killpg(supervisor.pid, signal.SIGKILL)  # the whole supervisor, mid-write for all we know
    until(lambda: not runner.is_running(supervisor), "the supervisor is gone")
    copy = ws.disk_copy("scratch")
    subprocess.run(["debugfs", "-w", "-R", "sif <2> links_count 9", str(copy)], check=True)
    cli(capsys, "start", "disky")
    checks = {e["detail"]: e["exitCode"] for e in ws.run.events() if e["event"] == "fsck"}
    assert checks == {
        "state disk checked after its supervisor died: clean": 0,
        "disk scratch checked after its supervisor died: repaired": 1,
    }
    fsck = subprocess.run(["e2fsck", "-fn", str(copy)], check=False, capture_output=True)
    assert fsck.returncode == 0
    cli(capsys, "halt", "disky")


def test_a_supervisor_that_cannot_be_launched_leaves_the_workspace_failed(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = project / "ws.yaml"
    spec.write_text("name: ws\nimage: oci:layout:latest\nentrypoint: sleep 600\n")
    cli(capsys, "create", "-f", str(spec))
    ws = Workspace(Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / "ws")
    ws.run.supervisor_log.mkdir(parents=True)  # its output has nowhere to go
    error = cli(capsys, "start", "ws", code=1)["error"]
    assert error["kind"] == "io"
    assert error["message"] == "the supervisor could not be launched: Is a directory"
    status = cli(capsys, "status", "ws")
    assert (status["event"]["state"], status["event"]["detail"]) == ("failed", error["message"])
    ws.run.supervisor_log.rmdir()
    cli(capsys, "start", "ws")
    assert cli(capsys, "status", "ws")["event"]["state"] == "running"


def test_delete_right_after_the_end_waits_for_the_supervisor_to_exit(
    project: Path, capsys: pytest.CaptureFixture[str], children: list[subprocess.Popen[bytes]]
) -> None:
    spec = project / "ws.yaml"
    spec.write_text("name: ws\nimage: oci:layout:latest\nentrypoint: 'true'\n")
    cli(capsys, "create", "-f", str(spec))
    ws = Workspace(Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / "ws")
    lingering = stand_in_supervisor(ws.run, children)  # as one busy stopping its gateway
    ws.run.set_state(State.STOPPED, "entrypoint exited 0")
    threading.Timer(0.5, lambda: os.kill(lingering.pid, signal.SIGKILL)).start()
    began = time.monotonic()
    assert cli(capsys, "delete", "-y", "ws")["results"][0]["deleted"] is True
    assert 0.4 < time.monotonic() - began < 5
    assert not ws.root.exists()


def test_one_start_at_a_time_and_a_killed_ones_lock_never_blocks(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = project / "ws.yaml"
    spec.write_text("name: ws\nimage: oci:layout:latest\nentrypoint: sleep 600\n")
    cli(capsys, "create", "-f", str(spec))
    ws = Workspace(Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / "ws")
    holder = subprocess.Popen(  # a start that holds the lock (the real one, as flock)
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
            " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
            str(ws.run.path / ".start.lock"),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        error = cli(capsys, "start", "ws", code=1)["error"]
        assert (error["kind"], error["message"]) == (
            "conflict",
            "workspace 'ws' is being started by another command",
        )
        assert ws.run.state() is State.PREPARED, "nothing started twice"
    finally:
        holder.kill()
        holder.wait()
    cli(capsys, "start", "ws")
    assert cli(capsys, "status", "ws")["event"]["state"] == "running"


def test_a_restart_after_the_vmm_died_checks_the_disks_first(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_RESTART_BACKOFF", "0.05")
    spec = project / "ws.yaml"
    spec.write_text(
        "name: ws\nimage: oci:layout:latest\nentrypoint: sleep 600\nrestart: on-failure\n"
    )
    cli(capsys, "create", "-f", str(spec))
    cli(capsys, "start", "ws")
    ws = Workspace(Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / "ws")
    until(lambda: ws.run.vmm() is not None, "the VMM is recorded")
    first = ws.run.vmm()
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)  # the OOM killer's favourite: the VMM
    until(lambda: ws.run.vmm() not in (None, first), "the second boot")
    (fsck,) = [e for e in ws.run.events() if e["event"] == "fsck"]
    assert fsck["detail"] == (
        "state disk checked after a VM that stopped without a clean shutdown: clean"
    )
    (restart,) = [e for e in ws.run.events() if e["event"] == "restart"]
    assert restart["reason"].startswith("the VM stopped before the guest command finished")
    assert not ws.run.runtime().get("stateDiskDirty")
    assert cli(capsys, "halt", "ws")["state"] == "halted"


def test_no_restart_on_a_disk_the_check_cannot_repair(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_RESTART_BACKOFF", "1")
    spec = project / "ws.yaml"
    spec.write_text("name: ws\nimage: oci:layout:latest\nentrypoint: sleep 600\nrestart: always\n")
    cli(capsys, "create", "-f", str(spec))
    cli(capsys, "start", "ws")
    ws = Workspace(Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / "ws")
    until(lambda: ws.run.vmm() is not None, "the VMM is recorded")
    vmm = ws.run.vmm()
    assert vmm is not None
    os.kill(vmm.pid, signal.SIGKILL)
    ws.state_disk.write_bytes(b"\xa5" * (1 << 20))  # during the back-off
    garbage = ws.state_disk.read_bytes()
    until(lambda: ws.run.state() is State.FAILED, "the supervisor gives up", 15)
    assert str(ws.run.runtime()["detail"]).startswith(
        f"no restart: workspace state disk {ws.state_disk} has errors e2fsck -fy could not repair"
    )
    assert ws.state_disk.read_bytes() == garbage, "left as it is"
    assert ws.run.runtime()["stateDiskDirty"], "still marked: the next start checks it again"
