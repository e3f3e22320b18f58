"""minimal-agent-openai: a small tool-using agent backed by OpenAI Chat Completions.

Two ways to drive it, chosen by the environment; the work on one request is the same in both:
  1. load the operator's constraints and system prompt from the agent dir; signal `ready`;
  2. take a WorkRequest and refuse it unless the principal is verified; signal `accepting`,
     then `working`;
  3. let the model drive the bash / read_file / write_file function tools until it gives a
     final answer or a limit is hit;
  4. hand back the WorkResult; signal `completed` or `failed`.

File mode (the default) handles one request per boot: it reads <workspace>/input.json, writes
the WorkResult to <workspace>/result.json (atomically, on failure too) and prints the signals
as JSON lines on stderr. Exit status 0 when the work completed, 1 otherwise.

Serve mode (MICROAGENT_MEDIATION_ADDR=HOST:PORT is set, as it is when the workspace declares a
mediation channel) connects to that address, signals `ready` and then answers WorkRequests,
one JSON line each, one after another: each gets its signals, then its WorkResult, as JSON
lines on the same connection (a signal has a `signal` key, a result does not). The SDK is
imported once, at start; stderr says how long that took and how long each request took. A
line that is not a valid request, or is longer than 1 MiB, gets a `failed` result and the agent
carries on. When the host closes the connection (end of stream) the agent exits 0. When the
connection cannot be made or is cut off (reset: the target is not there yet, or the VM was
restored from a snapshot or forked), it connects again, with backoff, up to
MAX_CONNECT_ATTEMPTS times in a row, and says `ready` on the new connection.

Ready file: once the imports are done and the operator's files are loaded, the agent writes
MICROAGENT_READY_FILE (default /run/agent.ready inside a microagent guest), so a health probe
(`test -f /run/agent.ready`) passes only then: a warm template is taken after the imports.

Only this file and protocol.py are copied into the VM.

Environment:
  OPENAI_API_KEY          the key (or a placeholder when a proxy at OPENAI_BASE_URL adds it)
  OPENAI_BASE_URL         optional: a proxy, a local OpenAI-compatible server or a test server
  OPENAI_MODEL            optional: model id (default below)
  MICROAGENT_WORKSPACE    workspace root (default /workspace)
  MICROAGENT_AGENT_DIR    operator files: constraints.json, system_prompt.md (default /agent)
  MICROAGENT_MAX_TURNS    model calls allowed per request (default 30)
  MICROAGENT_MAX_RETRIES  SDK retries per model call (default 2)
  MICROAGENT_AGENT_ID     agent id used in signals (default: the hostname)
  MICROAGENT_MEDIATION_ADDR  HOST:PORT to serve requests from (serve mode); unset: file mode
  MICROAGENT_READY_FILE   written once the agent is ready (default: /run/agent.ready in a
                          microagent guest, none elsewhere); empty: none
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

# pydantic, the protocol models and the SDK are most of the agent's start-up time (seconds
# under emulation). Serve mode pays it once and reports it; timing it needs a statement
# before the imports:
# ruff: noqa: E402
IMPORTS_STARTED = time.perf_counter()

import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessage
from protocol import (
    Constraints,
    LifecycleSignal,
    SignalKind,
    Usage,
    WorkRequest,
    WorkResult,
    WorkStatus,
)
from pydantic import BaseModel, ValidationError

IMPORT_SECONDS = time.perf_counter() - IMPORTS_STARTED

# >>> shared agent core >>>
# Everything between these markers is identical in the three example agents
# (tests/examples checks it). Edit one copy, then paste it into the other two.

IMPORTS_DONE_AT = datetime.now(UTC)  # with the pid, names this process's one import

INPUT_NAME = "input.json"
RESULT_NAME = "result.json"
SECRET_NAME_MARKERS = ("API_KEY", "TOKEN", "SECRET", "CREDENTIAL", "PASSWORD")
DEFAULT_BASH_TIMEOUT = 120
MAX_BASH_TIMEOUT = 600
MAX_OUTPUT_CHARS = 20_000
MAX_READ_BYTES = 10_000_000
DEFAULT_MAX_TURNS = 30
DEFAULT_MAX_RETRIES = 2
MEDIATION_ENV = "MICROAGENT_MEDIATION_ADDR"
MAX_LINE_BYTES = 1 << 20  # one request line in serve mode; a longer one is refused
READ_CHUNK = 1 << 16
MAX_CONNECT_ATTEMPTS = 40  # failed connections in a row before serve mode gives up (~36 s)
FIRST_RETRY_SECONDS = 0.05  # then doubling, up to MAX_RETRY_SECONDS
MAX_RETRY_SECONDS = 1.0
CONNECT_TIMEOUT_SECONDS = 5.0
READY_FILE_ENV = "MICROAGENT_READY_FILE"
GUEST_HELPERS = Path("/run/microagent")  # the microagent init makes it in every guest root
DEFAULT_READY_FILE = "/run/agent.ready"

ModelT = TypeVar("ModelT", bound=BaseModel)


class AgentFailure(Exception):
    """The request cannot be completed; the message becomes WorkResult.error."""


class RequestDenied(AgentFailure):
    """The request is refused on policy grounds (e.g. an unverified principal)."""


class ToolError(Exception):
    """A tool call was refused or failed; the message goes back to the model."""


@dataclass(frozen=True)
class Settings:
    """Where things live; read once from the environment, never fails."""

    workspace: Path
    agent_dir: Path
    agent_id: str
    mediation_addr: str  # HOST:PORT of the mediation channel; empty means file mode
    ready_file: Path | None = None  # written once the agent is ready (for a health probe)

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            workspace=Path(os.environ.get("MICROAGENT_WORKSPACE") or "/workspace").resolve(),
            agent_dir=Path(os.environ.get("MICROAGENT_AGENT_DIR") or "/agent"),
            agent_id=os.environ.get("MICROAGENT_AGENT_ID") or socket.gethostname() or "agent",
            mediation_addr=os.environ.get(MEDIATION_ENV, "").strip(),
            ready_file=ready_file_from_env(),
        )


def ready_file_from_env() -> Path | None:
    raw = os.environ.get(READY_FILE_ENV)
    if raw is None:  # unset: the default inside a microagent guest, none on other machines
        return Path(DEFAULT_READY_FILE) if GUEST_HELPERS.is_dir() else None
    return Path(raw.strip()) if raw.strip() else None


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise AgentFailure(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise AgentFailure(f"{name} must be at least {minimum}, got {value}")
    return value


def now() -> datetime:
    return datetime.now(UTC)


def stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def log(message: str) -> None:
    """A line for whoever reads the agent's stderr (serve mode sends its signals elsewhere)."""
    stderr_line(f"agent: {message}")


