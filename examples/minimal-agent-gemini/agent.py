"""minimal-agent-gemini: a small tool-using agent backed by Google Gemini (google-genai SDK).

One request per boot:
  1. load the operator's constraints and system prompt from the agent dir; signal `ready`;
  2. load the WorkRequest from <workspace>/input.json, refuse it unless the principal is
     verified; signal `accepting`, then `working`;
  3. let the model drive the bash / read_file / write_file function tools until it gives a
     final answer or a limit is hit;
  4. write the WorkResult to <workspace>/result.json (atomically); signal `completed` or
     `failed`. Exit status 0 when completed, 1 otherwise; a result file is written either way.

Signals are JSON lines on stderr. Only this file and protocol.py are copied into the VM.

Environment:
  GEMINI_API_KEY          the key (GOOGLE_API_KEY also works; with a proxy, a placeholder)
  GOOGLE_GEMINI_BASE_URL  optional: a proxy or test server in place of the Gemini API
  GEMINI_MODEL            optional: model id (default below)
  MICROAGENT_WORKSPACE    workspace root (default /workspace)
  MICROAGENT_AGENT_DIR    operator files: constraints.json, system_prompt.md (default /agent)
  MICROAGENT_MAX_TURNS    model calls allowed per request (default 30)
  MICROAGENT_MAX_RETRIES  SDK retries per model call (default 2)
  MICROAGENT_AGENT_ID     agent id used in signals (default: the hostname)
"""

from __future__ import annotations

import contextlib
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

from google import genai
from google.genai import types
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

# >>> shared agent core >>>
# Everything between these markers is identical in the three example agents
# (tests/examples checks it). Edit one copy, then paste it into the other two.

INPUT_NAME = "input.json"
RESULT_NAME = "result.json"
SECRET_NAME_MARKERS = ("API_KEY", "TOKEN", "SECRET", "CREDENTIAL", "PASSWORD")
DEFAULT_BASH_TIMEOUT = 120
MAX_BASH_TIMEOUT = 600
MAX_OUTPUT_CHARS = 20_000
MAX_READ_BYTES = 10_000_000
DEFAULT_MAX_TURNS = 30
DEFAULT_MAX_RETRIES = 2

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

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            workspace=Path(os.environ.get("MICROAGENT_WORKSPACE") or "/workspace").resolve(),
            agent_dir=Path(os.environ.get("MICROAGENT_AGENT_DIR") or "/agent"),
            agent_id=os.environ.get("MICROAGENT_AGENT_ID") or socket.gethostname() or "agent",
        )


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


def emit(settings: Settings, kind: SignalKind, **fields: str | None) -> None:
    """Print one lifecycle signal as a JSON line on stderr."""
    sig = LifecycleSignal(signal=kind, agent_id=settings.agent_id, observed_at=now(), **fields)
    print(sig.model_dump_json(exclude_none=True), file=sys.stderr, flush=True)


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


