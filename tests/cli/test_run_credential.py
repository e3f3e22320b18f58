"""`run --credential/--credential-upstream` with the fake backend: a one-shot command reaches
the model API through a host-side broker, as a workspace's does, and the key never enters the
guest, its files or a log; bad flags are refused (exit 2) before anything is pulled or booted.

The fake guest's "command" is played here: while the machine runs, it calls the base URL its
environment names (the guest agent's stand-in listens there on the host and carries the
connection over the agent port, as ``ma-agent`` does in a VM).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import pytest

from microagent.cli import main
from microagent.runtime import backends
from microagent.runtime.backend import Backend, BootConfig, GuestResult, OutputSink
from microagent.runtime.fake import FakeBackend, FakeMachine, FakeOutcome
from microagent.workspace import run as oneshot
from microagent.workspace.services import PLACEHOLDER
from testenv.agent_standin import standin_argv
from testenv.clitools import cli_json as cli
from testenv.fakeguest import ext4_like
from testenv.leaks import files_holding
from testenv.ports import free_port
from testenv.supervised import processes_naming
from testenv.upstream import Upstream, post_and_read

SENTINEL = "sk-ant-run-" + secrets.token_hex(12)


@dataclass
class Seen:
    """What the fake guest's command saw and did while its machine ran."""

    env: dict[str, str] = field(default_factory=dict)
    reply: bytes = b""
    vm_dir: Path | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # the run's files, by name
    argv_leaks: list[str] = field(default_factory=list)  # command lines naming the key


class CallingMachine:
    """A fake machine whose command calls the model (``ANTHROPIC_BASE_URL``) before it exits."""

    def __init__(self, machine: FakeMachine, seen: Seen) -> None:
        self.machine, self.seen = machine, seen

    def __enter__(self) -> CallingMachine:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.machine.shutdown()

    def wait(
        self, timeout: float | None = None, on_output: OutputSink | None = None
    ) -> GuestResult:
        env = dict(self.machine.run_config.env)
        self.seen.env, self.seen.vm_dir = env, self.machine.config.state_dir
        url = env.get("ANTHROPIC_BASE_URL")
        if url:
            port = urlsplit(url).port
            assert port is not None, url
            self.seen.reply = post(port, "/v1/messages", env.get("ANTHROPIC_API_KEY", ""))
            audit = self.machine.config.state_dir / "audit.jsonl"
            until(lambda: audit.is_file() and audit.read_bytes().endswith(b"\n"))
        self.seen.argv_leaks = processes_naming(SENTINEL)  # the gateway's among them
        files = [p for p in self.machine.config.state_dir.iterdir() if p.is_file()]
        # the throwaway state disk is sparse and large (the guest's writes); not read here
        self.seen.files = {p.name: p.read_bytes() for p in files if p.name != "state.ext4"}
        return self.machine.wait(timeout, on_output)


class CallingGuest(FakeBackend):
    def __init__(self, seen: Seen) -> None:
        super().__init__(lambda _run: FakeOutcome(stdout="called\n", agent=tuple(standin_argv())))
        self.seen = seen

    def boot(self, config: BootConfig, *, incoming: bool = False) -> Any:
        return CallingMachine(super().boot(config, incoming=incoming), self.seen)


