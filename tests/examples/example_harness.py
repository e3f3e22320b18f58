"""Helpers for the example-agent tests (fixtures are in conftest.py).

The agents are run the way the VM runs them (`python agent.py` as a separate process), with
temporary directories standing in for /workspace and /agent and a scripted fake of the
provider's HTTP API on 127.0.0.1 standing in for the model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
MEDIATION_ENV = "MICROAGENT_MEDIATION_ADDR"
EXAMPLE_NAMES = ("minimal-agent", "minimal-agent-openai", "minimal-agent-gemini")
FAKE_KEY = "fake-key-9f8e7d6c5b4a-never-show-me"
FAKE_TOKEN = "fake-token-1234-also-secret"


# --- fake provider API ---------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One request the fake API received."""

    path: str
    headers: dict[str, str]
    body: Any
    client: tuple[str, int] = ("", 0)  # the agent's end of the HTTP connection


class FakeModelAPI:
    """An HTTP server that answers each POST with the next scripted reply and records it.

    When the script runs out it answers 500, so an agent that calls the model more often than
    a test expects fails loudly instead of hanging.
    """

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._script: deque[tuple[int, Any]] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def reply(self, body: Any, status: int = 200) -> None:
        self._script.append((status, body))

    def take(self, recorded: Recorded) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(recorded)
            if self._script:
                return self._script.popleft()
        return 500, {"error": {"message": "fake API: no scripted reply left"}}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeModelAPI:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _handler_for(api: FakeModelAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes; no 40 ms stall

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            body = json.loads(raw) if raw else None
            headers = {key.lower(): value for key, value in self.headers.items()}
            client = (str(self.client_address[0]), int(self.client_address[1]))
            status, reply = api.take(Recorded(self.path, headers, body, client))
            payload = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


# --- running an agent ----------------------------------------------------------------------


@dataclass(frozen=True)
class AgentRun:
    """What one agent process did: exit status, output, and the workspace it left behind."""

    returncode: int
    stdout: str
    stderr: str
    workspace: Path

    @property
    def signals(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]

    @property
    def signal_kinds(self) -> list[str]:
        return [sig["signal"] for sig in self.signals]

    @property
    def result(self) -> dict[str, Any]:
        return json.loads((self.workspace / "result.json").read_text())


class AgentHarness:
    """A workspace dir, an agent dir with the example's operator files, and a clean env."""

    def __init__(self, example: str, root: Path) -> None:
        self.example_dir = EXAMPLES / example
        self.root = root
        self.workspace = root / "workspace"
        self.agent_dir = root / "agent"
        self.workspace.mkdir()
        self.agent_dir.mkdir()
        for name in ("constraints.json", "system_prompt.md"):
            shutil.copy(self.example_dir / "demo" / name, self.agent_dir / name)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(root),
            "PYTHONDONTWRITEBYTECODE": "1",
            "MICROAGENT_WORKSPACE": str(self.workspace),
            "MICROAGENT_AGENT_DIR": str(self.agent_dir),
            "MICROAGENT_AGENT_ID": "test-agent",
            "MICROAGENT_MAX_RETRIES": "0",
            # Credentials under other names too: none of them may reach the bash tool.
            "DEPLOY_TOKEN": FAKE_TOKEN,
        }
        self.request: dict[str, Any] = {}

    @property
    def system_prompt(self) -> str:
        return (self.agent_dir / "system_prompt.md").read_text().strip()

    def write_request(self, **overrides: Any) -> dict[str, Any]:
        request = json.loads((self.example_dir / "demo" / "input-001.json").read_text())
        request.update(overrides)
        (self.workspace / "input.json").write_text(json.dumps(request))
        self.request = request
        return request

    def run(self, timeout: float = 60) -> AgentRun:
        proc = subprocess.run(
            [sys.executable, str(self.example_dir / "agent.py")],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return AgentRun(proc.returncode, proc.stdout, proc.stderr, self.workspace)

    @property
    def log_path(self) -> Path:
        return self.root / "agent-output.txt"

    def start_serving(self, address: str, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start the agent in serve mode; its stdout and stderr go to `log_path`.

        A file rather than a pipe: nothing has to drain it while the test talks to the agent.
        """
        with self.log_path.open("wb") as log:
            return subprocess.Popen(
                [sys.executable, str(self.example_dir / "agent.py")],
                env=self.env | {MEDIATION_ENV: address} | extra_env,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        """Poll the agent's output until `text` shows up (a condition, not a fixed sleep)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert time.monotonic() < deadline, f"{text!r} not in agent output:\n{self.output()}"
            time.sleep(0.02)


# --- loading example modules in-process ----------------------------------------------------


def load_module(path: Path, name: str) -> ModuleType:
    """Import a file under a unique module name (the examples all call theirs `protocol`)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def load_protocol(example: str) -> ModuleType:
    return load_module(EXAMPLES / example / "protocol.py", f"protocol_{example.replace('-', '_')}")


def load_dispatch() -> ModuleType:
    """scripts/dispatch.py, the host end of serve mode."""
    return load_module(SCRIPTS / "dispatch.py", "dispatch")


def load_agent(example: str) -> ModuleType:
    """Import an example's agent.py in-process; its `from protocol import ...` needs the dir."""
    example_dir = EXAMPLES / example
    saved_protocol = sys.modules.pop("protocol", None)
    sys.path.insert(0, str(example_dir))
    try:
        return load_module(example_dir / "agent.py", f"agent_{example.replace('-', '_')}")
    finally:
        sys.path.remove(str(example_dir))
        sys.modules.pop("protocol", None)
        if saved_protocol is not None:
            sys.modules["protocol"] = saved_protocol
