"""The snapshot folder format (runtime.snapshot): the VM shape a restore must match, digests
that agree for sparse and dense copies, atomic publication (a write that dies leaves the
previous snapshot usable), and a manifest from disk that is bounded and checked field by field.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from microagent.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError
from microagent.runtime import snapshot, stamps
from microagent.runtime.backend import Accel, BootConfig, Disk
from microagent.runtime.qemu import build_argv
from microagent.runtime.snapshot import Identity, Manifest, SavedFile

ARGV = [
    "ip", "netns", "exec", "ma-1", "setpriv", "--pdeathsig", "KILL",
    "/usr/bin/qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-cpu", "max",
    "-m", "256", "-smp", "1", "-kernel", "/a/vmlinuz",
    "-drive", "id=vd0,file=/a/root.ext4,format=raw,if=none,readonly=on",
    "-device", "virtio-blk-device,drive=vd0,serial=rootfs",
    "-drive", "id=vd1,file=/a/state.ext4,format=raw,if=none",
    "-device", "virtio-blk-device,drive=vd1,serial=state",
]  # fmt: skip


def test_the_shape_keeps_the_device_state_and_drops_host_paths() -> None:
    shape = snapshot.argv_shape(ARGV)
    assert shape["options"] == {"-M": "microvm", "-accel": "tcg", "-cpu": "max", "-m": "256",
                                "-smp": "1"}  # fmt: skip
    assert shape["drives"] == ["ro", "rw"] and len(shape["devices"]) == 2
    moved = [w.replace("/a/", "/elsewhere/") for w in ARGV[7:]] + ["-incoming", "defer"]
    assert snapshot.argv_shape(moved) == shape  # other paths, no wrapper, a restore: the same
    bigger = [("512" if w == "256" else w) for w in ARGV]
    assert snapshot.argv_shape(bigger) != shape


def test_identity_differences_say_what_changed() -> None:
    mine = Identity("qemu 7.2.22", snapshot.argv_shape(ARGV), "a" * 64, "b" * 64, "sha256:x")
    assert mine.differences(mine) == []
    other = Identity("qemu 8.2.0", snapshot.argv_shape(ARGV[:-4]), "c" * 64, "b" * 64, "sha256:x")
    words = " ".join(mine.differences(other))
    assert "VMM: qemu 7.2.22 in the snapshot, qemu 8.2.0 now" in words
    assert "guest kernel" in words and "VM drives" in words and "initramfs" not in words


def test_sparse_and_dense_copies_have_one_digest(tmp_path: Path) -> None:
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    with sparse.open("wb") as fh:
        fh.truncate(8 << 20)
        fh.seek(3 << 20)
        fh.write(b"data in the middle")
    dense.write_bytes(sparse.read_bytes())
    assert sparse.stat().st_blocks < dense.stat().st_blocks
    assert snapshot.sparse_sha256(sparse) == snapshot.sparse_sha256(dense)
    with dense.open("r+b") as fh:
        fh.seek((8 << 20) - 1)
        fh.write(b"\1")
    assert snapshot.sparse_sha256(sparse) != snapshot.sparse_sha256(dense)
    with sparse.open("r+b") as fh:
        fh.truncate((8 << 20) + 1)  # one more zero byte changes the digest too
    assert snapshot.sparse_sha256(sparse) != snapshot.sparse_sha256(tmp_path / "dense")


def _write(root: Path, tag: str, payload: bytes) -> Manifest:
    tmp = snapshot.begin(root, tag)
    (tmp / "vmstate").write_bytes(payload)
    (tmp / "disk-state").write_bytes(b"disk")
    identity = Identity("fake", {}, "k", "i", "r")
    state = SavedFile("vmstate", len(payload), snapshot.file_sha256(tmp / "vmstate"))
    disk = SavedFile("disk-state", 4, snapshot.sparse_sha256(tmp / "disk-state"), "state")
    manifest = Manifest(tag, "2026-12-01T00:00:00Z", identity, state, (disk,), 0.5)
    snapshot.publish(root, tag, tmp, manifest)
    return manifest


def test_publishing_replaces_a_tag_whole(tmp_path: Path) -> None:
    _write(tmp_path, "t", b"first")
    first = (tmp_path / "snapshots" / "t").resolve()
    _write(tmp_path, "t", b"second")
    assert not first.exists()
    manifest = snapshot.read_manifest(tmp_path, "t")
    snapshot.verify(tmp_path, manifest)
    assert (tmp_path / "snapshots" / "t" / "vmstate").read_bytes() == b"second"
    assert oct((tmp_path / "snapshots" / "t" / "manifest.json").stat().st_mode & 0o777) == "0o600"


def test_a_write_that_died_leaves_the_previous_snapshot_usable(tmp_path: Path) -> None:
    _write(tmp_path, "t", b"good")
    dead = snapshot.begin(tmp_path, "t")  # killed while the VMM wrote its state
    (dead / "vmstate").write_bytes(b"half")
    orphan = tmp_path / "snapshots" / ".v-t-0123456789ab"  # killed between rename and swap
    orphan.mkdir()
    snapshot.verify(tmp_path, snapshot.read_manifest(tmp_path, "t"))
    assert [row["tag"] for row in snapshot.listing(tmp_path)] == ["t"]
    snapshot.collect_garbage(tmp_path)
    assert not dead.exists() and not orphan.exists()
    snapshot.verify(tmp_path, snapshot.read_manifest(tmp_path, "t"))


def test_verify_finds_a_changed_or_truncated_file(tmp_path: Path) -> None:
    manifest = _write(tmp_path, "t", b"0123456789")
    state = tmp_path / "snapshots" / "t" / "vmstate"
    state.write_bytes(b"0123456780")
    with pytest.raises(IntegrityError, match="does not match its digest"):
        snapshot.verify(tmp_path, manifest)
    state.write_bytes(b"01234")
    with pytest.raises(IntegrityError, match="has 5 bytes, not 10"):
        snapshot.verify(tmp_path, manifest)
    state.unlink()
    with pytest.raises(IntegrityError, match="vmstate"):
        snapshot.verify(tmp_path, manifest)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m["state"].update(file="../../workspace.json"), "bad file name"),
        (lambda m: m["disks"][0].update(file="disk-../x"), "bad file name"),
        (lambda m: m["state"].update(sha256="00"), "64 hex digits"),
        (lambda m: m["state"].update(size=-1), "non-negative"),
        (lambda m: m.update(format=2), "format 1"),
        (lambda m: m.update(tag="other"), "another tag"),
        (lambda m: m.update(disks=[m["disks"][0]] * 33), "at most 32"),
        (lambda m: m["identity"].update(kernel=["x"]), "short strings"),
    ],
)
def test_a_malformed_manifest_is_refused(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], words: str
) -> None:
    _write(tmp_path, "t", b"x")
    path = tmp_path / "snapshots" / "t" / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match=words) as caught:
        snapshot.read_manifest(tmp_path, "t")
    assert "start NAME" in caught.value.hint


def test_an_oversized_manifest_is_not_parsed(tmp_path: Path) -> None:
    folder = tmp_path / "snapshots" / "t"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes(b"[" * (snapshot.MANIFEST_MAX + 1))
    with pytest.raises(IntegrityError, match="larger than"):
        snapshot.read_manifest(tmp_path, "t")


def test_a_deeply_nested_manifest_is_refused_before_parsing(tmp_path: Path) -> None:
    folder = tmp_path / "snapshots" / "t"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes(b"[" * 30_000 + b"]" * 30_000)
    with pytest.raises(IntegrityError, match="nested deeper than"):
        snapshot.read_manifest(tmp_path, "t")


@pytest.mark.parametrize("tag", ["", ".v-x", "../t", "t/u", "a" * 64, "t\n", "ü"])
def test_tags_are_bounded(tag: str) -> None:
    with pytest.raises(InvalidInputError):
        snapshot.check_tag(tag)


def test_missing_snapshots_and_mismatches(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        snapshot.read_manifest(tmp_path, "none")
    manifest = _write(tmp_path, "t", b"x")
    snapshot.check_identity(manifest, manifest.identity)
    with pytest.raises(ConflictError, match="root filesystem"):
        snapshot.check_identity(manifest, Identity("fake", {}, "k", "i", "another"))
    assert snapshot.remove(tmp_path, "t") and not snapshot.remove(tmp_path, "t")
    assert os.listdir(tmp_path / "snapshots") == []


def test_a_restore_boots_the_same_argv_waiting_for_the_state(tmp_path: Path) -> None:
    disks = (Disk(tmp_path / "root.ext4", readonly=True, serial="rootfs"),)
    config = BootConfig(tmp_path / "vmlinuz", tmp_path / "initrd", disks, tmp_path / "vm")
    cold = build_argv("qemu-system-x86_64", config, Accel.TCG, tsc_khz=2_000_000)
    restore = build_argv("qemu-system-x86_64", config, Accel.TCG, tsc_khz=1_999_000, incoming=True)
    assert restore[-2:] == ["-incoming", "defer"] and "-incoming" not in cold
    assert snapshot.argv_shape(restore) == snapshot.argv_shape(cold)  # the TSC hint: no matter


# -- stamps: a file is hashed once per version of it (runtime.stamps) ---------------------------


def _settle(*paths: Path) -> None:
    """Wait until the files' last changes are old enough for a stamp (rule 2)."""
    for path in paths:
        moment = stamps.Version.of(path.stat()).settled_at()
        time.sleep(max(0.0, (moment - time.time_ns()) / 1e9) + 0.01)


