"""The example agents in serve mode, driven by scripts/dispatch.py over real loopback TCP.

Each agent runs as a process (the way the VM runs it) with MICROAGENT_MEDIATION_ADDR pointing
at a dispatcher listening on 127.0.0.1, and a scripted fake of its provider's API. One session
per provider is run once and looked at by several tests: a probe connection first, then three
good requests with bad lines between them, then end of stream.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from example_harness import (
    EXAMPLES,
    SCRIPTS,
    AgentHarness,
    FakeModelAPI,
    Recorded,
    load_dispatch,
    load_protocol,
)
from example_providers import PROVIDER_PARAMS, Provider, call, cheapest_installed

dispatch = load_dispatch()

MAX_LINE = 1 << 20  # the agents' bound on one request line
TIMEOUT = 60.0
ANSWERS = {"req-001": "first answer", "req-002": "second answer", "req-003": "third answer"}


def request(request_id: str, **overrides: Any) -> dict[str, Any]:
    demo = json.loads((EXAMPLES / "minimal-agent" / "demo" / "input-001.json").read_text())
    return demo | {"request_id": request_id, "audit_ref": f"audit://{request_id}"} | overrides


def line_of(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def session_lines() -> list[tuple[bytes, str]]:
    """What the dispatcher sends, in order, with the request id the answer should carry."""
    unverified = request("req-denied")["principal"] | {"verified": False}
    return [
        (line_of(request("req-001", content="task one")), "req-001"),
        (b"{not json", "unknown"),
        (line_of(request("req-002", content="task two")), "req-002"),
        (b'{"request_id": "req-huge", "content": "' + b"x" * MAX_LINE + b'"}', "unknown"),
        (b'{"request_id": "req-shape", "principal": {"name": "bob"}}', "req-shape"),
        (line_of(request("req-denied", principal=unverified)), "req-denied"),
        (line_of(request("req-003", content="task three")), "req-003"),
    ]


@dataclass
class Session:
    """Everything one serve-mode session showed."""

    provider: Provider
    agent: AgentHarness
    returncode: int
    ready: dict[str, Any]
    exchanges: list[Any]
    left_over: list[dict[str, Any]]
    model_calls: list[Recorded]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.agent.output()

    @property
    def log(self) -> str:
        """The agent's own lines, without the interpreter's import-time profile."""
        lines = self.output.splitlines()
        return "\n".join(line for line in lines if not line.startswith("import time:"))

    def result(self, request_id: str) -> Any:
        return next(x for x in self.exchanges if x.request_id == request_id)


def script_model(provider: Provider, api: FakeModelAPI) -> None:
    api.reply(provider.answer(ANSWERS["req-001"]))
    api.reply(provider.tool_turn(call("w1", "write_file", path="served.txt", content="served\n")))
    api.reply(provider.answer(ANSWERS["req-002"]))
    api.reply(provider.answer(ANSWERS["req-003"]))


def probe(listener: socket.socket) -> None:
    """What the runtime does to report mediationReady: connect, then close."""
    socket.create_connection(listener.getsockname()[:2], timeout=5).close()


def stop(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_session(provider: Provider, root: Path) -> Session:
    events: list[tuple[str, dict[str, Any]]] = []
    with FakeModelAPI() as api, dispatch.listen("127.0.0.1:0") as listener:
        agent = provider.configure(AgentHarness(provider.example, root), api)
        script_model(provider, api)
        probe(listener)
        proc = agent.start_serving(dispatch.bound_address(listener), PYTHONPROFILEIMPORTTIME="1")
        try:
            deadline = time.monotonic() + TIMEOUT
            peer, ready = dispatch.wait_for_agent(listener, deadline, lambda *e: events.append(e))
            exchanges = [
                dispatch.exchange(peer, line, rid, deadline, lambda *e: events.append(e))
                for line, rid in session_lines()
            ]
            left_over = peer.finish(deadline)
            peer.close()
        finally:
            returncode = stop(proc)
    return Session(provider, agent, returncode, ready, exchanges, left_over, api.requests, events)


class Sessions:
    """One serve-mode session per provider per test run."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._runs: dict[str, Session] = {}

    def get(self, provider: Provider) -> Session:
        if provider.name not in self._runs:
            root = self._tmp.mktemp(f"serve-{provider.name}")
            self._runs[provider.name] = run_session(provider, root)
        return self._runs[provider.name]


@pytest.fixture(scope="session")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Sessions:
    return Sessions(tmp_path_factory)


