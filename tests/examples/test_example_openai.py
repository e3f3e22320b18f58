"""minimal-agent-openai: what is particular to Chat Completions (POST /v1/chat/completions)."""

from __future__ import annotations

import pytest
from example_harness import AgentHarness, FakeModelAPI
from example_providers import LoopRuns, Provider, provider_named

OPENAI = provider_named("openai")


@pytest.fixture
def provider() -> Provider:
    return OPENAI


def test_system_prompt_and_request_open_the_conversation(loops: LoopRuns) -> None:
    loop = loops.get(OPENAI)
    messages = loop.requests[0].body["messages"]
    assert messages == [
        {"role": "system", "content": loop.agent.system_prompt},
        {"role": "user", "content": loop.agent.request["content"]},
    ]


def test_tool_calls_are_answered_by_tool_messages_in_order(loops: LoopRuns) -> None:
    messages = loops.get(OPENAI).requests[1].body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assistant = messages[2]
    assert [c["id"] for c in assistant["tool_calls"]] == ["t1", "t2"]
    assert all(c["type"] == "function" for c in assistant["tool_calls"])
    assert [m["tool_call_id"] for m in messages[3:]] == ["t1", "t2"]


def test_usage_splits_cached_tokens_out_of_the_prompt(loops: LoopRuns) -> None:
    usage = loops.get(OPENAI).run.result["usage"]
    assert usage["input_tokens"] == 170  # prompt_tokens minus cached_tokens
    assert usage["cache_read_input_tokens"] == 1850


def test_malformed_arguments_come_back_as_a_tool_error(
    agent: AgentHarness, fake_api: FakeModelAPI
) -> None:
    turn = OPENAI.tool_turn()
    turn["choices"][0]["message"]["tool_calls"] = [
        {"id": "bad", "type": "function", "function": {"name": "bash", "arguments": "{not json"}}
    ]
    fake_api.reply(turn)
    fake_api.reply(OPENAI.answer("Gave up."))

    run = agent.run()

    assert run.returncode == 0, run.stderr
    reply = OPENAI.tool_replies(fake_api.requests[1].body)["bad"]
    assert reply.is_error
    assert "JSON object" in reply.text