def _stamped(tmp_path: Path) -> tuple[Manifest, Path]:
    """A snapshot whose files are verified and stamped; its VM state file."""
    manifest = _write(tmp_path, "t", b"0123456789" * 100)
    folder = tmp_path / "snapshots" / "t"
    _settle(folder / "vmstate", folder / "disk-state")
    assert snapshot.verify(tmp_path, manifest) == ()  # hashed, and stamped
    assert snapshot.verify(tmp_path, manifest) == ("vmstate", "disk-state")  # not read again
    return manifest, folder / "vmstate"


def _overwrite_keeping_mtime(path: Path, data: bytes) -> None:
    """Change the bytes in place, same size, and set the mtime back (what utime(2) allows:
    the ctime still moves)."""
    st = path.stat()
    with path.open("r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_a_stamp_never_lets_a_file_changed_in_place_pass(tmp_path: Path) -> None:
    manifest, state = _stamped(tmp_path)
    _overwrite_keeping_mtime(state, b"9")
    with pytest.raises(IntegrityError, match="vmstate does not match its digest"):
        snapshot.verify(tmp_path, manifest)


def test_a_stamp_never_lets_a_replaced_file_pass(tmp_path: Path) -> None:
    manifest, state = _stamped(tmp_path)
    other = state.with_name("other")
    other.write_bytes(b"9" + state.read_bytes()[1:])
    st = state.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same size and mtime
    other.replace(state)
    with pytest.raises(IntegrityError, match="vmstate does not match its digest"):
        snapshot.verify(tmp_path, manifest)


def test_a_hard_link_made_elsewhere_ends_the_stamp(tmp_path: Path) -> None:
    manifest, state = _stamped(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    os.link(state, elsewhere)  # the ctime moves: hashed again (it is sound, so it passes)
    assert snapshot.verify(tmp_path, manifest) == ("disk-state",)
    _settle(state)
    assert snapshot.verify(tmp_path, manifest) == ("disk-state",)  # hashed, restamped ...
    assert snapshot.verify(tmp_path, manifest) == ("vmstate", "disk-state")
    _overwrite_keeping_mtime(elsewhere, b"9")  # ... and a write through the other link is seen
    with pytest.raises(IntegrityError, match="vmstate does not match its digest"):
        snapshot.verify(tmp_path, manifest)


def test_a_link_by_microagent_carries_the_stamp_and_a_later_write_ends_it(
    tmp_path: Path,
) -> None:
    manifest, _state = _stamped(tmp_path)
    source = (tmp_path / "snapshots" / "t").resolve()
    other = tmp_path / "ws"
    copy = snapshot.begin(other, "t")
    books = (stamps.Book.of_folder(source), stamps.Book.of_folder(copy))
    for name in ("vmstate", "disk-state"):
        stamps.link(source / name, copy / name, books)
    snapshot.publish(other, "t", copy, manifest)
    assert snapshot.verify(other, manifest) == ("vmstate", "disk-state")  # no byte read
    assert snapshot.verify(tmp_path, manifest) == ("vmstate", "disk-state")  # nor here
    _overwrite_keeping_mtime(other / "snapshots" / "t" / "vmstate", b"9")
    for root in (other, tmp_path):
        with pytest.raises(IntegrityError, match="vmstate does not match its digest"):
            snapshot.verify(root, manifest)
    # a changed file's stamp is not carried: the link's copy is hashed (and refused)
    third = snapshot.begin(tmp_path / "third", "t")
    stamps.link(source / "vmstate", third / "vmstate", (books[0], stamps.Book.of_folder(third)))
    assert stamps.Book.of_folder(third).stamps() == {}


def test_a_fresh_file_is_hashed_not_stamped_and_a_bad_book_costs_a_hash(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    book = stamps.Book(tmp_path / "book.json")
    assert stamps.take(path, "sha256", book) == (snapshot.file_sha256(path), False)
    assert book.stamps() == {}  # changed moments ago: a write in the same tick would not show
    assert stamps.take(path, "sha256", book, wait=True)[1] is False  # waits, then stamps
    assert stamps.take(path, "sha256", book) == (snapshot.file_sha256(path), True)
    assert stamps.take(path, "sparse-sha256", book)[1] is False  # another digest: not stamped
    for garbage in (b"[" * 5000, b'{"format": 1, "stamps": []}', b"\xff", b"{}"):
        book.path.write_bytes(garbage)
        assert stamps.take(path, "sha256", book)[1] is False
    document = json.loads(book.path.read_text())
    [stamp] = document["stamps"].values()
    stamp["ino"] += 1  # a stamp filed under another inode is no stamp
    book.path.write_text(json.dumps(document))
    assert book.stamps() == {}
    unwritable = stamps.Book(tmp_path / "a-folder")  # neither readable nor writable as a book
    unwritable.path.mkdir()
    assert stamps.take(path, "sha256", unwritable) == (snapshot.file_sha256(path), False)
    assert unwritable.stamps() == {}


def test_the_kit_digests_are_stamped_and_follow_a_change(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"kernel" * 100)
    initrd.write_bytes(b"initrd" * 100)
    _settle(kernel, initrd)
    book = stamps.Book(tmp_path / "verified.json")
    first = snapshot.make_identity("qemu", ARGV, kernel, initrd, "r", book=book)
    assert len(book.stamps()) == 2
    assert snapshot.make_identity("qemu", ARGV, kernel, initrd, "r", book=book) == first
    _overwrite_keeping_mtime(kernel, b"K")
    changed = snapshot.make_identity("qemu", ARGV, kernel, initrd, "r", book=book)
    assert changed.kernel == snapshot.file_sha256(kernel) != first.kernel
