"""The mediation channel's spec field, flag, plan key, fail-closed start and readiness (fake
backend; the channel itself is exercised by the agent-link tests and the vm tier)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.compiler.loader import load_spec
from microagent.compiler.lock import ResolvedImage
from microagent.compiler.overrides import parse_mediation_flag
from microagent.compiler.plan import compile_plan
from microagent.errors import InvalidInputError, SpecError
from testenv.agent_standin import standin_argv
from testenv.clitools import cli_json as cli
from testenv.ports import free_port


def spec_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "microagent.yaml"
    path.write_text("name: m\nimage: python@sha256:" + "a" * 64 + "\nentrypoint: 'true'\n" + body)
    return path


def test_spec_mediation_is_parsed(tmp_path: Path) -> None:
    spec = load_spec(
        spec_file(tmp_path, "mediation: {port: 2048, target: '127.0.0.1:9900', required: true}\n")
    )
    assert spec.mediation is not None
    assert (spec.mediation.port, spec.mediation.target, spec.mediation.required) == (
        2048,
        "127.0.0.1:9900",
        True,
    )
    v6 = load_spec(spec_file(tmp_path, "mediation: {port: 1, target: '[::1]:80'}\n"))
    assert v6.mediation is not None and v6.mediation.target_host == "::1"
    assert not v6.mediation.required


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("example.com:80", "such as 127.0.0.1:9900"),
        ("127.0.0.1:0", "not HOST:PORT"),
        ("127.0.0.1:70000", "not HOST:PORT"),
        ("::1:80", None),  # the schema's pattern refuses it first
        ("127.0.0.1", None),
    ],
)
def test_bad_targets_are_located_errors(tmp_path: Path, target: str, why: str | None) -> None:
    path = spec_file(tmp_path, f"mediation:\n  port: 2048\n  target: '{target}'\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = info.value.render()  # the message, then the hint
    assert "microagent.yaml:6:" in text and "mediation.target" in text
    if why:
        assert why in text


def test_mediation_flag() -> None:
    m = parse_mediation_flag("2048=127.0.0.1:9900")
    assert (m.port, m.target, m.required) == (2048, "127.0.0.1:9900", True)
    for bad in ("2048", "x=127.0.0.1:1", "0=127.0.0.1:1", "2048=host:1", "2048=127.0.0.1:"):
        with pytest.raises(InvalidInputError):
            parse_mediation_flag(bad)


def test_mediation_enters_the_config_key_only_when_declared(tmp_path: Path) -> None:
    image = ResolvedImage("python", "sha256:" + "a" * 64, "linux/amd64")
    plain = compile_plan(load_spec(spec_file(tmp_path, "")), image)
    again = compile_plan(load_spec(spec_file(tmp_path, "")), image)
    mediated = compile_plan(
        load_spec(spec_file(tmp_path, "mediation: {port: 2048, target: '127.0.0.1:9'}\n")), image
    )
    assert plain.config_step.key == again.config_step.key
    assert "mediation" not in plain.config_step.inputs
    assert mediated.config_step.key != plain.config_step.key
    assert mediated.steps[0].key == plain.steps[0].key  # the disk steps are untouched


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


@pytest.fixture
def project(busybox_project: Path) -> Path:
    (busybox_project / "microagent.yaml").write_text(
        "name: med\nimage: oci:layout:latest\nentrypoint: 'true'\nnetwork: {mode: isolated}\n"
    )
    return busybox_project


def test_required_target_down_fails_closed_at_start(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    spec = str(project / "microagent.yaml")
    cli(capsys, "create", "-f", spec, "--mediation", f"2048=127.0.0.1:{port}")
    failed = cli(capsys, "start", "med", code=1)
    assert (
        f"required mediation target 127.0.0.1:{port} is unreachable" in failed["error"]["message"]
    )
    assert failed["error"]["hint"]
    status = cli(capsys, "status", "med")
    assert status["event"]["state"] == "prepared"  # nothing booted
    ready = status["readiness"]["mediationReady"]
    assert ready["ready"] is False and ready["required"] is True


def test_reachable_target_boots_with_the_channel_declared(
    project: Path, capsys: pytest.CaptureFixture[str], listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    spec = str(project / "microagent.yaml")
    cli(capsys, "create", "-f", spec, "--mediation", f"2048=127.0.0.1:{port}")
    cli(capsys, "start", "med")
    home = Path(os.environ["MICROAGENT_HOME"])
    boot = json.loads((home / "workspaces" / "med" / "runtime" / "boot.json").read_text())
    assert boot["mediation"] == {
        "port": 2048,
        "target": f"127.0.0.1:{port}",
        "host": "127.0.0.1",
        "targetPort": port,
        "required": True,
    }


# -- the channel and the health probe through the real supervisor and agent link --------------
# The fake backend runs the Python stand-in guest agent on the host: its mediation listener is
# a host port here, and health commands run on the host.


def wait_for(
    capsys: pytest.CaptureFixture[str], name: str, test: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 60  # generous: CI machines run this under load
    while time.monotonic() < deadline:
        status = cli(capsys, "status", name)
        if test(status):
            return status
        time.sleep(0.1)
    pytest.fail(f"{name}: condition never met; last status {status}")


def echo_upper(listener: socket.socket) -> threading.Thread:
    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                    if data.endswith(b"\n"):
                        conn.sendall(data.upper())
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_the_channel_carries_a_guest_connection_to_the_target(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    listener: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    echo_upper(listener)
    target = listener.getsockname()[1]
    guest_port = free_port()
    spec = str(project / "microagent.yaml")
    cli(capsys, "create", "-f", spec, "--mediation", f"{guest_port}=127.0.0.1:{target}")
    fake = {"hang": True, "agent": standin_argv(mediation_port=guest_port)}
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps(fake))
    cli(capsys, "start", "med")
    try:
        status = wait_for(capsys, "med", lambda s: s["readiness"]["execReady"]["ready"])
        assert status["readiness"]["mediationReady"]["ready"] is True
        with socket.create_connection(("127.0.0.1", guest_port), timeout=10) as conn:
            conn.sendall(b"work request\n")
            conn.settimeout(10)
            assert conn.recv(4096) == b"WORK REQUEST\n"
    finally:
        cli(capsys, "halt", "med")


def test_the_health_probe_flips_readiness(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = project / "healthy"
    flag.touch()
    spec = project / "microagent.yaml"
    spec.write_text(
        spec.read_text()
        + f"health: {{exec: [test, -f, '{flag}'], intervalSeconds: 1, retries: 2}}\n"
    )
    cli(capsys, "create", "-f", str(spec))
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"hang": True, "agent": standin_argv()}))
    cli(capsys, "start", "med")
    try:
        wait_for(capsys, "med", lambda s: s["readiness"]["healthy"]["ready"] is True)
        flag.unlink()
        sick = wait_for(capsys, "med", lambda s: s["readiness"]["healthy"]["ready"] is False)
        assert "2 probes failed in a row" in sick["readiness"]["healthy"]["detail"]
        events = [e for e in cli(capsys, "events", "med")["events"] if e.get("event") == "health"]
        # under load a probe may also time out before the flag goes (a verdict of its own);
        # what must hold: it was healthy, and the last verdict, after the flag went, is not
        assert [e["healthy"] for e in events][-2:] == [True, False]
    finally:
        cli(capsys, "halt", "med")
    assert cli(capsys, "status", "med")["readiness"]["healthy"]["ready"] is False
