"""Registry faults at scale (issue 16 item 3): randomized, seeded fault schedules injected by
``testenv.faultproxy`` in front of the real local registry, across ``image pull``, ``build
--push`` / ``--cache-to`` and ``create --cache-from``, all through the CLI.

Every run ends in one of two ways, never a third:

- success with exactly the right bytes: the digest the command reports is the image's, every
  blob in the store re-hashes to its name (``cache verify``), nothing half-written is left;
  after a push, every tag in the registry names the manifest a clean push publishes and every
  blob the registry holds on disk re-hashes to its digest;
- a clear error: a JSON error of the tree (registry / integrity), with a hint, no traceback,
  no partial entry in the store; running the command again without faults then works.

A schedule whose faults are all transient and few enough (at most ``attempts - 1`` of them)
must succeed: that is what retrying with back-off is for. ``MICROAGENT_FAULT_SEED`` replays a
campaign; ``MICROAGENT_FAULT_SCALE=full`` runs the large one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from microagent.cli import main
from microagent.compiler.refs import ImageRef
from microagent.fsutil import TEMP_PREFIX
from microagent.oci.registry import RegistryClient, RetryPolicy
from testenv import standin
from testenv.faultproxy import Fault, FaultKind, FaultProxy
from testenv.registry import RegistryHandle

if TYPE_CHECKING:
    from conftest import Tally  # tests/faults/conftest.py

pytestmark = pytest.mark.integration

# the Reproduce column of docs/reliability.md
REPRODUCE = "MICROAGENT_FAULT_SCALE=full .venv/bin/pytest -q tests/faults/"


ATTEMPTS = 4
SEED = int(os.environ.get("MICROAGENT_FAULT_SEED", "16003"))
TRANSIENT_STATUSES = (500, 502, 503, 504, 429)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's retry settings, with sub-second pauses and stalls (the campaign's clock)."""
    original = RetryPolicy.of.__func__  # type: ignore[attr-defined]

    def of(cls: type[RetryPolicy], settings: Any) -> RetryPolicy:
        policy = original(cls, settings)
        return dataclasses.replace(
            policy, attempts=ATTEMPTS, backoff=0.02, max_pause=0.5, read_timeout=0.4,
            min_rate=20_000, deadline=30.0,
        )  # fmt: skip

    monkeypatch.setattr(RetryPolicy, "of", classmethod(of))


# -- fault schedules -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    fault: Fault
    path: str
    method: str | None
    times: int | None
    transient: bool  # the client must ride it out (if it fires few enough times)

    def describe(self) -> str:
        f = self.fault
        detail = {
            FaultKind.STATUS: f"{f.status} retry-after={f.retry_after}",
            FaultKind.RESET: f"after={f.after}",
            FaultKind.TRUNCATE: f"after={f.after}",
            FaultKind.STALL: f"after={f.after}",
            FaultKind.TRICKLE: f"chunk={f.chunk}",
            FaultKind.LENGTH: f"delta={f.delta}",
            FaultKind.CORRUPT: f"at={f.after}",
        }.get(f.kind, "")
        return f"{f.kind.value}({detail}) {self.method or '*'} {self.path} x{self.times}"


_TRANSIENT: list[Callable[[random.Random], Fault]] = [  # the first three: any method
    lambda rng: Fault.error(rng.choice(TRANSIENT_STATUSES)),
    lambda rng: Fault.error(rng.choice(TRANSIENT_STATUSES), rng.choice(["0", "0.05", "0.2"])),
    lambda rng: Fault.reset(after=None),
    lambda rng: Fault.reset(after=rng.randrange(1, 400_000)),
    lambda rng: Fault.truncate(after=rng.randrange(0, 400_000)),
    lambda rng: Fault.stall(seconds=3.0, after=rng.randrange(0, 200_000)),
    lambda rng: Fault.wrong_length(rng.choice([1, 100, 5000])),  # announces more than it sends
    lambda rng: Fault.trickle(chunk=rng.choice([2048, 4096]), every=0.2),  # < min_rate: a stall
]


