"""A restore connects the host's agent link before the restored guest runs.

QEMU compares a virtio port's saved "host connected" with the port's host once the guest runs;
a host that connects later shows the guest its host leaving and coming back, and the guest
agent ends the channels opened meanwhile (a restored VM's first exec was lost that way). The
supervisor therefore starts the link first and gives the machine's restore a ``before_run``
that waits for the link's connection (HELLO, after the resync preamble, queued).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from microagent.runtime.agentlink import RESYNC_PREAMBLE
from microagent.runtime.agentproto import FrameReader, FrameType
from microagent.runtime.backend import BeforeRun, BootConfig, Disk
from microagent.runtime.rundir import RunDir
from microagent.runtime.supervisor import Supervisor


class _Restoring:
    """A machine whose restore runs the guest only after ``before_run``: it records what the
    VMM's agent socket had received by then (an accepted connection, and its bytes)."""

    def __init__(self, config: BootConfig, listener: socket.socket) -> None:
        self.config = config
        self.listener = listener  # bound when the "VMM" loads the state: the link, started
        self.received: bytes | None = None  # None: no host had connected when the guest ran
        self.conn: socket.socket | None = None

    def argv(self) -> Sequence[str]:
        return ["stand-in"]

    def restore(
        self, state: Path, timeout: float = 600.0, *, before_run: BeforeRun | None = None
    ) -> None:
        del state, timeout
        assert before_run is not None, "a restore must be told what to do before the guest runs"
        self.listener.bind(str(self.config.agent_socket))  # earlier, retries (every 0.1 s)
        self.listener.listen(1)
        before_run()
        self.listener.settimeout(0)
        try:
            self.conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        self.conn.settimeout(0.5)  # the link sends nothing after its HELLO
        data = b""
        while True:
            try:
                chunk = self.conn.recv(1 << 16)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
        self.received = data


def test_the_agent_link_is_connected_with_its_hello_before_the_restored_guest_runs(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "vm"
    state_dir.mkdir()
    config = BootConfig(
        kernel=Path("/k"),
        initrd=Path("/i"),
        disks=(Disk(Path("/root.ext4"), readonly=True),),
        state_dir=state_dir,
    )
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    machine = _Restoring(config, listener)
    supervisor = Supervisor(run)
    try:
        supervisor._restore(machine, tmp_path / "vmstate")  # type: ignore[arg-type]
        assert machine.received is not None, "the guest ran before the agent link connected"
        assert machine.received.startswith(RESYNC_PREAMBLE)
        reader = FrameReader()
        frames = reader.feed(machine.received[len(RESYNC_PREAMBLE) :])
        assert [frame.type for frame in frames][:1] == [FrameType.HELLO]
        assert supervisor.restored
    finally:
        supervisor._end_link()
        listener.close()
        if machine.conn is not None:
            machine.conn.close()
    assert supervisor.link is None