@dataclass(frozen=True)
class Signals:
    """Lifecycle signals as JSON lines: on stderr in file mode, on the channel in serve mode."""

    agent_id: str
    write_line: Callable[[str], None] = stderr_line

    def emit(self, kind: SignalKind, **fields: str | None) -> None:
        sig = LifecycleSignal(signal=kind, agent_id=self.agent_id, observed_at=now(), **fields)
        self.write_line(sig.model_dump_json(exclude_none=True))


# --- tools -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSpec:
    """A provider-neutral tool declaration; each provider section translates it."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolOutcome:
    text: str
    is_error: bool = False


def _object_schema(required: list[str], **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


TOOLS = (
    ToolSpec(
        name="bash",
        description=(
            "Run a shell command with `bash -c` in the workspace directory. Returns the exit "
            "code, stdout and stderr; very long output is shortened in the middle. The command "
            f"is killed after timeout_seconds (default {DEFAULT_BASH_TIMEOUT})."
        ),
        parameters=_object_schema(
            ["command"],
            command={"type": "string", "description": "The command line to run."},
            timeout_seconds={
                "type": "integer",
                "description": f"Time limit in seconds, 1 to {MAX_BASH_TIMEOUT}.",
            },
        ),
    ),
    ToolSpec(
        name="read_file",
        description=(
            "Read a text file inside the workspace. Relative paths start at the workspace root."
        ),
        parameters=_object_schema(
            ["path"], path={"type": "string", "description": "File to read."}
        ),
    ),
    ToolSpec(
        name="write_file",
        description=(
            "Create or overwrite a text file inside the workspace, creating missing parent "
            "directories. Relative paths start at the workspace root."
        ),
        parameters=_object_schema(
            ["path", "content"],
            path={"type": "string", "description": "File to write."},
            content={"type": "string", "description": "The complete new file content."},
        ),
    ),
)


def truncate(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    """Keep the head and the tail of long text and say how much of the middle was cut."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    omitted = len(text) - limit
    return f"{text[:head]}\n[... {omitted} characters omitted ...]\n{text[-tail:]}"


