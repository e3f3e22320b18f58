"""The store's guards, each pinned down: names, sizes, digests, locks, temps and what a
removal may touch.

Written against the mutants that outlived test_cache_store.py (docs/testing.md); each test
drives the public Store API on a real directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from microagent.digests import Digest
from microagent.errors import IntegrityError, InvalidInputError, NotFoundError
from microagent.store.content import CHUNK, SIZE_HINT, Store


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_entry_names_are_refused_with_what_is_wrong(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with pytest.raises(InvalidInputError) as raised:
        store.entry_path("rootfs/../x")
    assert raised.value.message == "invalid store entry name 'rootfs/../x'"
    with pytest.raises(InvalidInputError) as raised:
        store.entry_path("locks/x.ext4")
    assert raised.value.message == "store entry name 'locks/x.ext4' uses a reserved directory"


def test_a_missing_blob_is_named(tmp_path: Path) -> None:
    digest = _sha256(b"nothing")
    with pytest.raises(NotFoundError) as raised:
        Store(tmp_path / "s").open_blob(digest)
    assert raised.value.message == f"blob {digest} is not in the store"


def test_a_corrupt_blob_is_removed_and_the_fix_is_named(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    digest = store.put_blob_bytes(b"good")
    path = store.blob_path(digest)
    path.chmod(0o644)
    path.write_bytes(b"evil")
    with pytest.raises(IntegrityError) as raised:
        store.verify_blob(digest)
    assert raised.value.message == (
        f"stored blob {digest} is corrupt (content hashes to "
        f"{hashlib.sha256(b'evil').hexdigest()}); removed"
    )
    assert raised.value.hint == "retry the command to fetch it again"
    assert not path.exists()


def test_a_file_is_checked_against_its_digest_and_size(tmp_path: Path) -> None:
    """From a path as from a stream: the expected digest and size are both enforced."""
    store = Store(tmp_path / "s")
    src = tmp_path / "blob"
    src.write_bytes(b"content")
    with pytest.raises(IntegrityError) as raised:
        store.put_blob_file(src, _sha256(b"other"))
    assert raised.value.message == (
        f"digest mismatch: expected {_sha256(b'other')}, content hashes to {_sha256(b'content')}"
    )
    assert raised.value.hint == "the source is corrupt or was changed; nothing was stored"
    with pytest.raises(IntegrityError) as raised:
        store.put_blob_file(src, _sha256(b"content"), expected_size=8)
    assert raised.value.message == "content has 7 bytes, expected 8"
    assert raised.value.hint == SIZE_HINT
    with pytest.raises(IntegrityError) as raised:
        store.put_blob_file(src, _sha256(b"content"), expected_size=6)
    assert raised.value.message == "content is larger than the expected 6 bytes"
    assert raised.value.hint == SIZE_HINT
    assert not (
        tmp_path / "s" / "blobs" / "sha256" / hashlib.sha256(b"content").hexdigest()
    ).exists()
    got = store.put_blob_file(src, _sha256(b"content"), expected_size=7)
    assert got == Digest.parse(_sha256(b"content"))


def test_sizes_add_up_over_many_chunks(tmp_path: Path) -> None:
    data = b"x" * (2 * CHUNK + 10)
    store = Store(tmp_path / "s")
    src = tmp_path / "big"
    src.write_bytes(data)
    assert store.put_blob_file(src, _sha256(data), expected_size=len(data)) == Digest.parse(
        _sha256(data)
    )
    with pytest.raises(IntegrityError) as raised:
        Store(tmp_path / "t").put_blob_file(src, _sha256(data), expected_size=len(data) + 1)
    assert raised.value.message == f"content has {len(data)} bytes, expected {len(data) + 1}"


def test_a_sha512_blob_is_hashed_and_kept_as_sha512(tmp_path: Path) -> None:
    data = b"five twelve"
    expected = "sha512:" + hashlib.sha512(data).hexdigest()
    store = Store(tmp_path / "s")
    assert str(store.put_blob_bytes(data, expected)) == expected
    assert (tmp_path / "s" / "blobs" / "sha512" / hashlib.sha512(data).hexdigest()).is_file()


def test_a_step_record_is_canonical_json(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    key = "a" * 64
    store.put_key(key, {"b": [1, 2], "a": {"y": 1, "x": 2}})
    assert store.key_path(key).read_bytes() == b'{"a":{"x":2,"y":1},"b":[1,2]}\n'
    assert json.loads(store.key_path(key).read_bytes()) == store.get_key(key)


def test_lock_files_mirror_the_entry_name_under_locks(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    root = tmp_path / "s"
    assert store.lock_path("rootfs/k.ext4") == root / "locks" / "rootfs" / "k.ext4.lock"
    assert store.lock_path("a/b/c") == root / "locks" / "a" / "b" / "c.lock"


def test_a_new_store_root_is_private_and_may_be_deep(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "er" / "store"
    Store(root).put_blob_bytes(b"x")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    Store(root).put_key("b" * 64, {})  # an existing root is fine


def test_removing_a_busy_entry_leaves_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    final = store.build_once("rootfs/k.ext4", lambda p: p.write_bytes(b"fs"))
    fd = os.open(store.lock_path("rootfs/k.ext4"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert store.remove("rootfs/k.ext4") is False
        assert final.exists()
    finally:
        os.close(fd)
    assert store.remove("rootfs/k.ext4") is True
    assert not final.exists()


def test_remove_takes_only_entry_names(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = Store(root)
    store.build_once("rootfs/k.ext4", lambda p: p.write_bytes(b"fs"))
    digest = store.put_blob_bytes(b"blob")
    (root / "rootfs" / ".tmp-k.ext4.abc").write_bytes(b"half")
    for name in ("locks/rootfs", "tmp/x", "blobs/sha256", "rootfs/.tmp-k.ext4.abc", "rootfs/"):
        assert store.remove(name) is False, name
    assert (root / "locks" / "rootfs").is_dir()
    assert (root / "rootfs" / ".tmp-k.ext4.abc").exists()
    assert store.remove(f"blobs/sha256/{digest.hex}") is True


def test_removing_an_entry_without_a_lock_makes_no_lock(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "rootfs").mkdir(parents=True)
    (root / "rootfs" / "k.ext4").write_bytes(b"fs")
    assert Store(root).remove("rootfs/k.ext4") is True
    assert not (root / "locks").exists()


def test_entries_carry_their_paths(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    digest = store.put_blob_bytes(b"blob")
    [entry] = store.entries()
    assert entry.path == store.blob_path(digest)


def test_prune_collects_stale_temps_unless_it_is_a_dry_run(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = Store(root)
    store.put_blob_bytes(b"blob")
    temp = root / "blobs" / "sha256" / ".tmp-stale"
    temp.write_bytes(b"half")
    old = time.time() - 7 * 3600
    os.utime(temp, (old, old))
    assert store.prune(dry_run=True).garbage == ()
    assert temp.exists()
    assert store.prune().garbage == (temp,)
    assert not temp.exists()


def test_the_temp_of_a_build_in_progress_is_not_garbage(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = Store(root)
    store.build_once("rootfs/k.ext4", lambda p: p.write_bytes(b"fs"))
    temp = root / "rootfs" / ".tmp-k.ext4.abc"
    temp.write_bytes(b"half")
    fd = os.open(store.lock_path("rootfs/k.ext4"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert store.stale_temps() == []
    finally:
        os.close(fd)
    assert store.stale_temps() == [temp]  # its builder is gone: the lock is free


def test_touch_marks_the_entry_never_what_a_link_points_to(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "rootfs").mkdir(parents=True)
    target = tmp_path / "outside"
    target.write_bytes(b"host file")
    old = time.time() - 3600
    os.utime(target, (old, old))
    (root / "rootfs" / "link").symlink_to(target)
    store = Store(root)
    store.touch("rootfs/link")
    assert target.stat().st_mtime == pytest.approx(old)
    assert (root / "rootfs" / "link").lstat().st_mtime > old + 1800
    store.touch("rootfs/missing")  # a use of nothing is no error


def test_an_entry_is_built_once_unless_it_is_replaced(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    builds: list[bytes] = []

    def build(data: bytes) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            builds.append(data)
            path.write_bytes(data)

        return write

    final = store.build_once("rootfs/k.ext4", build(b"one"))
    assert store.build_once("rootfs/k.ext4", build(b"two")) == final
    assert (builds, final.read_bytes()) == ([b"one"], b"one")
    assert store.build_once("rootfs/k.ext4", build(b"three"), replace=True) == final
    assert (builds, final.read_bytes()) == ([b"one", b"three"], b"three")
