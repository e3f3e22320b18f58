"""The VMM's management socket (QMP, QEMU's JSON protocol) in the VM directory.

Used to inspect a running machine from the host: today to write the guest's memory to a file
(``dump-guest-memory``), which the tests use to show that no secret ever sat in guest RAM.
Every reply is bounded; QEMU is trusted, but a wedged VMM must not hang the caller.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from microagent.errors import VMError

QMP_SOCKET = "qmp.sock"
LINE_MAX = 1 << 20
TIMEOUT = 10.0


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

    def execute(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value; VMError on a QMP error."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None:
                self._sock.settimeout(max(0.1, deadline - time.monotonic()))
            reply = self._read()
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