def scrubbed_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment minus anything whose name suggests a credential."""
    return {
        name: value
        for name, value in env.items()
        if not any(marker in name.upper() for marker in SECRET_NAME_MARKERS)
    }


def resolve_in_workspace(root: Path, raw: str) -> Path:
    """Resolve a tool path (following symlinks) and refuse anything outside the workspace.

    This keeps the file tools honest; the VM boundary is what actually contains the agent.
    """
    if not raw.strip() or "\x00" in raw:
        raise ToolError(f"invalid path {raw!r}")
    candidate = Path(raw) if Path(raw).is_absolute() else root / raw
    resolved = Path(os.path.realpath(candidate))
    if not resolved.is_relative_to(root):
        raise ToolError(
            f"refused: {raw!r} resolves to {resolved}, which is outside the workspace {root}"
        )
    return resolved


def _str_arg(args: Mapping[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise ToolError(f"argument {name!r} is required and must be a string")
    return value


def _format_run(exit_code: int | str, stdout: bytes, stderr: bytes) -> str:
    out = truncate(stdout.decode("utf-8", errors="replace"))
    err = truncate(stderr.decode("utf-8", errors="replace"))
    return f"exit_code={exit_code}\nstdout:\n{out}\nstderr:\n{err}"


def _bash_timeout(args: Mapping[str, Any]) -> int:
    value = args.get("timeout_seconds", DEFAULT_BASH_TIMEOUT)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ToolError("timeout_seconds must be an integer")
    return max(1, min(value, MAX_BASH_TIMEOUT))


def run_bash(root: Path, args: Mapping[str, Any]) -> str:
    command = _str_arg(args, "command")
    timeout = _bash_timeout(args)
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=root,
        env=scrubbed_env(os.environ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so a timeout kills the whole tree
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            stdout, stderr = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            stdout, stderr = b"", b""
        output = _format_run("killed", stdout, stderr)
        raise ToolError(f"command timed out after {timeout} s and was killed\n{output}") from None
    return _format_run(proc.returncode, stdout, stderr)


def read_file(root: Path, args: Mapping[str, Any]) -> str:
    raw = _str_arg(args, "path")
    path = resolve_in_workspace(root, raw)
    if not path.is_file():
        raise ToolError(f"{raw!r} does not exist or is not a regular file")
    try:
        if path.stat().st_size > MAX_READ_BYTES:
            raise ToolError(f"{raw!r} is larger than {MAX_READ_BYTES} bytes; use bash to page it")
        data = path.read_bytes()
    except OSError as exc:
        raise ToolError(f"cannot read {raw!r}: {exc.strerror}") from None
    return truncate(data.decode("utf-8", errors="replace"))


def write_file(root: Path, args: Mapping[str, Any]) -> str:
    raw = _str_arg(args, "path")
    content = _str_arg(args, "content")
    path = resolve_in_workspace(root, raw)
    if path == root or path.is_dir():
        raise ToolError(f"{raw!r} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    except OSError as exc:
        raise ToolError(f"cannot write {raw!r}: {exc.strerror}") from None
    return f"wrote {len(content.encode('utf-8'))} bytes to {path}"


TOOL_HANDLERS: dict[str, Callable[[Path, Mapping[str, Any]], str]] = {
    "bash": run_bash,
    "read_file": read_file,
    "write_file": write_file,
}


def execute_tool(root: Path, name: str, args: object) -> ToolOutcome:
    """Run one tool call; every refusal or failure comes back as an error outcome."""
    handler = TOOL_HANDLERS.get(name)
    try:
        if handler is None:
            raise ToolError(f"unknown tool {name!r}; available: {', '.join(TOOL_HANDLERS)}")
        if not isinstance(args, Mapping):
            raise ToolError("tool arguments must be a JSON object")
        return ToolOutcome(handler(root, args))
    except ToolError as exc:
        return ToolOutcome(f"error: {exc}", is_error=True)


# --- one request -------------------------------------------------------------------------


@dataclass
class Session:
    """Limits and counters for one request. The provider loop reports into it."""

    workspace: Path
    request_id: str = "unknown"
    audit_ref: str | None = None
    max_turns: int = DEFAULT_MAX_TURNS
    max_tool_calls: int | None = None
    max_tokens: int | None = None
    deadline: float | None = None
    turns: int = 0
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read: int = 0
    cache_creation: int = 0

    def adopt(self, request: WorkRequest, max_turns: int) -> None:
        self.request_id = request.request_id
        self.audit_ref = request.audit_ref
        self.max_turns = max_turns
        bounds = request.bounds
        if bounds is not None:
            self.max_tool_calls = bounds.max_tool_calls
            self.max_tokens = bounds.max_tokens
            if bounds.max_duration_seconds is not None:
                self.deadline = time.monotonic() + bounds.max_duration_seconds

    def begin_turn(self) -> None:
        """Call before each model request; raises once a limit is reached."""
        if self.turns >= self.max_turns:
            raise AgentFailure(f"turn limit ({self.max_turns}) reached without a final answer")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise AgentFailure("the request's max_duration_seconds ran out")
        self.turns += 1

    def add_usage(
        self, input_tokens: int, output_tokens: int, cache_read: int = 0, cache_creation: int = 0
    ) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cache_read += cache_read
        self.cache_creation += cache_creation

    def call_tool(self, name: str, args: object) -> ToolOutcome:
        if self.max_tool_calls is not None and self.tool_calls >= self.max_tool_calls:
            limit = self.max_tool_calls
            text = f"error: this request allows {limit} tool calls and all are used; answer now"
            return ToolOutcome(text, is_error=True)
        self.tool_calls += 1
        return execute_tool(self.workspace, name, args)

    def result(self, status: WorkStatus, content: str = "", error: str | None = None) -> WorkResult:
        usage = Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_input_tokens=self.cache_read,
            cache_creation_input_tokens=self.cache_creation,
            tool_calls=self.tool_calls,
            turns=self.turns,
        )
        return WorkResult(
            request_id=self.request_id,
            status=status,
            content=content,
            error=error,
            usage=usage,
            completed_at=now(),
            audit_ref=self.audit_ref,
        )


Converse = Callable[[Session, WorkRequest, str], str]


def parse_model(raw: bytes, model: type[ModelT], source: str) -> ModelT:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise AgentFailure(f"{source} is not a valid {model.__name__}: {problems}") from None


def load_model(path: Path, model: type[ModelT]) -> ModelT:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AgentFailure(f"cannot read {path}: {exc.strerror}") from None
    return parse_model(raw, model, str(path))


def read_system_prompt(agent_dir: Path) -> str:
    path = agent_dir / "system_prompt.md"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AgentFailure(f"cannot read {path}: {exc.strerror}") from None
    if not text:
        raise AgentFailure(f"{path} is empty")
    return text


@dataclass(frozen=True)
class Operator:
    """What the operator baked in at the agent dir: the constraints and the system prompt."""

    constraints: Constraints
    system_prompt: str

    @classmethod
    def load(cls, agent_dir: Path) -> Operator:
        constraints = load_model(agent_dir / "constraints.json", Constraints)
        return cls(constraints, read_system_prompt(agent_dir))

    def describe(self) -> str:
        return f"constraints v{self.constraints.version} ({self.constraints.hash})"


def peek_request_ids(raw: bytes) -> tuple[str, str | None]:
    """Best-effort request_id/audit_ref from a request that may not validate."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return "unknown", None
    if not isinstance(parsed, dict):
        return "unknown", None
    request_id = parsed.get("request_id")
    audit_ref = parsed.get("audit_ref")
    return (
        request_id if isinstance(request_id, str) and request_id else "unknown",
        audit_ref if isinstance(audit_ref, str) else None,
    )


