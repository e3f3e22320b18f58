"""Content store: verified writes, step records, build-once publishing, pruning, crashes."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from microagent.digests import Digest, key_hex
from microagent.errors import BuildError, IntegrityError, InvalidInputError, NotFoundError
from microagent.fsutil import TEMP_PREFIX, flocked
from microagent.store.content import Store

HELLO = b"hello, store\n"
HELLO_HEX = hashlib.sha256(HELLO).hexdigest()
KEY = "a" * 64


def temps(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


# -- Digest ------------------------------------------------------------------------------------


def test_digest_parse_and_str() -> None:
    d = Digest.parse(f"sha256:{HELLO_HEX}")
    assert d == Digest("sha256", HELLO_HEX)
    assert str(d) == f"sha256:{HELLO_HEX}"
    assert Digest.of_bytes(HELLO) == d
    assert Digest.parse(d) is d
    assert Digest.parse("sha512:" + "0" * 128).algorithm == "sha512"


@pytest.mark.parametrize(
    "text",
    [
        HELLO_HEX,  # no algorithm
        "sha256:" + HELLO_HEX.upper(),
        "sha256:" + HELLO_HEX[:-1],
        "sha256:" + HELLO_HEX + "0",
        "sha256:" + "g" * 64,
        "md5:" + "0" * 32,
        "sha256:../../etc/passwd",
        "",
    ],
)
def test_digest_rejects_malformed(text: str) -> None:
    with pytest.raises(IntegrityError):
        Digest.parse(text)


def test_key_hex_accepts_prefixed_and_bare() -> None:
    assert key_hex(KEY) == key_hex(f"sha256:{KEY}") == KEY
    with pytest.raises(IntegrityError):
        key_hex("../x")


# -- blobs -------------------------------------------------------------------------------------


def test_put_blob_bytes_verifies_and_stores(store: Store) -> None:
    d = store.put_blob_bytes(HELLO, f"sha256:{HELLO_HEX}")
    assert d.hex == HELLO_HEX
    path = store.blob_path(d)
    assert path == store.root / "blobs" / "sha256" / HELLO_HEX
    assert path.read_bytes() == HELLO
    assert path.stat().st_mode & 0o777 == 0o444
    assert store.has_blob(d)
    with store.open_blob(str(d)) as fh:
        assert fh.read() == HELLO


def test_put_blob_file_from_path_and_stream(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = os.urandom(3 * 1024 * 1024 + 7)  # several chunks
    src.write_bytes(data)
    d1 = store.put_blob_file(src)
    d2 = store.put_blob_file(io.BytesIO(data), d1, expected_size=len(data))
    assert d1 == d2 == Digest.of_bytes(data)
    assert store.blob_path(d1).read_bytes() == data


def test_digest_mismatch_leaves_nothing(store: Store) -> None:
    wrong = Digest.of_bytes(b"something else")
    with pytest.raises(IntegrityError, match="digest mismatch"):
        store.put_blob_bytes(HELLO, wrong)
    assert not store.has_blob(wrong)
    assert not store.has_blob(Digest.of_bytes(HELLO))
    assert list((store.root / "blobs" / "sha256").iterdir()) == []


def test_size_mismatch_and_oversize_stream_leave_nothing(store: Store) -> None:
    d = Digest.of_bytes(HELLO)
    with pytest.raises(IntegrityError, match="bytes"):
        store.put_blob_file(io.BytesIO(HELLO), d, expected_size=len(HELLO) + 1)
    with pytest.raises(IntegrityError, match="larger"):
        store.put_blob_file(io.BytesIO(HELLO * 1000), None, expected_size=10)
    assert list((store.root / "blobs" / "sha256").iterdir()) == []


def test_existing_blob_is_not_rewritten(store: Store) -> None:
    d = store.put_blob_bytes(HELLO)
    inode = store.blob_path(d).stat().st_ino
    assert store.put_blob_bytes(HELLO) == d  # unknown digest: written to temp, not published
    assert store.put_blob_bytes(HELLO, d) == d  # known digest: short-circuit
    assert store.blob_path(d).stat().st_ino == inode
    assert temps(store.root / "blobs" / "sha256") == []


def test_open_missing_blob_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.open_blob(Digest.of_bytes(b"nope"))


def test_verify_blob_removes_corrupt_content(store: Store) -> None:
    d = store.put_blob_bytes(HELLO)
    store.verify_blob(d)
    path = store.blob_path(d)
    path.chmod(0o644)
    path.write_bytes(b"bit rot")
    with pytest.raises(IntegrityError, match="corrupt"):
        store.verify_blob(d)
    assert not store.has_blob(d)


# -- step records ------------------------------------------------------------------------------


def test_key_records_round_trip(store: Store) -> None:
    assert store.get_key(KEY) is None
    record = {"layer": f"sha256:{HELLO_HEX}", "parent": None, "n": 1}
    store.put_key(f"sha256:{KEY}", record)
    assert store.get_key(KEY) == record
    store.put_key(KEY, {"replaced": True})
    assert store.get_key(KEY) == {"replaced": True}
    assert store.key_path(KEY).name == f"{KEY}.json"
    assert temps(store.root / "keys") == []


@pytest.mark.parametrize("content", [b'{"layer": "sha2', b"", b"[1, 2]", b"\xff\xfe"])
def test_torn_or_foreign_record_is_a_miss(store: Store, content: bytes) -> None:
    store.put_key(KEY, {"ok": 1})
    store.key_path(KEY).write_bytes(content)
    assert store.get_key(KEY) is None


# -- build_once --------------------------------------------------------------------------------


def test_build_once_builds_then_reuses(store: Store) -> None:
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        tmp.write_text("image")

    p1 = store.build_once("rootfs/k.ext4", build)
    p2 = store.build_once("rootfs/k.ext4", build)
    assert p1 == p2 == store.root / "rootfs" / "k.ext4"
    assert p1.read_text() == "image"
    assert len(calls) == 1
    assert calls[0].parent == p1.parent and calls[0].name.startswith(TEMP_PREFIX)
    assert store.has_entry("rootfs/k.ext4")


def test_build_once_publishes_directories(store: Store) -> None:
    def build(tmp: Path) -> None:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "f").write_text("x")

    path = store.build_once("stage/abc", build)
    assert (path / "sub" / "f").read_text() == "x"


def test_failed_build_publishes_nothing(store: Store) -> None:
    def build(tmp: Path) -> None:
        tmp.write_text("half")
        raise BuildError("step failed")

    with pytest.raises(BuildError, match="step failed"):
        store.build_once("rootfs/k.ext4", build)
    assert not store.has_entry("rootfs/k.ext4")
    assert temps(store.root / "rootfs") == []
    with pytest.raises(BuildError, match="produced nothing"):
        store.build_once("rootfs/k.ext4", lambda tmp: None)


@pytest.mark.parametrize(
    "name",
    ["single", "../x/y", "rootfs/../../x", "blobs/x", "locks/x", "tmp/x", ".hidden/x", "a//b", ""],
)
def test_bad_entry_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(InvalidInputError):
        store.build_once(name, lambda tmp: tmp.write_text("x"))


def _concurrent_builder(root: str, counter: str, barrier: threading.Barrier, out: object) -> None:
    store = Store(Path(root))

    def build(tmp: Path) -> None:
        with Path(counter).open("a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        tmp.write_text("built once")

    barrier.wait()
    path = store.build_once("rootfs/k.ext4", build)
    out.put(path.read_text())  # type: ignore[attr-defined]


def test_concurrent_builders_build_once(store: Store, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    counter = tmp_path / "calls"
    args = (str(store.root), str(counter), barrier, results)
    procs = [ctx.Process(target=_concurrent_builder, args=args) for _ in range(n)]
    for p in procs:
        p.start()
    seen = [results.get(timeout=20) for _ in range(n)]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert seen == ["built once"] * n
    assert len(counter.read_text().splitlines()) == 1


def _crashing_builder(root: str, ready: str) -> None:
    def build(tmp: Path) -> None:
        tmp.write_bytes(b"partial image")
        Path(ready).touch()
        time.sleep(60)

    Store(Path(root)).build_once("rootfs/k.ext4", build)


def _slow_blob_writer(root: str, ready: str) -> None:
    class Slow(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
            Path(ready).touch()
            time.sleep(0.05)
            buf[:4] = b"data"
            return 4

    Store(Path(root)).put_blob_file(io.BufferedReader(Slow()), Digest.of_bytes(b"x"))


def _run_and_kill(target: object, root: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = tmp_path / "ready"
    proc = ctx.Process(target=target, args=(str(root), str(ready)))  # type: ignore[arg-type]
    proc.start()
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline, "child never started writing"
        time.sleep(0.01)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


def test_killed_builder_leaves_no_entry_and_retry_succeeds(store: Store, tmp_path: Path) -> None:
    _run_and_kill(_crashing_builder, store.root, tmp_path)
    assert not store.has_entry("rootfs/k.ext4")
    assert [e.name for e in store.entries()] == []
    leftovers = temps(store.root / "rootfs")
    assert len(leftovers) == 1
    path = store.build_once("rootfs/k.ext4", lambda tmp: tmp.write_text("good"))
    assert path.read_text() == "good"
    garbage = store.collect_garbage()  # the lock is free, so the temp is stale at any age
    assert [p.name for p in garbage] == leftovers
    assert temps(store.root / "rootfs") == []


def test_killed_blob_writer_leaves_only_garbage(store: Store, tmp_path: Path) -> None:
    _run_and_kill(_slow_blob_writer, store.root, tmp_path)
    blob_dir = store.root / "blobs" / "sha256"
    assert len(temps(blob_dir)) == 1
    assert store.entries() == []
    assert store.collect_garbage() == []  # young temps of unlocked writers are kept
    assert len(store.collect_garbage(max_age=0)) == 1
    assert list(blob_dir.iterdir()) == []
    assert store.put_blob_bytes(b"x", Digest.of_bytes(b"x")) == Digest.of_bytes(b"x")


def test_temp_of_a_running_build_is_not_collected(store: Store) -> None:
    seen: list[list[Path]] = []

    def build(tmp: Path) -> None:
        tmp.write_text("in progress")
        seen.append(store.collect_garbage(max_age=0))

    store.build_once("rootfs/k.ext4", build)
    assert seen == [[]]


# -- listing and pruning -----------------------------------------------------------------------


def _fill(store: Store) -> dict[str, float]:
    """Four entries of different kinds with increasing last-use times."""
    blob = store.put_blob_bytes(os.urandom(20000))
    store.put_key(KEY, {"layer": str(blob)})
    store.build_once("rootfs/old.ext4", lambda t: t.write_bytes(os.urandom(40000)))
    store.build_once("rootfs/new.ext4", lambda t: t.write_bytes(os.urandom(40000)))
    names = [f"blobs/sha256/{blob.hex}", f"keys/{KEY}.json", "rootfs/old.ext4", "rootfs/new.ext4"]
    times = {name: 1_000_000.0 + 100 * i for i, name in enumerate(names)}
    for name, t in times.items():
        os.utime(store.root / name, (t, t))
    return times


def test_entries_sizes_and_last_use(store: Store) -> None:
    times = _fill(store)
    entries = {e.name: e for e in store.entries()}
    assert set(entries) == set(times)
    assert all(entries[n].last_used == t for n, t in times.items())
    assert entries["rootfs/new.ext4"].size == 40000
    assert entries["rootfs/new.ext4"].kind == "rootfs"
    assert store.disk_usage() == sum(e.disk_bytes for e in entries.values()) > 100000
    store.touch("rootfs/old.ext4")
    assert {e.name: e for e in store.entries()}["rootfs/old.ext4"].last_used > max(times.values())


def test_prune_is_lru_and_honours_keep(store: Store) -> None:
    times = _fill(store)
    oldest = min(times, key=times.__getitem__)
    sizes = {e.name: e.disk_bytes for e in store.entries()}
    budget = sizes[oldest] + sizes["rootfs/new.ext4"]
    report = store.prune(budget, keep=lambda name: name == oldest)
    removed = [e.name for e in report.removed]
    assert removed == [f"keys/{KEY}.json", "rootfs/old.ext4"]  # oldest first, kept one skipped
    assert report.freed_bytes == sizes[f"keys/{KEY}.json"] + sizes["rootfs/old.ext4"]
    assert store.has_blob(Digest.parse("sha256:" + oldest.rsplit("/", 1)[1]))
    assert store.disk_usage() == budget


def test_prune_without_limit_removes_nothing_and_all_removes_all_but_kept(store: Store) -> None:
    _fill(store)
    assert store.prune().removed == ()
    report = store.prune(all=True, keep=lambda name: name.startswith("keys/"))
    assert len(report.removed) == 3
    assert [e.name for e in store.entries()] == [f"keys/{KEY}.json"]
    assert store.get_key(KEY) is not None


def test_prune_skips_entry_being_used_under_its_lock(store: Store) -> None:
    store.build_once("rootfs/busy.ext4", lambda t: t.write_text("x"))
    with flocked(store.lock_path("rootfs/busy.ext4")):
        assert store.prune(all=True).removed == ()
    assert store.prune(all=True).removed[0].name == "rootfs/busy.ext4"
    assert store.entries() == []
    assert temps(store.root / "rootfs") == []


def test_scratch_dirs_are_private_unlisted_and_collected(store: Store) -> None:
    with store.scratch_dir() as work:
        assert work.parent == store.root / "tmp" and work.name.startswith(TEMP_PREFIX)
        (work / "stage").mkdir()
        assert store.entries() == []
        kept = work
    assert not kept.exists()
    with store.scratch_dir() as work:
        os.utime(work, (1, 1))
        assert store.collect_garbage() == [work]  # a crashed user's dir, long stale


def test_remove_refuses_non_entries(store: Store) -> None:
    _fill(store)
    assert not store.remove("rootfs")
    assert not store.remove("locks/rootfs/new.ext4.lock")
    assert not store.remove("rootfs/missing.ext4")
    assert store.remove("rootfs/new.ext4")
    assert not store.has_entry("rootfs/new.ext4")
