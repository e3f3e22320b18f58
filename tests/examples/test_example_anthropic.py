"""minimal-agent: what is particular to the Anthropic Messages API (POST /v1/messages)."""

from __future__ import annotations

from typing import Any

import pytest
from example_providers import LoopRuns, Provider, provider_named

ANTHROPIC = provider_named("anthropic")
EPHEMERAL = {"type": "ephemeral"}


@pytest.fixture
def provider() -> Provider:
    return ANTHROPIC


def blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [block for message in body["messages"] for block in message["content"]]


def test_system_prompt_is_sent_as_a_cached_block(loops: LoopRuns) -> None:
    loop = loops.get(ANTHROPIC)
    for recorded in loop.requests:
        assert recorded.body["system"] == [
            {"type": "text", "text": loop.agent.system_prompt, "cache_control": EPHEMERAL}
        ]


def test_each_turn_marks_only_its_newest_block_for_caching(loops: LoopRuns) -> None:
    # With the system block that makes two breakpoints per request, well under the API's four.
    for recorded in loops.get(ANTHROPIC).requests:
        sent = blocks(recorded.body)
        assert [b for b in sent if "cache_control" in b] == [sent[-1]]
        assert sent[-1]["cache_control"] == EPHEMERAL


def test_usage_reports_cache_reads_and_writes(loops: LoopRuns) -> None:
    usage = loops.get(ANTHROPIC).run.result["usage"]
    assert usage["cache_creation_input_tokens"] == 950
    assert usage["cache_read_input_tokens"] == 1850


def test_assistant_turn_is_replayed_before_the_tool_results(loops: LoopRuns) -> None:
    messages = loops.get(ANTHROPIC).requests[1].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == [
        {"type": "text", "text": "Working on it."},
        {
            "type": "tool_use",
            "id": "t1",
            "name": "bash",
            "input": {"command": "echo hi > x.txt && cat x.txt"},
        },
        {
            "type": "tool_use",
            "id": "t2",
            "name": "write_file",
            "input": {"path": "notes/a.txt", "content": "written by the model\n"},
        },
    ]
    assert [b["type"] for b in messages[2]["content"]] == ["tool_result", "tool_result"]
