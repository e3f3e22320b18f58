"""Warm templates in a real guest (issue 18 item 4): ``create --warm`` of a health-probed
workspace boots it once until its probe passes and saves that as the spec's template; a
second workspace of the spec (another name) is a fork of it whose start is a restore (events
``warm-start``, ``restored``), which answers at once with what the template's boot left in
memory and on disk, under its own hostname; a corrupt template is refused with a notice and
the workspace still starts cold.

The walkthrough's agent (examples/minimal-agent, the python stand-in with pydantic and the
SDK, the scripted model behind the credential broker, as tests/vm/test_walkthrough.py runs it)
in serve mode: ``create --warm`` boots it once until its health probe sees /run/agent.ready,
which the agent writes after its imports, and saves it while the agent waits for its channel;
nothing listens on the mediation target meanwhile: the host holds the channel itself (the
agent's connection is taken, left silent, nothing forwarded). A second warm create forks that,
and its first request over the mediation channel is answered by the process that did the
imports during the template's boot (its ready signal names that import's time and pid, and
the fork's console shows no import).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent import Microagent, Settings
from microagent.compiler.overrides import Overrides
from microagent.kit.guestkit import GuestKit
from testenv import standin
from testenv.clitools import cli_json as cli
from testenv.ports import free_port
from testenv.scripted_model import ScriptedModel

pytestmark = pytest.mark.vm
ROOT = Path(__file__).parents[2]
BOOT_TIMEOUT = 300.0
SECRET = "sk-ant-warm-serve-secret-2718"
# the entrypoint's boot-time work (a marker and a value only this boot knows) stands in for
# an agent importing its SDK; the probe passes once it is done
ENTRY = "echo $$-$(date +%s) >/tmp/boot-id; touch /tmp/ready; exec sleep 100000"
SPEC = (
    "name: warm-vm\nimage: oci:layout:latest\nprofile: tiny\nnetwork: {mode: isolated}\n"
    f"entrypoint: '{ENTRY}'\n"
    "health: {exec: [test, -f, /tmp/ready], intervalSeconds: 1, timeoutSeconds: 30}\n"
)


def _until(check: Callable[[], bool], what: str, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _exec_ready(api: Microagent, name: str) -> bool:
    return bool(api.status(name)["readiness"]["execReady"]["ready"])


def _healthy(api: Microagent, name: str) -> bool:
    return bool(api.status(name)["readiness"]["healthy"]["ready"])


def _sh(api: Microagent, name: str, script: str) -> str:
    done = api.exec(name, ["sh", "-c", script], timeout=60)
    assert done.exit_code == 0, done.stderr
    return done.stdout.decode() if isinstance(done.stdout, bytes) else str(done.stdout)


def _events(api: Microagent, name: str) -> list[str]:
    return [str(e["event"]) for e in api.events(name)]


def test_a_warm_create_forks_the_template_and_a_corrupt_one_boots_cold(
    kit: GuestKit, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    shutil.copytree(busybox_layout.layout, tmp_path / "layout")
    path = tmp_path / "microagent.yaml"
    path.write_text(SPEC)
    notices: list[str] = []
    api = Microagent(
        Settings(home=tmp_path / "home", kernel=kit.kernel, initrd=kit.initrd),
        notice=notices.append,
    )
    names = ["warm-vm", "warm-b", "warm-c"]
    try:
        made = api.create(path, warm=True)
        assert made.warm is not None and made.warm.made and not made.warm.error, made.warm
        print(f"template made: ready after {made.warm.ready_seconds:.1f}s")
        began = time.monotonic()
        forked = api.create(path, Overrides(name="warm-b"), warm=True)
        assert forked.warm is not None and not forked.warm.made
        assert forked.warm.key == made.warm.key
        api.start("warm-b")
        _until(lambda: _exec_ready(api, "warm-b"), "the fork's guest agent", 120)
        boot_id = _sh(api, "warm-b", "cat /tmp/boot-id")
        print(f"warm create -> exec-ready: {time.monotonic() - began:.2f}s")
        seen = _events(api, "warm-b")
        assert "warm-start" in seen and "restored" in seen and "cold" not in seen
        # what the template's boot left is there: the fork did not boot
        assert boot_id.strip() and _sh(api, "warm-b", "ls /tmp/ready").strip() == "/tmp/ready"
        _until(lambda: "hostname" in _events(api, "warm-b"), "the hostname event", 60)
        assert _sh(api, "warm-b", "/run/microagent/busybox hostname").strip() == "warm-b"
        assert api.status("warm-b")["template"] == made.warm.key

        api.create(path, Overrides(name="warm-c"), warm=True)
        stored = next((tmp_path / "home" / "store" / "templates").iterdir())
        vmstate = stored / "snapshots" / "template" / "vmstate"
        with vmstate.open("r+b") as fh:  # the forks' hard links see it too
            fh.seek(vmstate.stat().st_size // 2)
            fh.write(b"corrupt!")
        api.start("warm-c")
        assert any("refused" in n and "booting cold" in n for n in notices), notices
        _until(lambda: _healthy(api, "warm-c"), "the cold boot's health probe")
        seen = _events(api, "warm-c")
        assert "warm-start-refused" in seen and "cold" in seen and "restored" not in seen
        assert _sh(api, "warm-c", "cat /tmp/boot-id").strip() != boot_id.strip()
    finally:
        api.delete(names, force=True)


# -- the walkthrough's agent in serve mode, from a warm template -------------------------------


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedModel]:
    """The model, and the key each start's credential broker reads from this process."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    with ScriptedModel(expect_key=SECRET) as server:
        yield server


