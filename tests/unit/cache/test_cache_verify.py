"""``cache verify``'s library half: a real store made by a real ``create`` (fake backend over the
busybox stand-in), damaged on disk the way crashes, bad disks and people damage it; each damage
is found with its kind and problem, ``repair`` removes exactly what is wrong (and what only
the removed record kept alive) and a second verify is clean; the next build rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from microagent.api import Microagent
from microagent.ext4.debugfs import check_image
from microagent.fsutil import flocked
from microagent.remotecache.publish import ensure_rootfs_image
from microagent.settings import Settings
from microagent.store.content import Store
from microagent.store.records import (
    StepRecord,
    all_records,
    layers_stored,
    read_record,
    rootfs_ready,
    write_record,
)
from microagent.store.verify import Problem, VerifyReport, verify
from testenv.clitools import cli_json

SPEC = "name: ws\nimage: oci:layout:latest\nsetup: [mkdir -p /workspace]\nentrypoint: 'true'\n"
pytestmark = pytest.mark.tools("mke2fs", "e2fsck")
OLD = 7 * 3600  # seconds: older than the grace for temps and unrecorded root filesystems


@dataclass
class Made:
    """The store after `create` of SPEC as workspace `ws`, and its step records."""

    store: Store
    api: Microagent
    project: Path
    base: StepRecord
    setup: StepRecord

    def name_of(self, digest: str) -> str:
        return "blobs/" + digest.replace(":", "/")

    def key_name(self, record: StepRecord) -> str:
        return f"keys/{record.key.removeprefix('sha256:')}.json"

    def check(self, *, repair: bool = False, in_use: bool = True) -> VerifyReport:
        used = self.api.cache_in_use() if in_use else set()
        return verify(self.store, repair=repair, in_use=used, fsck=check_image)

    def create(self, capsys: pytest.CaptureFixture[str], name: str) -> dict[str, object]:
        spec = self.project / "microagent.yaml"
        return cli_json(capsys, "create", "-f", str(spec), "--name", name)


@pytest.fixture
def one_image_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every setup step gets a rootfs image of its own, as this file's damage is aimed at
    (stacked roots: ``test_layer_disks_store.py``)."""
    monkeypatch.setenv("MICROAGENT_LAYER_DISKS", "0")