# --- one session per provider ------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDER_PARAMS)
def test_three_requests_are_answered_in_order_by_one_process(
    provider: Provider, sessions: Sessions
) -> None:
    session = sessions.get(provider)
    assert session.returncode == 0, session.log
    protocol = load_protocol(provider.example)
    results = [protocol.WorkResult.model_validate(x.result) for x in session.exchanges]
    assert [r.request_id for r in results] == [rid for _, rid in session_lines()]
    completed = [r for r in results if r.status == "completed"]
    assert [(r.request_id, r.content) for r in completed] == list(ANSWERS.items())
    assert all(r.audit_ref == f"audit://{r.request_id}" for r in completed)
    assert completed[1].usage is not None and completed[1].usage.tool_calls == 1
    assert not (session.agent.workspace / "result.json").exists()  # results went on the wire


@pytest.mark.parametrize("provider", PROVIDER_PARAMS)
def test_the_sdk_is_imported_once_and_the_timing_is_reported(
    provider: Provider, sessions: Sessions
) -> None:
    session = sessions.get(provider)
    # PYTHONPROFILEIMPORTTIME makes the interpreter itself log each module it imports, once.
    imported = [
        line.rsplit("|", 1)[1].strip()
        for line in session.output.splitlines()
        if line.startswith("import time:")
    ]
    assert imported.count(provider.sdk) == 1
    assert session.log.count("imports took") == 1
    assert "imports took" in session.ready["detail"]
    took = [line for line in session.log.splitlines() if ", took " in line]
    assert [line.split(":")[1].strip() for line in took] == [rid for _, rid in session_lines()]


@pytest.mark.parametrize("provider", PROVIDER_PARAMS)
def test_signals_come_before_each_result(provider: Provider, sessions: Sessions) -> None:
    session = sessions.get(provider)
    assert session.ready["signal"] == "ready"
    assert session.ready["agent_id"] == "test-agent"
    assert session.ready["detail"].startswith("constraints v1 (sha256:demo-v1); ")
    for exchange in session.exchanges:
        kinds = [(s["signal"], s.get("request_id")) for s in exchange.signals]
        rid = exchange.request_id
        if exchange.status == "completed":
            assert kinds == [("accepting", rid), ("working", rid), ("completed", rid)]
            assert exchange.signals[-1]["detail"].startswith("took ")
        else:
            assert kinds[-1] == ("failed", rid)
            assert exchange.signals[-1]["error"] == exchange.result["error"]
        assert "signal" not in exchange.result


@pytest.mark.parametrize("provider", PROVIDER_PARAMS)
def test_bad_lines_get_failed_results_and_the_agent_carries_on(
    provider: Provider, sessions: Sessions
) -> None:
    session = sessions.get(provider)
    statuses = {x.request_id: x.status for x in session.exchanges}
    assert statuses == {
        "req-001": "completed",
        "unknown": "failed",  # both the non-JSON line and the oversized one
        "req-002": "completed",
        "req-shape": "failed",
        "req-denied": "denied",
        "req-003": "completed",
    }
    errors = [x.result["error"] for x in session.exchanges if x.request_id == "unknown"]
    assert "not a valid WorkRequest" in errors[0]
    assert errors[1] == f"request line longer than {MAX_LINE} bytes; refused without parsing it"
    assert "principal.kind" in session.result("req-shape").result["error"]
    assert "not verified" in session.result("req-denied").result["error"]
    assert len(session.model_calls) == 4  # bad lines never reached the model


@pytest.mark.parametrize("provider", PROVIDER_PARAMS)
def test_tools_run_and_the_model_client_is_kept(provider: Provider, sessions: Sessions) -> None:
    session = sessions.get(provider)
    assert (session.agent.workspace / "served.txt").read_text() == "served\n"
    replies = provider.tool_replies(session.model_calls[2].body)
    assert "wrote 7 bytes" in replies["w1"].text
    # One SDK client for the whole session: every model call rode the same HTTP connection.
    assert len({recorded.client for recorded in session.model_calls}) == 1


@pytest.mark.parametrize("provider", PROVIDER_PARAMS)
def test_a_probe_is_skipped_and_end_of_stream_ends_the_agent(
    provider: Provider, sessions: Sessions
) -> None:
    session = sessions.get(provider)
    probes = [fields for event, fields in session.events if event == "probe"]
    assert [p["detail"] for p in probes] == ["connected and closed"]
    assert session.left_over == []
    assert session.returncode == 0
    assert session.log.rstrip().endswith("agent: the host closed the channel; exiting")


# --- transport behaviour (the same core in every agent, so one agent suffices) ------------------


@pytest.fixture
def cheap_provider() -> Provider:
    return cheapest_installed()


@pytest.fixture
def agent(cheap_provider: Provider, tmp_path: Path, fake_api: FakeModelAPI) -> AgentHarness:
    return cheap_provider.configure(AgentHarness(cheap_provider.example, tmp_path), fake_api)


