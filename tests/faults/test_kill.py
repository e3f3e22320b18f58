"""kill -9 campaigns (issue 16 item 3, first bullet): SIGKILL the real CLI, as a process group,
at random points of ``create`` (pull, setup boot, layer export, rootfs build, record write,
workspace install), ``build --push``, ``create --cache-from``, ``cp`` in and out, and
``start``/``halt``. After every kill:

- ``cache verify --json`` finds nothing corrupt (temp files and locks the killed writer left
  are *leftovers*: never served, collected by the next writer or garbage collection);
- no workspace is stuck (a live state with no live supervisor, or a VMM nobody owns);
- the same command run again succeeds with the result of an uninterrupted run (the same
  rootfs key and setup content, the same pushed manifest, the same file bytes);
- nothing written before is lost (a file kept in the workspace, the host file ``cp`` wrote).

Kills land either when a progress marker appears in the store (a blob, a temp of a root
filesystem or record, the n-th step record, the workspace's staging folder) or after a random
delay within the uninterrupted run's duration. Seeded (``MICROAGENT_FAULT_SEED``, printed and
recorded). The fake VM backend boots nothing but writes real files, so layers have content.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faultkit import Cli, Findings, kill_when, stop_strays, stray_processes, verify_store

from testenv.fakeguest import root_images, setup_markers
from testenv.registry import RegistryHandle

pytestmark = pytest.mark.tools("docker-registry", "skopeo", "mke2fs", "debugfs", "e2fsck")

SETUP = ["mkdir -p /workspace", "echo one > /workspace/one"]  # two boots, three records
SPEC = (
    "name: ws\n"
    "image: oci:layout:latest\n"
    f"setup: {json.dumps(SETUP)}\n"
    "files: [{src: note.txt, dst: /app/note.txt}]\n"
    "entrypoint: sleep 1000\n"
    "outputs: [{name: result, path: /workspace/result.json}]\n"
)
DEFAULT_SEED = 16_3
HANG = {"hang": True, "process": ["sleep", "600"]}  # a stand-in VMM process while running
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)

Marker = Callable[[], bool]


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("MICROAGENT_FAULT_SEED", DEFAULT_SEED))
    print(f"MICROAGENT_FAULT_SEED={value}")
    return value


@pytest.fixture
def project(busybox_project: Path) -> Path:
    (busybox_project / "note.txt").write_text("hello\n")
    (busybox_project / "microagent.yaml").write_text(SPEC)
    return busybox_project


@pytest.fixture
def cli(project: Path, tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home", project)


@dataclass
class Kills:
    """One campaign's bookkeeping around a :class:`Tally`: the failures it found (asserted
    empty at the end) and how the kills were placed."""

    tally: Any  # conftest.Tally
    rng: random.Random
    failures: list[str] = field(default_factory=list)
    placed: dict[str, int] = field(default_factory=dict)
    leftovers_after_rerun: int = 0
    thorough: bool = False
    staging: int = 0  # workspace staging folders (workspaces/.tmp-*) a killed create left

    def check_store(self, cli: Cli, when: str) -> Findings:
        found = verify_store(cli)
        self.tally.corrupt += len(found.corrupt)
        if found.corrupt:
            self.failures.append(f"{when}: corrupt entries {found.corrupt} ({found.source})")
        return found

    def after_kill(self, cli: Cli, when: str) -> None:
        self.tally.leftover += len(self.check_store(cli, when).leftover)
        self.staging += sum(1 for _ in (cli.home / "workspaces").glob(".tmp-*"))

    def after_rerun(self, cli: Cli, when: str, *, last: bool = False) -> None:
        """The store after the re-run: every time at full scale, at the end at CI scale."""
        if self.thorough or last:
            self.leftovers_after_rerun += len(self.check_store(cli, when).leftover)

    def lost(self, what: str) -> None:
        self.tally.lost += 1
        self.failures.append(what)

    def stuck(self, what: str) -> None:
        self.tally.stuck += 1
        self.failures.append(what)

    def kill(self, proc: Any, label: str, *, delay: float, marker: Marker | None) -> bool:
        killed = kill_when(proc, delay=delay, marker=marker)
        self.tally.runs += 1
        if killed:
            self.tally.faults += 1
            self.placed[label] = self.placed.get(label, 0) + 1
        return killed

    def finish(self, cli: Cli) -> None:
        self.tally.tracebacks = cli.tracebacks
        source = "microagent cache verify --json"
        where = ", ".join(f"{k}: {v}" for k, v in sorted(self.placed.items()))
        self.tally.notes = (
            f"seed {self.tally.seed}; kills at {where}; verify by {source}; "
            f"{self.tally.leftover} leftovers after the kills, "
            f"{self.leftovers_after_rerun} after the re-runs; "
            f"{self.staging} workspace staging folders left"
        )
        self.tally.leftover += self.staging
        self.failures += cli.traceback_examples
        assert not self.failures, "\n".join(self.failures[:10])


def glob_count(root: Path, pattern: str, count: int = 1) -> Marker:
    return lambda: sum(1 for _ in root.glob(pattern)) >= count


def store_markers(home: Path) -> dict[str, Marker]:
    """Where a create/build is, seen from its store: pull, setup records, layer export,
    root filesystem builds, record writes and the workspace's staging folder."""
    store = home / "store"
    return {
        "pull (first blob)": glob_count(store / "blobs/sha256", "[0-9a-f]*"),
        "blob temp (pull or layer export)": glob_count(store / "blobs/sha256", ".tmp-*"),
        "rootfs build (temp)": glob_count(store / "rootfs", ".tmp-*"),
        "base recorded": glob_count(store / "keys", "[0-9a-f]*.json", 1),
        "record temp": glob_count(store / "keys", ".tmp-*"),
        "setup step 1 recorded": glob_count(store / "keys", "[0-9a-f]*.json", 2),
        "2nd rootfs built": glob_count(store / "rootfs", "[0-9a-f]*.ext4", 2),
        "last step recorded": glob_count(store / "keys", "[0-9a-f]*.json", 3),
        "workspace staging": glob_count(home / "workspaces", ".tmp-*"),
    }


