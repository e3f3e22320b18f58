"""A live workspace in a real guest: exec through the guest agent, the mediation channel and a
credential broker in isolated mode, the health probe, the lifecycle verbs (ps, wait, kill),
and restarts.

One boot serves most checks (a TCG boot of the busybox image costs ~15 s): the entrypoint
marks itself healthy and sleeps; execs run beside it.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent import Microagent, Settings
from microagent.compiler.overrides import Overrides
from microagent.errors import ConflictError
from microagent.kit.guestkit import GuestKit
from testenv import standin
from testenv.upstream import Upstream

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 300.0
NAME = "live-vm"
MEDIATION_PORT = 2048
MICROAGENT = str(Path(sys.executable).with_name("microagent"))
LIVE_KEY_ENV = "MA_LIVE_BROKER_KEY"
LIVE_KEY = "live-key-0042"
LIVE_UPSTREAMS: list[Upstream] = []


class Upper:
    """The host side of the mediation channel: answers each line in capitals."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())


def _until(check: Callable[[], bool], what: str, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def live(
    kit: GuestKit, busybox_layout: standin.BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Microagent, Settings, Upper]]:
    home = tmp_path_factory.mktemp("live-home")
    folder = tmp_path_factory.mktemp("live-proj")
    shutil.copytree(busybox_layout.layout, folder / "layout")
    upper = Upper()
    upstream = Upstream(reply=b"brokered\n")  # the workspace's credential broker forwards to it
    (folder / "microagent.yaml").write_text(
        f"name: {NAME}\n"
        "image: oci:layout:latest\n"
        "profile: tiny\n"
        "network: {mode: isolated}\n"
        "setup: [mkdir -p /workspace]\n"
        "entrypoint: touch /tmp/healthy && exec sleep 3600\n"
        f"mediation: {{port: {MEDIATION_PORT}, target: '127.0.0.1:{upper.port}', required: true}}\n"
        "health: {exec: [test, -f, /tmp/healthy], intervalSeconds: 1, retries: 2}\n"
        "credentials:\n"
        f"  - {{name: live, from: 'env:{LIVE_KEY_ENV}', upstream: 'http://127.0.0.1:{upstream.port}',"
        " header: Authorization, format: 'Bearer {value}', baseUrlEnv: LIVE_BASE_URL,"
        " keyEnv: LIVE_TOKEN}\n"
    )
    os.environ[LIVE_KEY_ENV] = LIVE_KEY  # read by start (module scope: no monkeypatch)
    LIVE_UPSTREAMS.append(upstream)
    settings = Settings(home=home, kernel=kit.kernel, initrd=kit.initrd)
    api = Microagent(settings)
    api.create(folder / "microagent.yaml", Overrides(credentials=("live",)))
    api.start(NAME)
    _until(lambda: api.status(NAME)["readiness"]["execReady"]["ready"] is True, "the guest agent")
    yield api, settings, upper
    api.delete([NAME], force=True)
    upstream.close()
    os.environ.pop(LIVE_KEY_ENV, None)


def _cli(settings: Settings, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "MICROAGENT_HOME": str(settings.home)}
    if settings.kernel and settings.initrd:
        env["MICROAGENT_KERNEL"], env["MICROAGENT_INITRD"] = (
            str(settings.kernel),
            str(settings.initrd),
        )
    return subprocess.run(
        [MICROAGENT, *args],
        check=False,
        env=env,
        capture_output=True,
        timeout=120,
        **kw,
    )