def _import_stamps(text: str) -> list[str]:
    """The agent's import record(s): ``imports took N s, done TIME (pid P)``."""
    return re.findall(r"imports took [0-9.]+ s, done \S+ \(pid \d+\)", text)


def _console(capsys: pytest.CaptureFixture[str], name: str) -> str:
    return "".join(r["text"] for r in cli(capsys, "logs", name)["records"])


def _dispatch(target: str, request: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, str(ROOT / "scripts/dispatch.py"), "--listen", target, "--json"]
    argv += ["--wait", "300", "--timeout", "300", str(request)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def _warm_create(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    created = cli(capsys, "create", "--warm", *args)
    template = created["template"]
    assert "error" not in template, f"the template was not made: {template['error']}"
    return dict(template)


def test_the_walkthrough_agent_answers_its_first_request_after_a_warm_create_without_importing(
    env: Path, model: ScriptedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "minimal-agent"
    shutil.copytree(ROOT / "examples" / "minimal-agent", project)
    request = json.loads((project / "demo/input-002.json").read_text())
    request["request_id"] = "req-warm"  # the model's req-002 plan: read, write, run a script
    warm_request = tmp_path / "input-warm.json"  # outside the project: its build stays the
    warm_request.write_text(json.dumps(request))  # walkthrough's (a cache hit there)
    port = free_port()
    target = f"127.0.0.1:{port}"
    flags = ["--file", str(project / "microagent.yaml"), "--credential", "anthropic",
             "--credential-upstream", f"anthropic=http://127.0.0.1:{model.port}",
             "--mediation", f"2048={target}"]  # fmt: skip
    names = ["warm-agent", "warm-agent-b"]
    try:
        made = _warm_create(capsys, *flags, "--name", "warm-agent")  # nothing listens there
        assert made["made"] is True
        # the template's agent had connected and said ready, to the host, which held the
        # channel (no target contacted): the fork's restore must reset that connection for
        # its agent to reach the dispatcher
        log = {e["event"]: e for e in cli(capsys, "events", "warm-agent")["events"]}
        assert "mediation-held" in log, log
        released = log["mediation-released"]
        assert released["connections"] >= 1 and released["refused"] == 0, released
        assert released["bytes"] > len('{"signal":"ready"}'), released
        stamps = _import_stamps(_console(capsys, "warm-agent"))
        assert len(stamps) == 1, stamps  # the template's boot imported the SDK, once
        began = time.monotonic()
        forked = _warm_create(capsys, *flags, "--name", "warm-agent-b")
        assert forked["made"] is False and forked["key"] == made["key"]
        dispatcher = _dispatch(target, warm_request)
        try:
            assert dispatcher.stdout is not None
            listening = json.loads(dispatcher.stdout.readline())
            assert listening["event"] == "listening", listening
            cli(capsys, "start", "warm-agent-b")
            events = [json.loads(line) for line in dispatcher.stdout]
            assert dispatcher.wait(timeout=60) == 0, events
        finally:
            dispatcher.kill()
        answered = time.monotonic() - began
        ready = next(e for e in events if e["event"] == "ready")
        result = next(e for e in events if e["event"] == "result")["message"]
        # the process that answered did its imports in the template's boot, and only there
        assert _import_stamps(ready["message"]["detail"]) == stamps, ready
        assert _import_stamps(_console(capsys, "warm-agent-b")) == []
        seen = [str(e["event"]) for e in cli(capsys, "events", "warm-agent-b")["events"]]
        assert "warm-start" in seen and "restored" in seen and "cold" not in seen, seen
        assert (result["request_id"], result["status"]) == ("req-warm", "completed"), result
        assert result["content"].startswith("I did NOT find the earlier script, added a Modified")
        assert "No module named 'rich'" in result["content"]  # the tools ran in the fork
        assert model.keys and set(model.keys) == {SECRET}  # the fork's broker added the key
        took = float(stamps[0].split()[2])
        figures = (
            f"template ready after {made['readySeconds']:.1f}s (imports {took:.1f}s); the "
            f"fork's agent ready {ready['after']:.1f}s after the dispatcher listened; answered "
            f"{answered:.1f}s after the second create began"
        )
        with capsys.disabled():
            print(f"\nwarm serve mode: {figures}")
        assert ready["after"] < took  # no second import could have been done in that time
        status = cli(capsys, "status", "warm-agent-b")
        assert status["template"] == made["key"]
    finally:
        cli(capsys, "delete", "-y", "--force", *names)
