"""Disk full (issue 16 item 3): MICROAGENT_HOME on a small tmpfs, filled to a few levels of
free space; ``create``, ``image pull``, ``build --push oci:DIR`` and ``cp`` (both ways) fail
with "no space left on device" saying where, about how much was needed and how much is free,
and what to free; they leave no partial entry (``cache verify`` clean, no temp file, no
workspace record, a state disk e2fsck finds clean); and after ``cache prune`` the same command
works.

The space that ``cache prune`` frees is an old, unused cache entry (a blob last used ten days
ago, pruned with ``--older-than 1d``), the way a real cache fills up.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from microagent.cli import main
from microagent.errors import HostIOError
from microagent.fsutil import TEMP_PREFIX, atomic_write, remove_any
from microagent.store.content import Store
from testenv import standin

if TYPE_CHECKING:
    from conftest import Tally  # tests/faults/conftest.py

pytestmark = [
    pytest.mark.root("mounting a small tmpfs as MICROAGENT_HOME"),
    pytest.mark.tools("mount", "umount", "mke2fs", "debugfs", "e2fsck"),
]

# the Reproduce column of docs/reliability.md
REPRODUCE = "MICROAGENT_FAULT_SCALE=full .venv/bin/pytest -q tests/faults/"


SMALL_MIB = 72
JUNK_MIB = 24  # the old cache entry that `cache prune` removes
DAY = 86_400
# Free bytes left when the command runs: from nothing to about what a create needs.
LEVELS = (0, 64 << 10, 700 << 10, 1536 << 10, 3 << 20, 6 << 20)
SPEC = 'name: ws\nimage: oci:layout:latest\nsetup: ["mkdir -p /workspace"]\n'


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A ``SMALL_MIB`` tmpfs at ``tmp_path/small``, unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_MIB}m,mode=0755", "tmpfs", str(mnt)],
        check=True,
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(mnt: Path, leave: int) -> None:
    """Make the file system hold only ``leave`` more bytes (a filler outside the store)."""
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    extra = _free(mnt) - leave
    if extra > 0:
        with filler.open("wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, extra)
    assert abs(_free(mnt) - leave) <= 64 << 10, (_free(mnt), leave)


def _add_junk(home: Path, rng: random.Random) -> None:
    """An old, unused cache entry: what `cache prune --older-than 1d` frees."""
    store = Store(home / "store")
    digest = store.put_blob_bytes(rng.randbytes(JUNK_MIB << 20))
    old = time.time() - 10 * DAY
    os.utime(store.blob_path(digest), (old, old))


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    capsys.readouterr()
    code = main(["--json", *args])
    out = capsys.readouterr()
    try:
        doc: dict[str, Any] = json.loads(out.out)
    except ValueError:
        doc = {"unparsable": out.out}
    return code, doc, out.err


# -- the commands ---------------------------------------------------------------------------


@dataclass
class Bench:
    mnt: Path
    project: Path
    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch
    busybox_ref: str  # in the local registry
    outside: Path  # a folder on another file system

    @property
    def home(self) -> Path:
        return self.mnt / "home"

    def cli(self, *args: str) -> tuple[int, dict[str, Any], str]:
        return _cli(self.capsys, *args)

    def spec(self) -> str:
        return str(self.project / "microagent.yaml")


@dataclass(frozen=True)
class Command:
    """One command to run on a full disk: how to get ready (with room), the argv, and the
    checks after a failure and after a success."""

    name: str
    prepare: Callable[[Bench], None]
    argv: Callable[[Bench], list[str]]
    after_failure: Callable[[Bench], list[str]]
    after_success: Callable[[Bench, dict[str, Any]], list[str]]


def _nothing(_b: Bench) -> None:
    return None


def _created(b: Bench) -> None:
    code, doc, err = b.cli("create", "-f", b.spec())
    assert code == 0, (doc, err)


def _built(b: Bench) -> None:
    code, doc, err = b.cli("build", "-f", b.spec())
    assert code == 0, (doc, err)


def _no_workspace(b: Bench) -> list[str]:
    code, doc, _ = b.cli("list")
    names = [w.get("name") for w in doc.get("workspaces", [])] if code == 0 else [doc]
    left = [p.name for p in (b.home / "workspaces").glob("*")] if code == 0 else []
    return [f"a failed create left a workspace: {names} {left}"] if names or left else []


def _workspace_ready(b: Bench, doc: dict[str, Any]) -> list[str]:
    problems = [] if doc.get("workspace") == "ws" else [f"created {doc}"]
    return problems + _state_disk_clean(b)


def _pulled(b: Bench, doc: dict[str, Any]) -> list[str]:
    return [] if str(doc.get("digest", "")).startswith("sha256:") else [f"pulled {doc}"]


def _no_base_entry(b: Bench) -> list[str]:
    rootfs = list((b.home / "store" / "rootfs").glob("*"))
    return [f"a failed pull left {rootfs}"] if rootfs else []


def _layout_clean(b: Bench) -> list[str]:
    """A failed push into oci:DIR leaves no half-written blob, and an index (if any) that
    names only blobs that are there, each with the right digest."""
    layout = b.mnt / "pushed"
    problems = [f"temp left in the layout: {p}" for p in layout.rglob(f"{TEMP_PREFIX}*")]
    problems += _layout_blobs_ok(layout)
    return problems


def _layout_blobs_ok(layout: Path) -> list[str]:
    import hashlib

    problems = []
    for blob in (layout / "blobs" / "sha256").glob("*"):
        if hashlib.sha256(blob.read_bytes()).hexdigest() != blob.name:
            problems.append(f"layout blob {blob.name} is not what its name says")
    index = layout / "index.json"
    if index.exists():
        for entry in json.loads(index.read_text()).get("manifests", []):
            if not (layout / "blobs" / "sha256" / entry["digest"][7:]).is_file():
                problems.append(f"the index names a missing manifest {entry['digest']}")
    return problems


def _pushed(b: Bench, doc: dict[str, Any]) -> list[str]:
    problems = _layout_clean(b)
    if not (b.mnt / "pushed" / "index.json").is_file() or not doc.get("published"):
        problems.append(f"nothing published: {doc}")
    return problems


def _big_file(b: Bench) -> Path:
    path = b.outside / "big"
    if not path.exists():
        path.write_bytes(random.Random(5).randbytes(6 << 20))
    return path


def _state_disk_clean(b: Bench) -> list[str]:
    state = b.home / "workspaces" / "ws" / "state.ext4"
    done = subprocess.run(
        ["e2fsck", "-fn", str(state)], check=False, capture_output=True, text=True
    )
    return [] if done.returncode == 0 else [f"state disk damaged: {done.stdout[-400:]}"]


def _copied_in_nothing(b: Bench) -> list[str]:
    problems = _state_disk_clean(b)
    code, _doc, _ = b.cli("cp", "ws:/big", str(b.outside / "back"))
    if code == 0:
        problems.append("a failed cp left a (partial) /big in the workspace")
    return problems


def _copied_in(b: Bench, doc: dict[str, Any]) -> list[str]:
    problems = _state_disk_clean(b)
    back = b.outside / "back"
    back.unlink(missing_ok=True)
    code, got, _ = b.cli("cp", "ws:/big", str(back))
    if code != 0 or back.read_bytes() != _big_file(b).read_bytes():
        problems.append(f"cp back of /big differs: {got}")
    return problems


def _copied_out_nothing(b: Bench) -> list[str]:
    left = [p.name for p in b.mnt.glob("*") if p.name not in ("home", "filler")]
    return [f"a failed cp left {left} on the host"] if left else []


def _copied_out(b: Bench, doc: dict[str, Any]) -> list[str]:
    out = b.mnt / "busybox"
    ok = out.is_file() and out.stat().st_size > 100_000
    return [] if ok else [f"cp out wrote {out.stat().st_size if out.exists() else None}"]


def _cp_in_argv(b: Bench) -> list[str]:
    return ["cp", str(_big_file(b)), "ws:/big"]


COMMANDS = [
    Command("create", _nothing, lambda b: ["create", "-f", b.spec()], _no_workspace,
            _workspace_ready),
    Command("image pull", _nothing, lambda b: ["image", "pull", b.busybox_ref], _no_base_entry,
            _pulled),
    Command("build --push oci:DIR", _built,
            lambda b: ["build", "-f", b.spec(), "--push", f"oci:{b.mnt / 'pushed'}"],
            _layout_clean, _pushed),
    Command("cp host->ws", _created, _cp_in_argv, _copied_in_nothing, _copied_in),
    Command("cp ws->host", _created, lambda b: ["cp", "ws:/bin/busybox", str(b.mnt)],
            _copied_out_nothing, _copied_out),
]  # fmt: skip


# -- what every run must end in -------------------------------------------------------------


@dataclass
class Outcome:
    command: str
    leave: int
    problems: list[str] = field(default_factory=list)
    failed: bool = False


def _clear_no_space(doc: dict[str, Any], err: str, home: Path) -> list[str]:
    error = doc.get("error") or {}
    message, hint = str(error.get("message", "")), str(error.get("hint", ""))
    problems = []
    if error.get("kind") != "io" or not message.startswith("no space left on device ("):
        problems.append(f"not a no-space error: {error or doc}")
    if "free " not in message:
        problems.append(f"does not say how much is free: {message}")
    if "cache prune" not in hint:
        problems.append(f"does not say what to free: {hint!r}")
    if "Traceback" in err or "internal error" in message:
        problems.append(f"traceback: {err[-400:]}")
    return problems


def _store_clean(b: Bench) -> list[str]:
    """``cache verify`` finds nothing wrong, and no temp file is left in the store (scratch
    folders under tmp/ included)."""
    store = b.home / "store"
    problems = [f"temp left: {p}" for p in store.rglob(f"{TEMP_PREFIX}*") if "locks" not in str(p)]
    code, doc, _ = b.cli("cache", "verify")
    if "checked" in doc:
        problems += [f"cache verify: {p}" for p in doc.get("problems", [])]
    elif (doc.get("error") or {}).get("kind") != "usage":  # (before `cache verify` landed)
        problems.append(f"cache verify answered {code} {doc}")
    return problems


def _run(b: Bench, command: Command, leave: int, rng: random.Random) -> Outcome:
    outcome = Outcome(command.name, leave)
    with contextlib.suppress(FileNotFoundError):
        (b.mnt / "filler").unlink()
    for path in (b.home, b.mnt / "pushed", b.mnt / "busybox"):
        remove_any(path)
    command.prepare(b)
    _add_junk(b.home, rng)
    _fill(b.mnt, leave)
    code, doc, err = b.cli(*command.argv(b))
    if code == 0:  # the space sufficed: then it must be right
        outcome.problems += [f"(with room) {p}" for p in command.after_success(b, doc)]
        return outcome
    outcome.failed = True
    outcome.problems += _clear_no_space(doc, err, b.home)
    outcome.problems += command.after_failure(b)
    outcome.problems += _store_clean(b)
    code, doc, err = b.cli("cache", "prune", "--older-than", "1d", "-y")
    if code != 0 or not doc.get("removed"):
        outcome.problems.append(f"cache prune freed nothing: {doc} {err[-300:]}")
    code, doc, err = b.cli(*command.argv(b))
    if code != 0:
        outcome.problems.append(f"after cache prune it still fails: {doc.get('error')}")
    else:
        outcome.problems += command.after_success(b, doc)
    return outcome


@pytest.fixture
def bench(
    *,
    small_fs: Path,
    busybox_project: Path,
    busybox_image: standin.PushedImage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Bench:
    (busybox_project / "microagent.yaml").write_text(SPEC)
    monkeypatch.setenv("MICROAGENT_HOME", str(small_fs / "home"))
    outside = tmp_path / "outside"
    outside.mkdir()
    return Bench(small_fs, busybox_project, capsys, monkeypatch, busybox_image.ref, outside)


def test_disk_full_is_a_clear_error_leaves_nothing_partial_and_prune_recovers(
    bench: Bench,
    scaled: Callable[[int, int], int],
    campaign: Callable[[str, str], Tally],
) -> None:
    tally = campaign(
        "disk-full",
        REPRODUCE + "test_disk_full.py::"
        "test_disk_full_is_a_clear_error_leaves_nothing_partial_and_prune_recovers",
    )
    began, tally.seed = time.monotonic(), 16_004
    rng = random.Random(tally.seed)
    levels = [LEVELS[i] for i in rng.sample(range(len(LEVELS)), scaled(1, len(LEVELS)))]
    outcomes = []
    for leave in levels:
        for command in COMMANDS:
            outcome = _run(bench, command, leave, rng)
            outcomes.append(outcome)
            tally.runs += 1
            tally.faults += outcome.failed
            tally.tracebacks += any("traceback" in p for p in outcome.problems)
            tally.corrupt += any("left" in p or "damaged" in p for p in outcome.problems)
            tally.lost += any("still fails" in p for p in outcome.problems)
    tally.seconds = round(time.monotonic() - began, 1)
    tally.notes = f"free space left: {', '.join(f'{v >> 10} KiB' for v in levels)}"
    problems = [
        f"{o.command} @ {o.leave >> 10} KiB free: {p}" for o in outcomes for p in o.problems
    ]
    assert not problems, "\n".join(problems)
    assert tally.faults >= tally.runs // 2, "the disk was not full enough to matter"


@pytest.mark.parametrize("leave", [0, 4096, 200 << 10])
def test_store_writes_on_a_full_disk_say_so_and_leave_no_temp(small_fs: Path, leave: int) -> None:
    """The store's own writes (a blob, a step record) at the library level: HostIOError with
    the figures, and no temp file, even when closing the temp fails too (its buffer cannot be
    flushed either)."""
    store = Store(small_fs / "store")
    store.put_blob_bytes(b"warm")  # the directories exist: only the data lacks room
    _fill(small_fs, leave)
    with pytest.raises(HostIOError, match=r"^no space left on device \(.*\): need ~1\.0 MiB, free"):
        store.put_blob_bytes(random.Random(1).randbytes(1 << 20))
    with pytest.raises(HostIOError, match="no space left on device") as caught:
        atomic_write(store.root / "keys.json", b"x" * (1 << 20))
    assert "cache prune" in caught.value.hint
    assert not list(small_fs.rglob(f"{TEMP_PREFIX}*"))