def placement(
    kills: Kills, i: int, markers: dict[str, Marker], ref: float
) -> tuple[str, Marker | None, float]:
    """Even runs: the next store marker (deadline 2x the reference run); odd: a random delay."""
    if markers and i % 2 == 0:
        name = list(markers)[(i // 2) % len(markers)]
        return name, markers[name], 2 * ref + 1
    delay = kills.rng.uniform(0.02, max(ref, 0.1))
    return f"random delay ({_bucket(delay, ref)})", None, delay


def _bucket(delay: float, ref: float) -> str:
    third = int(3 * delay / max(ref, 0.1))
    return ("first third", "middle third", "last third", "after")[min(third, 3)]


def campaign_kills(
    campaign: Callable[[str, str], Any], name: str, command: str, seed: int
) -> Kills:
    tally = campaign(name, command)
    tally.seed = seed
    return Kills(tally, random.Random(f"{seed}:{name}"), thorough=tally.scale == "full")


def reproduce(test: str) -> str:
    return f"MICROAGENT_FAULT_SCALE=full .venv/bin/pytest -q tests/faults/test_kill.py::{test}"


def check_created(
    kills: Kills, cli: Cli, done: Any, ref_key: str, what: str, *, boots: int | None = None
) -> None:
    if done.code != 0:
        kills.lost(f"{what}: the re-run failed: {done.describe()}")
        return
    got = done.json()
    if got["rootfsKey"] != ref_key:
        kills.lost(f"{what}: rootfs key {got['rootfsKey']} != {ref_key}")
    if boots is not None and got["setupBoots"] != boots:
        kills.lost(f"{what}: {got['setupBoots']} setup boots, expected {boots}")
    markers = setup_markers(root_images(cli.home, ref_key))
    if markers != sorted(SETUP):
        kills.lost(f"{what}: the rootfs holds setup markers {markers}")


def remove_installed(kills: Kills, cli: Cli, ref_key: str, what: str) -> None:
    """A kill after the workspace was installed: it must be whole; then it goes, so the same
    command line runs again."""
    if not (cli.home / "workspaces" / "ws" / "workspace.json").exists():
        return
    status = cli.run("status", "ws")
    if status.code != 0:
        kills.lost(f"{what}: status of the installed workspace failed: {status.describe()}")
        return
    event = status.json()["event"]
    if event["identity"]["rootfsKey"] != ref_key or event["state"] != "prepared":
        kills.lost(f"{what}: a workspace installed by the killed run is wrong: {event}")
    cli.ok("delete", "-y", "ws")


# -- create ---------------------------------------------------------------------------------------


def test_kill_create(cli: Cli, campaign: Any, scaled: Any, seed: int) -> None:
    kills = campaign_kills(campaign, "kill -9 create", reproduce("test_kill_create"), seed)
    ref = cli.with_home(cli.home / "ref").run("create", "-f", "microagent.yaml")
    assert ref.code == 0, ref.describe()
    ref_key = ref.json()["rootfsKey"]
    target = scaled(5, 50)
    for i in range(3 * target):
        if kills.tally.faults >= target:
            break
        home = cli.with_home(cli.home / f"k{i}")
        label, marker, delay = placement(kills, i, store_markers(home.home), ref.seconds)
        proc = home.spawn("create", "-f", "microagent.yaml")
        if not kills.kill(proc, label, delay=delay, marker=marker):
            continue
        what = f"create kill {i} at {label}"
        kills.after_kill(home, what)
        remove_installed(kills, home, ref_key, what)
        rerun = home.run("create", "-f", "microagent.yaml")
        kills.tally.runs += 1
        check_created(kills, home, rerun, ref_key, what)
        kills.after_rerun(home, what, last=kills.tally.faults >= target)
    assert kills.tally.faults >= target, f"only {kills.tally.faults} kills landed"
    staging_is_collected(kills, cli)
    kills.finish(cli)


def staging_is_collected(kills: Kills, cli: Cli) -> None:
    """The staging folders killed creates left go with the next create once they are a
    minute old (aged here); a live create's (locked) stays."""
    left = sorted(cli.home.glob("k*/workspaces/.tmp-*"))
    if not left:
        return
    home = cli.with_home(left[0].parents[1])
    old = time.time() - 120
    for path in home.home.glob("workspaces/.tmp-*"):
        os.utime(path, (old, old))
    home.ok("create", "-f", "microagent.yaml", "--name", "after")
    remaining = sorted(p.name for p in home.home.glob("workspaces/.tmp-*"))
    if remaining:
        kills.failures.append(f"staging folders of killed creates not collected: {remaining}")


# -- build --push and create --cache-from ---------------------------------------------------------


def registry_get(url: str, *, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers={"Accept": MANIFEST_TYPES})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), b""


def pushed_manifest(registry: RegistryHandle, repo: str, tag: str) -> int | None:
    """How many layers the image ``repo:tag`` has, after checking every blob it needs is
    there (None: no such manifest, or a blob is missing). Digests differ from build to build:
    a setup layer holds the files the step wrote, with their times."""
    status, _headers, body = registry_get(f"{registry.url}/v2/{repo}/manifests/{tag}")
    if status != 200:
        return None
    manifest = json.loads(body)
    blobs = [manifest["config"], *manifest.get("layers", ())]
    for blob in blobs:
        code, _h, _b = registry_get(
            f"{registry.url}/v2/{repo}/blobs/{blob['digest']}", method="HEAD"
        )
        if code != 200:
            return None
    return len(manifest.get("layers", ()))


def test_kill_build_push(
    cli: Cli, campaign: Any, scaled: Any, seed: int, registry: RegistryHandle
) -> None:
    """Some kills in a fresh home (anywhere in the build or the push), the rest in a home
    whose build is cached (so they land in the push itself: blobs, step tags, the image)."""
    kills = campaign_kills(
        campaign, "kill -9 build --push", reproduce("test_kill_build_push"), seed
    )
    shared = cli.with_home(cli.home / "shared")
    ref = shared.run("build", "-f", "microagent.yaml", "--push", f"{registry.host}/kill/ref:v1")
    assert ref.code == 0, ref.describe()
    ref_layers = pushed_manifest(registry, "kill/ref", "v1")
    assert ref_layers, "the reference push left no manifest"
    ref_tags = ref.json()["published"][0]["tags"]
    push_only = shared.ok(
        "build", "-f", "microagent.yaml", "--push", f"{registry.host}/kill/ref2:v1"
    )
    target = scaled(4, 40)
    for i in range(3 * target):
        if kills.tally.faults >= target:
            break
        fresh = i % (2 if kills.thorough else 4) == 0
        home = cli.with_home(cli.home / f"k{i}") if fresh else shared
        repo = f"kill/push-{seed}-{i}"
        argv = ("build", "-f", "microagent.yaml", "--push", f"{registry.host}/{repo}:v1")
        if fresh:
            label, marker, delay = placement(kills, i, store_markers(home.home), ref.seconds)
        else:
            seconds = float(push_only["published"][0]["seconds"]) + 0.5
            label, marker, delay = placement(kills, 1, {}, seconds)
            label = f"push only, {label}"
        if not kills.kill(home.spawn(*argv), label, delay=delay, marker=marker):
            continue
        what = f"build --push kill {i} at {label}"
        kills.after_kill(home, what)
        rerun = home.run(*argv)
        kills.tally.runs += 1
        if rerun.code != 0:
            kills.lost(f"{what}: the re-run failed: {rerun.describe()}")
        elif (got := pushed_manifest(registry, repo, "v1")) != ref_layers:
            kills.lost(f"{what}: pushed {got} layers, the uninterrupted push {ref_layers}")
        elif (tags := rerun.json()["published"][0]["tags"])[:-1] != ref_tags[:-1]:
            kills.lost(f"{what}: pushed tags {tags}, the uninterrupted push {ref_tags}")
        kills.after_rerun(home, what, last=kills.tally.faults >= target)
    assert kills.tally.faults >= target, f"only {kills.tally.faults} kills landed"
    kills.finish(cli)


def test_kill_create_cache_from(
    cli: Cli, campaign: Any, scaled: Any, seed: int, registry: RegistryHandle
) -> None:
    kills = campaign_kills(
        campaign, "kill -9 create --cache-from", reproduce("test_kill_create_cache_from"), seed
    )
    repo = f"{registry.host}/kill/cache-from-{seed}"
    built = cli.with_home(cli.home / "builder").ok(
        "build", "-f", "microagent.yaml", "--push", f"{repo}:v1"
    )
    argv = ("create", "-f", "microagent.yaml", "--cache-from", repo)
    ref = cli.with_home(cli.home / "ref").run(*argv)
    assert ref.code == 0 and ref.json()["setupBoots"] == 0, ref.describe()
    ref_key = built["rootfsKey"]
    target = scaled(4, 40)
    for i in range(3 * target):
        if kills.tally.faults >= target:
            break
        home = cli.with_home(cli.home / f"k{i}")
        markers = store_markers(home.home)
        label, marker, delay = placement(kills, i, markers, ref.seconds)
        if not kills.kill(home.spawn(*argv), label, delay=delay, marker=marker):
            continue
        what = f"create --cache-from kill {i} at {label}"
        kills.after_kill(home, what)
        remove_installed(kills, home, ref_key, what)
        rerun = home.run(*argv)
        kills.tally.runs += 1
        check_created(kills, home, rerun, ref_key, what, boots=0)
        kills.after_rerun(home, what, last=kills.tally.faults >= target)
    assert kills.tally.faults >= target, f"only {kills.tally.faults} kills landed"
    kills.finish(cli)


# -- cp in and out --------------------------------------------------------------------------------


def state_disk_clean(home: Path, name: str) -> bool:
    image = home / "workspaces" / name / "state.ext4"
    import subprocess

    return (
        subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, check=False).returncode
        == 0
    )


