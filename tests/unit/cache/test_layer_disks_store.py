"""Store maintenance of stacked roots: ``cache verify`` and ``cache prune`` over a real store
whose setup steps' roots are stacks (the base's image under one layer disk per step), made by a
real ``create`` through the CLI (the fake backend writes each step's files into the real
overlay upper, so every layer and layer disk is built as a VM build builds it).

A layer disk is damaged the way a bad disk damages it and found; ``--repair`` removes it and
the steps stacked on it count as not built; a record naming a disk of another step's layer is
corrupt; prune keeps what a workspace's stack is made of, and never takes what a staying
stack stands on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.ext4.debugfs import check_image
from microagent.store.content import Store
from microagent.store.records import (
    RootStack,
    StepRecord,
    all_records,
    layer_disk_entry,
    read_record,
    rootfs_entry,
    rootfs_ready,
    write_record,
)
from microagent.store.retention import keeper, left_incomplete, names_in_use
from microagent.store.verify import VerifyReport, verify
from testenv.clitools import cli_json

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")

SPEC = "name: ws\nimage: oci:layout:latest\nsetup: [echo one, echo two]\nentrypoint: 'true'\n"
WRITES = {"/etc/motd": "hello from a setup step\n", "/opt/app/file.txt": "x" * 5000}
OLD = 7 * 3600  # seconds: older than verify's grace for entries no record names


@dataclass
class Stacked:
    """The store after ``create`` of SPEC as workspace ``ws``: the base, the first setup step
    (base image + its layer disk) and the second (+ both layer disks)."""

    store: Store
    project: Path
    base: StepRecord
    first: StepRecord
    second: StepRecord

    @property
    def disks(self) -> tuple[str, str]:
        """The two layer disks, bottom first."""
        assert self.second.stack is not None
        low, high = self.second.stack.layers
        return low, high

    def path(self, name: str) -> Path:
        return self.store.root / name

    def key_name(self, record: StepRecord) -> str:
        return f"keys/{record.key.removeprefix('sha256:')}.json"

    def blob_name(self, digest: str) -> str:
        return "blobs/" + digest.replace(":", "/")


@pytest.fixture
def stacked(
    busybox_project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Stacked:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"writes": WRITES}))
    monkeypatch.delenv("MICROAGENT_LAYER_DISKS", raising=False)  # on: the default
    (busybox_project / "microagent.yaml").write_text(SPEC)
    created = cli_json(capsys, "create", "-f", str(busybox_project / "microagent.yaml"))
    store = Store(busybox_project.parent / "home" / "store")
    records = {r.key: r for r in all_records(store)}
    second = records[created["rootfsKey"]]
    first = records[second.parent or ""]
    base = records[first.parent or ""]
    return Stacked(store, busybox_project, base, first, second)


def cli_verify(capsys: pytest.CaptureFixture[str], *flags: str, code: int = 0) -> dict[str, object]:
    return cli_json(capsys, "cache", "verify", *flags, code=code)


def problems(document: dict[str, object]) -> set[tuple[str, str, str]]:
    listed = document["problems"]
    assert isinstance(listed, list)
    return {(p["kind"], p["name"], p["problem"]) for p in listed}


def detail(document: dict[str, object], name: str) -> str:
    listed = document["problems"]
    assert isinstance(listed, list)
    return str(next(p["detail"] for p in listed if p["name"] == name))


def found(report: VerifyReport) -> set[tuple[str, str, str]]:
    return {(p.kind, p.name, p.problem) for p in report.problems}


def restack(store: Store, record: StepRecord, image: str, layers: tuple[str, ...]) -> None:
    """Write ``record`` again with the root stack ``image`` + ``layers``."""
    write_record(store, replace(record, stack=RootStack(image, layers)))


def age(path: Path, seconds: float = OLD) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    path.chmod(0o644)
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


# -- what a stacked build leaves --------------------------------------------------------------


def test_a_stacked_store_verifies_clean(
    stacked: Stacked, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stacked.first.rootfs is None and stacked.second.rootfs is None
    assert stacked.first.stack == RootStack(stacked.base.rootfs or "", stacked.disks[:1])
    assert stacked.second.stack == RootStack(stacked.base.rootfs or "", stacked.disks)
    assert stacked.disks == tuple(layer_disk_entry(layer.diff_id) for layer in
                                  stacked.second.layers[-2:])  # fmt: skip
    for name in stacked.disks:
        check_image(stacked.path(name))  # what verify's e2fsck -fn sees too
    document = cli_verify(capsys)
    assert document["ok"] is True and document["problems"] == []
    assert document["checked"] == {"blobs": 5, "keys": 3, "entries": 3}  # base image, 2 disks


def test_a_missing_layer_disk_is_no_problem_the_step_counts_as_not_built(
    stacked: Stacked, capsys: pytest.CaptureFixture[str]
) -> None:
    """Like a pruned rootfs: the record stays sound (its layers are stored), the step is not
    built, and the next create makes its root again."""
    _low, high = stacked.disks
    stacked.path(high).unlink()
    assert rootfs_ready(stacked.store, stacked.second.key) is None
    assert rootfs_ready(stacked.store, stacked.first.key) is not None
    document = cli_verify(capsys)
    assert document["problems"] == [] and document["checked"] == {
        "blobs": 5, "keys": 3, "entries": 2,
    }  # fmt: skip
    spec = str(stacked.project / "microagent.yaml")
    cli_json(capsys, "create", "-f", spec, "--name", "again")
    assert rootfs_ready(stacked.store, stacked.second.key) is not None
    assert stacked.path(high).is_file()  # the same layer, the same disk
    assert cli_verify(capsys)["problems"] == []


# -- damaged layer disks ----------------------------------------------------------------------


def test_a_layer_disk_with_a_broken_superblock_is_corrupt_and_repair_removes_it(
    stacked: Stacked, capsys: pytest.CaptureFixture[str]
) -> None:
    low, high = stacked.disks
    overwrite(stacked.path(low), 1024, b"\xde\xad" * 64)  # the superblock, magic and all
    document = cli_verify(capsys, code=1)
    assert problems(document) == {("layerdisk", low, "corrupt")}
    assert detail(document, low) == (
        "no ext4 superblock (a workspace boots from it: create that workspace again)"
    )
    repaired = cli_verify(capsys, "--repair", "-y")
    assert repaired["repaired"] == [low] and repaired["ok"] is True
    assert not os.path.lexists(stacked.path(low)) and stacked.path(high).exists()
    for record in (stacked.first, stacked.second):  # both stand on it: neither is built
        assert rootfs_ready(stacked.store, record.key) is None
        assert read_record(stacked.store, record.key) is not None  # rebuilt from its layers
    assert cli_verify(capsys)["problems"] == []
    assert main(["--json", "cache", "verify"]) == 0


def test_e2fsck_finds_a_layer_disk_damage_the_superblock_size_does_not(
    stacked: Stacked, capsys: pytest.CaptureFixture[str]
) -> None:
    _low, high = stacked.disks
    overwrite(stacked.path(high), 1024 + 0x0C, b"\x01\x00\x00\x00")  # its free-blocks count
    document = cli_verify(capsys, code=1)
    assert problems(document) == {("layerdisk", high, "corrupt")}
    assert "e2fsck -fn" in detail(document, high)
    assert verify(stacked.store).problems == ()  # no checker given: only the cheap checks


def test_a_truncated_layer_disk_nothing_uses_is_corrupt(stacked: Stacked) -> None:
    _low, high = stacked.disks
    size = stacked.path(high).stat().st_size
    os.truncate(stacked.path(high), size // 2)
    report = verify(stacked.store, fsck=check_image)  # no workspace named: nothing in use
    assert found(report) == {("layerdisk", high, "corrupt")}
    assert report.problems[0].detail == f"truncated: {size // 2} bytes, its superblock says {size}"


# -- records naming layer disks ---------------------------------------------------------------


def test_a_record_whose_stack_names_another_steps_layer_disk_is_corrupt(
    stacked: Stacked, capsys: pytest.CaptureFixture[str]
) -> None:
    low, high = stacked.disks
    restack(stacked.store, stacked.first, stacked.base.rootfs or "", (high,))
    document = cli_verify(capsys, code=1)
    name = stacked.key_name(stacked.first)
    assert problems(document) == {("key", name, "corrupt")}
    assert detail(document, name) == f"names a foreign layer disk {high!r} (not of its layers)"
    repaired = cli_verify(capsys, "--repair", "-y")
    assert repaired["repaired"] == [name]
    assert stacked.path(low).exists() and stacked.path(high).exists()  # the second names them
    assert cli_verify(capsys)["problems"] == []


def test_a_record_whose_stack_stands_on_no_ancestors_image_is_corrupt(
    stacked: Stacked, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stack's image is the rootfs of a step up its chain; not its own, not a stranger's.
    Where a record up the chain is gone the chain above is unknown, and nothing is judged."""
    name, stranger = stacked.key_name(stacked.second), f"rootfs/{'ab' * 32}.ext4"
    for image in (stranger, rootfs_entry(stacked.second.key)):
        restack(stacked.store, stacked.second, image, stacked.disks)
        document = cli_verify(capsys, code=1)
        assert problems(document) == {("key", name, "corrupt")}
        assert detail(document, name) == (
            f"its root stack stands on {image!r}, the rootfs of no step of its chain"
        )
    stacked.path(stacked.key_name(stacked.first)).unlink()
    assert cli_verify(capsys)["problems"] == []
    assert rootfs_ready(stacked.store, stacked.second.key) is None  # its image is not there
    write_record(stacked.store, stacked.second)
    assert cli_verify(capsys)["problems"] == []  # the base's image: found above the gap too
    assert rootfs_ready(stacked.store, stacked.second.key) is not None