def until(done: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            pytest.fail("gave up waiting")
        time.sleep(0.02)


def post(port: int, path: str, key: str) -> bytes:
    """A model SDK's call: the placeholder key in its header, to the guest's loopback port."""

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    until(listening)
    return post_and_read(port, path, f"x-api-key: {key}")


@pytest.fixture
def home(fake_backend: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    port = next(p for p in iter(free_port, None) if p <= 65519)  # a service port base
    monkeypatch.setenv("MICROAGENT_SERVICE_PORT_BASE", str(port))  # the broker's guest port
    monkeypatch.setenv("ANTHROPIC_API_KEY", SENTINEL)
    return tmp_path / "home"


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """The smallest file that passes run's ext4 check (the fake backend boots nothing)."""
    return ext4_like(tmp_path / "root.ext4")


@pytest.fixture
def seen(home: Path, monkeypatch: pytest.MonkeyPatch) -> Seen:
    """The fake backend's guest calls the model; what it saw is returned."""
    seen = Seen()

    def factory(_probes: Path | None, _outcome: str | None) -> Backend:
        return CallingGuest(seen)

    monkeypatch.setitem(backends.BACKENDS, "fake", factory)
    return seen


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream(reply=b'{"type":"message"}') as server:
        yield server


def run_args(rootfs: Path, *flags: str) -> list[str]:
    return ["run", *flags, "--rootfs", str(rootfs), "--", "python3", "agent.py"]


def test_the_command_reaches_the_model_through_the_broker_and_never_holds_the_key(
    seen: Seen,
    upstream: Upstream,
    rootfs: Path,
    home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = f"anthropic=http://127.0.0.1:{upstream.port}/api"
    flags = ("--credential", "anthropic", "--credential-upstream", target)
    done = cli(capsys, *run_args(rootfs, *flags, "-e", "MODE=test"))
    assert (done["ok"], done["result"]["exitCode"], done["result"]["stdout"]) == (
        True,
        0,
        "called\n",
    )
    port = os.environ["MICROAGENT_SERVICE_PORT_BASE"]
    assert urlsplit(seen.env["ANTHROPIC_BASE_URL"]).netloc == f"127.0.0.1:{port}"
    assert seen.env["ANTHROPIC_API_KEY"] == PLACEHOLDER and seen.env["MODE"] == "test"
    assert SENTINEL not in json.dumps(seen.env)
    assert seen.reply.startswith(b"HTTP/1.1 200") and seen.reply.endswith(b'{"type":"message"}')
    (request,) = upstream.requests
    assert (request.path, request.headers["x-api-key"]) == ("/api/v1/messages", SENTINEL)
    entry = json.loads(seen.files["audit.jsonl"].splitlines()[0])
    assert (entry["credential"], entry["path"], entry["status"]) == (
        "anthropic",
        "/api/v1/messages",
        200,
    )
    assert seen.argv_leaks == []
    for name, data in seen.files.items():  # config disk, gateway config and log, audit, ...
        assert SENTINEL.encode() not in data, name
    assert {"gateway.json", "gateway.log", "config.tar"} <= set(seen.files)
    assert seen.vm_dir is not None and not seen.vm_dir.exists()  # the scratch dir went
    assert processes_naming(str(seen.vm_dir)) == []  # and so did the gateway
    assert files_holding(home, SENTINEL) == []


def test_without_credentials_the_guest_gets_no_broker(
    seen: Seen, rootfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli(capsys, *run_args(rootfs))
    assert "ANTHROPIC_BASE_URL" not in seen.env and "gateway.json" not in seen.files
    assert seen.env.get("ANTHROPIC_API_KEY") is None  # nothing of the host's shell either


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--credential", f"anthropic={SENTINEL}"], ("not the key itself", "env:VAR")),
        (
            ["--credential", "nobody"],
            (
                "--credential nobody: not a preset (anthropic, openai, gemini)",
                "run brokers a preset",
            ),
        ),
        (["--credential", "Bad Name"], ("invalid credential name", "lowercase letters")),
        (["--credential", "openai", "--credential", "openai"], ("given twice", "")),
        (
            ["--credential-upstream", "anthropic=https://example.com"],
            (
                "--credential-upstream anthropic: no such credential",
                "pass --credential anthropic too",
            ),
        ),
        (
            ["--credential", "anthropic", "--credential-upstream", "anthropic=http://example.com"],
            ("plain http is only for a loopback host", "use https"),
        ),
        (["--credential-upstream", "anthropic"], ("expected NAME=URL", "")),
        (
            ["--credential", "anthropic", "-e", "ANTHROPIC_BASE_URL=http://x"],
            ("--env ANTHROPIC_BASE_URL: credential 'anthropic' sets it", "drop --env"),
        ),
        (
            ["--credential", "anthropic", "-e", "ANTHROPIC_API_KEY"],
            ("--env ANTHROPIC_API_KEY: credential 'anthropic' sets it", ""),
        ),
    ],
    ids=lambda v: " ".join(v).replace(SENTINEL, "KEY") if isinstance(v, list) else "",
)
def test_bad_credential_flags_are_refused_before_anything_runs(
    seen: Seen,
    rootfs: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    expected: tuple[str, str],
) -> None:
    failed = cli(capsys, *run_args(rootfs, *flags), code=2)
    error, (message, hint) = failed["error"], expected
    assert message in error["message"] and hint in (error.get("hint") or "")
    assert SENTINEL not in json.dumps(failed)
    home = Path(os.environ["MICROAGENT_HOME"])
    assert seen.env == {} and not home.exists()  # nothing booted, nothing pulled or stored


def test_a_missing_key_fails_before_the_image_is_pulled(
    seen: Seen, home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    failed = cli(
        capsys, "run", "--credential", "anthropic", "oci:nowhere:latest", "--", "x", code=2
    )
    assert "credential 'anthropic'" in failed["error"]["message"]
    assert "env:ANTHROPIC_API_KEY" in failed["error"]["message"]
    assert seen.env == {}  # never booted; and the pull's own error did not come first


def test_a_changed_destination_is_said_and_print_command_reads_no_key(
    seen: Seen,
    rootfs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Like create: where a key that is not a stock preset's goes is said on stderr."""
    flags: tuple[str, ...] = ("--credential", "anthropic=env:MA_NO_SUCH_KEY")
    flags += ("--credential-upstream", "anthropic=http://127.0.0.1:9")
    capsys.readouterr()
    assert main(run_args(rootfs, *flags)) == 2
    err = capsys.readouterr().err
    assert "credential anthropic: env:MA_NO_SUCH_KEY -> http://127.0.0.1:9" in err
    assert "error: credential 'anthropic': credential source env:MA_NO_SUCH_KEY" in err
    shown = cli(capsys, "run", *flags, "--print-command", "--rootfs", str(rootfs), "--", "x")
    assert shown["ok"] is True and seen.env == {}


def test_env_with_an_sdk_key_warns(
    seen: Seen, rootfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["--json", *run_args(rootfs, "-e", "OPENAI_API_KEY=sk-x")]) == 0
    err = capsys.readouterr().err
    assert "warning: --env OPENAI_API_KEY puts the key inside the guest" in err
    assert "--credential openai" in err and "sk-x" not in err
    assert seen.env["OPENAI_API_KEY"] == "sk-x"  # still given: a warning, as on create


def test_audit_log_keeps_each_runs_entries_and_never_the_key(
    seen: Seen, upstream: Upstream, rootfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "runs" / "audit.jsonl"
    log.parent.mkdir()
    target = f"anthropic=http://127.0.0.1:{upstream.port}/api"
    flags = ("--credential", "anthropic", "--credential-upstream", target, "--audit-log", str(log))
    for _ in range(2):  # appended: a second run adds its entry after the first's
        assert cli(capsys, *run_args(rootfs, *flags))["result"]["exitCode"] == 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["kind"], e["credential"], e["path"], e["status"]) for e in entries] == [
        ("broker", "anthropic", "/api/v1/messages", 200)
    ] * 2
    assert log.stat().st_mode & 0o777 == 0o600
    assert SENTINEL not in log.read_text()


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _link(path: Path) -> Path:
    (path.parent / "victim").write_text("keep\n")
    path.symlink_to(path.parent / "victim")
    return path


CRED = ("--credential", "anthropic")


@pytest.mark.parametrize(
    "case",
    [
        (lambda p: p, (), "--audit-log needs --credential"),
        (_link, CRED, "cannot append to it: a symbolic link"),
        (_fifo, CRED, "not a regular file"),
        (lambda p: p / "missing" / "log", CRED, "cannot append to it: No such file"),
    ],
    ids=["no credential", "symlink", "fifo", "no directory"],
)
def test_an_audit_log_that_cannot_be_kept_is_refused_before_anything_runs(
    seen: Seen, rootfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Any
) -> None:
    make, flags, expected = case
    where = tmp_path / "shared"
    where.mkdir()
    log = make(where / "log")
    failed = cli(capsys, *run_args(rootfs, *flags, "--audit-log", str(log)), code=2)
    assert expected in failed["error"]["message"], failed
    assert seen.env == {}  # never booted
    if (where / "victim").exists():
        assert (where / "victim").read_text() == "keep\n"


@pytest.mark.usefixtures("seen")  # the fake guest that calls the model
def test_an_audit_log_that_fills_up_is_a_warning_after_the_runs_own_result(
    upstream: Upstream,
    rootfs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = f"anthropic=http://127.0.0.1:{upstream.port}/api"
    flags = ("--credential", "anthropic", "--credential-upstream", target)
    code = main(["run", *flags, "--audit-log", "/dev/full", *run_args(rootfs)[1:]])
    assert code == 2 and "not a regular file" in capsys.readouterr().err  # a device: refused

    def full(_fd: int, _data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(oneshot, "_write_all", full)  # the disk fills as the entries go in
    log = tmp_path / "audit.jsonl"
    code = main(["run", *flags, "--audit-log", str(log), *run_args(rootfs)[1:]])
    err = capsys.readouterr().err
    assert code == 0, err  # the command's own exit code, not the audit's trouble
    assert f"warning: the run's audit was not all appended to {log}: No space left" in err, err

    code = main(["--json", "run", *flags, "--audit-log", str(log), *run_args(rootfs)[1:]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["result"]["exitCode"] == 0, "stdout is the JSON document alone"
    assert f"warning: the run's audit was not all appended to {log}: No space left" in err, err