def load_model(path: Path, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise AgentFailure(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise AgentFailure(f"{path} is not a valid {model.__name__}: {problems}") from None


def read_system_prompt(agent_dir: Path) -> str:
    path = agent_dir / "system_prompt.md"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AgentFailure(f"cannot read {path}: {exc.strerror}") from None
    if not text:
        raise AgentFailure(f"{path} is empty")
    return text


def peek_request_ids(path: Path) -> tuple[str, str | None]:
    """Best-effort request_id/audit_ref from a request that may not validate."""
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return "unknown", None
    if not isinstance(raw, dict):
        return "unknown", None
    request_id = raw.get("request_id")
    audit_ref = raw.get("audit_ref")
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


def describe(exc: BaseException) -> str:
    if isinstance(exc, AgentFailure):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _handle(settings: Settings, session: Session, provider: str, converse: Converse) -> str:
    constraints = load_model(settings.agent_dir / "constraints.json", Constraints)
    system_prompt = read_system_prompt(settings.agent_dir)
    emit(settings, "ready", detail=f"constraints v{constraints.version} ({constraints.hash})")
    request = load_model(settings.workspace / INPUT_NAME, WorkRequest)
    session.adopt(request, env_int("MICROAGENT_MAX_TURNS", DEFAULT_MAX_TURNS, minimum=1))
    admit(request, constraints)
    emit(settings, "accepting", request_id=request.request_id)
    emit(settings, "working", request_id=request.request_id, detail=provider)
    return converse(session, request, system_prompt)


def _finish(settings: Settings, result: WorkResult) -> int:
    path = settings.workspace / RESULT_NAME
    try:
        write_result(path, result)
    except OSError as exc:
        emit(settings, "failed", request_id=result.request_id, error=f"cannot write {path}: {exc}")
        return 1
    if result.status == "completed":
        emit(settings, "completed", request_id=result.request_id, detail=str(path))
        return 0
    emit(settings, "failed", request_id=result.request_id, error=result.error)
    return 1


def serve(provider: str, converse: Converse) -> int:
    """Handle the one request waiting in the workspace; returns the process exit status."""
    settings = Settings.from_env()
    with contextlib.suppress(OSError):  # an earlier run's result must not pass for this one's
        (settings.workspace / RESULT_NAME).unlink(missing_ok=True)
    session = Session(settings.workspace)
    session.request_id, session.audit_ref = peek_request_ids(settings.workspace / INPUT_NAME)
    try:
        content = _handle(settings, session, provider, converse)
        result = session.result("completed", content=content)
    except RequestDenied as exc:
        result = session.result("denied", error=str(exc))
    except Exception as exc:  # whatever goes wrong, the caller still gets a WorkResult
        result = session.result("failed", error=describe(exc))
    return _finish(settings, result)


# <<< shared agent core <<<

# --- Gemini ------------------------------------------------------------------------------

DEFAULT_MODEL = "gemini-2.5-flash"


def make_client() -> genai.Client:
    api_key = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
    if not api_key:
        raise AgentFailure("GEMINI_API_KEY is not set (pass it with `microagent create --env`)")
    options = types.HttpOptions(
        base_url=os.environ.get("GOOGLE_GEMINI_BASE_URL") or None,
        retry_options=types.HttpRetryOptions(
            attempts=env_int("MICROAGENT_MAX_RETRIES", DEFAULT_MAX_RETRIES) + 1
        ),
    )
    return genai.Client(api_key=api_key, vertexai=False, http_options=options)


def generation_config(session: Session, system_prompt: str) -> types.GenerateContentConfig:
    declarations = [
        types.FunctionDeclaration(
            name=tool.name, description=tool.description, parameters_json_schema=tool.parameters
        )
        for tool in TOOLS
    ]
    return types.GenerateContentConfig(
        system_instruction=system_prompt,
        tools=[types.Tool(function_declarations=declarations)],
        # The SDK could call Python functions itself; this loop runs the tools instead.
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        max_output_tokens=session.max_tokens,
    )


def record_usage(
    session: Session, usage: types.GenerateContentResponseUsageMetadata | None
) -> None:
    # Gemini caches repeated prompt prefixes implicitly; cached tokens are included in
    # prompt_token_count, so they are split out to match the other agents' input_tokens.
    if usage is None:
        return
    cached = usage.cached_content_token_count or 0
    session.add_usage(
        input_tokens=max((usage.prompt_token_count or 0) - cached, 0),
        output_tokens=(usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0),
        cache_read=cached,
    )


def first_candidate(response: types.GenerateContentResponse) -> types.Candidate:
    if not response.candidates:
        feedback = response.prompt_feedback
        reason = feedback.block_reason if feedback else None
        raise AgentFailure(f"model returned no candidates (block_reason={reason})")
    return response.candidates[0]


def function_response(session: Session, call: types.FunctionCall) -> types.Part:
    outcome = session.call_tool(call.name or "", call.args or {})
    key = "error" if outcome.is_error else "output"
    return types.Part(
        function_response=types.FunctionResponse(
            id=call.id, name=call.name, response={key: outcome.text}
        )
    )


def final_text(candidate: types.Candidate) -> str:
    reason = candidate.finish_reason
    if reason not in (None, types.FinishReason.STOP):
        raise AgentFailure(f"model stopped early (finish_reason={reason})")
    parts = candidate.content.parts if candidate.content else None
    return "\n".join(p.text for p in parts or () if p.text and not p.thought).strip()


def converse(session: Session, request: WorkRequest, system_prompt: str) -> str:
    """The tool loop: call Gemini, run the functions it asks for, repeat until it answers."""
    client = make_client()
    model = os.environ.get("GEMINI_MODEL") or DEFAULT_MODEL
    config = generation_config(session, system_prompt)
    contents: list[types.Content] = [
        types.Content(role="user", parts=[types.Part.from_text(text=request.content)])
    ]
    while True:
        session.begin_turn()
        response = client.models.generate_content(model=model, contents=contents, config=config)
        record_usage(session, response.usage_metadata)
        candidate = first_candidate(response)
        calls = response.function_calls
        if not calls:
            return final_text(candidate)
        # The model's turn goes back verbatim (it may carry thought signatures).
        contents.append(candidate.content or types.Content(role="model", parts=[]))
        replies = [function_response(session, call) for call in calls]
        contents.append(types.Content(role="user", parts=replies))


def main() -> int:
    return serve("gemini", converse)


if __name__ == "__main__":
    sys.exit(main())
