"""The secret search the leak tests rely on (testenv.leaks) finds what a full read finds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testenv.leaks import CHUNK, files_holding, holds

NEEDLE = b"sk-test-needle-0123456789"


def _sparse(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


@pytest.mark.parametrize(
    "offset",
    [
        0,
        (1 << 30) + 5,  # deep in a sparse file
        (1 << 30) + CHUNK - 7,  # across two chunks of one data region
        (2 << 30) - len(NEEDLE),  # at the very end
    ],
)
def test_the_needle_is_found_wherever_it_sits(tmp_path: Path, offset: int) -> None:
    # A data region of two chunks at 1 GiB, then the needle (in it, or elsewhere).
    path = _sparse(tmp_path / "disk.img", 2 << 30, {(1 << 30): b"x" * 2 * CHUNK, offset: NEEDLE})
    assert holds(path, NEEDLE)
    assert files_holding(tmp_path, NEEDLE.decode()) == ["disk.img"]


def test_a_needle_split_by_a_hole_is_not_there_and_a_clean_disk_is_clean(tmp_path: Path) -> None:
    half = len(NEEDLE) // 2
    path = _sparse(tmp_path / "d.img", 1 << 30, {0: NEEDLE[:half], 1 << 20: NEEDLE[half:]})
    assert not holds(path, NEEDLE)
    assert files_holding(tmp_path, NEEDLE) == []


def test_a_needle_that_ends_at_a_regions_edge_is_found(tmp_path: Path) -> None:
    # The data region ends right after the needle's last byte: the read must not stop short.
    block = os.statvfs(tmp_path).f_bsize
    path = _sparse(tmp_path / "e.img", 64 << 20, {(8 << 20) - len(NEEDLE): NEEDLE})
    assert (8 << 20) % block == 0
    assert holds(path, NEEDLE)


def test_symlinks_are_not_followed_and_zero_needles_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(NEEDLE)
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "link").symlink_to(outside / "secret")
    assert files_holding(inside, NEEDLE) == []
    assert files_holding(tmp_path, NEEDLE) == ["outside/secret"]
    with pytest.raises(ValueError):
        holds(outside / "secret", b"\0\0")