def admit(request: WorkRequest, constraints: Constraints) -> None:
    """Structural checks before any work starts."""
    principal = request.principal
    if not principal.verified:
        raise RequestDenied(f"principal {principal.name!r} is not verified; request refused")
    wanted = request.constraints_version
    if wanted and wanted != constraints.version:
        raise AgentFailure(
            f"request expects constraints v{wanted}, this agent holds v{constraints.version}"
        )


def describe(exc: BaseException) -> str:
    if isinstance(exc, AgentFailure):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Worker:
    """The provider's tool loop and where the signals about its work go."""

    provider: str
    converse: Converse
    signals: Signals

    def work(self, operator: Operator, session: Session, request: WorkRequest) -> str:
        """Admit one request and run the tool loop on it; returns the final answer."""
        session.adopt(request, env_int("MICROAGENT_MAX_TURNS", DEFAULT_MAX_TURNS, minimum=1))
        admit(request, operator.constraints)
        self.signals.emit("accepting", request_id=request.request_id)
        self.signals.emit("working", request_id=request.request_id, detail=self.provider)
        return self.converse(session, request, operator.system_prompt)

    def report(self, result: WorkResult, detail: str) -> int:
        """Signal how a request ended; 0 when it completed, else 1."""
        if result.status == "completed":
            self.signals.emit("completed", request_id=result.request_id, detail=detail)
            return 0
        self.signals.emit("failed", request_id=result.request_id, error=result.error)
        return 1


