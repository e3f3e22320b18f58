"""State that heals with a real VM (issue 16 item 2): QEMU killed with SIGKILL is noticed by its
supervisor (``failed`` with the reason, the state disk checked before the next start); a
supervisor killed with SIGKILL in ``user`` network mode is reported ``failed`` and ``delete
--force`` leaves no process, no network namespace and no file behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import require_user_network

from microagent import Microagent, Settings, runner
from microagent.kit.guestkit import GuestKit
from microagent.runner import ProcessIdentity
from microagent.runtime import network
from microagent.workspace.records import Workspace
from testenv import standin

BOOT_TIMEOUT = 300.0


def until(check: Callable[[], bool], what: str, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def make(
    kit: GuestKit, layout: standin.BuiltImage, tmp_path: Path, mode: str
) -> tuple[Microagent, Workspace]:
    folder = tmp_path / "proj"
    folder.mkdir()
    shutil.copytree(layout.layout, folder / "layout")
    (folder / "microagent.yaml").write_text(
        "name: heal\nimage: oci:layout:latest\nprofile: tiny\n"
        f"network: {{mode: {mode}}}\nentrypoint: exec sleep 3600\n"
    )
    settings = Settings(home=tmp_path / "home", kernel=kit.kernel, initrd=kit.initrd)
    api = Microagent(settings)
    api.create(folder / "microagent.yaml")
    api.start("heal")
    ws = Workspace(settings.home / "workspaces" / "heal")
    until(lambda: api.status("heal")["readiness"]["guestReady"]["ready"] is True, "the guest")
    return api, ws


def test_qemu_killed_is_noticed_by_its_supervisor(
    kit: GuestKit, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    api, ws = make(kit, busybox_layout, tmp_path, "isolated")
    try:
        vmm = ws.run.vmm()
        supervisor = ProcessIdentity.from_json(ws.run.runtime()["supervisor"])
        assert vmm is not None and supervisor is not None
        os.kill(vmm.pid, signal.SIGKILL)
        until(lambda: api.status("heal")["event"]["state"] == "failed", "failed", 30)
        detail = api.status("heal")["event"]["detail"]
        assert detail.startswith("the VM stopped before the guest command finished"), detail
        until(lambda: not runner.is_running(supervisor), "the supervisor exits", 30)
        assert ws.run.runtime()["stateDiskDirty"] == "a VM that stopped without a clean shutdown"
        api.start("heal")
        fsck = [e for e in api.events("heal") if e["event"] == "fsck"]
        assert [e["detail"].rsplit(": ", 1)[0] for e in fsck] == [
            "state disk checked after a VM that stopped without a clean shutdown"
        ]
        assert api.halt("heal").value == "halted"
    finally:
        api.delete(["heal"], force=True)


def _holders(supervisor: int) -> list[int]:
    """A normal user's namespace holders among ``supervisor``'s children (runtime.network)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if fields and int(fields[1]) == supervisor and f"({network.HOLDER_COMMAND})" in stat:
            found.append(int(entry.name))
    return found


def _namespaces(supervisor: int) -> list[str]:
    """What holds ``supervisor``'s network namespace: its named namespaces (root) or the
    live holder processes it started (a normal user)."""
    if network.rootless():
        return [str(pid) for pid in _holders(supervisor)]
    prefix = f"{network.NETNS_PREFIX}{supervisor}-"
    return [p.name for p in network.NETNS_DIR.iterdir() if p.name.startswith(prefix)]


def test_supervisor_killed_in_user_mode_then_delete_force_leaves_nothing(
    kit: GuestKit, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    require_user_network()
    api, ws = make(kit, busybox_layout, tmp_path, "user")
    vmm = ws.run.vmm()
    supervisor = ProcessIdentity.from_json(ws.run.runtime()["supervisor"])
    assert vmm is not None and supervisor is not None
    held = _namespaces(supervisor.pid)
    assert held
    os.kill(supervisor.pid, signal.SIGKILL)
    until(lambda: not runner.is_running(supervisor), "the supervisor is gone", 30)
    status = api.status("heal")
    assert status["event"]["state"] == "failed"
    assert status["event"]["detail"].startswith("the supervisor process died unexpectedly")
    if network.rootless():  # the holder dies with its parent: nothing for delete to find
        until(lambda: not any(runner.pid_alive(int(p)) for p in held), "the holder goes", 10)
    else:
        left = _namespaces(supervisor.pid)
        assert left, "nobody tore its namespace down: delete --force must"
    api.delete(["heal"], force=True)
    assert not ws.root.exists()
    assert not runner.is_running(vmm)
    assert _namespaces(supervisor.pid) == []
    home = str(tmp_path / "home")
    named = [p for p in runner.processes() if any(home in w for w in runner.command_line(p))]
    assert named == []
    if not network.rootless():
        listed = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True)
        assert f"{network.NETNS_PREFIX}{supervisor.pid}-" not in listed.stdout