def test_a_stack_on_an_image_whose_own_record_is_broken_keeps_it(stacked: Stacked) -> None:
    """The base's image config is lost: its record goes, its image stays (both setup steps
    stand on it) and they stay built."""
    config = stacked.base.origin.config if stacked.base.origin else ""
    stacked.store.blob_path(config).unlink()
    report = verify(stacked.store, repair=True, fsck=check_image)  # no workspace in use
    base = stacked.key_name(stacked.base)
    assert found(report) == {("key", base, "missing")} and report.repaired == (base,)
    assert stacked.path(stacked.base.rootfs or "").exists()
    assert rootfs_ready(stacked.store, stacked.second.key) is not None
    assert verify(stacked.store, fsck=check_image).problems == ()


def test_a_layer_disk_no_stack_names_is_orphaned_once_it_is_old(stacked: Stacked) -> None:
    low, _high = stacked.disks
    top = stacked.store.root / "layerdisks"
    orphan, young, odd = top / f"{'cd' * 32}.ext4", top / f"{'ef' * 32}.ext4", top / "x.img"
    shutil.copyfile(stacked.path(low), orphan)
    shutil.copyfile(stacked.path(low), young)  # a build that has not written its record yet
    odd.write_text("x")
    age(orphan)
    for name in stacked.disks:
        age(stacked.path(name))  # named by a stack: never orphaned, however old
    report = verify(stacked.store, repair=True, fsck=check_image)
    assert found(report) == {
        ("layerdisk", f"layerdisks/{orphan.name}", "orphaned"),
        ("layerdisk", "layerdisks/x.img", "orphaned"),
    }
    assert set(report.repaired) == {f"layerdisks/{orphan.name}", "layerdisks/x.img"}
    assert young.exists() and verify(stacked.store, fsck=check_image).problems == ()