def read_back(kills: Kills, cli: Cli, guest: str, expected: bytes, *, what: str, tmp: Path) -> None:
    out = tmp / f"read-{time.monotonic_ns()}"
    done = cli.run("cp", f"ws:{guest}", str(out))
    if done.code != 0 or out.read_bytes() != expected:
        kills.lost(f"{what}: {guest} did not read back ({done.describe()})")
    out.unlink(missing_ok=True)


def test_kill_cp(cli: Cli, campaign: Any, scaled: Any, seed: int, tmp_path: Path) -> None:
    kills = campaign_kills(campaign, "kill -9 cp in/out", reproduce("test_kill_cp"), seed)
    cli.ok("create", "-f", "microagent.yaml")
    keep = kills.rng.randbytes(64 * 1024)
    (tmp_path / "keep").write_bytes(keep)
    cli.ok("cp", str(tmp_path / "keep"), "ws:/root/keep")
    payload = tmp_path / "payload"
    payload.write_bytes(kills.rng.randbytes(2 * 1024 * 1024))
    ref_in = cli.run("cp", str(payload), "ws:/root/payload")
    ref_out = cli.run("cp", "ws:/root/payload", str(tmp_path / "ref-out"))
    assert ref_in.code == 0 and ref_out.code == 0, ref_in.describe() + ref_out.describe()
    assert (tmp_path / "ref-out").read_bytes() == payload.read_bytes()
    target = scaled(4, 40)
    for i in range(3 * target):
        if kills.tally.faults >= target:
            break
        content = kills.rng.randbytes(kills.rng.randint(256, 2048) * 1024)
        payload.write_bytes(content)
        host_out = tmp_path / f"out-{i}"
        copy_in = i % 2 == 0
        argv = (
            (str(payload), "ws:/root/payload") if copy_in else ("ws:/root/payload", str(host_out))
        )
        if not copy_in:
            cli.ok("cp", str(payload), "ws:/root/payload")
        ref = ref_in if copy_in else ref_out
        delay = kills.rng.uniform(0.02, max(ref.seconds, 0.1))
        label = f"cp {'in' if copy_in else 'out'}, {_bucket(delay, ref.seconds)}"
        if not kills.kill(cli.spawn("cp", *argv), label, delay=delay, marker=None):
            continue
        what = f"cp kill {i} ({label})"
        if not copy_in and host_out.exists() and host_out.read_bytes() != content:
            kills.tally.corrupt += 1
            kills.failures.append(
                f"{what}: a torn host file {host_out} ({host_out.stat().st_size} bytes)"
            )
        kills.after_kill(cli, what)
        rerun = cli.run("cp", *argv)
        kills.tally.runs += 1
        if rerun.code != 0:
            kills.lost(f"{what}: the re-run failed: {rerun.describe()}")
        elif copy_in:
            read_back(kills, cli, "/root/payload", content, what=what, tmp=tmp_path)
        elif host_out.read_bytes() != content:
            kills.lost(f"{what}: cp out wrote other bytes")
        if kills.thorough:
            read_back(kills, cli, "/root/keep", keep, what=what, tmp=tmp_path)
        if not state_disk_clean(cli.home, "ws"):
            kills.tally.corrupt += 1
            kills.failures.append(f"{what}: the state disk is not clean after the re-run")
        kills.after_rerun(cli, what, last=kills.tally.faults >= target)
    read_back(kills, cli, "/root/keep", keep, what="after the campaign", tmp=tmp_path)
    assert kills.tally.faults >= target, f"only {kills.tally.faults} kills landed"
    kills.finish(cli)