def settle(session: Session, attempt: Callable[[], str]) -> WorkResult:
    """Run the attempt; whatever goes wrong, the caller still gets a WorkResult."""
    try:
        return session.result("completed", content=attempt())
    except RequestDenied as exc:
        return session.result("denied", error=str(exc))
    except Exception as exc:
        return session.result("failed", error=describe(exc))


def mark_ready(settings: Settings, detail: str) -> None:
    """Write the ready file (atomically): a health probe that tests for it passes from now on.
    A file that cannot be written is reported and the agent carries on without it."""
    path = settings.ready_file
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(detail + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log(f"cannot write the ready file {path}: {exc.strerror or exc}")


def serve(provider: str, converse: Converse) -> int:
    """Serve mode when a mediation address is set, else file mode; returns the exit status."""
    settings = Settings.from_env()
    if settings.mediation_addr:
        return serve_channel(settings, provider, converse)
    return serve_file(settings, provider, converse)


# --- file mode: <workspace>/input.json in, <workspace>/result.json out, signals on stderr --


def write_result(path: Path, result: WorkResult) -> None:
    """Write the result next to its final name, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".result-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(result.model_dump_json(indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _handle_file(settings: Settings, worker: Worker, session: Session) -> str:
    operator = Operator.load(settings.agent_dir)
    mark_ready(settings, operator.describe())
    worker.signals.emit("ready", detail=operator.describe())
    request = load_model(settings.workspace / INPUT_NAME, WorkRequest)
    return worker.work(operator, session, request)


def _finish_file(settings: Settings, worker: Worker, result: WorkResult) -> int:
    path = settings.workspace / RESULT_NAME
    try:
        write_result(path, result)
    except OSError as exc:
        error = f"cannot write {path}: {exc}"
        worker.signals.emit("failed", request_id=result.request_id, error=error)
        return 1
    return worker.report(result, detail=str(path))


def serve_file(settings: Settings, provider: str, converse: Converse) -> int:
    """Handle the one request waiting in the workspace; exit status 0 when it completed."""
    worker = Worker(provider, converse, Signals(settings.agent_id))
    with contextlib.suppress(OSError):  # an earlier run's result must not pass for this one's
        (settings.workspace / RESULT_NAME).unlink(missing_ok=True)
    session = Session(settings.workspace)
    raw = read_or_empty(settings.workspace / INPUT_NAME)
    session.request_id, session.audit_ref = peek_request_ids(raw)
    result = settle(session, lambda: _handle_file(settings, worker, session))
    return _finish_file(settings, worker, result)


# --- serve mode: WorkRequests in, signals and WorkResults out, as JSON lines on one TCP -----
# connection over the mediation channel, one request after another until the host closes it.


class Channel:
    """JSON lines both ways over one connection; a read never holds more than one bounded line."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")

    def write_line(self, line: str) -> None:
        self._sock.sendall(line.encode("utf-8") + b"\n")

    def read_line(self) -> bytes | None:
        """The next line without its newline, or None once the host has closed its side.

        A line longer than MAX_LINE_BYTES is read to its end and dropped; what comes back is
        its first MAX_LINE_BYTES + 1 bytes, so the caller can refuse it by its length.
        """
        line = self._reader.readline(MAX_LINE_BYTES + 1)
        if not line:
            return None
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := self._reader.readline(READ_CHUNK)) and not rest.endswith(b"\n"):
                pass
        return line.removesuffix(b"\n")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