def test_exec_streams_codes_env_and_cwd(live: tuple[Microagent, Settings, Upper]) -> None:
    _api, settings, _ = live
    done = _cli(
        settings, "exec", NAME, "-e", "X=42", "--", "sh", "-c", "echo out $X; echo err >&2; exit 3"
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out 42\n", b"err\n")
    assert _cli(settings, "exec", NAME, "--", "pwd").stdout == b"/workspace\n"
    assert _cli(settings, "exec", NAME, "-w", "/tmp", "--", "pwd").stdout == b"/tmp\n"
    assert _cli(settings, "exec", NAME, "--", "no-such-program").returncode == 127
    assert _cli(settings, "exec", NAME, "--", "/etc/passwd").returncode == 126
    assert _cli(settings, "exec", NAME, "--timeout", "1", "--", "sleep", "30").returncode == 124
    assert _cli(settings, "exec", NAME, "--", "sh", "-c", "kill -9 $$").returncode == 137
    piped = _cli(
        settings, "exec", "-i", NAME, "--", "sh", "-c", "tr a-z A-Z; echo done", input=b"hello\n"
    )
    assert piped.stdout == b"HELLO\ndone\n"
    collected = json.loads(_cli(settings, "--json", "exec", NAME, "--", "echo", "hi").stdout)
    assert (collected["ok"], collected["exitCode"], collected["stdout"]) == (True, 0, "hi\n")
    assert isinstance(collected["durationMs"], int)


def test_concurrent_execs_while_the_entrypoint_runs(
    live: tuple[Microagent, Settings, Upper],
) -> None:
    api, _settings, _ = live
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        results[i] = api.exec(NAME, ["sh", "-c", f"sleep 1; echo {i}"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {i: (r.exit_code, r.stdout) for i, r in results.items()} == {
        i: (0, f"{i}\n".encode()) for i in range(4)
    }
    entry = api.exec(NAME, ["sh", "-c", "cat /proc/1/cmdline >/dev/null; pidof sleep"])
    assert entry.exit_code == 0 and entry.stdout.strip()  # the entrypoint still sleeps


def test_a_terminal_session(live: tuple[Microagent, Settings, Upper]) -> None:
    _api, settings, _ = live
    env = {**os.environ, "MICROAGENT_HOME": str(settings.home)}
    env["MICROAGENT_KERNEL"], env["MICROAGENT_INITRD"] = str(settings.kernel), str(settings.initrd)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a terminal
        os.execve(MICROAGENT, [MICROAGENT, "exec", "-it", NAME, "--", "sh"], env)
    seen = b""

    def read_until(text: bytes, timeout: float = 60) -> None:
        """Read the terminal until ``text`` shows, answering the shell's cursor-position
        queries as a terminal would (busybox ash's line editor asks before each prompt)."""
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                seen += chunk
                for _ in range(chunk.count(b"\x1b[6n")):
                    os.write(fd, b"\x1b[1;1R")
        assert text in seen, seen

    read_until(b"# ")  # the prompt: the session is up
    os.write(fd, b"tty; echo $((6 * 7))x\r")
    read_until(b"42x")
    assert b"/dev/pts/" in seen
    os.write(fd, b"sleep 30\r")
    time.sleep(2)
    os.write(fd, b"\x03")  # Ctrl-C reaches the guest's terminal, not this host
    os.write(fd, b"echo back$((1 + 1))\r")
    read_until(b"back2")
    os.write(fd, b"exit 5\r")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5


def test_mediation_in_isolated_mode(live: tuple[Microagent, Settings, Upper]) -> None:
    api, _settings, _ = live
    status = api.status(NAME)
    assert status["readiness"]["mediationReady"]["ready"] is True
    script = f'echo "$MICROAGENT_MEDIATION_ADDR"; echo ping | nc 127.0.0.1 {MEDIATION_PORT}'
    done = api.exec(NAME, ["sh", "-c", script], timeout=60)
    assert done.stdout == f"127.0.0.1:{MEDIATION_PORT}\nPING\n".encode(), done
    # isolated stays isolated: no interface but loopback
    links = api.exec(NAME, ["sh", "-c", "ls /sys/class/net"]).stdout.split()
    assert links == [b"lo"]


def test_a_credential_broker_in_isolated_mode(live: tuple[Microagent, Settings, Upper]) -> None:
    """No NIC at all: the broker is still at LIVE_BASE_URL (the guest agent's service channel),
    the guest holds a placeholder, the upstream gets the real key."""
    _api, settings, _ = live
    fetch = 'wget -q -O - --header "Authorization: Bearer guest" "$LIVE_BASE_URL/ping"'
    done = _cli(settings, "exec", NAME, "--", "sh", "-c", f"{fetch}; echo $LIVE_TOKEN")
    assert (done.returncode, done.stdout) == (0, b"brokered\nmicroagent-brokered\n"), done.stderr
    seen = [r.headers.get("authorization") for r in LIVE_UPSTREAMS[-1].requests]
    assert seen == [f"Bearer {LIVE_KEY}"]


def test_health_flips_readiness(live: tuple[Microagent, Settings, Upper]) -> None:
    api, _settings, _ = live
    _until(lambda: api.status(NAME)["readiness"]["healthy"]["ready"] is True, "healthy", 120)
    api.exec(NAME, ["rm", "/tmp/healthy"])
    _until(lambda: api.status(NAME)["readiness"]["healthy"]["ready"] is False, "unhealthy", 120)
    api.exec(NAME, ["touch", "/tmp/healthy"])
    _until(lambda: api.status(NAME)["readiness"]["healthy"]["ready"] is True, "healthy again", 120)


def test_ps_wait_kill_and_exec_refused_after(live: tuple[Microagent, Settings, Upper]) -> None:
    api, settings, _ = live
    rows = api.ps()
    assert [r["name"] for r in rows] == [NAME]
    assert rows[0]["pid"] and rows[0]["uptimeSeconds"] >= 0
    assert _cli(settings, "wait", NAME, "--timeout", "1").returncode == 124
    killed = api.kill(NAME)
    assert killed.to_json()["killed"] is True
    assert api.wait(NAME, timeout=30).to_json()["state"] == "stopped"
    assert api.ps() == []
    refused = _cli(settings, "exec", NAME, "--", "true")
    assert refused.returncode == 1 and b"microagent start" in refused.stderr
    with pytest.raises(ConflictError):
        api.exec(NAME, ["true"])


def test_restart_on_failure_counts(
    kit: GuestKit, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    folder = tmp_path / "proj"
    folder.mkdir()
    shutil.copytree(busybox_layout.layout, folder / "layout")
    (folder / "microagent.yaml").write_text(
        "name: flaky\nimage: oci:layout:latest\nprofile: tiny\nnetwork: {mode: isolated}\n"
        "restart: on-failure:2\nentrypoint: echo try; exit 3\n"
    )
    api = Microagent(Settings(home=tmp_path / "home", kernel=kit.kernel, initrd=kit.initrd))
    api.create(folder / "microagent.yaml")
    api.start("flaky")
    assert api.wait("flaky", timeout=BOOT_TIMEOUT).to_json()["state"] == "failed"
    status = api.status("flaky")
    assert status["restarts"] == 2, status
    assert "after 2 restarts" in status["event"]["detail"]
    restarts = [e for e in api.events("flaky") if e.get("event") == "restart"]
    assert [e["attempt"] for e in restarts] == [1, 2]
    api.delete(["flaky"])
