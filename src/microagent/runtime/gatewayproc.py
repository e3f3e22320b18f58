"""The workspace's gateway process (credential brokers, egress proxy), as its supervisor runs it.

The supervisor starts it before the first boot and stops it when it ends; it outlives restarts
of the VM. Its configuration (no secret in it) is written beside the run's other files; the
secret values reach it on its stdin, which is the supervisor's own stdin: a pipe the CLI filled
and closed. The supervisor never reads that pipe, so the values are never in its memory.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

from microagent import runner
from microagent.broker.gateway import GatewayConfig
from microagent.errors import VMError
from microagent.fsutil import write_json_atomic
from microagent.runtime.control import tail_text

READY_TIMEOUT = 15.0
STOP_GRACE = 3.0
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

    def stop(self) -> None:
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
