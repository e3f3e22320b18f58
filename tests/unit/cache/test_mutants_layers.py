"""Layer application's guards, pinned down where mutants of layers/apply.py outlived the layer
tests (docs/testing.md): each refusal names the layer and the entry, with the hint; hard links
and whiteouts create nothing they should not; symlink targets are bounded to the byte.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from cache_tarkit import E, chardev, dir_, file, hard, sym, tar_bytes, whiteout

from microagent.errors import IntegrityError
from microagent.layers.apply import LayerSource, Limits, flatten
from microagent.layers.stagemeta import StageMetadata

HINT = "the image contains an unsafe or malformed layer; refusing to unpack it"


def _apply(tmp_path: Path, *entries: E, devices: bool = True) -> tuple[Path, StageMetadata]:
    stage = tmp_path / "stage"
    stage.mkdir(exist_ok=True)
    data = tar_bytes(list(entries))
    layer = LayerSource("#0", lambda: io.BytesIO(data))
    return stage, flatten(stage, [layer], limits=Limits(allow_devices=devices))


def _refusal(tmp_path: Path, *entries: E) -> str:
    with pytest.raises(IntegrityError) as raised:
        _apply(tmp_path, *entries)
    assert raised.value.hint == HINT
    return raised.value.message


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ((hard("h", "missing"),), "layer #0: entry 'h': hard link target 'missing' does not exist"),
        (
            (hard("h", "nodir/t"),),
            "layer #0: entry 'h': hard link target 'nodir/t' does not exist",
        ),
        ((file("a"), hard("a", "a")), "layer #0: entry 'a': hard link to 'a' would be circular"),
        ((dir_("d"), hard("h", "d")), "layer #0: entry 'h': hard link to a directory"),
        ((sym("s", ""),), "layer #0: entry 's': invalid symlink target"),
        ((sym("s", "t" * 4096),), "layer #0: entry 's': invalid symlink target"),
        ((whiteout("d/."),), "layer #0: entry 'd/.wh..': whiteout of an invalid name"),
    ],
)
def test_each_refusal_names_the_layer_and_the_entry(
    tmp_path: Path, entries: tuple[E, ...], message: str
) -> None:
    assert _refusal(tmp_path, *entries) == message
    assert not (tmp_path / "stage" / "nodir").exists()


def test_a_symlink_target_of_4095_bytes_is_kept_with_its_time(tmp_path: Path) -> None:
    stage, _ = _apply(tmp_path, sym("s", "t" * 4095, mtime=1_234_567))
    assert os.readlink(stage / "s") == "t" * 4095
    assert os.lstat(stage / "s").st_mtime == 1_234_567


def test_a_hard_link_replaces_what_was_there_in_a_new_folder_if_need_be(tmp_path: Path) -> None:
    stage, _ = _apply(
        tmp_path,
        file("a", b"content"),
        dir_("x"),
        file("x/inner"),
        file("b", b"old"),
        hard("x", "a"),
        hard("b", "a"),
        hard("new/dir/h", "a"),
    )
    for name in ("x", "b", "new/dir/h"):
        assert (stage / name).read_bytes() == b"content", name
        assert os.stat(stage / name).st_ino == os.stat(stage / "a").st_ino


def test_a_hard_link_to_a_recorded_device_is_recorded_too(tmp_path: Path) -> None:
    stage, meta = _apply(tmp_path, chardev("dev/null"), hard("dev/also", "dev/null"))
    recorded = meta.get("/dev/also")
    assert recorded is not None and recorded.kind.is_device
    assert (recorded.major, recorded.minor) == (1, 3)
    assert not (stage / "dev" / "also").exists()


def test_a_whiteout_under_a_missing_folder_creates_nothing(tmp_path: Path) -> None:
    stage, _ = _apply(tmp_path, whiteout("nodir/x"), file("keep"))
    assert sorted(p.name for p in stage.iterdir()) == ["keep"]


def test_aufs_bookkeeping_entries_are_skipped_not_applied(tmp_path: Path) -> None:
    stage, _ = _apply(tmp_path, file("a"), file(".wh..wh.plnk", b""), file(".wh..wh.x", b""))
    assert sorted(p.name for p in stage.iterdir()) == ["a"]


def _with(tmp_path: Path, limits: Limits, *entries: E) -> Path:
    stage = tmp_path / "stage"
    stage.mkdir(parents=True, exist_ok=True)
    data = tar_bytes(list(entries))
    flatten(stage, [LayerSource("#0", lambda: io.BytesIO(data))], limits=limits)
    return stage


def test_name_limits_hold_to_the_byte_and_the_component(tmp_path: Path) -> None:
    limits = Limits(max_path_bytes=12, max_depth=3)
    stage = _with(tmp_path, limits, file("a/b/c"), file("abcdefghijkl"))
    assert (stage / "a" / "b" / "c").is_file() and (stage / "abcdefghijkl").is_file()
    for entry, reason in [
        (file("abcdefghijklm"), "name longer than 12 bytes"),
        (file("a/b/c/d"), "path deeper than 3 components"),
        (file("a/.wh.x/y"), "whiteout name used as a directory"),
        (file("bad\x7fname"), "control character in name"),
    ]:
        with pytest.raises(IntegrityError) as raised:
            _with(tmp_path / entry.name.replace("/", "_").replace("\x7f", "_"), limits, entry)
        assert raised.value.message == f"layer #0: entry {entry.name!r}: {reason}"


def test_hard_links_to_symlinks_link_the_symlink_itself(tmp_path: Path) -> None:
    stage, _ = _apply(
        tmp_path,
        file("f", b"content"),
        sym("s", "f"),
        dir_("d"),
        sym("sd", "d"),
        hard("h", "s"),
        hard("hd", "sd"),
    )
    for link, target in (("h", "f"), ("hd", "d")):
        assert os.path.islink(stage / link), link
        assert os.readlink(stage / link) == target


@pytest.mark.root("a folder made as root gets root's mode")
def test_a_folder_made_for_an_entry_is_root_0755_as_root(tmp_path: Path) -> None:
    stage, _ = _apply(tmp_path, file("implied/f"))
    assert (stage / "implied").stat().st_mode & 0o7777 == 0o755


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ((file(".wh.", b""),), "layer #0: entry '.wh.': whiteout of an invalid name"),
        (
            (hard("h", "../x"),),
            "layer #0: entry 'h': '..' component (would escape the root)",
        ),
    ],
)
def test_whiteouts_and_link_targets_are_checked_like_names(
    tmp_path: Path, entries: tuple[E, ...], message: str
) -> None:
    assert _refusal(tmp_path, *entries) == message
