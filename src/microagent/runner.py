"""The one subprocess runner.

Every external program microagent uses goes through :func:`run` (or :func:`spawn` for
long-lived children): argv lists only, a minimal environment, stdin closed unless data is
given, and on failure an error that names the command and replays the tail of its stderr.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from microagent.errors import ToolError, VMError
from microagent.frozen import Frozen

# Which Debian package provides a tool, for the "not installed" hint.
PACKAGES: Mapping[str, str] = {
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-img": "qemu-utils",
    "slirp4netns": "slirp4netns",
    "iptables": "iptables",
    "iptables-restore": "iptables",
    "ip6tables-restore": "iptables",
    "ip": "iproute2",
    "socat": "socat",
    "docker-registry": "docker-registry",
    "debootstrap": "debootstrap",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "busybox": "busybox-static",
    "setpriv": "util-linux",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "sleep": "coreutils",
    "env": "coreutils",
    "gpgv": "gpgv",
    "gpg": "gpg",
    "cpio": "cpio",
    "openssl": "openssl",
    "mount": "mount",
    "umount": "mount",
}

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STDERR_TAIL_LINES = 20


@dataclass(frozen=True, eq=False, repr=False)
class Completed(Frozen):
    """The outcome of a finished command."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A small, predictable environment: PATH, locale, HOME, TMPDIR plus ``extra``."""
    env = {
        "PATH": os.environ.get("PATH", BASE_PATH) + ":" + BASE_PATH,
        "LC_ALL": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
    }
    if "TMPDIR" in os.environ:
        env["TMPDIR"] = os.environ["TMPDIR"]
    if extra:
        env.update(extra)
    return env


def find_tool(name: str) -> str:
    """Absolute path of ``name`` on PATH (plus the sbin dirs), or a ToolError with a hint."""
    found = shutil.which(name, path=minimal_env()["PATH"])
    if found is None:
        package = PACKAGES.get(name, name)
        raise ToolError(
            f"required program {name!r} is not installed",
            hint=f"install it, e.g. `apt-get install {package}`",
        )
    return found


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _resolve(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    if not argv:
        raise ValueError("empty argv")
    words = [os.fspath(a) for a in argv]
    if os.sep not in words[0]:
        words[0] = find_tool(words[0])
    return words


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    cwd: Path | None = None,
    input: bytes | None = None,
) -> Completed:
    """Run a command to completion and capture its output (decoded as UTF-8, replaced)."""
    words = _resolve(argv)
    shown = shlex.join(words)
    try:
        proc = subprocess.run(
            words,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=minimal_env(env),
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"command timed out after {timeout}s: {shown}") from exc
    except OSError as exc:
        raise ToolError(f"could not run {shown}: {exc.strerror or exc}") from exc
    done = Completed(
        argv=tuple(words),
        returncode=proc.returncode,
        stdout=proc.stdout.decode("utf-8", "replace"),
        stderr=proc.stderr.decode("utf-8", "replace"),
    )
    if check and done.returncode != 0:
        tail = _tail(done.stderr) or _tail(done.stdout)
        detail = f":\n{tail}" if tail else ""
        raise ToolError(f"command failed with exit code {done.returncode}: {shown}{detail}")
    return done


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    stdout: Path | None = None,
    cwd: Path | None = None,
    new_session: bool = False,
    pass_fds: Sequence[int] = (),
    stdin: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived child; its stdout+stderr go to ``stdout`` (a file) or are discarded.
    ``stdin``: a file descriptor the child reads (a pipe of secrets); else ``/dev/null``."""
    words = _resolve(argv)
    sink = stdout.open("ab") if stdout is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            words,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=minimal_env(env),
            cwd=cwd,
            start_new_session=new_session,
            pass_fds=tuple(pass_fds),
        )
    except OSError as exc:
        raise ToolError(f"could not start {shlex.join(words)}: {exc.strerror or exc}") from exc
    finally:
        if stdout is not None and not isinstance(sink, int):
            sink.close()


def pid_alive(pid: object) -> bool:
    """Whether ``pid`` names a running (not zombie) process."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