def parse_address(raw: str) -> tuple[str, int]:
    host, _, port = raw.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise AgentFailure(f"{MEDIATION_ENV} must be HOST:PORT, got {raw!r}")
    return host.strip("[]"), int(port)


class Backoff:
    """Failed attempts to reach the host in a row, bounded, with a growing pause between."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.failures = 0

    def retry(self, why: str) -> None:
        """Pause before the next attempt; AgentFailure once the attempts are used up."""
        self.failures += 1
        if self.failures >= MAX_CONNECT_ATTEMPTS:
            raise AgentFailure(f"{why}; gave up after {self.failures} attempts")
        delay = min(FIRST_RETRY_SECONDS * 2 ** (self.failures - 1), MAX_RETRY_SECONDS)
        log(f"{why}; retrying in {delay:g} s")
        time.sleep(delay)

    def connect(self) -> Channel:
        """A connection to the mediation address: the channel may come up late."""
        host, port = parse_address(self.address)
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS)
            except OSError as exc:
                self.retry(f"cannot connect to {self.address} yet ({exc})")
            else:
                sock.settimeout(None)  # requests may be a long time apart
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # lines go at once
                return Channel(sock)


def _work_on_line(worker: Worker, operator: Operator, session: Session, line: bytes) -> str:
    if len(line) > MAX_LINE_BYTES:
        raise AgentFailure(
            f"request line longer than {MAX_LINE_BYTES} bytes; refused without parsing it"
        )
    session.request_id, session.audit_ref = peek_request_ids(line)
    request = parse_model(line, WorkRequest, "the request line")
    return worker.work(operator, session, request)


def answer(settings: Settings, worker: Worker, operator: Operator, line: bytes) -> WorkResult:
    """One request line in; its signals go out as it runs, its WorkResult is returned."""
    started = time.perf_counter()
    session = Session(settings.workspace)
    result = settle(session, lambda: _work_on_line(worker, operator, session, line))
    took = f"{time.perf_counter() - started:.3f} s"
    worker.report(result, detail=f"took {took}")
    log(f"{result.request_id}: {result.status}, took {took}")
    return result


def describe_imports() -> str:
    done = IMPORTS_DONE_AT.isoformat(timespec="microseconds").replace("+00:00", "Z")
    return f"imports took {IMPORT_SECONDS:.3f} s, done {done} (pid {os.getpid()})"


@dataclass(frozen=True)
class Server:
    """Serve mode: what stays from one connection to the next."""

    settings: Settings
    provider: str
    converse: Converse
    operator: Operator
    ready: str  # the `ready` signal's detail

    def session(self, channel: Channel, backoff: Backoff) -> None:
        """Say ready and answer requests until end of stream; OSError if it is cut off."""
        signals = Signals(self.settings.agent_id, channel.write_line)
        worker = Worker(self.provider, self.converse, signals)
        log(f"serving requests from {self.settings.mediation_addr}")
        signals.emit("ready", detail=self.ready)
        while (line := channel.read_line()) is not None:
            backoff.failures = 0  # the host is there: a later cut starts a fresh count
            if line.strip():
                result = answer(self.settings, worker, self.operator, line)
                channel.write_line(result.model_dump_json())

    def run(self, backoff: Backoff) -> int:
        """Connect, serve, and connect again after a cut, until end of stream (0)."""
        while True:
            channel = backoff.connect()
            try:
                self.session(channel, backoff)
            except OSError as exc:  # reset: a restore or fork of the VM, a target gone away
                backoff.retry(f"channel {backoff.address} cut off ({exc})")
                continue
            finally:
                channel.close()
            log("the host closed the channel; exiting")
            return 0


def refuse(backoff: Backoff, agent_id: str, error: str) -> int:
    """The agent cannot serve: say why on the channel (the host is waiting for `ready`)."""
    channel = backoff.connect()
    try:
        Signals(agent_id, channel.write_line).emit("failed", error=error)
    finally:
        channel.close()
    return 1


def serve_channel(settings: Settings, provider: str, converse: Converse) -> int:
    """Answer requests from the mediation channel until the host closes it (exit status 0)."""
    backoff = Backoff(settings.mediation_addr)
    try:
        parse_address(settings.mediation_addr)
        try:
            operator = Operator.load(settings.agent_dir)
        except AgentFailure as exc:
            log(str(exc))
            return refuse(backoff, settings.agent_id, str(exc))
        ready = f"{operator.describe()}; {describe_imports()}"
        log(f"ready: {ready}")
        mark_ready(settings, ready)
        return Server(settings, provider, converse, operator, ready).run(backoff)
    except AgentFailure as exc:
        log(str(exc))
        return 1
    except OSError as exc:  # saying `failed` broke off too
        log(f"channel {settings.mediation_addr} failed: {exc}")
        return 1


# <<< shared agent core <<<

# --- OpenAI ------------------------------------------------------------------------------

DEFAULT_MODEL = "gpt-5-mini"


@functools.cache  # one client per process: serve mode reuses it for every request
def make_client() -> openai.OpenAI:
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise AgentFailure("OPENAI_API_KEY is not set (pass it with `microagent create --env`)")
    return openai.OpenAI(
        api_key=api_key,
        base_url=os.environ.get("OPENAI_BASE_URL") or None,
        max_retries=env_int("MICROAGENT_MAX_RETRIES", DEFAULT_MAX_RETRIES),
    )


def tool_params() -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        for tool in TOOLS
    ]


def limits(session: Session) -> dict[str, Any]:
    # Without a bound, leave the output limit to the model's own default.
    return {"max_completion_tokens": session.max_tokens} if session.max_tokens else {}


def record_usage(session: Session, usage: CompletionUsage | None) -> None:
    # OpenAI caches long prompt prefixes on its own; cached tokens are part of prompt_tokens,
    # so they are split out here to match the other agents' meaning of input_tokens.
    if usage is None:
        return
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details else 0
    written = (getattr(details, "cache_write_tokens", None) or 0) if details else 0
    session.add_usage(
        input_tokens=max(usage.prompt_tokens - cached, 0),
        output_tokens=usage.completion_tokens,
        cache_read=cached,
        cache_creation=written,
    )


def function_calls(message: ChatCompletionMessage) -> list[Any]:
    return [call for call in message.tool_calls or () if call.type == "function"]


def assistant_entry(message: ChatCompletionMessage, calls: list[Any]) -> dict[str, Any]:
    """The model's turn, as a request message for the next call."""
    entry: dict[str, Any] = {"role": "assistant", "content": message.content}
    if calls:
        entry["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in calls
        ]
    return entry