@pytest.fixture
def made(
    one_image_roots: None, busybox_project: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Made:  # fmt: skip
    (busybox_project / "microagent.yaml").write_text(SPEC)
    cli_json(capsys, "create", "-f", str(busybox_project / "microagent.yaml"))
    store = Store(tmp_path / "home" / "store")
    return Made(store, Microagent(Settings.from_environ()), busybox_project, *_records(store))


def _records(store: Store) -> tuple[StepRecord, StepRecord]:
    """The base and the setup step's records."""
    records = [read_record(store, "sha256:" + p.stem) for p in (store.root / "keys").iterdir()]
    by_kind = {r.kind.value: r for r in records if r is not None}
    return by_kind["base"], by_kind["setup"]


def found(report: VerifyReport) -> set[tuple[str, str, str]]:
    return {(p.kind, p.name, p.problem) for p in report.problems}


def detail(report: VerifyReport, name: str) -> str:
    return next(p.detail for p in report.problems if p.name == name)


def mtimes(root: Path) -> dict[str, float]:
    return {str(p): p.lstat().st_mtime for p in sorted(root.rglob("*"))}


def flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def age(path: Path, seconds: float = OLD) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def repaired_clean(made: Made, expected: set[tuple[str, str, str]], *, in_use: bool = True) -> None:
    """Repair removes exactly the entries of ``expected``; then the store verifies clean."""
    report = made.check(repair=True, in_use=in_use)
    assert found(report) == expected
    assert set(report.repaired) == {name for _kind, name, _problem in expected}
    assert report.ok and report.remaining == ()
    for _kind, name, _problem in expected:
        assert not os.path.lexists(made.store.root / name), name
    again = made.check(in_use=in_use)
    assert again.problems == () and again.ok


# -- clean ------------------------------------------------------------------------------------


def test_a_store_after_a_real_create_verifies_clean_and_is_not_touched(made: Made) -> None:
    in_use = made.api.cache_in_use()  # reads the records (marks them used) before the snapshot
    before = mtimes(made.store.root)
    report = verify(made.store, in_use=in_use, fsck=check_image)
    assert report.problems == () and report.repaired == () and report.ok
    # manifest, image config, base layer, setup layer; two records; two root filesystems
    assert report.checked == {"blobs": 4, "keys": 2, "entries": 2}
    assert report.to_json() == {"ok": True, "checked": report.checked, "problems": [],
                                "repaired": []}  # fmt: skip
    assert verify(made.store, repair=True).repaired == ()  # nothing in use, still nothing wrong
    assert mtimes(made.store.root) == before  # not even a last-use time moved


def test_what_prune_and_publishing_leave_behind_is_no_problem(made: Made) -> None:
    """A packed image whose blob was pruned (packed again when publishing), a rootfs pruned
    while its layers stay (rebuilt by flattening), an empty store: all normal."""
    packed = ensure_rootfs_image(made.store, made.setup)
    assert packed is not None
    assert made.store.remove(made.name_of(packed.blob))
    assert made.store.remove(made.setup.rootfs or "")
    record = read_record(made.store, made.setup.key)
    assert record is not None and record.packed == packed  # it still names both
    report = made.check()
    assert report.problems == () and report.checked == {"blobs": 4, "keys": 2, "entries": 1}
    empty = verify(Store(made.store.root.parent / "nothing-here"))
    assert empty.ok and empty.checked == {"blobs": 0, "keys": 0, "entries": 0}


# -- blobs ------------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_layer_blob_takes_the_records_built_on_it(
    made: Made, capsys: pytest.CaptureFixture[str]
) -> None:
    layer = made.setup.layers[-1].digest
    flip_byte(made.store.blob_path(layer), 10)
    report = made.check()
    blob, key = made.name_of(layer), made.key_name(made.setup)
    assert found(report) == {("blob", blob, "corrupt"), ("key", key, "missing")}
    got = hashlib.sha256(made.store.blob_path(layer).read_bytes()).hexdigest()
    assert detail(report, blob) == f"content hashes to sha256:{got}"
    assert detail(report, key) == f"its layer blob {layer} is corrupt"
    assert not report.ok and len(report.remaining) == 2
    # the workspace boots from the setup rootfs: it stays although its record goes
    repaired_clean(made, found(report))
    assert made.store.entry_path(made.setup.rootfs or "").is_file()
    built = made.create(capsys, "again")
    assert built["stepsBuilt"] == 1  # the setup step ran again and stored its layer
    rebuilt = read_record(made.store, made.setup.key)
    assert rebuilt is not None and layers_stored(made.store, rebuilt)
    assert made.check().problems == ()


def test_a_blob_nothing_can_name_is_orphaned(made: Made) -> None:
    (made.store.root / "blobs" / "sha256" / "notes.txt").write_text("hi")
    (made.store.root / "blobs" / "md5").mkdir()
    (made.store.root / "blobs" / "md5" / ("0" * 32)).write_text("x")
    report = made.check()
    assert found(report) == {
        ("blob", "blobs/sha256/notes.txt", "orphaned"),
        ("blob", f"blobs/md5/{'0' * 32}", "orphaned"),
    }
    assert "unsupported digest algorithm 'md5'" in detail(report, f"blobs/md5/{'0' * 32}")
    repaired_clean(made, found(report))


# -- step records -----------------------------------------------------------------------------