# -- process identity ---------------------------------------------------------------------------

KILL_WAIT = 5.0


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def boot_id() -> str:
    """This boot of the host ('' where the kernel does not say): a pid or a start time
    recorded under another boot names nothing that runs now."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True, eq=False, repr=False)
class ProcessIdentity(Frozen):
    """A process as the kernel knows it: pid plus start time (clock ticks after boot) and the
    boot it runs in, so a recorded pid is never mistaken for a later process that reuses the
    number, in this boot or after a restart of the host."""

    pid: int
    start_time: int
    boot_id: str = ""  # '' when unknown (recorded before boot ids were)

    def to_json(self) -> dict[str, int | str]:
        data: dict[str, int | str] = {"pid": self.pid, "startTime": self.start_time}
        if self.boot_id:
            data["bootId"] = self.boot_id
        return data

    @classmethod
    def from_json(cls, data: object) -> ProcessIdentity | None:
        """The identity recorded as :meth:`to_json`, or None for anything else."""
        if not isinstance(data, Mapping):
            return None
        pid, start, boot = data.get("pid"), data.get("startTime"), data.get("bootId", "")
        if type(pid) is not int or type(start) is not int or pid <= 0:
            return None
        return cls(pid, start, boot if isinstance(boot, str) else "")


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of the running (not zombie) process ``pid``, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # fields[0] is field 3 (state) of proc_pid_stat(5)
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return ProcessIdentity(pid, int(fields[19]), boot_id())  # field 22: starttime


def is_running(identity: ProcessIdentity) -> bool:
    """Whether the process ``identity`` names is still running (a reused pid is not it, nor
    is anything of a boot other than this one)."""
    now = process_identity(identity.pid)
    if now is None or now.start_time != identity.start_time:
        return False
    return not identity.boot_id or not now.boot_id or identity.boot_id == now.boot_id


def command_line(pid: int) -> tuple[str, ...]:
    """The argv of process ``pid`` (empty when it is gone, a zombie or a kernel thread)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ()
    words = raw.removesuffix(b"\0").split(b"\0") if raw else []
    return tuple(word.decode("utf-8", "surrogateescape") for word in words)


def processes() -> Iterator[int]:
    """The pids of every process on the host (none where there is no ``/proc``)."""
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return
    yield from (int(entry.name) for entry in entries if entry.name.isdigit())


def owned_by_me(pid: int) -> bool:
    """Whether process ``pid`` runs as this process's effective user."""
    try:
        return Path(f"/proc/{pid}").stat().st_uid == os.geteuid()
    except OSError:
        return False


def working_dir(pid: int) -> Path | None:
    """The current directory of process ``pid`` (None when it cannot be read)."""
    try:
        return Path(f"/proc/{pid}/cwd").readlink()
    except OSError:
        return None


def lineage(pid: int) -> tuple[int, int] | None:
    """The parent pid and the session id of the running process ``pid`` (None if none)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # fields[1], [3]: fields 4 (ppid), 6 (session)
    if len(fields) < 4 or fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[3])


def kill_process(identity: ProcessIdentity, *, timeout: float = KILL_WAIT) -> bool:
    """SIGKILL the process ``identity`` names, if it still runs, and wait until it is gone.

    The pid is pinned with a pidfd before its start time is checked, so a pid reused in
    between is never signalled. True if it was killed; VMError if it survives ``timeout``.
    """
    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd (old kernel): check, then signal by pid
        pidfd = -1
    try:
        if not is_running(identity):
            return False
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(identity.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        raise VMError(f"not allowed to stop process {identity.pid}: {exc.strerror}") from exc
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return _await_gone(identity, timeout)


def _await_gone(identity: ProcessIdentity, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_running(identity):
        if time.monotonic() > deadline:
            raise VMError(f"process {identity.pid} survived SIGKILL for {timeout:g}s")
        time.sleep(0.01)
    return True
