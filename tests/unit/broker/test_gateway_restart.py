"""The gateway survives its worker's death (broker/gateway.py Keeper), run as the supervisor
runs it (runtime/gatewayproc.py GatewayProcess: secrets on a pipe, output in gateway.log):
a worker killed with SIGKILL is replaced and the next request is served, a worker that keeps
dying makes the gateway give up with a clear line, and the secret is in no argv and no
environment of either process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker_fakes import KEY, Upstream, credential, request, serve_upstream

from microagent import runner
from microagent.broker.gateway import MAX_RESTARTS, GatewayConfig
from microagent.runtime.gatewayproc import GatewayProcess
from testenv.clitools import cli_json as cli
from testenv.supervised import standin_home

WAIT = 30.0  # generous: the machine may be loaded
WORKER = re.compile(r"^gateway: worker (\d+) serving$", re.MULTILINE)


def until(predicate: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(0.02)


class Watched:
    """A gateway started by GatewayProcess, and what its watch reported."""

    def __init__(self, directory: Path, upstream: Upstream) -> None:
        self.config = GatewayConfig(
            audit=directory / "audit.jsonl", credentials=(credential(directory, upstream.url),)
        )
        self.process = GatewayProcess(self.config, directory)
        self.restarts: list[str] = []
        self.exits: list[tuple[int, str]] = []
        read, write = os.pipe()
        try:
            os.write(write, json.dumps({"model": KEY}).encode())
            os.close(write)
            self.process.start(stdin=read, timeout=WAIT)
        finally:
            os.close(read)
        self.thread = self.process.watch(
            self.restarts.append, lambda code, line: self.exits.append((code, line))
        )

    @property
    def socket(self) -> Path:
        return self.config.credentials[0].socket

    @property
    def keeper(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def log(self) -> str:
        return self.process.log.read_text(errors="replace")

    def workers(self) -> list[int]:
        return [int(pid) for pid in WORKER.findall(self.log())]

    def next_worker(self, count: int) -> int:
        """The pid of the ``count``-th worker, once it serves."""
        until(lambda: len(self.workers()) >= count, f"worker {count} serving:\n{self.log()}")
        return self.workers()[count - 1]


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with serve_upstream() as served:
        yield served


@pytest.fixture
def gateway(sockdir: Path, upstream: Upstream) -> Iterator[Watched]:
    watched = Watched(sockdir, upstream)
    try:
        yield watched
    finally:
        watched.process.stop()


def proc_bytes(pid: int, name: str) -> bytes:
    return (Path("/proc") / str(pid) / name).read_bytes()


def parent_of(pid: int) -> int:
    status = (Path("/proc") / str(pid) / "status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)$", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def test_a_killed_worker_is_replaced_and_the_next_request_is_served(
    gateway: Watched, upstream: Upstream
) -> None:
    first = gateway.next_worker(1)
    assert parent_of(first) == gateway.keeper
    assert request(gateway.socket, "GET", "/v1/one")[0] == 200
    os.kill(first, signal.SIGKILL)
    until(lambda: "worker restart 1/" in gateway.log(), "the restart logged")
    # Sent at once: the new worker may not be forked yet; the connection waits for it.
    status, _headers, _body = request(gateway.socket, "GET", "/v1/two")
    assert status == 200
    assert [seen.path for seen in upstream.seen] == ["/v1/one", "/v1/two"]
    assert upstream.seen[1].header("x-api-key") == [KEY]
    second = gateway.next_worker(2)
    assert second != first and parent_of(second) == gateway.keeper
    until(lambda: gateway.restarts, "the watch reported the restart")
    assert gateway.restarts[0].startswith("worker restart 1/")
    assert f"the worker (pid {first}) was killed by signal 9 (SIGKILL)" in gateway.restarts[0]
    assert gateway.exits == []
    for pid in (gateway.keeper, second):
        for name in ("cmdline", "environ"):
            assert KEY.encode() not in proc_bytes(pid, name), (pid, name)
    assert gateway.process.alive()


def test_stopping_the_gateway_stops_its_worker_and_removes_the_sockets(
    gateway: Watched,
) -> None:
    worker = gateway.next_worker(1)
    keeper = gateway.keeper
    gateway.process.stop()
    until(lambda: not Path(f"/proc/{worker}").exists(), "the worker gone")
    assert not Path(f"/proc/{keeper}").exists()
    assert not gateway.socket.exists()
    gateway.thread.join(WAIT)  # it ends on stop, without reporting an exit
    assert not gateway.thread.is_alive()
    assert gateway.exits == []


def test_a_keeper_killed_outright_takes_its_worker_with_it(gateway: Watched) -> None:
    worker = gateway.next_worker(1)
    os.kill(gateway.keeper, signal.SIGKILL)
    until(lambda: not runner.pid_alive(worker), "the worker gone with its keeper")


def test_a_worker_that_keeps_dying_makes_the_gateway_give_up(gateway: Watched) -> None:
    for count in range(1, MAX_RESTARTS + 2):
        os.kill(gateway.next_worker(count), signal.SIGKILL)
    assert gateway.process.proc is not None
    assert gateway.process.proc.wait(WAIT) == 1
    last = gateway.log().splitlines()[-1]
    assert last.startswith("gateway: giving up: the worker (pid ")
    assert f"its {MAX_RESTARTS + 1}th death within 60 s" in last
    assert "the credential brokers and the egress proxy are down" in last
    assert len(gateway.workers()) == MAX_RESTARTS + 1
    until(lambda: gateway.exits, "the watch reported the exit")
    assert gateway.exits == [(1, last.removeprefix("gateway: "))]
    until(lambda: len(gateway.restarts) == MAX_RESTARTS, "every restart reported")
    assert not gateway.socket.exists()


# --- in a workspace: the supervisor records the restart --------------------------------------

WORKSPACE = "regateway"


@pytest.fixture
def home(busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MA_UNIT_REGATEWAY", KEY)
    with standin_home(tmp_path / "home", monkeypatch, halt=WORKSPACE) as home:
        yield home


def _post(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\nhi"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_supervisor_records_a_gateway_restart_and_the_workspace_keeps_its_broker(
    home: Path,
    upstream: Upstream,
    busybox_project: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = busybox_project / "microagent.yaml"
    spec.write_text(
        f"name: {WORKSPACE}\nimage: oci:layout:latest\nentrypoint: sleep 600\n"
        "credentials:\n"
        "  - name: internal\n"
        "    from: env:MA_UNIT_REGATEWAY\n"
        f"    upstream: {upstream.url}\n"
        "    header: x-api-key\n"
        '    format: "{value}"\n'
        "    baseUrlEnv: INTERNAL_BASE_URL\n"
        "    keyEnv: INTERNAL_KEY\n"
    )
    cli(capsys, "create", "-f", str(spec), "--credential", "internal")
    cli(capsys, "start", WORKSPACE)
    runtime = home / "workspaces" / WORKSPACE / "runtime"
    port = int(json.loads((runtime / "boot.json").read_text())["services"][0]["guestPort"])
    until(lambda: _listening(port), f"the service port {port} listening")
    assert _post(port).startswith(b"HTTP/1.1 200")
    log = runtime / "gateway.log"
    # the keeper logs its worker after the fork, while the worker may already serve
    until(lambda: WORKER.search(log.read_text()), f"a worker serving, in {log}")
    first = int(WORKER.findall(log.read_text())[0])
    os.kill(first, signal.SIGKILL)

    def restarts() -> list[dict[str, object]]:
        lines = (runtime / "events.jsonl").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        return [event for event in events if event["event"] == "gateway-restart"]

    until(restarts, "a gateway-restart event")
    detail = str(restarts()[0]["detail"])
    assert detail.startswith("worker restart 1/") and f"(pid {first})" in detail
    assert _post(port).startswith(b"HTTP/1.1 200")
    assert [seen.header("x-api-key") for seen in upstream.seen] == [[KEY], [KEY]]
    assert cli(capsys, "status", WORKSPACE)["readiness"]["brokerReady"]["ready"] is True
    cli(capsys, "halt", WORKSPACE)
