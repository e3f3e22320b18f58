"""minimal-agent-gemini: what is particular to the Gemini API (models/M:generateContent)."""

from __future__ import annotations

import re

from example_providers import LoopRuns, provider_named

GEMINI = provider_named("gemini")


def test_requests_go_to_generate_content(loops: LoopRuns) -> None:
    for recorded in loops.get(GEMINI).requests:
        assert re.fullmatch(r"/v1(beta)?/models/gemini-test-model:generateContent", recorded.path)


def test_system_prompt_is_the_system_instruction(loops: LoopRuns) -> None:
    loop = loops.get(GEMINI)
    for recorded in loop.requests:
        parts = recorded.body["systemInstruction"]["parts"]
        assert parts == [{"text": loop.agent.system_prompt}]


def test_function_calls_are_answered_with_function_responses(loops: LoopRuns) -> None:
    contents = loops.get(GEMINI).requests[1].body["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    calls = [p["functionCall"] for p in contents[1]["parts"]]
    assert [(c["id"], c["name"]) for c in calls] == [("t1", "bash"), ("t2", "write_file")]
    responses = [p["functionResponse"] for p in contents[2]["parts"]]
    assert [(r["id"], r["name"]) for r in responses] == [("t1", "bash"), ("t2", "write_file")]
    assert all(set(r["response"]) == {"output"} for r in responses)


def test_usage_splits_cached_tokens_out_of_the_prompt(loops: LoopRuns) -> None:
    usage = loops.get(GEMINI).run.result["usage"]
    assert usage["input_tokens"] == 170  # promptTokenCount minus cachedContentTokenCount
    assert usage["cache_read_input_tokens"] == 1850
    assert usage["cache_creation_input_tokens"] == 0
