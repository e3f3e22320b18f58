"""Warm templates in a real guest (issue 18 item 4): ``create --warm`` of a health-probed
workspace boots it once until its probe passes and saves that as the spec's template; a
second workspace of the spec (another name) is a fork of it whose start is a restore (events
``warm-start``, ``restored``), which answers at once with what the template's boot left in
memory and on disk, under its own hostname; a corrupt template is refused with a notice and
the workspace still starts cold.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from microagent import Microagent, Settings
from microagent.compiler.overrides import Overrides
from microagent.kit.guestkit import GuestKit
from testenv import standin

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 300.0
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