def test_the_agent_retries_until_the_channel_is_up(agent: AgentHarness) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        proc = agent.start_serving(dispatch.bound_address(listener))
        try:
            agent.wait_for_output("; retrying in ")
            listener.listen(1)
            peer, ready = dispatch.wait_for_agent(listener, time.monotonic() + TIMEOUT, print)
            assert ready["signal"] == "ready"
            assert peer.finish(time.monotonic() + TIMEOUT) == []
            peer.close()
        finally:
            returncode = stop(proc)
    assert returncode == 0, agent.output()


def cut_off(peer: Any) -> None:
    """What the guest agent does to a connection when the VM is restored from a snapshot or
    forked (or the target is unreachable): close it with a reset, not an end of stream."""
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


def test_a_cut_connection_is_made_again_and_the_sdk_is_not_imported_again(
    cheap_provider: Provider, agent: AgentHarness, fake_api: FakeModelAPI
) -> None:
    fake_api.reply(cheap_provider.answer("after the cut"))
    with dispatch.listen("127.0.0.1:0") as listener:
        proc = agent.start_serving(dispatch.bound_address(listener))
        try:
            deadline = time.monotonic() + TIMEOUT
            peer, first = dispatch.wait_for_agent(listener, deadline, print)
            cut_off(peer)
            peer, again = dispatch.wait_for_agent(listener, deadline, print)
            done = dispatch.exchange(peer, line_of(request("req-001")), "req-001", deadline, print)
            assert peer.finish(deadline) == []
            peer.close()
        finally:
            returncode = stop(proc)
    assert returncode == 0, agent.output()
    assert (first["signal"], again["signal"]) == ("ready", "ready")
    assert again["detail"] == first["detail"]  # one import: same time, same process
    assert done.status == "completed" and done.result["content"] == "after the cut"
    log = agent.output()
    assert "cut off" in log and log.count("imports took") == 1, log
    assert log.rstrip().endswith("agent: the host closed the channel; exiting")


def test_the_ready_file_is_written_before_the_channel_is_up(
    agent: AgentHarness, tmp_path: Path
) -> None:
    """A health probe sees the agent ready once it has imported its SDK, whether or not the
    host listens yet: a warm template is taken then, and the agent connects after the fork."""
    ready_file = tmp_path / "run" / "agent.ready"
    ready_file.parent.mkdir()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        proc = agent.start_serving(
            dispatch.bound_address(listener), MICROAGENT_READY_FILE=str(ready_file)
        )
        try:
            agent.wait_for_output("; retrying in ")
            deadline = time.monotonic() + TIMEOUT
            while not ready_file.exists():
                assert time.monotonic() < deadline and proc.poll() is None, agent.output()
                time.sleep(0.02)
            assert "imports took" in ready_file.read_text()
            listener.listen(1)
            peer, ready = dispatch.wait_for_agent(listener, deadline, print)
            assert ready["detail"] == ready_file.read_text().strip()
            assert peer.finish(deadline) == []
            peer.close()
        finally:
            returncode = stop(proc)
    assert returncode == 0, agent.output()


