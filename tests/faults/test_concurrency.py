"""Concurrency campaigns (issue 16 item 3, second bullet), the real CLI as parallel processes on
one ``MICROAGENT_HOME`` with the fake VM backend:

- 8 ``create``s of one spec at once under different names: each step is built exactly once
  (the setup boots of all 8 add up to the number of setup steps), all 8 workspaces usable;
- 4 workspaces running at once while ``status``, ``exec`` and ``cp`` run against them (``cp``
  into a running one is refused cleanly; into a stopped one it works), then halted together;
- ``cache prune --all`` racing a ``create`` (a cold build and a cache hit): the create succeeds
  and its workspace is whole: prune never removes what the create uses.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from faultkit import Cli, Done, Process, stop_strays, stray_processes, verify_store

from testenv.agent_standin import standin_argv
from testenv.fakeguest import root_images, setup_markers

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")

SETUP = ["mkdir -p /workspace", "echo one > /workspace/one", "echo two > /workspace/two"]
SPEC = (
    "name: ws\n"
    "image: oci:layout:latest\n"
    f"setup: {json.dumps(SETUP)}\n"
    "files: [{src: note.txt, dst: /app/note.txt}]\n"
    "entrypoint: sleep 1000\n"
)
OTHER_SPEC = SPEC.replace(json.dumps(SETUP), json.dumps(["echo other > /root/other"]))  # base only
NAMES = [f"c{i}" for i in range(8)]


@pytest.fixture
def cli(busybox_project: Path, tmp_path: Path) -> Cli:
    (busybox_project / "note.txt").write_text("hello\n")
    (busybox_project / "microagent.yaml").write_text(SPEC)
    (busybox_project / "other.yaml").write_text(OTHER_SPEC)
    return Cli(tmp_path / "home", busybox_project)


def reproduce(test: str) -> str:
    return (
        f"MICROAGENT_FAULT_SCALE=full .venv/bin/pytest -q tests/faults/test_concurrency.py::{test}"
    )


def together(cli: Cli, calls: list[tuple[str, ...]], timeout: float = 300) -> list[Done]:
    """Start every call at once, then wait for all of them."""
    procs: list[Process] = [cli.spawn(*argv) for argv in calls]
    return [cli.finish(proc, timeout=timeout) for proc in procs]


class Findings:
    def __init__(self, tally: Any) -> None:
        self.tally = tally
        self.failures: list[str] = []

    def fail(self, column: str, what: str) -> None:
        setattr(self.tally, column, getattr(self.tally, column) + 1)
        self.failures.append(what)

    def check_store(self, cli: Cli, when: str) -> None:
        found = verify_store(cli)
        self.tally.leftover += len(found.leftover)
        for problem in found.corrupt:
            self.fail("corrupt", f"{when}: {problem} ({found.source})")

    def done(self, cli: Cli) -> None:
        self.tally.tracebacks = cli.tracebacks
        self.failures += cli.traceback_examples
        assert not self.failures, "\n".join(self.failures[:10])


def cp_round_trip(cli: Cli, names: list[str], tmp: Path, tag: str) -> dict[str, bytes]:
    """Copy a distinct file into each workspace at once; what each should hold."""
    sent = {}
    for name in names:
        data = f"{tag} {name} {random.random()}\n".encode()
        (tmp / f"{tag}-{name}").write_bytes(data)
        sent[name] = data
    calls = [("cp", str(tmp / f"{tag}-{n}"), f"{n}:/root/{tag}") for n in names]
    for done in together(cli, calls):
        assert done.code == 0, done.describe()
    return sent


def read_all(cli: Cli, sent: dict[str, bytes], tmp: Path, tag: str, found: Findings) -> None:
    calls = [("cp", f"{n}:/root/{tag}", str(tmp / f"back-{tag}-{n}")) for n in sent]
    for name, done in zip(sent, together(cli, calls), strict=True):
        back = tmp / f"back-{tag}-{name}"
        if done.code != 0 or back.read_bytes() != sent[name]:
            found.fail("lost", f"{name}:/root/{tag} did not read back: {done.describe()}")
        back.unlink(missing_ok=True)


# -- 8 creates of one spec at once, then 4 of them running with traffic ---------------------------


def test_eight_creates_at_once_then_four_running_with_traffic(
    cli: Cli, campaign: Any, scaled: Any, tmp_path: Path
) -> None:
    rounds = scaled(1, 3)
    creates = Findings(
        campaign(
            "8 concurrent creates of one spec",
            reproduce("test_eight_creates_at_once_then_four_running_with_traffic"),
        )
    )
    running = Findings(
        campaign(
            "4 running workspaces + cp/status/exec",
            reproduce("test_eight_creates_at_once_then_four_running_with_traffic"),
        )
    )
    for r in range(rounds):
        home = cli.with_home(cli.home / f"r{r}")
        eight_creates(home, creates, tmp_path)
        try:
            four_running(home, running, tmp_path, traffic=scaled(2, 10))
        finally:
            stop_strays(home.home)
    creates.tally.notes = f"{rounds} rounds of 8 parallel creates in a fresh home"
    running.tally.notes = f"{rounds} rounds; 4 running, 4 stopped workspaces"
    creates.done(cli)
    running.done(cli)


def eight_creates(cli: Cli, found: Findings, tmp: Path) -> None:
    results = together(cli, [("create", "-f", "microagent.yaml", "--name", n) for n in NAMES])
    found.tally.runs += len(results)
    found.tally.faults += 1  # one race of 8
    ok = [d.json() for d in results if d.code == 0]
    for done in results:
        if done.code != 0:
            found.fail("lost", f"a concurrent create failed: {done.describe()}")
    boots = sum(int(doc["setupBoots"]) for doc in ok)
    if boots != len(SETUP):
        found.fail("corrupt", f"{boots} setup boots for {len(SETUP)} setup steps (8 creates)")
    keys = {doc["rootfsKey"] for doc in ok}
    if len(keys) != 1:
        found.fail("corrupt", f"8 creates of one spec gave rootfs keys {keys}")
    for key in keys:
        if setup_markers(root_images(cli.home, key)) != sorted(SETUP):
            found.fail("corrupt", f"the rootfs of {key} lacks the setup content")
    found.check_store(cli, "after 8 creates")  # usable: 4 start next, 4 take cp traffic


def four_running(cli: Cli, found: Findings, tmp: Path, traffic: int) -> None:
    live, stopped = NAMES[:4], NAMES[4:]
    kept = cp_round_trip(cli, live, tmp, "kept")
    fake = json.dumps({"hang": True, "agent": standin_argv()})
    starts = [cli.spawn("start", n, env={"MICROAGENT_FAKE": fake}) for n in live]
    for name, proc in zip(live, starts, strict=True):
        done = cli.finish(proc)
        found.tally.runs += 1
        if done.code != 0:
            found.fail("stuck", f"start {name} failed: {done.describe()}")
    for i in range(traffic):
        traffic_round(cli, found, tmp, i, live=live, stopped=stopped)
    for done in together(cli, [("halt", n) for n in live]):
        found.tally.runs += 1
        if done.code != 0:
            found.fail("stuck", f"halt failed: {done.describe()}")
    for name in live:
        state = cli.ok("status", name)["event"]["state"]
        if state in ("starting", "running", "stopping"):
            found.fail("stuck", f"{name} is still {state} after halt")
    if stray_processes(cli.home):
        found.fail("stuck", f"processes left after halting all: {stray_processes(cli.home)}")
    read_all(cli, kept, tmp, "kept", found)
    found.check_store(cli, "after the running round")


def traffic_round(
    cli: Cli, found: Findings, tmp: Path, i: int, *, live: list[str], stopped: list[str]
) -> None:
    """status and exec on every running workspace, cp into a running one (refused) and into
    the stopped ones, all at once."""
    (tmp / "refused").write_text("never lands\n")
    calls = [("status", n) for n in live]
    calls += [("exec", n, "-w", "/tmp", "--", "sh", "-c", f"echo {n}-{i}") for n in live]
    calls += [("cp", str(tmp / "refused"), f"{live[i % 4]}:/root/refused")]
    calls += [("cp", str(tmp / "refused"), f"{n}:/root/t{i}") for n in stopped]
    results = together(cli, calls)
    found.tally.runs += len(results)
    found.tally.faults += 1  # one round of parallel traffic
    for name, done in zip(live, results[:4], strict=True):
        if done.code != 0 or done.json()["event"]["state"] != "running":
            found.fail("stuck", f"status {name} while running: {done.describe()}")
    for name, done in zip(live, results[4:8], strict=True):
        if done.code != 0 or done.json()["stdout"] != f"{name}-{i}\n":
            found.fail("lost", f"exec in {name}: {done.describe()}")
    refused = results[8]
    if refused.code == 0 or "running" not in refused.out + refused.err:
        found.fail("corrupt", f"cp into a running workspace was not refused: {refused.describe()}")
    for done in results[9:]:
        if done.code != 0:
            found.fail("lost", f"cp into a stopped workspace failed: {done.describe()}")


# -- cache prune racing create --------------------------------------------------------------------


def test_prune_racing_create_never_removes_what_create_uses(
    cli: Cli, campaign: Any, scaled: Any, tmp_path: Path
) -> None:
    found = Findings(
        campaign(
            "cache prune racing create",
            reproduce("test_prune_racing_create_never_removes_what_create_uses"),
        )
    )
    rounds = scaled(2, 20)
    cli.ok("create", "-f", "other.yaml", "--name", "bystander")  # its entries are in use
    kept = cp_round_trip(cli, ["bystander"], tmp_path, "kept")
    prunes = 0
    for r in range(rounds):
        cold = r % 2 == 0  # a cold build, then a cache hit of the same spec
        if cold:
            cli.run("delete", "-y", "ws")
            cli.run("cache", "prune", "--all", "-y")  # nothing cached but the bystander's
        else:
            cli.ok("delete", "-y", "ws")
        prunes += race(cli, found, f"round {r} ({'cold' if cold else 'cache hit'})", tmp_path)
    found.tally.faults = prunes
    found.check_store(cli, "after the races")
    read_all(cli, kept, tmp_path, "kept", found)
    images = root_images(cli.home, cli.ok("status", "bystander")["event"]["identity"]["rootfsKey"])
    if not all(image.is_file() for image in images):
        found.fail("lost", "prune removed the rootfs of the bystander workspace")
    found.tally.notes = f"{rounds} races (cold build and cache hit alternating), {prunes} prunes"
    found.done(cli)


def race(cli: Cli, found: Findings, what: str, tmp: Path) -> int:
    """One create while ``cache prune --all -y`` runs back to back; how many prunes ran."""
    create = cli.spawn("create", "-f", "microagent.yaml")
    prunes = 0
    while create.alive():
        done = cli.run("cache", "prune", "--all", "-y")
        prunes += 1
        if done.code != 0:
            found.fail("lost", f"{what}: prune failed: {done.describe()}")
    created = cli.finish(create)
    found.tally.runs += 1 + prunes
    if created.code != 0:
        found.fail("lost", f"{what}: create failed while prune ran: {created.describe()}")
        return prunes
    got = created.json()
    images = [Path(p) for p in (got["rootfs"], *got["rootfsLayers"])]  # what the workspace boots
    if not all(image.is_file() for image in images) or setup_markers(images) != sorted(SETUP):
        found.fail("lost", f"{what}: prune removed the rootfs the new workspace uses")
        return prunes
    tag = f"race{time.monotonic_ns()}"
    read_all(cli, cp_round_trip(cli, ["ws"], tmp, tag), tmp, tag, found)
    return prunes
