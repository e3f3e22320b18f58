"""The workspace's gateway process (credential brokers, egress proxy), as its supervisor runs it.

The supervisor starts it before the first boot and stops it when it ends; it outlives restarts
of the VM. Its configuration (no secret in it) is written beside the run's other files; the
secret values reach it on its stdin, which is the supervisor's own stdin: a pipe the CLI filled
and closed. The supervisor never reads that pipe, so the values are never in its memory, and
it could not start the gateway again: the gateway restarts its own worker when that dies (see
:class:`~microagent.broker.gateway.Keeper`). :meth:`GatewayProcess.watch` follows its log for
those restarts and reports the gateway's own end (the restart limit hit) to the supervisor.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from microagent import runner
from microagent.broker.gateway import STOP_WAIT, GatewayConfig
from microagent.errors import VMError
from microagent.fsutil import write_json_atomic
from microagent.runtime.control import tail_text

READY_TIMEOUT = 15.0
# Longer than the keeper gives its worker (broker.gateway.STOP_WAIT), so a slow worker is
# ended by its keeper, which then removes the sockets, rather than orphaned by a SIGKILL.
STOP_GRACE = float(STOP_WAIT + 2)
WATCH_POLL = 0.5  # seconds between looks at the gateway's log and process
WATCH_READ = 64 << 10  # bytes of new log read at a time
RESTART_PREFIX = "gateway: worker restart "
# Runs the gateway of the microagent this process runs (see lifecycle's supervisor bootstrap).
GATEWAY_BOOTSTRAP = (
    "import sys; root = sys.argv[1]; root in sys.path or sys.path.insert(0, root); "
    "from microagent.broker.gateway import main; sys.exit(main(sys.argv[2:]))"
)


def gateway_argv(config_path: Path) -> list[str]:
    package_root = Path(__file__).resolve().parents[2]
    return [sys.executable, "-I", "-c", GATEWAY_BOOTSTRAP, str(package_root), str(config_path)]


class GatewayProcess:
    """One gateway: ``start`` returns once every socket listens (VMError otherwise)."""

    def __init__(self, config: GatewayConfig, run_dir: Path) -> None:
        self.config = config
        self.config_path = run_dir / "gateway.json"
        self.log = run_dir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()

    def start(self, stdin: int = 0, timeout: float = READY_TIMEOUT) -> None:
        for folder in {path.parent for path in self.config.sockets}:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # the VM dir, before its boot
        write_json_atomic(self.config_path, self.config.to_json(), mode=0o600)
        self.log.unlink(missing_ok=True)
        self.proc = runner.spawn(gateway_argv(self.config_path), stdout=self.log, stdin=stdin)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready():
                return
            if self.proc.poll() is not None:
                raise VMError(
                    f"the credential gateway exited ({self.proc.returncode}): "
                    f"{tail_text(self.log, 5).strip()[-400:]}",
                    hint=f"see {self.log}",
                )
            time.sleep(0.02)
        self.stop()
        raise VMError("the credential gateway did not start in time", hint=f"see {self.log}")

    def _ready(self) -> bool:
        try:
            head = self.log.read_bytes()[:4096]
        except OSError:
            return False
        return b"ready\n" in head

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def watch(
        self, on_restart: Callable[[str], None], on_exit: Callable[[int, str], None]
    ) -> threading.Thread:
        """A thread that calls ``on_restart(line)`` for each worker restart the gateway logs
        and, if the gateway ends before :meth:`stop` (it gave up), ``on_exit(code, line)``
        with its last log line."""
        proc = self.proc
        if proc is None:
            raise VMError("the credential gateway is not running")
        thread = threading.Thread(
            target=self._watch, args=(proc, on_restart, on_exit), name="gateway-watch", daemon=True
        )
        thread.start()
        return thread

    def _watch(
        self,
        proc: subprocess.Popen[bytes],
        on_restart: Callable[[str], None],
        on_exit: Callable[[int, str], None],
    ) -> None:
        offset, last = 0, ""
        while True:
            stopping = self._stopping.wait(WATCH_POLL)
            code = proc.poll()
            offset, lines = self._new_lines(offset)
            for line in lines:
                last = line or last
                if line.startswith(RESTART_PREFIX):
                    on_restart(line.removeprefix("gateway: "))
            if stopping or self._stopping.is_set():
                return
            if code is not None:
                on_exit(code, last.removeprefix("gateway: ")[:400])
                return

    def _new_lines(self, offset: int) -> tuple[int, list[str]]:
        """Whole lines the log has gained since ``offset``, and the offset after them."""
        try:
            with self.log.open("rb") as fh:
                fh.seek(offset)
                data = fh.read(WATCH_READ)
        except OSError:
            return offset, []
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) == WATCH_READ:  # one line longer than a read: skipped
            return offset + len(data), []
        text = data[:end].decode("utf-8", "replace")
        return offset + end, text.splitlines()

    def stop(self) -> None:
        self._stopping.set()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_GRACE)