def test_a_deleted_layer_blob_makes_every_record_that_names_it_missing(made: Made) -> None:
    layer = made.base.layers[0].digest  # in the base record and in the setup step's chain
    made.store.blob_path(layer).unlink()
    report = made.check()
    base, setup = made.key_name(made.base), made.key_name(made.setup)
    assert found(report) == {("key", base, "missing"), ("key", setup, "missing")}
    assert detail(report, base) == f"its layer blob {layer} is not in the store"
    repaired_clean(made, found(report))


def test_without_a_workspace_a_broken_records_rootfs_goes_with_it(
    made: Made, capsys: pytest.CaptureFixture[str]
) -> None:
    config = made.base.origin.config if made.base.origin else ""
    made.store.blob_path(config).unlink()
    report = made.check(in_use=False)
    base_rootfs = made.base.rootfs or ""
    assert found(report) == {
        ("key", made.key_name(made.base), "missing"),
        ("rootfs", base_rootfs, "orphaned"),
    }
    assert detail(report, made.key_name(made.base)) == (
        f"its image config blob {config} is not in the store"
    )
    assert detail(report, base_rootfs).startswith("its record keys/")
    repaired_clean(made, found(report), in_use=False)
    made.create(capsys, "again")  # pulls the config again and records the base step
    assert read_record(made.store, made.base.key) is not None
    assert made.check().problems == ()


def test_garbage_key_records_are_corrupt_or_orphaned(made: Made) -> None:
    keys = made.store.root / "keys"
    setup_key = keys / Path(made.key_name(made.setup)).name
    setup_key.write_text("{not json")
    stranger = "ab" * 32
    (keys / f"{stranger}.json").write_text(json.dumps(made.base.to_json()))  # another key's
    (keys / "README").write_text("notes")
    report = made.check()
    assert found(report) == {
        ("key", made.key_name(made.setup), "corrupt"),
        ("key", f"keys/{stranger}.json", "corrupt"),
        ("key", "keys/README", "orphaned"),
    }
    assert detail(report, made.key_name(made.setup)).startswith("not JSON")
    assert detail(report, f"keys/{stranger}.json") == (
        f"it is the record of {made.base.key}, not of sha256:{stranger}"
    )
    repaired_clean(made, found(report))  # the setup rootfs stays: workspace ws boots from it


def test_a_record_that_names_a_foreign_rootfs_is_corrupt(made: Made) -> None:
    raw = made.setup.to_json() | {"rootfs": made.base.rootfs}
    made.store.put_key(made.setup.key, raw)
    report = made.check(in_use=False)
    assert ("key", made.key_name(made.setup), "corrupt") in found(report)
    assert "foreign rootfs" in detail(report, made.key_name(made.setup))


# -- root filesystems -------------------------------------------------------------------------


