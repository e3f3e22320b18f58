"""A malformed ``exited`` event over QEMU's control socket is a clear VMError, never a raw
ValueError or TypeError out of the host's event pump.

The guest's event used to be read with ``int(exit_code)``, ``dict(outputs)`` and
``float(mark)``: ``"exit_code": "x"`` raised ValueError, a list for ``outputs`` TypeError,
from inside :meth:`QemuMachine.wait`. The machine is driven here over a real unix socket, as
QEMU serves it; the VMM is a stand-in that exits once the guest is asked to power off.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from microagent.errors import VMError
from microagent.runtime.backend import BootConfig
from microagent.runtime.qemu import QemuMachine


class _VMM:
    """A VMM process stand-in: runs until the guest powers off or it is signalled."""

    pid = 4242

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.signalled = False

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout or 0.0)
        while self.returncode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.returncode if self.returncode is not None else 0

    def terminate(self) -> None:
        self.signalled = True
        self.returncode = -15

    kill = terminate


class _Sandbox:
    torn_down = False

    def teardown(self) -> None:
        self.torn_down = True


class _Guest(threading.Thread):
    """Serves the control socket: sends ``lines``, then powers the VMM off when the host
    asks for a shutdown (as the guest init does), or at once with ``power_off``."""

    def __init__(self, path: Path, vmm: _VMM, lines: list[bytes], power_off: bool) -> None:
        super().__init__(daemon=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.vmm, self.lines, self.power_off = vmm, lines, power_off
        self.asked: list[dict[str, Any]] = []

    def run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(b"".join(self.lines))
            if self.power_off:
                time.sleep(0.2)  # the host reads the lines, then the VMM exits
                self.vmm.returncode = 0
            buf = b""
            while self.vmm.returncode is None and (chunk := conn.recv(4096)):
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    self.asked.append(json.loads(line))
                    if self.asked[-1].get("op") == "shutdown":
                        self.vmm.returncode = 0
        self.server.close()


def boot(
    tmp_path: Path, *events: dict[str, Any], power_off: bool = False
) -> tuple[QemuMachine, _Guest, _VMM, _Sandbox]:
    config = BootConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", disks=(), state_dir=tmp_path)
    vmm, sandbox = _VMM(), _Sandbox()
    lines = [json.dumps(e).encode() + b"\n" for e in events]
    guest = _Guest(config.control_socket, vmm, lines, power_off)
    guest.start()
    machine = QemuMachine(config, ["qemu"], cast(Any, vmm), cast(Any, sandbox))
    return machine, guest, vmm, sandbox


BOOTED = {"event": "booted"}
STARTED = {"event": "started"}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"exit_code": "x"}, ["exit_code: expected an integer from 0 to 255, got str 'x'"]),
        ({"exit_code": [1]}, ["exit_code: expected an integer"]),
        ({"exit_code": -1}, ["exit_code: expected an integer from 0 to 255, got int -1"]),
        ({"exit_code": 0, "outputs": []}, ["outputs: expected an object"]),
        ({"exit_code": 0, "outputs": {"result": 5}}, ["outputs.result: expected null or"]),
        ({"exit_code": 0, "marks": {"booted": "soon"}}, ["marks.booted: expected a number"]),
        ({"exit_code": 0, "stdout": {"a": 1}}, ["stdout: expected a string"]),
        (
            {"exit_code": "x", "outputs": [], "stopped": "yes"},
            ["exit_code: expected", "stopped: expected true or false", "outputs: expected"],
        ),
    ],
    ids=["code-text", "code-list", "code-negative", "outputs-list", "output-number",
         "mark-text", "stdout-object", "three-at-once"],
)  # fmt: skip
def test_a_malformed_exited_event_is_a_clear_vm_error(
    tmp_path: Path, fields: dict[str, Any], named: list[str]
) -> None:
    machine, guest, vmm, sandbox = boot(tmp_path, BOOTED, STARTED, {"event": "exited", **fields})
    with pytest.raises(VMError) as caught:
        machine.wait(timeout=20)
    guest.join(5)
    message = caught.value.message
    assert message.startswith("the guest's exited event is malformed: ")
    for part in named:
        assert part in message
    assert caught.value.hint  # says where to look
    assert {"op": "shutdown"} in guest.asked and vmm.returncode == 0  # the VM was stopped
    assert sandbox.torn_down
    assert [e["event"] for e in machine.events()] == ["booted", "started", "exited"]


def test_the_first_exited_event_decides_even_when_a_good_one_follows(tmp_path: Path) -> None:
    bad = {"event": "exited", "exit_code": "x"}
    good = {"event": "exited", "exit_code": 0}
    machine, guest, _, _ = boot(tmp_path, BOOTED, bad, good)
    with pytest.raises(VMError, match="exited event is malformed: exit_code"):
        machine.wait(timeout=20)
    guest.join(5)


def test_a_well_formed_exited_event_is_the_result(tmp_path: Path) -> None:
    """The other side: the same path with good fields gives the guest's result."""
    exited = {
        "event": "exited",
        "exit_code": 3,
        "stdout": "out\n",
        "stdout_truncated": True,
        "outputs": {"result": {"path": "/r.json", "content": "{}", "truncated": False}},
        "marks": {"init": 0.25},
    }
    machine, guest, _, _ = boot(tmp_path, BOOTED, exited, power_off=True)
    result = machine.wait(timeout=20)
    guest.join(5)
    assert (result.exit_code, result.stdout, result.stdout_truncated) == (3, "out\n", True)
    assert result.outputs == {"result": {"path": "/r.json", "content": "{}", "truncated": False}}
    assert result.timings["guest.init"] == 0.25