def _transient_fault(rng: random.Random, method: str | None) -> Fault:
    return rng.choice(_TRANSIENT if method in (None, "GET") else _TRANSIENT[:3])(rng)


def _fatal_fault(rng: random.Random, method: str | None) -> tuple[Fault, int | None]:
    """A fault no retry may hide: it fails the command, or (if it hits an answer without a
    body that matters) changes nothing."""
    choice = rng.randrange(6 if method in (None, "GET") else 3)
    if choice == 0:
        return Fault.error(rng.choice([400, 403, 404, 405])), None
    if choice == 1:
        return Fault.error(rng.choice(TRANSIENT_STATUSES)), None  # never recovers
    if choice == 2:
        return Fault.error(503, retry_after="3600"), 1  # asks for more than we wait
    if choice == 3:
        return Fault.corrupt(at=rng.randrange(0, 2000)), None
    if choice == 4:
        return Fault.wrong_length(rng.choice([-100, -1])), None
    return Fault.digest_header("sha256:" + hashlib.sha256(b"liar").hexdigest()), None


def schedule(rng: random.Random, paths: list[tuple[str, str | None]]) -> list[Planned]:
    """One to three faults; mostly transient ones firing a few times in all (which must be
    ridden out), sometimes one that cannot be."""
    planned: list[Planned] = []
    budget = ATTEMPTS - 1  # transient faults in all: no request can see more
    for _ in range(rng.randint(1, 3)):
        path, method = rng.choice(paths)
        if rng.random() < 0.25:
            fault, times = _fatal_fault(rng, method)
            planned.append(Planned(fault, path, method, times, transient=False))
        elif budget > 0:
            times = rng.randint(1, budget)
            budget -= times
            fault = _transient_fault(rng, method)
            planned.append(Planned(fault, path, method, times, transient=True))
    return planned


def _inject(proxy: FaultProxy, planned: list[Planned]) -> None:
    proxy.clear()
    for p in planned:
        proxy.inject(p.fault, p.path, method=p.method, times=p.times, skip=0)


def _must_succeed(planned: list[Planned]) -> bool:
    return all(p.transient for p in planned)


# -- what a run must end in --------------------------------------------------------------------


@dataclass
class Run:
    n: int
    planned: list[Planned]
    code: int
    doc: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    def where(self) -> str:
        return f"run {self.n} [{'; '.join(p.describe() for p in self.planned)}]"


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    capsys.readouterr()
    code = main(["--json", *args])
    out = capsys.readouterr()
    try:
        doc: dict[str, Any] = json.loads(out.out)
    except ValueError:
        doc = {"unparsable": out.out}
    return code, doc, out.err


def _clear_error(run: Run, err: str) -> None:
    """A failed run must say what failed and what to do, as a JSON error of the tree."""
    error = run.doc.get("error") or {}
    if run.code != 1 or error.get("kind") not in ("registry", "integrity", "not_found"):
        run.problems.append(f"exit {run.code}, error {error or run.doc}")
    if not error.get("hint"):
        run.problems.append(f"no hint: {error}")
    for bad in ("Traceback", "urllib3", "requests.exceptions", "internal error"):
        if bad in err or bad in json.dumps(error):
            run.problems.append(f"{bad!r} shown: {error} {err[-500:]}")