# -- start / halt ---------------------------------------------------------------------------------


LIVE = ("starting", "running", "stopping")


def runtime_of(home: Path, name: str) -> dict[str, Any]:
    path = home / "workspaces" / name / "runtime" / "runtime.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def settle(kills: Kills, cli: Cli, what: str, timeout: float = 8.0) -> str:
    """The workspace's state once it is not live-without-a-supervisor; a state that stays so
    (or a VMM left with no supervisor) is a stuck workspace."""
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        done = cli.run("status", "ws")
        if done.code != 0:
            kills.stuck(f"{what}: status failed: {done.describe()}")
            return "?"
        state = done.json()["event"]["state"]
        if state not in LIVE or stray_processes(cli.home):
            return state
        time.sleep(0.1)
    kills.stuck(
        f"{what}: {state} with no supervisor for {timeout:.0f}s ({runtime_of(cli.home, 'ws')})"
    )
    return state


def kill_supervisor(home: Path) -> None:
    pid = runtime_of(home, "ws").get("supervisorPid")
    if isinstance(pid, int) and pid > 1:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            return


def test_kill_start_halt(cli: Cli, campaign: Any, scaled: Any, seed: int, tmp_path: Path) -> None:
    kills = campaign_kills(campaign, "kill -9 start/halt", reproduce("test_kill_start_halt"), seed)
    cli.ok("create", "-f", "microagent.yaml")
    cli.extra_env["MICROAGENT_FAKE"] = json.dumps(HANG)  # what start boots (not setup)
    keep = kills.rng.randbytes(32 * 1024)
    (tmp_path / "keep").write_bytes(keep)
    cli.ok("cp", str(tmp_path / "keep"), "ws:/root/keep")
    try:
        ref = {"start": cli.run("start", "ws"), "halt": cli.run("halt", "ws")}
        assert all(d.code == 0 for d in ref.values()), [d.describe() for d in ref.values()]
        run_start_halt(kills, cli, scaled(4, 40), ref, tmp_path=tmp_path, keep=keep)
    finally:
        stop_strays(cli.home)
    kills.finish(cli)