def test_a_truncated_rootfs_is_corrupt_and_its_record_stays_usable(made: Made) -> None:
    rootfs = made.store.entry_path(made.setup.rootfs or "")
    size = rootfs.stat().st_size
    os.truncate(rootfs, size // 2)
    report = made.check()
    name = made.setup.rootfs or ""
    assert found(report) == {("rootfs", name, "corrupt")}
    assert detail(report, name) == (
        f"truncated: {size // 2} bytes, its superblock says {size} "
        "(a workspace boots from it: create that workspace again)"
    )
    repaired_clean(made, found(report))
    assert read_record(made.store, made.setup.key) is not None  # rebuilt from its layers


def test_e2fsck_finds_what_the_superblock_size_does_not(made: Made) -> None:
    rootfs = made.store.entry_path(made.base.rootfs or "")
    with rootfs.open("r+b") as fh:  # the free-blocks count in the superblock
        fh.seek(1024 + 0x0C)
        fh.write(b"\x01\x00\x00\x00")
    report = made.check()
    name = made.base.rootfs or ""
    assert found(report) == {("rootfs", name, "corrupt")}
    assert "e2fsck -fn" in detail(report, name)
    assert verify(made.store).problems == ()  # no checker given: only the cheap checks


def test_a_rootfs_that_differs_from_its_recorded_image_is_corrupt(made: Made) -> None:
    packed = ensure_rootfs_image(made.store, made.setup)  # records the image's sha256 and size
    assert packed is not None and made.check().problems == ()
    rootfs = made.store.entry_path(made.setup.rootfs or "")
    flip_byte(rootfs, rootfs.stat().st_size - 4096)  # free space: e2fsck cannot see it
    check_image(rootfs)
    report = made.check()
    name = made.setup.rootfs or ""
    assert found(report) == {("rootfs", name, "corrupt")}
    assert f"its record says {packed.digest}" in detail(report, name)
    repaired_clean(made, found(report))
    record = read_record(made.store, made.setup.key)
    assert record is not None and record.packed is None  # it described the removed image


def test_a_packed_image_of_a_format_this_version_does_not_know(made: Made) -> None:
    """A record written by a newer version: its image is not judged by a digest rule this
    version does not know, and publishing packs the rootfs anew in the current format."""
    packed = ensure_rootfs_image(made.store, made.setup)
    assert packed is not None and packed.format == 2
    future = dataclasses.replace(packed, format=3, digest="sha256:" + "0" * 64)
    write_record(made.store, made.setup.with_packed(future))
    assert made.check().problems == ()
    record = read_record(made.store, made.setup.key)
    assert record is not None
    again = ensure_rootfs_image(made.store, record)
    assert again == packed


def test_an_unrecorded_rootfs_is_orphaned_once_it_is_old(made: Made) -> None:
    orphan = made.store.root / "rootfs" / f"{'cd' * 32}.ext4"
    shutil.copyfile(made.store.entry_path(made.base.rootfs or ""), orphan)
    young = made.store.root / "rootfs" / f"{'ef' * 32}.ext4"
    shutil.copyfile(orphan, young)
    odd = made.store.root / "rootfs" / "old.img"
    odd.write_text("x")
    age(orphan)
    report = made.check()
    assert found(report) == {
        ("rootfs", f"rootfs/{'cd' * 32}.ext4", "orphaned"),
        ("rootfs", "rootfs/old.img", "orphaned"),
    }  # the young one may be a build that has not written its record yet
    repaired_clean(made, found(report))
    assert young.exists()


def test_repair_leaves_an_entry_whose_build_lock_is_held(made: Made) -> None:
    orphan = made.store.root / "rootfs" / f"{'cd' * 32}.ext4"
    shutil.copyfile(made.store.entry_path(made.base.rootfs or ""), orphan)
    age(orphan)
    with flocked(made.store.lock_path(f"rootfs/{orphan.name}")):
        report = made.check(repair=True)
    assert [p.name for p in report.remaining] == [f"rootfs/{orphan.name}"]
    assert report.repaired == () and not report.ok and orphan.exists()


# -- temps and locks --------------------------------------------------------------------------


def test_stale_temps_go_and_a_live_builders_stay(made: Made) -> None:
    root = made.store.root
    old_blob = root / "blobs" / "sha256" / ".tmp-3f2a"
    old_blob.write_bytes(b"half a download")
    age(old_blob)
    fresh_blob = root / "blobs" / "sha256" / ".tmp-9b1c"
    fresh_blob.write_bytes(b"downloading")
    dead = root / "rootfs" / f".tmp-{'cd' * 32}.ext4.0a0b"  # its lock is free: builder gone
    dead.write_bytes(b"half an image")
    made.store.lock_path(f"rootfs/{'cd' * 32}.ext4").touch()
    live = root / "rootfs" / f".tmp-{'ef' * 32}.ext4.0c0d"
    live.write_bytes(b"being built")
    scratch = root / "tmp" / ".tmp-scratch.0e0f"
    scratch.mkdir()
    (scratch / "upper.ext4").write_bytes(b"x")
    age(scratch)
    with flocked(made.store.lock_path(f"rootfs/{'ef' * 32}.ext4")):
        report = made.check()
        expected = {
            ("temp", "blobs/sha256/.tmp-3f2a", "stale"),
            ("temp", f"rootfs/{dead.name}", "stale"),
            ("temp", "tmp/.tmp-scratch.0e0f", "stale"),
        }
        assert found(report) == expected
        repaired_clean(made, expected)
    assert fresh_blob.exists() and live.exists()


def test_a_lock_that_is_no_file_is_corrupt_and_dead_locks_are_normal(made: Made) -> None:
    broken = made.store.lock_path(f"rootfs/{'cd' * 32}.ext4")
    broken.mkdir(parents=True)
    made.store.lock_path("rootfs/gone.ext4").touch()  # its entry was pruned: fine
    report = made.check()
    name = broken.relative_to(made.store.root).as_posix()
    assert found(report) == {("lock", name, "corrupt")}
    repaired_clean(made, found(report))


# -- everything at once -----------------------------------------------------------------------


def test_every_damage_at_once_in_repair_order(made: Made) -> None:
    flip_byte(made.store.blob_path(made.setup.layers[-1].digest), 0)
    os.truncate(made.store.entry_path(made.base.rootfs or ""), 8192)
    (made.store.root / "keys" / "junk.json").write_text("[]")
    temp = made.store.root / "keys" / ".tmp-junk"
    temp.write_text("{")
    age(temp)
    report = made.check()
    assert [p.kind for p in report.problems] == ["key", "key", "rootfs", "blob", "temp"]
    assert all(isinstance(p, Problem) and p.detail for p in report.problems)
    repaired_clean(made, found(report))


# -- shared disks and bundles -----------------------------------------------------------------

DISK_SPEC = SPEC + (
    "disks:\n  - {name: ref, path: ref.ext4, mountpoint: /ref}\n"
    "bundles:\n  - {name: corpus, path: corpus.tar, mountpoint: /corpus}\n"
)


@pytest.fixture
def with_disks(
    one_image_roots: None, busybox_project: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> tuple[Made, Path, Path]:  # fmt: skip
    """`create` of a spec with a ro disk and a ro bundle: the store's disk and bundle folders."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("reference\n")
    image = busybox_project / "ref.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), "4M"],
                   check=True, capture_output=True)  # fmt: skip
    with tarfile.open(busybox_project / "corpus.tar", "w") as tar:
        tar.add(tree / "hello.txt", "docs/hello.txt")
    (busybox_project / "microagent.yaml").write_text(DISK_SPEC)
    cli_json(capsys, "create", "-f", str(busybox_project / "microagent.yaml"))
    store = Store(tmp_path / "home" / "store")
    made = Made(store, Microagent(Settings.from_environ()), busybox_project, *_records(store))
    disk = next((store.root / "disks").iterdir())
    bundle = next((store.root / "bundles").iterdir())
    return made, disk, bundle


def api_check(made: Made, *, repair: bool = False) -> VerifyReport:
    return made.api.cache_verify(repair=repair)


def test_shared_disk_and_bundle_images_are_checked_against_their_manifests(
    with_disks: tuple[Made, Path, Path],
) -> None:
    made, disk, bundle = with_disks
    clean = api_check(made)
    assert clean.problems == () and clean.checked["entries"] == 4  # 2 rootfs, a disk, a bundle
    image = disk / "disk.ext4"
    flip_byte(image, image.stat().st_size - 1024)  # free space: only the sha256 sees it
    os.truncate(bundle / "disk.ext4", 4096)
    report = api_check(made)
    disk_name, bundle_name = f"disks/{disk.name}", f"bundles/{bundle.name}"
    assert found(report) == {("disk", disk_name, "corrupt"), ("bundle", bundle_name, "corrupt")}
    assert "disk.ext4 hashes to sha256:" in detail(report, disk_name)
    assert "a workspace uses it" in detail(report, disk_name)
    assert detail(report, bundle_name).startswith("disk.ext4 has 4096 bytes, manifest.json says")
    repaired = api_check(made, repair=True)
    assert set(repaired.repaired) == {disk_name, bundle_name} and repaired.ok
    assert api_check(made).problems == ()


def test_a_shared_disk_with_a_foreign_or_broken_manifest(
    with_disks: tuple[Made, Path, Path],
) -> None:
    made, disk, _ = with_disks
    stray = disk.parent / ("0" * 64)
    shutil.copytree(disk, stray)  # what an older image format left: no create names it
    broken = disk.parent / ("1" * 64)
    shutil.copytree(disk, broken)
    (broken / "manifest.json").write_text("{")
    report = api_check(made)
    assert found(report) == {
        ("disk", f"disks/{stray.name}", "orphaned"),
        ("disk", f"disks/{broken.name}", "corrupt"),
    }
    assert detail(report, f"disks/{broken.name}").startswith("manifest.json: unreadable")
    assert set(api_check(made, repair=True).repaired) == {
        f"disks/{stray.name}",
        f"disks/{broken.name}",
    }
    assert disk.is_dir() and api_check(made).problems == ()


# -- while builds run -------------------------------------------------------------------------


def test_repair_during_builds_removes_nothing_they_make(made: Made) -> None:
    """Builds (setup boots, layers, root filesystems, records, temps and locks coming and
    going) run in a thread while verify --repair runs again and again: nothing sound goes."""
    specs = []
    for index in range(4):
        spec = made.project / f"spec{index}.yaml"
        spec.write_text(SPEC.replace("mkdir -p /workspace", f"mkdir -p /w{index}"))
        specs.append(spec)
    errors: list[BaseException] = []
    keys: list[str] = []

    def build() -> None:
        try:
            api = Microagent(Settings.from_environ())
            keys.extend(api.build(spec).outcome.built.key for spec in specs)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=build)
    worker.start()
    rounds = 0
    while worker.is_alive() or rounds == 0:
        report = made.check(repair=True)
        assert report.repaired == (), report.problems
        rounds += 1
    worker.join()
    assert errors == [] and len(keys) == 4 and rounds > 1
    for key in keys:
        assert rootfs_ready(made.store, key) is not None
    assert made.check().problems == ()


# -- prune keeps the store whole ---------------------------------------------------------------


def test_a_prune_that_takes_a_layer_blob_takes_the_records_that_name_it(
    made: Made, capsys: pytest.CaptureFixture[str]
) -> None:
    """LRU pruning removes the setup layer's blob alone (its oldest entry): every record that
    names it goes with its rootfs, so no record claims a layer the store lost; the base stays."""
    cli_json(capsys, "delete", "ws", "--force", "--yes")
    assert made.api.cache_in_use() == set()
    layer = made.setup.layers[-1]  # its own (the chain starts with the base image's)
    now = time.time()
    for entry in made.store.entries():
        os.utime(entry.path, (now, now), follow_symlinks=False)
    age(made.store.root / made.name_of(layer.digest))
    total = made.store.disk_usage()
    assert [r.key for r in all_records(made.store) if layer in r.layers] == [made.setup.key]
    expected = {made.name_of(layer.digest), made.key_name(made.setup), made.setup.rootfs}

    dry = made.api.cache_prune(total - 1, dry_run=True)
    assert {e.name for e in dry.removed} == expected
    assert read_record(made.store, made.setup.key) is not None  # a dry run removes nothing

    report = made.api.cache_prune(total - 1)
    assert {e.name for e in report.removed} == expected
    for name in expected:
        assert not os.path.lexists(made.store.root / name), name
    assert read_record(made.store, made.base.key) is not None
    assert rootfs_ready(made.store, made.base.key) is not None
    after = made.check()
    assert after.problems == () and after.ok