def test_the_agent_gives_up_after_its_connection_attempts(
    core: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded retries with a growing pause (in-process; the pauses are recorded, not slept)."""
    pauses: list[float] = []
    monkeypatch.setattr(core.time, "sleep", pauses.append)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))  # never listens: every attempt is refused
        backoff = core.Backoff(dispatch.bound_address(listener))
        with pytest.raises(core.AgentFailure, match=r"gave up after 40 attempts"):
            backoff.connect()
    assert len(pauses) == core.MAX_CONNECT_ATTEMPTS - 1 == 39
    assert pauses[:5] == [0.05, 0.1, 0.2, 0.4, 0.8] and set(pauses[5:]) == {1.0}


def test_a_bad_address_ends_the_agent_with_status_1(agent: AgentHarness) -> None:
    proc = agent.start_serving("no-port-here")
    assert stop(proc) == 1
    assert "MICROAGENT_MEDIATION_ADDR must be HOST:PORT, got 'no-port-here'" in agent.output()


def test_missing_operator_files_are_reported_on_the_channel(agent: AgentHarness) -> None:
    (agent.agent_dir / "constraints.json").unlink()
    with dispatch.listen("127.0.0.1:0") as listener:
        proc = agent.start_serving(dispatch.bound_address(listener))
        try:
            peer, first = dispatch.wait_for_agent(listener, time.monotonic() + TIMEOUT, print)
            with pytest.raises(dispatch.DispatchError, match="cannot serve: cannot read"):
                dispatch.check_ready(first, peer)
            peer.close()
        finally:
            returncode = stop(proc)
    assert first["signal"] == "failed"
    assert "constraints.json" in first["error"]
    assert returncode == 1


def test_the_dispatch_script_end_to_end(
    cheap_provider: Provider, agent: AgentHarness, fake_api: FakeModelAPI
) -> None:
    fake_api.reply(cheap_provider.answer("one"))
    fake_api.reply(cheap_provider.answer("two"))
    demo = agent.example_dir / "demo"
    argv = [sys.executable, str(SCRIPTS / "dispatch.py"), "--listen", "127.0.0.1:0", "--json"]
    argv += [str(demo / "input-001.json"), str(demo / "input-002.json"), "--wait", "60"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as dispatcher:
        assert dispatcher.stdout is not None
        listening = json.loads(dispatcher.stdout.readline())
        assert listening["event"] == "listening"
        host, port = dispatch.parse_address(listening["address"])
        socket.create_connection((host, port), timeout=5).close()  # a probe first
        proc = agent.start_serving(listening["address"])
        try:
            events = [json.loads(line) for line in dispatcher.stdout]
        finally:
            returncode = stop(proc)
    assert (dispatcher.returncode, returncode) == (0, 0), agent.output()
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["probe", "ready"]
    assert kinds.count("sent") == kinds.count("result") == 2
    assert [e["message"]["content"] for e in events if e["event"] == "result"] == ["one", "two"]
    summary = events[-1]
    assert (summary["event"], summary["requests"], summary["completed"]) == ("summary", 2, 2)
    assert summary["first_over_rest"] == pytest.approx(summary["first"] / summary["rest_median"])


# --- the dispatcher on its own --------------------------------------------------------------------


def test_a_silent_connection_does_not_hold_up_the_agent() -> None:
    with dispatch.listen("127.0.0.1:0") as listener:
        address = listener.getsockname()[:2]
        lingering = socket.create_connection(address, timeout=5)  # connects, says nothing
        with lingering, socket.create_connection(address, timeout=5) as fake_agent:
            fake_agent.sendall(b'{"signal": "ready", "agent_id": "a", "observed_at": "now"}\n')
            peer, first = dispatch.wait_for_agent(listener, time.monotonic() + 10, print)
            peer.close()
    assert first["signal"] == "ready"


def test_the_dispatcher_bounds_what_it_reads() -> None:
    with (
        dispatch.listen("127.0.0.1:0") as listener,
        socket.create_connection(listener.getsockname()[:2], timeout=5) as fake_agent,
    ):
        fake_agent.sendall(b'{"signal": "ready"}\n')
        peer, _ = dispatch.wait_for_agent(listener, time.monotonic() + 10, print)
        flood = b"x" * (dispatch.MAX_LINE_BYTES + dispatch.RECV_CHUNK)  # and no newline
        sender = threading.Thread(target=sendall_quietly, args=(fake_agent, flood))
        sender.start()
        with pytest.raises(dispatch.DispatchError, match="longer than"):
            peer.read_message(time.monotonic() + 10)
        peer.close()
        sender.join(timeout=10)
    assert not sender.is_alive()


def sendall_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the reader gives up and closes mid-way
        sock.sendall(data)


def test_repeated_request_lists_get_unique_ids(tmp_path: Path) -> None:
    planned = dispatch.plan_requests([], generate=2, content="hi", repeat=2)
    ids = [r["request_id"] for r in planned]
    assert ids == ["dispatch-001.1", "dispatch-002.1", "dispatch-001.2", "dispatch-002.2"]
    assert dispatch.plan_requests([], generate=1, content="hi", repeat=1)[0]["request_id"] == (
        "dispatch-001"
    )


# --- the agent's channel, in-process ------------------------------------------------------------


def test_the_agent_reads_one_bounded_line_at_a_time(core: ModuleType) -> None:
    limit = core.MAX_LINE_BYTES
    agent_end, host_end = socket.socketpair()
    data = b"a" * limit + b"\n" + b"b" * (limit + 1) + b"c" * limit + b"\n" + b"last"
    sender = threading.Thread(target=sendall_quietly, args=(host_end, data))
    sender.start()
    channel = core.Channel(agent_end)
    try:
        assert channel.read_line() == b"a" * limit  # exactly at the bound: accepted
        assert channel.read_line() == b"b" * (limit + 1)  # over it: cut, the rest skipped
        sender.join(timeout=10)
        host_end.shutdown(socket.SHUT_WR)
        assert channel.read_line() == b"last"  # a last line without a newline still counts
        assert channel.read_line() is None
    finally:
        channel.close()
        host_end.close()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("127.0.0.1:9900", ("127.0.0.1", 9900)), ("[::1]:2048", ("::1", 2048))],
)
def test_the_agent_parses_its_mediation_address(
    core: ModuleType, raw: str, expected: tuple[str, int]
) -> None:
    assert core.parse_address(raw) == expected


@pytest.mark.parametrize("raw", ["9900", ":9900", "host:", "host:0", "host:65536", "host:9x"])
def test_the_agent_refuses_a_bad_mediation_address(core: ModuleType, raw: str) -> None:
    with pytest.raises(core.AgentFailure, match="must be HOST:PORT"):
        core.parse_address(raw)