# -- prune ------------------------------------------------------------------------------------


def test_names_in_use_holds_each_steps_stack_and_a_merged_steps_image_too(
    stacked: Stacked,
) -> None:
    low, high = stacked.disks
    base_rootfs = stacked.base.rootfs or ""
    used = names_in_use(stacked.store, [stacked.second.key], [])
    assert {base_rootfs, low, high} <= used
    assert {stacked.key_name(r) for r in (stacked.base, stacked.first, stacked.second)} <= used
    assert {stacked.blob_name(layer.digest) for layer in stacked.second.layers} <= used
    assert names_in_use(stacked.store, [stacked.first.key], []) & {high} == set()
    # merged into one image (a stack too deep for a VM): a workspace made before boots from
    # the stack, one made after from the image; both are kept
    merged = stacked.second.with_rootfs(rootfs_entry(stacked.second.key))
    write_record(stacked.store, merged)
    assert {merged.rootfs or "", base_rootfs, low, high} <= names_in_use(
        stacked.store, [stacked.second.key], []
    )


def test_prune_all_keeps_what_a_workspaces_stack_is_made_of(
    stacked: Stacked, capsys: pytest.CaptureFixture[str]
) -> None:
    for entry in stacked.store.entries():
        age(entry.path)
    pruned = cli_json(capsys, "cache", "prune", "--all", "-y")
    removed = {row["name"] for row in pruned["removed"]}
    assert removed.isdisjoint({stacked.base.rootfs, *stacked.disks})
    assert rootfs_ready(stacked.store, stacked.second.key) is not None
    assert cli_verify(capsys)["problems"] == []