def parse_arguments(raw: str | None) -> object:
    try:
        return json.loads(raw or "{}")
    except json.JSONDecodeError:
        return None  # execute_tool turns this into an error the model can read


def run_function_calls(session: Session, calls: list[Any]) -> list[dict[str, Any]]:
    replies: list[dict[str, Any]] = []
    for call in calls:
        outcome = session.call_tool(call.function.name, parse_arguments(call.function.arguments))
        replies.append({"role": "tool", "tool_call_id": call.id, "content": outcome.text})
    return replies


def converse(session: Session, request: WorkRequest, system_prompt: str) -> str:
    """The tool loop: call the model, run the functions it asks for, repeat until it answers."""
    client = make_client()
    model = os.environ.get("OPENAI_MODEL") or DEFAULT_MODEL
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": request.content},
    ]
    while True:
        session.begin_turn()
        completion = client.chat.completions.create(
            model=model, messages=messages, tools=tool_params(), **limits(session)
        )
        record_usage(session, completion.usage)
        if not completion.choices:
            raise AgentFailure("model returned no choices")
        choice = completion.choices[0]
        calls = function_calls(choice.message)
        if not calls or choice.finish_reason == "length":
            return final_text(choice.finish_reason, choice.message)
        messages.append(assistant_entry(choice.message, calls))
        messages.extend(run_function_calls(session, calls))


def final_text(finish_reason: str, message: ChatCompletionMessage) -> str:
    if finish_reason != "stop":
        raise AgentFailure(f"model stopped early (finish_reason={finish_reason!r})")
    if message.refusal:
        raise AgentFailure(f"model refused: {message.refusal}")
    return (message.content or "").strip()


def main() -> int:
    return serve("openai", converse)


if __name__ == "__main__":
    sys.exit(main())
