"""Published ports through the CLI with the fake backend: kept in the record, listed by
``status``, a taken host port refused at ``start`` before anything boots, flag errors."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.runtime.backend import PublishedPort
from microagent.runtime.rundir import RunDir
from testenv.clitools import cli_json as cli
from testenv.ports import free_port


@pytest.fixture
def project(busybox_project: Path) -> Path:
    (busybox_project / "microagent.yaml").write_text(
        "name: web\n"
        "image: oci:layout:latest\n"
        "entrypoint: httpd -f -p 8000\n"
        "network:\n"
        "  forwards: [{hostPort: 18000, guestPort: 8000}]\n"
    )
    return busybox_project


def test_published_ports_are_recorded_and_listed(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = str(project / "microagent.yaml")
    port = free_port()
    cli(capsys, "create", "-f", spec, "--publish", f"{port}:9000", "-p", "0.0.0.0:18000:8080")
    record = Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / "web" / "workspace.json"
    assert json.loads(record.read_text())["published"] == [
        {"protocol": "tcp", "host": "127.0.0.1", "hostPort": port, "guestPort": 9000},
        {"protocol": "tcp", "host": "0.0.0.0", "hostPort": 18000, "guestPort": 8080},
    ]  # the flag on 0.0.0.0:18000 replaced the spec's 127.0.0.1:18000
    status = cli(capsys, "status", "web")
    assert status["network"]["mode"] == "user"
    assert [(p["hostPort"], p["live"]) for p in status["network"]["ports"]] == [
        (port, False),
        (18000, False),
    ]
    capsys.readouterr()
    main(["status", "web"])
    assert f"published: 127.0.0.1:{port} -> guest 9000/tcp" in capsys.readouterr().out


def test_a_taken_host_port_is_refused_at_start(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cli(capsys, "create", "-f", str(project / "microagent.yaml"), "-p", f"{port}:8000")
        error = cli(capsys, "start", "web", code=1)["error"]
        assert error["kind"] == "conflict"
        assert f"127.0.0.1:{port} is already in use" in error["message"]
    assert cli(capsys, "status", "web")["event"]["state"] == "prepared"  # nothing booted


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-p", "8080:80/udp"], "UDP is not supported"),
        (["-p", "8080:80", "-p", "8080:81"], "published twice"),
        (["-p", "localhost:8080:80"], "invalid value 'localhost'"),
        (["--network", "isolated"], "--network isolated: the spec publishes ports"),
        (["--network", "isolated", "-p", "8080:80"], "--publish needs network mode 'user'"),
    ],
)
def test_create_flag_errors(
    project: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    error = cli(capsys, "create", "-f", str(project / "microagent.yaml"), *flags, code=2)
    assert message in error["error"]["message"]
    assert not (Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / "web").exists()


def test_run_refuses_publish_without_a_network(
    fake_backend: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rootfs = str(tmp_path / "root.ext4")
    args = ["run", "--rootfs", rootfs, "--network", "isolated", "-p", "8080:80", "--", "true"]
    error = cli(capsys, *args, code=2)["error"]
    assert "--publish needs --network user" in error["message"]
    error = cli(capsys, "run", "--rootfs", rootfs, "-p", "8080:80/udp", "--", "true", code=2)[
        "error"
    ]
    assert "UDP is not supported" in error["message"]


def test_start_boots_with_the_published_ports(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    cli(capsys, "create", "-f", str(project / "microagent.yaml"), "-p", f"{port}:9000")
    cli(capsys, "start", "web", "--wait", "--timeout", "30")
    run_dir = RunDir(Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / "web" / "runtime")
    assert run_dir.read_boot().config.network.published == (
        PublishedPort("127.0.0.1", 18000, 8000),
        PublishedPort("127.0.0.1", port, 9000),
    )