def run_start_halt(
    kills: Kills, cli: Cli, target: int, ref: dict[str, Any], *, tmp_path: Path, keep: bytes
) -> None:
    state = settle(kills, cli, "before the campaign")
    for i in range(4 * target):
        if kills.tally.faults >= target:
            break
        verb = "halt" if state in LIVE else "start"
        delay = kills.rng.uniform(0.02, max(ref[verb].seconds, 0.1))
        with_supervisor = i % 4 == 3  # now and then the supervisor dies too
        label = f"{verb}, {_bucket(delay, ref[verb].seconds)}" + (
            " + supervisor" if with_supervisor else ""
        )
        if not kills.kill(cli.spawn(verb, "ws"), label, delay=delay, marker=None):
            state = settle(kills, cli, f"{verb} {i}, not killed")
            continue
        if with_supervisor:
            kill_supervisor(cli.home)
        what = f"{verb} kill {i} ({label})"
        settle(kills, cli, what)
        rerun = cli.run(verb, "ws")
        kills.tally.runs += 1
        state = check_rerun(kills, cli, verb, rerun, what)
        if verb == "halt" and i % 3 == 0:
            read_back(kills, cli, "/root/keep", keep, what=what, tmp=tmp_path)
    cli.run("halt", "ws")
    read_back(kills, cli, "/root/keep", keep, what="after the campaign", tmp=tmp_path)


def check_rerun(kills: Kills, cli: Cli, verb: str, rerun: Any, what: str) -> str:
    """start: running again (or 'already running' when the killed start got that far);
    halt: exits 0 and leaves no live state and no VMM. The state it ends in."""
    state = settle(kills, cli, f"{what}, re-run")
    if verb == "start":
        already = rerun.code != 0 and "already" in rerun.out + rerun.err
        if (rerun.code != 0 and not already) or state != "running":
            kills.lost(f"{what}: the re-run did not get it running ({state}): {rerun.describe()}")
        return state
    if rerun.code != 0 or state in LIVE or stray_processes(cli.home):
        kills.stuck(
            f"{what}: halt again left {state}, strays {stray_processes(cli.home)}: "
            + rerun.describe()
        )
    return state
