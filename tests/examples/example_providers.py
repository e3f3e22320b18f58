"""Each provider's wire format, behind one small interface, so scenarios are written once.

A `Provider` knows how to point its example agent at a fake API, how to script replies in its
API's real JSON shapes (tool calls, final answer, error), and how to read back what the agent
sent (tool results, output-token limit, API key).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from example_harness import FAKE_KEY, AgentHarness, AgentRun, FakeModelAPI, Recorded

from testenv.prereq import importable, require_modules, unavailable


@dataclass(frozen=True)
class Call:
    """A tool call the fake model makes."""

    id: str
    name: str
    args: dict[str, Any]


def call(call_id: str, name: str, **args: Any) -> Call:
    return Call(call_id, name, args)


@dataclass(frozen=True)
class Tokens:
    """Token usage of one fake reply: uncached input, output, input read from and written to
    the prompt cache (the last only where the provider reports it)."""

    input: int = 10
    output: int = 5
    cached: int = 0
    written: int = 0


@dataclass(frozen=True)
class ToolReply:
    """A tool result as the agent sent it back to the model."""

    text: str
    is_error: bool


class Provider:
    name: ClassVar[str]
    example: ClassVar[str]
    sdk: ClassVar[str]
    key_env: ClassVar[str]
    base_url_env: ClassVar[str]
    model_env: ClassVar[str]
    model: ClassVar[str]
    base_path: ClassVar[str] = ""

    @classmethod
    def installed(cls) -> bool:
        # find_spec instead of importing: importing an SDK in the test process costs seconds,
        # and only the agent subprocess needs it.
        return importable(cls.sdk)

    def configure(self, harness: AgentHarness, api: FakeModelAPI) -> AgentHarness:
        harness.env |= {
            self.key_env: FAKE_KEY,
            self.base_url_env: api.url + self.base_path,
            self.model_env: self.model,
        }
        return harness

    def endpoint(self) -> str:
        raise NotImplementedError

    def tool_turn(self, *calls: Call, tokens: Tokens = Tokens()) -> dict[str, Any]:
        raise NotImplementedError

    def answer(self, text: str, tokens: Tokens = Tokens()) -> dict[str, Any]:
        raise NotImplementedError

    def error(self, message: str) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def tool_replies(self, body: dict[str, Any]) -> dict[str, ToolReply]:
        """The tool results carried by the newest turn of a request, by call id."""
        raise NotImplementedError

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        raise NotImplementedError

    def sent_key(self, headers: dict[str, str]) -> str | None:
        # SDK versions differ between an API-key header and a bearer token.
        for header in ("x-api-key", "x-goog-api-key"):
            if header in headers:
                return headers[header]
        return headers.get("authorization", "").removeprefix("Bearer ") or None

    def declared_tools(self, body: dict[str, Any]) -> list[str]:
        raise NotImplementedError


class Anthropic(Provider):
    name = "anthropic"
    example = "minimal-agent"
    sdk = "anthropic"
    key_env = "ANTHROPIC_API_KEY"
    base_url_env = "ANTHROPIC_BASE_URL"
    model_env = "ANTHROPIC_MODEL"
    model = "claude-test-model"

    def endpoint(self) -> str:
        return "/v1/messages"

    def _message(self, content: list[Any], stop_reason: str, tokens: Tokens) -> dict[str, Any]:
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": tokens.input,
                "output_tokens": tokens.output,
                "cache_read_input_tokens": tokens.cached,
                "cache_creation_input_tokens": tokens.written,
            },
        }

    def tool_turn(self, *calls: Call, tokens: Tokens = Tokens()) -> dict[str, Any]:
        content = [{"type": "text", "text": "Working on it."}]
        content += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": c.args} for c in calls
        ]
        return self._message(content, "tool_use", tokens)

    def answer(self, text: str, tokens: Tokens = Tokens()) -> dict[str, Any]:
        return self._message([{"type": "text", "text": text}], "end_turn", tokens)

    def error(self, message: str) -> tuple[int, dict[str, Any]]:
        return 500, {"type": "error", "error": {"type": "api_error", "message": message}}

    def tool_replies(self, body: dict[str, Any]) -> dict[str, ToolReply]:
        last = body["messages"][-1]
        assert last["role"] == "user"
        return {
            b["tool_use_id"]: ToolReply(b["content"], b["is_error"])
            for b in last["content"]
            if b["type"] == "tool_result"
        }

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        return body.get("max_tokens")

    def declared_tools(self, body: dict[str, Any]) -> list[str]:
        return [tool["name"] for tool in body["tools"]]


class OpenAI(Provider):
    name = "openai"
    example = "minimal-agent-openai"
    sdk = "openai"
    key_env = "OPENAI_API_KEY"
    base_url_env = "OPENAI_BASE_URL"
    model_env = "OPENAI_MODEL"
    model = "gpt-test-model"
    base_path = "/v1"

    def endpoint(self) -> str:
        return "/v1/chat/completions"

    def _completion(
        self, message: dict[str, Any], finish_reason: str, tokens: Tokens
    ) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1_780_000_000,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": {
                "prompt_tokens": tokens.input + tokens.cached,
                "completion_tokens": tokens.output,
                "total_tokens": tokens.input + tokens.cached + tokens.output,
                "prompt_tokens_details": {
                    "cached_tokens": tokens.cached,
                    "cache_write_tokens": tokens.written,
                },
            },
        }

    def tool_turn(self, *calls: Call, tokens: Tokens = Tokens()) -> dict[str, Any]:
        tool_calls = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.args)},
            }
            for c in calls
        ]
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
        return self._completion(message, "tool_calls", tokens)

    def answer(self, text: str, tokens: Tokens = Tokens()) -> dict[str, Any]:
        return self._completion({"role": "assistant", "content": text}, "stop", tokens)

    def error(self, message: str) -> tuple[int, dict[str, Any]]:
        body = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        return 400, {"error": body}

    def tool_replies(self, body: dict[str, Any]) -> dict[str, ToolReply]:
        replies: dict[str, ToolReply] = {}
        for message in reversed(body["messages"]):
            if message["role"] != "tool":
                break
            text = message["content"]
            replies[message["tool_call_id"]] = ToolReply(text, text.startswith("error: "))
        return replies

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        return body.get("max_completion_tokens")

    def declared_tools(self, body: dict[str, Any]) -> list[str]:
        return [tool["function"]["name"] for tool in body["tools"]]


class Gemini(Provider):
    name = "gemini"
    example = "minimal-agent-gemini"
    sdk = "google.genai"
    key_env = "GEMINI_API_KEY"
    base_url_env = "GOOGLE_GEMINI_BASE_URL"
    model_env = "GEMINI_MODEL"
    model = "gemini-test-model"

    def endpoint(self) -> str:
        return f"/models/{self.model}:generateContent"  # after /v1 or /v1beta, by SDK version

    def _response(self, parts: list[Any], tokens: Tokens) -> dict[str, Any]:
        return {
            "candidates": [
                {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": {
                "promptTokenCount": tokens.input + tokens.cached,
                "candidatesTokenCount": tokens.output,
                "cachedContentTokenCount": tokens.cached,
                "totalTokenCount": tokens.input + tokens.cached + tokens.output,
            },
            "modelVersion": self.model,
        }

    def tool_turn(self, *calls: Call, tokens: Tokens = Tokens()) -> dict[str, Any]:
        parts = [{"functionCall": {"id": c.id, "name": c.name, "args": c.args}} for c in calls]
        return self._response(parts, tokens)

    def answer(self, text: str, tokens: Tokens = Tokens()) -> dict[str, Any]:
        return self._response([{"text": text}], tokens)

    def error(self, message: str) -> tuple[int, dict[str, Any]]:
        return 500, {"error": {"code": 500, "message": message, "status": "INTERNAL"}}

    def tool_replies(self, body: dict[str, Any]) -> dict[str, ToolReply]:
        last = body["contents"][-1]
        replies: dict[str, ToolReply] = {}
        for part in last["parts"]:
            if "functionResponse" not in part:
                continue
            response = part["functionResponse"]
            payload = response["response"]
            is_error = "error" in payload
            replies[response["id"]] = ToolReply(
                payload["error" if is_error else "output"], is_error
            )
        return replies

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        return body.get("generationConfig", {}).get("maxOutputTokens")

    def declared_tools(self, body: dict[str, Any]) -> list[str]:
        return [decl["name"] for tool in body["tools"] for decl in tool["functionDeclarations"]]


PROVIDERS: tuple[Provider, ...] = (Anthropic(), OpenAI(), Gemini())

PROVIDER_PARAMS = [
    pytest.param(
        provider,
        id=provider.name,
        marks=pytest.mark.modules(provider.sdk),
    )
    for provider in PROVIDERS
]


def cheapest_installed() -> Provider:
    """The provider whose SDK imports fastest, for tests that do not care which one runs."""
    for name in ("openai", "gemini", "anthropic"):
        provider = next(p for p in PROVIDERS if p.name == name)
        if provider.installed():
            return provider
    return unavailable(f"no provider SDK installed ({', '.join(p.sdk for p in PROVIDERS)})")


def provider_named(name: str) -> Provider:
    provider = next(p for p in PROVIDERS if p.name == name)
    require_modules(provider.sdk, module_level=True)
    return provider


# --- the shared three-turn scenario -----------------------------------------------------------

LOOP_ANSWER = "Wrote x.txt and notes/a.txt."
LOOP_TOKENS = (Tokens(100, 10, 0, 900), Tokens(50, 10, 900, 50), Tokens(20, 5, 950))
LOOP_MAX_TOKENS = 4000


@dataclass(frozen=True)
class Loop:
    """One finished run of the scenario: the harness, what the fake API saw, what happened."""

    provider: Provider
    agent: AgentHarness
    requests: list[Recorded]
    run: AgentRun


def run_loop(provider: Provider, root: Path) -> Loop:
    """Two tool turns (bash + write_file, then read_file + `env`), then a final answer."""
    with FakeModelAPI() as api:
        agent = provider.configure(AgentHarness(provider.example, root), api)
        agent.write_request(bounds={"max_tokens": LOOP_MAX_TOKENS})
        first = (
            call("t1", "bash", command="echo hi > x.txt && cat x.txt"),
            call("t2", "write_file", path="notes/a.txt", content="written by the model\n"),
        )
        second = (call("t3", "read_file", path="notes/a.txt"), call("t4", "bash", command="env"))
        api.reply(provider.tool_turn(*first, tokens=LOOP_TOKENS[0]))
        api.reply(provider.tool_turn(*second, tokens=LOOP_TOKENS[1]))
        api.reply(provider.answer(LOOP_ANSWER, tokens=LOOP_TOKENS[2]))
        run = agent.run()
    return Loop(provider, agent, api.requests, run)


class LoopRuns:
    """Runs the scenario at most once per provider per test session."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._runs: dict[str, Loop] = {}

    def get(self, provider: Provider) -> Loop:
        if provider.name not in self._runs:
            root = self._tmp.mktemp(f"loop-{provider.name}")
            self._runs[provider.name] = run_loop(provider, root)
        return self._runs[provider.name]
