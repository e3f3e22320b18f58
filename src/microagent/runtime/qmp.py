"""The VMM's management socket (QMP, QEMU's JSON protocol) in the VM directory.

Used to inspect and steer a running machine from the host: freeze and thaw its vCPUs (``stop``,
``cont``: pause/resume), save and load its state (``migrate`` / ``migrate-incoming`` to a file
descriptor passed over the socket with ``getfd``: no shell, no path in a URI; see
:mod:`~microagent.runtime.snapshot`), and write the guest's memory to a file
(``dump-guest-memory``), which the tests use to show that no secret ever sat in guest RAM.
Every reply is bounded; QEMU is trusted, but a wedged VMM must not hang the caller.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

from microagent.errors import VMError

QMP_SOCKET = "qmp.sock"
LINE_MAX = 1 << 20
TIMEOUT = 10.0
MIGRATE_POLL = 0.05  # seconds between query-migrate calls of a save
LOAD_POLL = 0.01  # ... of a restore: a start waits on it (two small QMP round trips each)
CONNECT_POLL = 0.01  # seconds between tries at the socket of a VMM just started
FD_NAME = "microagent-state"  # the name a passed state file descriptor gets in QEMU


class QMPClient:
    """One QMP session: the greeting, capabilities negotiation, then commands in turn."""

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buffer = b""
        try:
            self._sock.connect(str(path))
            self._read()  # {"QMP": {...}}
            self.execute("qmp_capabilities")
        except OSError as exc:
            self.close()
            raise VMError(f"cannot talk to the VMM at {path}: {exc.strerror or exc}") from exc

    def execute(
        self, command: str, timeout: float | None = None, *, fd: int | None = None, **arguments: Any
    ) -> Any:
        """Run ``command`` and return its ``return`` value; VMError on a QMP error. ``fd`` is
        passed along with the request (SCM_RIGHTS), as ``getfd`` wants it."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        try:
            if fd is None:
                self._sock.sendall(data)
            else:
                socket.send_fds(self._sock, [data], [fd])
        except OSError as exc:
            raise VMError(f"QMP {command}: cannot reach the VMM ({exc.strerror or exc})") from exc
        return self._reply(command, timeout)

    def _reply(self, command: str, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None:
                self._sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                reply = self._read()
            except OSError as exc:
                raise VMError(f"QMP {command}: no answer from the VMM ({exc})") from exc
            if "event" in reply:
                continue
            if "error" in reply:
                error = reply["error"] if isinstance(reply["error"], dict) else {}
                raise VMError(f"QMP {command}: {str(error.get('desc', 'failed'))[:200]}")
            return reply.get("return")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            if len(self._buffer) > LINE_MAX:
                raise VMError("the VMM sent an over-long QMP reply")
            chunk = self._sock.recv(65536)
            if not chunk:
                raise VMError("the VMM closed its QMP socket")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        value = json.loads(line)
        if not isinstance(value, dict):
            raise VMError("the VMM sent a QMP reply that is not an object")
        return value

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def dump_guest_memory(state_dir: Path, target: Path, timeout: float = 300.0) -> None:
    """Write the guest's RAM (ELF core format) to ``target`` (synchronously)."""
    with QMPClient(state_dir / QMP_SOCKET) as qmp:
        qmp.execute("dump-guest-memory", timeout=timeout, paging=False, protocol=f"file:{target}")


def connect(state_dir: Path, wait: float = 0.0) -> QMPClient:
    """A session on the VMM of ``state_dir``; with ``wait``, retried that long while the VMM
    has not made its socket yet (a VMM just started)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return QMPClient(state_dir / QMP_SOCKET)
        except VMError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(CONNECT_POLL)


def run_status(qmp: QMPClient) -> str:
    """The VM's run state (``running``, ``paused``, ``inmigrate``, ``postmigrate`` ...)."""
    reply = qmp.execute("query-status")
    return str(reply.get("status", "")) if isinstance(reply, dict) else ""


def monitor_command(qmp: QMPClient, command_line: str, timeout: float = TIMEOUT) -> str:
    """The text a human-monitor command prints (``human-monitor-command``), e.g. ``info
    registers -a``; QEMU bounds it, the caller bounds what it keeps."""
    arguments: dict[str, Any] = {"command-line": command_line}
    return str(qmp.execute("human-monitor-command", timeout, **arguments))


def stop(state_dir: Path) -> None:
    """Freeze the vCPUs (a no-op on a stopped VM)."""
    with QMPClient(state_dir / QMP_SOCKET) as qmp:
        qmp.execute("stop")


def cont(state_dir: Path) -> None:
    """Thaw the vCPUs."""
    with QMPClient(state_dir / QMP_SOCKET) as qmp:
        qmp.execute("cont")


def quit_vmm(state_dir: Path) -> None:
    """End the VMM now (no guest shutdown); the socket closing under us is the answer."""
    try:
        with QMPClient(state_dir / QMP_SOCKET) as qmp:
            qmp.execute("quit")
    except VMError as exc:
        if "closed" not in exc.message and "no answer" not in exc.message:
            raise


def _await_migration(qmp: QMPClient, what: str, timeout: float) -> dict[str, Any]:
    """Poll ``query-migrate`` until it completed; VMError when it failed or took too long."""
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.execute("query-migrate")
        info = info if isinstance(info, dict) else {}
        status = str(info.get("status", ""))
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            why = str(info.get("error-desc", status))[:300]
            raise VMError(f"the VMM could not {what}: {why}")
        if time.monotonic() > deadline:
            with contextlib.suppress(VMError):
                qmp.execute("migrate_cancel")
            raise VMError(f"the VMM did not {what} within {timeout:g}s")
        time.sleep(MIGRATE_POLL)


def save_state(state_dir: Path, fd: int, timeout: float = 600.0) -> dict[str, Any]:
    """Write the stopped VM's memory and device state to the open file ``fd``; the
    ``query-migrate`` report of the finished save."""
    with QMPClient(state_dir / QMP_SOCKET) as qmp:
        qmp.execute("getfd", fd=fd, fdname=FD_NAME)
        qmp.execute("migrate", uri=f"fd:{FD_NAME}")
        return _await_migration(qmp, "save the VM state", timeout)


def load_state(qmp: QMPClient, fd: int, timeout: float = 600.0) -> None:
    """Load a saved state from the open file ``fd`` into a VMM started with ``-incoming
    defer``; it stays stopped (the state was saved stopped) until ``cont``."""
    qmp.execute("getfd", fd=fd, fdname=FD_NAME)
    qmp.execute("migrate-incoming", uri=f"fd:{FD_NAME}")
    deadline = time.monotonic() + timeout
    while run_status(qmp) == "inmigrate":
        info = qmp.execute("query-migrate")
        if isinstance(info, dict) and info.get("status") == "failed":
            raise VMError(f"the VMM could not load the VM state: {info.get('error-desc', '')}")
        if time.monotonic() > deadline:
            raise VMError(f"the VMM did not load the VM state within {timeout:g}s")
        time.sleep(LOAD_POLL)
