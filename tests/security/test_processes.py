"""Processes the tool starts, and what they leave behind: attacks through the public interface.

- the supervisor never imports code from the caller's directory or ``PYTHON*`` variables;
- no VMM outlives its supervisor unnoticed: ``delete --force`` and ``halt`` kill it, and
  ``start`` / ``cp`` refuse to touch the disks while it runs; a reused pid is never killed;
- ``halt`` ends in a bounded time even when the run dir's lock is held by a supervisor that
  is stopped (resumed first) or traced (killed), or by a stranger (a conflict that names it);
- the VMM's socket directory is private even when it falls back to a shared temp directory;
- the per-boot config disk (it carries ``--env`` values) is gone once the boot is over.

Workspaces run through the CLI with the fake backend (no VM, the real detached supervisor); a
real ``sleep`` stands in for a VMM process where one is needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from microagent.errors import VMError
from microagent.runtime import boot
from microagent.runtime.rundir import RunDir
from microagent.workspace import lifecycle
from testenv.clitools import cli_json as cli
from testenv.leaks import files_holding
from testenv.prereq import require_root

SECRET = "sk-security-secret-4711"


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def project(busybox_project: Path) -> Iterator[Path]:
    (busybox_project / "microagent.yaml").write_text(
        "name: ws\nimage: oci:layout:latest\nsetup: [mkdir -p /workspace]\nentrypoint: 'true'\n"
    )
    yield busybox_project
    kill_leftovers(home())


def kill_leftovers(root: Path) -> None:
    """A failed test must not leave a hanging supervisor (or its VMM) behind."""
    for path in root.glob("workspaces/*/runtime/runtime.json"):
        runtime = json.loads(path.read_text())
        pid, vmm = runtime.get("supervisorPid"), runtime.get("vmm") or {}
        if isinstance(pid, int) and running(pid):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        vmm_pid = vmm.get("pid")
        if isinstance(vmm_pid, int) and running(vmm_pid):
            same = start_time(vmm_pid) == vmm["startTime"]  # never a reused pid
            os.kill(vmm_pid, signal.SIGKILL if same else 0)


@pytest.fixture
def stand_ins() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Stand-in VMM processes (``sleep``), each in its own session like QEMU; none survive."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def stand_in(procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    procs.append(proc)
    return proc


def fake_guest(monkeypatch: pytest.MonkeyPatch, **fields: Any) -> None:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(fields))


def home() -> Path:
    return Path(os.environ["MICROAGENT_HOME"])


def run_dir(name: str = "ws") -> RunDir:
    return RunDir(home() / "workspaces" / name / "runtime")


def cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def wait_for(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def start_hanging(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> RunDir:
    """Create and start ``ws`` with a guest that runs until stopped; wait until it ran."""
    cli(capsys, "create", "-f", "microagent.yaml")
    fake_guest(monkeypatch, hang=True)
    cli(capsys, "start", "ws")
    run = run_dir()
    wait_for("the guest command to start", lambda: run.runtime().get("commandStartedAt"))
    time.sleep(EVENT_SETTLE)  # the supervisor's watcher has written its last update
    return run


EVENT_SETTLE = 0.6


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: when the process started (clock ticks after boot)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def record_vmm(run: RunDir, proc: subprocess.Popen[bytes], *, skew: int = 0) -> None:
    """Record ``proc`` where the supervisor records its VMM (``skew``: a wrong start time)."""
    run.update(vmm={"pid": proc.pid, "startTime": start_time(proc.pid) + skew})


@pytest.fixture
def hanging_with_vmm(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stand_ins: list[subprocess.Popen[bytes]],
) -> tuple[RunDir, subprocess.Popen[bytes]]:
    """``ws`` started with a guest that runs until stopped (in the project's directory), and
    a stand-in VMM recorded as its VM."""
    monkeypatch.chdir(project)
    run = start_hanging(capsys, monkeypatch)
    vmm = stand_in(stand_ins)
    record_vmm(run, vmm)
    return run, vmm


def state(capsys: pytest.CaptureFixture[str], name: str = "ws") -> str:
    return str(cli(capsys, "status", name)["event"]["state"])


def gone(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


# -- 1. the supervisor runs our code only -------------------------------------------------------


def plant_package(where: Path, marker: Path) -> None:
    """A cloned repository's ``microagent`` package (and module) that leaves a marker."""
    payload = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    for rel in (
        "microagent/__init__.py",
        "microagent/runtime/__init__.py",
        "microagent/runtime/supervisor.py",
        "microagent.py",
        "sitecustomize.py",
        "usercustomize.py",
    ):
        path = where / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(payload)


def test_start_ignores_a_microagent_package_in_the_callers_directory(
    project: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marker = tmp_path / "pwned"
    plant_package(project, marker)
    elsewhere = tmp_path / "on-pythonpath"
    plant_package(elsewhere, marker)
    monkeypatch.chdir(project)
    monkeypatch.setenv("PYTHONPATH", str(elsewhere))
    monkeypatch.setenv("PYTHONSTARTUP", str(elsewhere / "microagent.py"))
    cli(capsys, "create", "-f", "microagent.yaml")
    capsys.readouterr()
    assert main(["start", "ws", "--wait", "--timeout", "30"]) == 0
    assert cli(capsys, "status", "ws")["event"]["state"] == "stopped"
    assert not marker.exists(), marker.read_text()


def test_supervisor_is_isolated_python_in_its_run_directory(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    run = start_hanging(capsys, monkeypatch)
    pid = run.runtime()["supervisorPid"]
    argv = cmdline(pid)
    assert b"-I" in argv[1:3], argv
    assert Path(os.readlink(f"/proc/{pid}/cwd")) == run.path.resolve()
    assert cli(capsys, "halt", "ws")["state"] == "halted"


# -- 2. no VMM outlives its supervisor ----------------------------------------------------------


def test_supervisor_records_its_vmm_which_dies_with_it(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    cli(capsys, "create", "-f", "microagent.yaml")
    fake_guest(monkeypatch, hang=True, process=["sleep", "300"])
    cli(capsys, "start", "ws")
    run = run_dir()
    vmm = wait_for("the VMM to be recorded", lambda: run.runtime().get("vmm"))
    pid = vmm["pid"]
    try:
        assert vmm["startTime"] == start_time(pid)
        wait_for("the stand-in VMM to run", lambda: cmdline(pid)[0].endswith(b"sleep"))
        assert os.getsid(pid) != os.getsid(run.runtime()["supervisorPid"])  # like QEMU
        os.killpg(run.runtime()["supervisorPid"], signal.SIGKILL)
        wait_for("the VMM to die with its supervisor", lambda: not running(pid), 5)
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
    assert state(capsys) == "failed"
    assert not run.config_disk.exists()


def test_force_delete_leaves_no_vmm(
    capsys: pytest.CaptureFixture[str],
    hanging_with_vmm: tuple[RunDir, subprocess.Popen[bytes]],
) -> None:
    _run, vmm = hanging_with_vmm
    assert cli(capsys, "delete", "-y", "--force", "ws")["results"][0]["deleted"]
    assert gone(vmm), "delete --force left the VMM running"


PTRACE_ATTACH, PTRACE_DETACH = 16, 17


@contextlib.contextmanager
def traced(pid: int) -> Iterator[None]:
    """``pid`` held in a ptrace stop (state ``t``): no signal but SIGKILL moves it on."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            require_root("attaching a tracer to the supervisor")
        raise OSError(err, os.strerror(err))
    try:
        deadline = time.monotonic() + 30
        while _sched_state(pid) != "t":
            assert time.monotonic() < deadline, "the tracee never stopped"
            time.sleep(0.01)
        yield
    finally:
        if _sched_state(pid) not in ("", "Z", "X"):
            libc.ptrace(PTRACE_DETACH, pid, None, None)


def _sched_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return ""


def test_halt_escalation_kills_the_vmm(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    hanging_with_vmm: tuple[RunDir, subprocess.Popen[bytes]],
) -> None:
    run, vmm = hanging_with_vmm
    # deaf to the graceful request: stopped by a tracer (halt resumes a plainly stopped one)
    with traced(run.runtime()["supervisorPid"]):
        assert cli(capsys, "halt", "ws", "--timeout", "1")["state"] == "halted"
        assert gone(vmm), "halt escalation left the VMM running"
    src = project / "microagent.yaml"
    cli(capsys, "cp", str(src), "ws:/tmp/spec.yaml")


class LockHolder:
    """Holds the run dir's writers' lock from this process (an open file of its own: flock
    locks of two opens conflict even within one process) as a supervisor holds it mid-write,
    and lets go once ``lets_go()`` says that supervisor would have: it runs again, or is gone.
    After ``bound`` seconds it lets go anyway (``gave_up``), so a halt that waits for the lock
    fails the test instead of hanging it."""

    def __init__(self, run: RunDir, lets_go: Callable[[], bool], bound: float = 30.0) -> None:
        self.fd = os.open(run.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.lets_go, self.bound = lets_go, bound
        self.gave_up = False
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()

    def _hold(self) -> None:
        deadline = time.monotonic() + self.bound
        while not self.lets_go():
            if time.monotonic() > deadline:
                self.gave_up = True
                break
            time.sleep(0.01)
        os.close(self.fd)

    def __enter__(self) -> LockHolder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.thread.join()


def timed_halt(
    capsys: pytest.CaptureFixture[str], *args: str, code: int = 0
) -> tuple[dict[str, Any], float]:
    began = time.monotonic()
    out = cli(capsys, "halt", "ws", *args, code=code)
    return out, time.monotonic() - began


def test_halt_resumes_a_supervisor_stopped_while_it_holds_the_lock(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    run = start_hanging(capsys, monkeypatch)
    pid = run.runtime()["supervisorPid"]
    try:
        os.kill(pid, signal.SIGSTOP)
        wait_for("the supervisor to stop", lambda: _sched_state(pid) == "T")
        with LockHolder(run, lets_go=lambda: _sched_state(pid) != "T") as holder:
            out, took = timed_halt(capsys, "--timeout", "20")
        assert not holder.gave_up, f"halt waited for the lock of a stopped supervisor: {out}"
        assert out["state"] == "halted", out
        assert took < 20, f"halt took {took:.1f}s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    event = cli(capsys, "status", "ws")["event"]
    assert (event["state"], event["detail"]) == ("halted", "halted on request"), event
    seen = [e["event"] for e in cli(capsys, "events", "ws")["events"]]
    assert "supervisor-resumed" in seen
    assert not running(pid)


def test_halt_kills_a_traced_supervisor_that_holds_the_lock(
    capsys: pytest.CaptureFixture[str],
    hanging_with_vmm: tuple[RunDir, subprocess.Popen[bytes]],
) -> None:
    run, vmm = hanging_with_vmm
    pid = run.runtime()["supervisorPid"]
    with traced(pid), LockHolder(run, lets_go=lambda: not running(pid)) as holder:
        out, took = timed_halt(capsys, "--timeout", "1")  # SIGCONT moves no tracee on
    assert not holder.gave_up, f"halt waited for the lock of a traced supervisor: {out}"
    assert out["state"] == "halted", out
    assert took < 15, f"halt took {took:.1f}s"  # 1 s for the lock, then the kill
    assert gone(vmm), "halt left the VMM running"
    detail = cli(capsys, "status", "ws")["event"]["detail"]
    assert detail == (
        f"killed: its supervisor (pid {pid}) was traced and held the run dir's lock for 1s"
    )
    assert run.runtime()["stateDiskDirty"] == "a halt that had to kill the VM"


def test_the_lock_wait_and_the_shutdown_share_the_halt_timeout(
    capsys: pytest.CaptureFixture[str],
    hanging_with_vmm: tuple[RunDir, subprocess.Popen[bytes]],
) -> None:
    """`--timeout` bounds the whole halt: a stranger holds the run dir's lock for most of it
    and the supervisor never shuts down (traced), so what is left after the lock is all the
    guest gets before the kill; the halt does not take the lock's wait plus a full timeout."""
    run, vmm = hanging_with_vmm
    held = time.monotonic() + 4.0
    with (
        traced(run.runtime()["supervisorPid"]),
        LockHolder(run, lets_go=lambda: time.monotonic() > held, bound=10) as holder,
    ):
        out, took = timed_halt(capsys, "--timeout", "5")
    assert not holder.gave_up
    assert out["state"] == "halted", out
    assert took < 8, f"halt took {took:.1f}s: lock wait (4 s) plus a whole timeout (5 s)?"
    assert gone(vmm), "halt left the VMM running"
    detail = cli(capsys, "status", "ws")["event"]["detail"]
    assert detail == "killed after 5s without a clean shutdown"


def test_halt_names_a_stranger_that_holds_the_lock(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    run = start_hanging(capsys, monkeypatch)
    with LockHolder(run, lets_go=lambda: False, bound=5) as holder:
        out, took = timed_halt(capsys, "--timeout", "1", code=1)
    assert holder.gave_up  # nothing of the workspace ever lets go of a stranger's lock
    assert took < holder.bound, f"halt took {took:.1f}s"
    error = out["error"]
    assert error["kind"] == "conflict", out
    assert error["message"] == (
        f"cannot halt workspace 'ws': another process held {run.lock_path} for 1s"
    )
    assert error["hint"].startswith(f"`fuser -v {run.lock_path}` names the process")
    assert cli(capsys, "status", "ws")["supervisor"]["responsive"] is True  # untouched
    assert cli(capsys, "halt", "ws")["state"] == "halted"


def test_kill_does_not_wait_for_ever_on_a_stranger_s_lock(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kill` ends the processes at once and then records ``stopped``; a lock held by no
    process of the workspace is waited for a bounded time, then named in a conflict."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(lifecycle, "EXIT_GRACE", 1.0)
    run = start_hanging(capsys, monkeypatch)
    pid = run.runtime()["supervisorPid"]
    began = time.monotonic()
    with LockHolder(run, lets_go=lambda: False, bound=6):
        error = cli(capsys, "kill", "ws", code=1)["error"]
        took = time.monotonic() - began
    assert took < 5, f"kill took {took:.1f}s"  # the grace (1 s) and the kill, not the holder
    assert error["kind"] == "conflict", error
    assert "was killed, but its state could not be recorded" in error["message"]
    assert error["hint"].startswith(f"`fuser -v {run.lock_path}` names the process")
    wait_for("the killed supervisor to be gone", lambda: not running(pid), 5)
    # once the lock is free, the death is recorded and the state disk marked for a check
    assert cli(capsys, "status", "ws", code=None)["event"]["state"] == "failed"
    assert run.runtime()["stateDiskDirty"]


def test_orphaned_vmm_blocks_cp_start_and_delete_until_halted(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    hanging_with_vmm: tuple[RunDir, subprocess.Popen[bytes]],
) -> None:
    run, vmm = hanging_with_vmm
    os.killpg(run.runtime()["supervisorPid"], signal.SIGKILL)  # the VMM (stand-in) lives on
    wait_for("the workspace to fail", lambda: state(capsys) == "failed")
    src = project / "microagent.yaml"
    copy = cli(capsys, "cp", str(src), "ws:/tmp/spec.yaml", code=1)["error"]
    assert copy["kind"] == "conflict" and "halt ws" in copy["hint"]
    assert "still running" in copy["message"]
    assert cli(capsys, "start", "ws", code=1)["error"]["kind"] == "conflict"
    began = time.monotonic()
    assert cli(capsys, "delete", "-y", "ws", code=1)["error"]["kind"] == "conflict"
    took = time.monotonic() - began  # no supervisor is left to stop the VMM: no 10 s wait
    assert took < lifecycle.EXIT_GRACE / 2, f"the refusal took {took:.1f}s"
    assert vmm.poll() is None
    assert cli(capsys, "halt", "ws")["state"] == "failed"
    assert gone(vmm), "halt left the orphaned VMM running"
    cli(capsys, "cp", str(src), "ws:/tmp/spec.yaml")
    fake_guest(monkeypatch)
    capsys.readouterr()
    assert main(["start", "ws", "--wait", "--timeout", "30"]) == 0


def test_a_reused_pid_is_never_killed(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stand_ins: list[subprocess.Popen[bytes]],
) -> None:
    monkeypatch.chdir(project)
    cli(capsys, "create", "-f", "microagent.yaml")
    capsys.readouterr()
    assert main(["start", "ws", "--wait", "--timeout", "30"]) == 0
    stranger = stand_in(stand_ins)  # a later process that got the recorded VMM's pid
    record_vmm(run_dir(), stranger, skew=-1)
    src = project / "microagent.yaml"
    cli(capsys, "cp", str(src), "ws:/tmp/spec.yaml")
    assert cli(capsys, "halt", "ws")["state"] == "stopped"
    assert cli(capsys, "delete", "-y", "--force", "ws")["results"][0]["deleted"]
    assert stranger.poll() is None, "a process that merely reuses the pid was killed"


# -- 3. the VMM's socket directory is private --------------------------------------------------


LONG = "x" * 90  # run dirs this deep push control.sock past the unix socket limit


@pytest.fixture
def temp_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A /tmp-like directory (sticky, world-writable) as TMPDIR; no XDG_RUNTIME_DIR. Short,
    as /tmp is: below pytest's own temporary folder the VM's socket paths would not fit."""
    root = Path(tempfile.mkdtemp(prefix="ma-tmp-", dir="/tmp"))
    root.chmod(0o1777)
    monkeypatch.setenv("TMPDIR", str(root))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_private_vm_dir_whose_sockets_cannot_fit_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / LONG
    deep.mkdir()
    deep.chmod(0o1777)
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with pytest.raises(VMError, match="too long a path") as raised:
        boot.vm_dir_for(long_run_dir(tmp_path), "ws")
    assert "TMPDIR" in (raised.value.hint or "")


def long_run_dir(tmp_path: Path) -> Path:
    path = tmp_path / LONG / "ws" / "runtime"
    assert len(str(path / "vm" / "control.sock")) >= boot.SOCKET_PATH_MAX
    return path


def assert_private_outside(vm_dir: Path, *planted: Path) -> None:
    info = vm_dir.lstat()
    assert info.st_uid == os.geteuid() and info.st_mode & 0o777 == 0o700
    assert info.st_mode & 0o170000 == 0o040000  # a directory, not a symlink
    for bad in planted:
        assert not vm_dir.resolve().is_relative_to(bad.resolve()), (vm_dir, bad)
        assert not vm_dir.is_relative_to(bad), (vm_dir, bad)


def test_fallback_dir_is_made_private(tmp_path: Path, temp_root: Path) -> None:
    vm_dir = boot.vm_dir_for(long_run_dir(tmp_path), "ws")
    base = temp_root / f"microagent-{os.geteuid()}"
    assert vm_dir.parent == base and boot.is_private_dir(base)
    assert_private_outside(vm_dir)
    assert boot.vm_dir_for(long_run_dir(tmp_path), "ws") == vm_dir  # stable across starts


@pytest.mark.parametrize("plant", ["world-writable", "group-writable", "symlink", "file"])
def test_planted_fallback_dir_is_not_used(
    tmp_path: Path, temp_root: Path, monkeypatch: pytest.MonkeyPatch, plant: str
) -> None:
    attacker = tmp_path / "attacker"
    attacker.mkdir(mode=0o700)
    for name in (f"microagent-{os.geteuid()}", "microagent"):
        plant_at(temp_root / name, attacker, plant)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    plant_at(xdg / "microagent", attacker, plant)
    planted = (temp_root / f"microagent-{os.geteuid()}", temp_root / "microagent", xdg)
    for runtime_dir in (None, xdg):
        if runtime_dir is not None:
            monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
        assert_private_outside(boot.vm_dir_for(long_run_dir(tmp_path), "ws"), attacker, *planted)
    assert list(attacker.iterdir()) == []


def plant_at(path: Path, target: Path, how: str) -> None:
    if how == "symlink":
        path.symlink_to(target)
    elif how == "file":
        path.write_text("")
    else:
        path.mkdir()
        path.chmod(0o777 if how == "world-writable" else 0o770)


@pytest.mark.root("to make a directory another user owns")
def test_fallback_dir_of_another_user_is_not_used(
    tmp_path: Path, temp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = temp_root / f"microagent-{os.geteuid()}"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    (xdg / "microagent").mkdir(mode=0o700)
    os.chown(xdg / "microagent", 65534, 65534)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert_private_outside(boot.vm_dir_for(long_run_dir(tmp_path), "ws"), theirs, xdg)
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert_private_outside(boot.vm_dir_for(long_run_dir(tmp_path), "ws"), theirs, xdg)


def test_runtime_dir_that_others_can_rename_in_is_not_used(
    tmp_path: Path, temp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared-xdg"
    shared.mkdir()
    shared.chmod(0o777)  # writable by all, not sticky: anyone can swap its entries
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    assert_private_outside(boot.vm_dir_for(long_run_dir(tmp_path), "ws"), shared)


def test_start_with_a_long_home_uses_a_private_vm_dir(
    project: Path,
    tmp_path: Path,
    temp_root: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / LONG / "home"))
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    (xdg / "microagent").symlink_to(attacker)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.chdir(project)
    cli(capsys, "create", "-f", "microagent.yaml")
    capsys.readouterr()
    assert main(["start", "ws", "--wait", "--timeout", "30"]) == 0
    vm_dir = Path(run_dir().runtime()["vmDir"])
    assert not vm_dir.is_relative_to(run_dir().path)  # the fallback was needed
    assert_private_outside(vm_dir, attacker, xdg / "microagent")


def test_scratch_vm_dir_is_private(temp_root: Path) -> None:
    with boot.scratch_vm_dir() as tmp:
        assert Path(tmp).parent == temp_root
        assert_private_outside(Path(tmp))


# -- 4. the config disk (it carries --env values) does not outlive the boot --------------------


def test_config_disk_is_gone_after_the_boot(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    cli(capsys, "create", "-f", "microagent.yaml", "-e", f"API_KEY={SECRET}")
    capsys.readouterr()
    assert main(["start", "ws", "--wait", "--timeout", "30"]) == 0
    ws = home() / "workspaces" / "ws"
    assert not run_dir().config_disk.exists()
    assert files_holding(ws, SECRET) == ["workspace.json"]
    assert (ws / "workspace.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("ending", ["halt", "supervisor killed"])
def test_config_disk_is_gone_after_halt_or_a_dead_supervisor(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    monkeypatch.chdir(project)
    cli(capsys, "create", "-f", "microagent.yaml", "-e", f"API_KEY={SECRET}")
    fake_guest(monkeypatch, hang=True)
    cli(capsys, "start", "ws")
    run = run_dir()
    wait_for("the guest command to start", lambda: run.runtime().get("commandStartedAt"))
    if ending == "halt":
        assert cli(capsys, "halt", "ws")["state"] == "halted"
    else:
        os.killpg(run.runtime()["supervisorPid"], signal.SIGKILL)
        wait_for("the workspace to fail", lambda: state(capsys) == "failed")
    assert files_holding(home() / "workspaces" / "ws", SECRET) == ["workspace.json"]