def test_left_incomplete_takes_records_not_layer_disks_nor_a_staying_stacks_image(
    stacked: Stacked,
) -> None:
    keep = keeper(set())
    config = stacked.base.origin.config if stacked.base.origin else ""
    # the base's config goes: its record too, not its image (the setup steps stand on it)
    assert left_incomplete(stacked.store, {stacked.blob_name(config)}, keep) == [
        stacked.key_name(stacked.base)
    ]
    # the second step's own layer goes: its record, never the layer disks (shared by content)
    layer = stacked.second.layers[-1].digest
    assert left_incomplete(stacked.store, {stacked.blob_name(layer)}, keep) == [
        stacked.key_name(stacked.second)
    ]
    # the base's layer goes: every record goes, and the base image with them
    base_layer = stacked.base.layers[0].digest
    expected = {stacked.key_name(r) for r in (stacked.base, stacked.first, stacked.second)}
    gone = left_incomplete(stacked.store, {stacked.blob_name(base_layer)}, keep)
    assert set(gone) == expected | {stacked.base.rootfs}
    # what keep protects stays
    kept = keeper({stacked.base.rootfs or ""})
    assert set(left_incomplete(stacked.store, {stacked.blob_name(base_layer)}, kept)) == expected


def test_a_prune_that_takes_a_steps_layer_blob_leaves_its_layer_disk(
    stacked: Stacked, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_json(capsys, "delete", "ws", "--force", "--yes")
    layer = stacked.second.layers[-1]
    now = time.time()
    for entry in stacked.store.entries():
        os.utime(entry.path, (now, now), follow_symlinks=False)
    age(stacked.store.blob_path(layer.digest))
    total = stacked.store.disk_usage()
    pruned = cli_json(capsys, "cache", "prune", "--max-size", str(total - 1), "-y")
    removed = {row["name"] for row in pruned["removed"]}
    assert removed == {stacked.blob_name(layer.digest), stacked.key_name(stacked.second)}
    assert all(stacked.path(name).exists() for name in stacked.disks)
    assert rootfs_ready(stacked.store, stacked.first.key) is not None
    assert cli_verify(capsys)["problems"] == []  # the unnamed disk is young: prune takes it
