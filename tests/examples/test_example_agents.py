"""The three example agents, each run as a process against a fake of its provider's API.

The same scenarios for every provider: the tool loop does real work and feeds the results
back, path escapes are refused (and the model is told), provider errors and a missing key end
in a failed WorkResult, and credentials never reach the bash tool.
"""

from __future__ import annotations

import json

import pytest
from example_harness import FAKE_KEY, FAKE_TOKEN, AgentHarness, FakeModelAPI, load_protocol
from example_providers import (
    LOOP_ANSWER,
    LOOP_MAX_TOKENS,
    PROVIDER_PARAMS,
    LoopRuns,
    Provider,
    call,
)

pytestmark = pytest.mark.parametrize("provider", PROVIDER_PARAMS)


def test_loop_completes_with_a_valid_result(provider: Provider, loops: LoopRuns) -> None:
    run = loops.get(provider).run
    assert run.returncode == 0, run.stderr
    assert run.signal_kinds == ["ready", "accepting", "working", "completed"]
    assert {sig["agent_id"] for sig in run.signals} == {"test-agent"}
    result = load_protocol(provider.example).WorkResult.model_validate(run.result)
    assert result.status == "completed"
    assert result.request_id == "req-001"
    assert result.audit_ref == "audit://req-001"
    assert result.content == LOOP_ANSWER
    assert result.error is None
    assert result.usage is not None
    assert (result.usage.turns, result.usage.tool_calls) == (3, 4)
    assert (result.usage.input_tokens, result.usage.output_tokens) == (170, 25)
    assert result.usage.cache_read_input_tokens == 1850


def test_loop_runs_the_tools_for_real(provider: Provider, loops: LoopRuns) -> None:
    workspace = loops.get(provider).agent.workspace
    assert (workspace / "x.txt").read_text() == "hi\n"
    assert (workspace / "notes" / "a.txt").read_text() == "written by the model\n"


def test_loop_feeds_tool_results_back(provider: Provider, loops: LoopRuns) -> None:
    loop = loops.get(provider)
    assert len(loop.requests) == 3
    for recorded in loop.requests:
        assert recorded.path.endswith(provider.endpoint())
        assert provider.sent_key(recorded.headers) == FAKE_KEY
        assert provider.max_tokens(recorded.body) == LOOP_MAX_TOKENS
        assert provider.declared_tools(recorded.body) == ["bash", "read_file", "write_file"]
    assert provider.tool_replies(loop.requests[0].body) == {}

    second = provider.tool_replies(loop.requests[1].body)
    assert second.keys() == {"t1", "t2"}
    assert second["t1"].text.startswith("exit_code=0\nstdout:\nhi\n")
    assert not second["t1"].is_error
    assert "wrote 21 bytes" in second["t2"].text

    third = provider.tool_replies(loop.requests[2].body)
    assert third.keys() == {"t3", "t4"}
    assert third["t3"].text == "written by the model\n"


def test_bash_environment_holds_no_credentials(provider: Provider, loops: LoopRuns) -> None:
    env_dump = provider.tool_replies(loops.get(provider).requests[2].body)["t4"].text
    assert "MICROAGENT_WORKSPACE=" in env_dump  # it really is the environment listing
    for secret in (FAKE_KEY, provider.key_env, FAKE_TOKEN, "DEPLOY_TOKEN"):
        assert secret not in env_dump


def test_path_escapes_are_refused_and_the_model_is_told(
    provider: Provider, agent: AgentHarness, fake_api: FakeModelAPI
) -> None:
    outside = agent.root / "outside.txt"
    outside.write_text("outside secret\n")
    (agent.workspace / "link").symlink_to(outside)
    (agent.workspace / "linkdir").symlink_to(agent.root)
    (agent.workspace / "inside.txt").write_text("inside\n")
    fake_api.reply(
        provider.tool_turn(
            call("dotdot", "read_file", path="../outside.txt"),
            call("abs", "read_file", path="/etc/passwd"),
            call("symlink", "read_file", path="link"),
            call("write-dotdot", "write_file", path="../planted.txt", content="x"),
            call("write-symlink", "write_file", path="linkdir/planted.txt", content="x"),
            call("ok", "read_file", path=str(agent.workspace / "inside.txt")),
        )
    )
    fake_api.reply(provider.answer("Some paths were refused."))

    run = agent.run()

    assert run.returncode == 0, run.stderr
    replies = provider.tool_replies(fake_api.requests[1].body)
    ok = replies.pop("ok")
    assert (ok.text, ok.is_error) == ("inside\n", False)
    assert len(replies) == 5
    for call_id, reply in replies.items():
        assert reply.is_error, call_id
        assert reply.text.startswith("error: refused:"), call_id
        assert "outside the workspace" in reply.text, call_id
    assert not (agent.root / "planted.txt").exists()
    sent = json.dumps([r.body for r in fake_api.requests])
    assert "outside secret" not in sent
    assert "root:x:0:0" not in sent


def test_provider_error_gives_failed_result(
    provider: Provider, agent: AgentHarness, fake_api: FakeModelAPI
) -> None:
    status, body = provider.error("the fake model broke")
    fake_api.reply(body, status=status)

    run = agent.run()

    assert run.returncode == 1
    assert len(fake_api.requests) == 1  # MICROAGENT_MAX_RETRIES=0 reached the SDK
    result = load_protocol(provider.example).WorkResult.model_validate(run.result)
    assert result.status == "failed"
    assert result.request_id == "req-001"
    assert result.audit_ref == "audit://req-001"
    assert "the fake model broke" in (result.error or "")
    assert run.signal_kinds == ["ready", "accepting", "working", "failed"]
    assert run.signals[-1]["error"] == result.error


def test_missing_api_key_gives_failed_result(
    provider: Provider, agent: AgentHarness, fake_api: FakeModelAPI
) -> None:
    del agent.env[provider.key_env]

    run = agent.run()

    assert run.returncode == 1
    assert run.result["status"] == "failed"
    assert provider.key_env in run.result["error"]
    assert fake_api.requests == []
