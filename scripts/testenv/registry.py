"""Start and stop a real local OCI registry (Debian's ``docker-registry``) on loopback.

Library::

    handle = start_registry(Path("/tmp/reg"))          # free port, waits for GET /v2/ == 200
    print(handle.host)                                 # "127.0.0.1:41234"
    handle.stop()

CLI (detached, for CI and the demo)::

    python scripts/testenv/registry.py start --data DIR [--port 5000] [--pidfile F]
    python scripts/testenv/registry.py stop --pidfile F

``start`` is idempotent: if a registry already answers on the port it says so and exits 0.
The data dir holds ``registry.yml`` (written here), ``storage/`` and ``registry.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

if __name__ == "__main__" and not __package__:  # run as a script: make src/ importable
    sys.path.insert(1, str(Path(__file__).resolve().parents[2] / "src"))

from microagent.errors import MicroagentError, ToolError
from microagent.runner import find_tool, spawn

LOOPBACK = "127.0.0.1"
HTTP_SECRET = "microagent-testenv-not-a-secret"
API_HEADER = "Docker-Distribution-Api-Version"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 15
PORT_ATTEMPTS = 3

CONFIG_TEMPLATE = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {addr}
  secret: {secret}
"""


@dataclass
class RegistryHandle:
    """A running registry: ``host`` is ``127.0.0.1:PORT``, ``url`` is ``http://`` + host."""

    host: str
    pid: int
    data_dir: Path
    log_path: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; safe to call twice."""
        if self._proc is not None:
            _stop_child(self._proc, timeout)
        else:
            stop_pid(self.pid, timeout)

    def __enter__(self) -> RegistryHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def write_config(data_dir: Path, port: int) -> Path:
    """Write ``data_dir/registry.yml`` for a registry on 127.0.0.1:``port``; return its path."""
    storage = data_dir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = data_dir / "registry.yml"
    config.write_text(
        CONFIG_TEMPLATE.format(
            storage=storage.resolve(), addr=f"{LOOPBACK}:{port}", secret=HTTP_SECRET
        )
    )
    return config


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def probe(host: str, timeout: float = 1.0) -> bool:
    """True when ``GET http://HOST/v2/`` answers 200 like a registry (API version header)."""
    try:
        with urllib.request.urlopen(f"http://{host}/v2/", timeout=timeout) as resp:
            return resp.status == 200 and resp.headers.get(API_HEADER) is not None
    except (OSError, urllib.error.URLError):
        return False


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, or a note that it is empty/missing."""
    try:
        text = log_path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def start_registry(
    data_dir: Path, port: int = 0, *, timeout: float = START_TIMEOUT, detach: bool = False
) -> RegistryHandle:
    """Start ``docker-registry serve`` on 127.0.0.1:``port`` (0: a free one) and wait for it.

    ``detach`` puts it in its own session so it outlives this process (the CLI's ``start``).
    Raises :class:`ToolError` with the log tail if it exits or does not answer in time.
    """
    find_tool("docker-registry")
    data_dir.mkdir(parents=True, exist_ok=True)
    attempts = PORT_ATTEMPTS if port == 0 else 1
    for attempt in range(1, attempts + 1):
        try:
            return _start_once(data_dir, port or free_port(), timeout, detach)
        except _PortTaken:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


class _PortTaken(ToolError):
    """The registry could not bind its port."""


def _start_once(data_dir: Path, port: int, timeout: float, detach: bool) -> RegistryHandle:
    config = write_config(data_dir, port)
    log_path = data_dir / "registry.log"
    log_path.write_bytes(b"")
    proc = spawn(["docker-registry", "serve", config], stdout=log_path, new_session=detach)
    host = f"{LOOPBACK}:{port}"
    handle = RegistryHandle(host, proc.pid, data_dir, log_path, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_tail(log_path)
            error = _PortTaken if "address already in use" in tail else ToolError
            raise error(f"docker-registry exited with code {proc.returncode} on {host}:\n{tail}")
        if probe(host, timeout=0.5):
            return handle
        time.sleep(0.02)
    _stop_child(proc, STOP_TIMEOUT)
    raise ToolError(
        f"docker-registry did not answer GET http://{host}/v2/ within {timeout:g}s:\n"
        f"{log_tail(log_path)}",
        hint=f"config: {config}",
    )


def _stop_child(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _is_registry_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"docker-registry" in cmdline


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return status.read_text().split(") ", 1)[1][:1] != "Z"
    return True


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop a (not necessarily child) registry process; False if it was not running.

    Refuses to signal a pid that is not a ``docker-registry`` (a stale pidfile after reuse).
    """
    if not _alive(pid):
        return False
    if not _is_registry_process(pid):
        raise ToolError(f"pid {pid} is not a docker-registry process; not stopping it")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True


# --- CLI --------------------------------------------------------------------------------------


def _cmd_start(args: argparse.Namespace) -> int:
    data_dir = Path(args.data).resolve()
    pidfile = Path(args.pidfile) if args.pidfile else data_dir / "registry.pid"
    host = f"{LOOPBACK}:{args.port}"
    if args.port and probe(host):
        print(f"a registry already answers on http://{host}/v2/; leaving it running")
        return 0
    began = time.monotonic()
    handle = start_registry(data_dir, args.port, detach=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{handle.pid}\n")
    print(
        f"registry listening on {handle.url} (pid {handle.pid}, ready in "
        f"{time.monotonic() - began:.2f}s)\n  data: {data_dir}\n  log: {handle.log_path}\n"
        f"  pidfile: {pidfile}"
    )
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    pidfile = Path(args.pidfile)
    try:
        pid = int(pidfile.read_text().strip())
    except FileNotFoundError:
        print(f"no pidfile at {pidfile}; nothing to stop")
        return 0
    except ValueError as exc:
        raise ToolError(f"pidfile {pidfile} does not hold a pid") from exc
    stopped = stop_pid(pid)
    pidfile.unlink()
    print(f"registry pid {pid} {'stopped' if stopped else 'was not running'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Local OCI registry for microagent tests.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a detached registry on 127.0.0.1")
    start.add_argument("--data", required=True, help="data dir (config, storage, log)")
    start.add_argument("--port", type=int, default=5000, help="port (0: pick a free one)")
    start.add_argument("--pidfile", help="where to write the pid (default DATA/registry.pid)")
    start.set_defaults(func=_cmd_start)
    stop = sub.add_parser("stop", help="stop the registry named by a pidfile")
    stop.add_argument("--pidfile", required=True)
    stop.set_defaults(func=_cmd_stop)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except MicroagentError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    return code


if __name__ == "__main__":
    raise SystemExit(main())