def _store_problems(store: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What ``cache verify`` (and a re-hash of every blob, and a look for temp files) finds."""
    problems = []
    code, doc, _err = _cli(capsys, "cache", "verify")
    if "checked" in doc:  # (cache verify landed: its contract, see the session notes)
        problems += [f"cache verify: {p}" for p in doc.get("problems", [])]
    elif code == 0 or (doc.get("error") or {}).get("kind") != "usage":
        problems.append(f"cache verify answered {code} {doc}")
    for blob in (store / "blobs" / "sha256").glob("*"):
        name = blob.name
        if not name.startswith(TEMP_PREFIX) and _sha_hex(blob.read_bytes()) != name:
            problems.append(f"blob {name} does not match its digest")
    temps = [p for p in store.rglob(f"{TEMP_PREFIX}*") if "tmp" not in p.relative_to(store).parts]
    problems += [f"temp left: {p}" for p in temps]
    return problems


def _sha_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _registry_blobs_ok(registry: RegistryHandle) -> list[str]:
    """Every blob the registry stores on disk re-hashes to the digest it is filed under."""
    bad = []
    root = registry.data_dir / "storage" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    for data in root.glob("*/*/data"):
        if hashlib.sha256(data.read_bytes()).hexdigest() != data.parent.name:
            bad.append(f"registry blob {data.parent.name} is corrupt")
    return bad


def _finish(
    run: Run, tally: Tally, ok: Callable[[], None], retry_clean: Callable[[], None]
) -> None:
    """Tally ``run``; on success check the bytes with ``ok``, on failure check that the same
    command works without faults (``retry_clean``)."""
    tally.runs += 1
    if run.code == 0:
        ok()
    elif _must_succeed(run.planned):
        run.problems.append(f"transient faults only, yet it failed: {run.doc.get('error')}")
    else:
        retry_clean()
    if any("Traceback" in p or "shown" in p for p in run.problems):
        tally.tracebacks += 1
    if run.problems:
        tally.corrupt += 1


def _report(runs: list[Run], tally: Tally, began: float) -> None:
    tally.seconds = round(time.monotonic() - began, 1)
    ok = sum(r.code == 0 for r in runs)
    tally.notes = f"{ok} succeeded with the right bytes, {len(runs) - ok} failed clearly"
    failed = [f"{r.where()}: {p}" for r in runs for p in r.problems]
    assert not failed, "\n".join(failed[:20])
    assert tally.tracebacks == 0 and tally.corrupt == 0
    outcomes = {code: sum(r.code == code for r in runs) for code in (0, 1)}
    assert outcomes[0] >= 1, outcomes
    if len(runs) >= 50:  # the full campaign reaches both sides (the CI one may not)
        assert outcomes[0] >= len(runs) // 3 and outcomes[1] >= 1, outcomes
    assert tally.faults >= len(runs), "most runs must see at least one fault fire"


# -- image pull --------------------------------------------------------------------------------

PULL_PATHS = [("/manifests/", "GET"), ("/manifests/", None), ("/blobs/", "GET"), ("/blobs/", None)]


def test_pull_campaign(
    *,
    busybox_image: standin.PushedImage,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    scaled: Callable[[int, int], int],
    campaign: Callable[[str, str], Tally],
) -> None:
    tally = campaign(
        "registry-faults/pull", REPRODUCE + "test_registry_campaign.py::test_pull_campaign"
    )
    began, tally.seed = time.monotonic(), SEED
    rng = random.Random(tally.seed)
    ref = f"{fault_proxy.host}/{busybox_image.repository}:{busybox_image.tag}"
    runs = []
    for n in range(scaled(12, 300)):
        home = tmp_path / f"home-{n}"
        monkeypatch.setenv("MICROAGENT_HOME", str(home))
        planned = schedule(rng, PULL_PATHS)
        _inject(fault_proxy, planned)
        code, doc, err = _cli(capsys, "image", "pull", ref)
        run = Run(n, planned, code, doc)
        tally.faults += len(fault_proxy.injected())
        store = home / "store"

        def ok(run: Run = run, store: Path = store) -> None:
            if run.doc.get("digest") != busybox_image.digest:
                run.problems.append(f"pulled {run.doc.get('digest')}, not the image")
            run.problems.extend(_store_problems(store, capsys))

        def retry_clean(run: Run = run, store: Path = store, err: str = err) -> None:
            _clear_error(run, err)
            if list(store.glob("rootfs/*")) or list(store.glob("keys/*")):
                run.problems.append("a failed pull left a step record or a rootfs")
            run.problems.extend(_store_problems(store, capsys))
            fault_proxy.clear()
            again, doc, _ = _cli(capsys, "image", "pull", ref)
            if again != 0 or doc.get("digest") != busybox_image.digest:
                run.problems.append(f"without faults the pull still fails: {doc}")

        _finish(run, tally, ok, retry_clean)
        runs.append(run)
    _report(runs, tally, began)


# -- build --push and --cache-to ------------------------------------------------------------------

PUSH_PATHS = [
    ("/blobs/uploads/", "POST"), ("/blobs/uploads/.+", "PATCH"), ("/blobs/uploads/.+", "PUT"),
    ("/blobs/sha256:", "HEAD"), ("/manifests/", "PUT"), ("/manifests/", "HEAD"), ("/v2/", None),
]  # fmt: skip
SPEC = (
    "name: ws\nimage: oci:layout:latest\n"
    'setup: ["mkdir -p /workspace", "echo one > /workspace/one"]\n'
)


@dataclass
class Project:
    spec: str
    home: Path
    reference: dict[str, str]  # tag -> manifest digest of a clean push
    rootfs_key: str


@pytest.fixture
def project(
    busybox_project: Path,
    registry: RegistryHandle,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Project:
    """The busybox project built once and pushed cleanly to ``campaign/ref-<test>``: what
    every faulty push must publish, and what every restore restores."""
    spec = busybox_project / "microagent.yaml"
    spec.write_text(SPEC)
    home = tmp_path / "home"
    monkeypatch.setenv("MICROAGENT_HOME", str(home))
    repo = f"campaign/ref-{tmp_path.name.lower().replace('_', '-')}"
    code, built, err = _cli(capsys, "build", "-f", str(spec), "--push", f"{registry.host}/{repo}")
    assert code == 0, (built, err)
    reference = _registry_tags(registry, repo)
    assert reference, "the clean push published nothing"
    return Project(str(spec), home, reference, built["rootfsKey"])


def _registry_tags(registry: RegistryHandle, repo: str) -> dict[str, str]:
    """tag -> manifest digest in ``repo``, read straight from the registry (no proxy), each
    manifest and every blob it names fetched and verified."""
    client = RegistryClient()
    ref = ImageRef(registry.host, repo)
    out = {}
    for tag in _tags_http(registry, repo):
        fetched = client.manifest(ref, tag)  # digest-verified against the registry's header
        out[tag] = fetched.digest
        doc = fetched.document()
        for desc in [doc.get("config"), *(doc.get("layers") or []), *(doc.get("manifests") or [])]:
            if isinstance(desc, dict) and "manifests" not in doc:
                with client.blob(ref, desc["digest"]) as stream:
                    data = stream.read()
                got = "sha256:" + hashlib.sha256(data).hexdigest()
                assert got == desc["digest"] and len(data) == desc["size"], (tag, desc)
    return out


def _tags_http(registry: RegistryHandle, repo: str) -> list[str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{registry.url}/v2/{repo}/tags/list", timeout=10) as answer:
            return list(json.loads(answer.read()).get("tags") or [])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise


def test_push_campaign(
    *,
    project: Project,
    registry: RegistryHandle,
    fault_proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    scaled: Callable[[int, int], int],
    campaign: Callable[[str, str], Tally],
) -> None:
    tally = campaign(
        "registry-faults/push", REPRODUCE + "test_registry_campaign.py::test_push_campaign"
    )
    began, tally.seed = time.monotonic(), SEED + 1
    rng = random.Random(tally.seed)
    monkeypatch.setenv("MICROAGENT_HOME", str(project.home))  # built: only the push remains
    runs = []
    for n in range(scaled(6, 150)):
        repo = f"campaign/push-{SEED}-{n}"
        target = f"{fault_proxy.host}/{repo}"
        how = rng.choice(["--push", "--cache-to"])
        planned = schedule(rng, PUSH_PATHS)
        _inject(fault_proxy, planned)
        code, doc, err = _cli(capsys, "build", "-f", project.spec, how, target)
        run = Run(n, planned, code, doc)
        tally.faults += len(fault_proxy.injected())

        def check_registry(run: Run = run, repo: str = repo, how: str = how) -> None:
            try:
                tags = _registry_tags(registry, repo)
            except AssertionError as exc:
                run.problems.append(f"the registry serves a wrong blob: {exc}")
                return
            for tag, digest in tags.items():
                if project.reference.get(tag, digest) != digest:
                    run.problems.append(f"tag {tag} names {digest}, not the built manifest")
            if run.code == 0 and how == "--push" and set(tags) != set(project.reference):
                run.problems.append(f"pushed tags {sorted(tags)}, expected all of them")
            if run.code == 0 and not tags:
                run.problems.append("a push that succeeded published nothing")

        def ok(run: Run = run) -> None:
            check_registry()
            run.problems.extend(_store_problems(project.home / "store", capsys))

        def retry_clean(run: Run = run, target: str = target, how: str = how, err: str = err):
            _clear_error(run, err)
            check_registry()
            fault_proxy.clear()
            again, doc, _ = _cli(capsys, "build", "-f", project.spec, how, target)
            if again != 0:
                run.problems.append(f"without faults the push still fails: {doc}")
            check_registry(dataclasses.replace(run, code=again))

        _finish(run, tally, ok, retry_clean)
        run.problems.extend(_registry_blobs_ok(registry))
        runs.append(run)
    _report(runs, tally, began)


# -- create --cache-from ------------------------------------------------------------------------

RESTORE_PATHS = [("/manifests/", "GET"), ("/manifests/", None), ("/blobs/", "GET")]


def test_restore_campaign(
    *,
    project: Project,
    registry: RegistryHandle,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    scaled: Callable[[int, int], int],
    campaign: Callable[[str, str], Tally],
) -> None:
    tally = campaign(
        "registry-faults/restore", REPRODUCE + "test_registry_campaign.py::test_restore_campaign"
    )
    began, tally.seed = time.monotonic(), SEED + 2
    rng = random.Random(tally.seed)
    repo = next(iter(_repos_of(project)))
    cache = f"{fault_proxy.host}/{repo}"
    runs = []
    for n in range(scaled(6, 150)):
        home = tmp_path / f"machine-b-{n}"
        monkeypatch.setenv("MICROAGENT_HOME", str(home))
        planned = schedule(rng, RESTORE_PATHS)
        _inject(fault_proxy, planned)
        code, doc, err = _cli(capsys, "create", "-f", project.spec, "--cache-from", cache)
        run = Run(n, planned, code, doc)
        tally.faults += len(fault_proxy.injected())
        store = home / "store"

        def ok(run: Run = run, store: Path = store) -> None:
            if run.doc.get("rootfsKey") != project.rootfs_key:
                run.problems.append(f"restored {run.doc.get('rootfsKey')}, not the built key")
            warnings = (run.doc.get("remote") or {}).get("warnings") or []
            told = warnings or _says_not_found(run.planned)  # a 404: a miss, said as one
            if run.doc.get("setupBoots") != 0 and (_must_succeed(run.planned) or not told):
                # an unreachable cache is a warning and a local build, never a silent one
                run.problems.append(f"booted setup VMs instead of restoring: {warnings}")
            run.problems.extend(_store_problems(store, capsys))

        def retry_clean(run: Run = run, store: Path = store, err: str = err) -> None:
            _clear_error(run, err)
            hexd = project.rootfs_key.removeprefix("sha256:")
            if (store / "keys" / f"{hexd}.json").exists() or (
                store / "rootfs" / f"{hexd}.ext4"
            ).exists():
                run.problems.append("a failed restore published the step")
            run.problems.extend(_store_problems(store, capsys))
            fault_proxy.clear()
            again, doc, _ = _cli(capsys, "create", "-f", project.spec, "--cache-from", cache)
            if again != 0 or doc.get("rootfsKey") != project.rootfs_key:
                run.problems.append(f"without faults the restore still fails: {doc}")

        _finish(run, tally, ok, retry_clean)
        runs.append(run)
    _report(runs, tally, began)


def _says_not_found(planned: list[Planned]) -> bool:
    """Whether the cache's manifests were answered 404: the cache does not have the step."""
    return any(
        p.fault.kind is FaultKind.STATUS and p.fault.status == 404 and "manifests" in p.path
        for p in planned
    )


def _repos_of(project: Project) -> Iterator[str]:
    yield f"campaign/ref-{project.home.parent.name.lower().replace('_', '-')}"
