"""A workspace's credential broker end to end with the fake backend (no VM): ``create
--credential`` → ``start`` (the value read on the host, piped to the gateway) → a program
connecting to the guest agent's service port (the agent stand-in runs on the host here) →
the gateway → a recording upstream; the audit, the status counts, and where the value is not.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testenv.clitools import cli_json as cli
from testenv.leaks import files_holding
from testenv.supervised import processes_naming, standin_home
from testenv.upstream import Upstream, post_and_read

NAME = "brokered"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream(reply=b"ok") as server:
        yield server


@pytest.fixture
def home(busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with standin_home(tmp_path / "home", monkeypatch, halt=NAME) as home:
        yield home


def _spec(folder: Path, port: int, *, allow: bool = False) -> Path:
    spec = folder / "microagent.yaml"
    spec.write_text(
        f"name: {NAME}\n"
        "image: oci:layout:latest\n"
        "entrypoint: sleep 600\n"
        + ("network: {mode: user, allow: [pypi.org]}\n" if allow else "")
        + "credentials:\n"
        "  - name: internal\n"
        "    from: env:MA_UNIT_SENTINEL\n"
        f"    upstream: http://127.0.0.1:{port}/base\n"
        "    header: Authorization\n"
        '    format: "Bearer {value}"\n'
        "    baseUrlEnv: INTERNAL_BASE_URL\n"
        "    keyEnv: INTERNAL_TOKEN\n"
    )
    return spec


def _until_listening(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on the service port {port}")


def test_the_broker_adds_the_key_and_the_guest_never_gets_it(
    home: Path,
    upstream: Upstream,
    busybox_project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sentinel = "sk-unit-" + secrets.token_hex(12)
    monkeypatch.setenv("MA_UNIT_SENTINEL", sentinel)
    spec = _spec(busybox_project, upstream.port)
    cli(capsys, "create", "-f", str(spec), "--credential", "internal")
    cli(capsys, "start", NAME)
    port = int(json.loads((home / "workspaces" / NAME / "runtime" / "boot.json").read_text())[
        "services"][0]["guestPort"])  # fmt: skip
    _until_listening(port)
    reply = post_and_read(port, "/v1/echo?secret=no", "Authorization: Bearer guest")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {sentinel}"
    status = cli(capsys, "status", NAME)
    assert status["readiness"]["brokerReady"]["ready"] is True
    assert status["audit"]["requests"] == 1 and status["audit"]["denied"] == 0
    entries = cli(capsys, "audit", NAME)["entries"]
    assert [(e["credential"], e["path"], e["status"]) for e in entries] == [
        ("internal", "/base/v1/echo", 200)
    ]
    cli(capsys, "halt", NAME)
    assert cli(capsys, "status", NAME)["readiness"]["brokerReady"]["ready"] is False
    assert processes_naming(str(home)) == []  # the gateway ended with its supervisor
    assert files_holding(home, sentinel) == []


def test_a_missing_value_fails_the_start_naming_the_reference(
    home: Path,
    upstream: Upstream,
    busybox_project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MA_UNIT_SENTINEL", raising=False)
    spec = _spec(busybox_project, upstream.port)
    cli(capsys, "create", "-f", str(spec), "--credential", "internal")
    failed = cli(capsys, "start", NAME, code=2)
    assert "env:MA_UNIT_SENTINEL" in failed["error"]["message"]
    assert cli(capsys, "status", NAME)["event"]["state"] == "prepared"  # as created: never started
