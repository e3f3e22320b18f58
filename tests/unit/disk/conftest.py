"""Disk-tool fixtures: a root filesystem image and a state image with an overlay upper dir.

Building them needs root (whiteout devices, trusted.* xattrs, chown) and e2fsprogs: the tests
are marked so (``testenv.prereq``), which skips them locally and fails them under ``CI=true``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from disk_kit import build_lower, build_state, mkfs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.tools("mke2fs", "debugfs", "e2fsck"))
            item.add_marker(pytest.mark.root("whiteout devices, trusted xattrs and chown"))


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return mkfs(build_lower(tmp_path / "lower"), tmp_path / "rootfs.ext4")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return mkfs(build_state(tmp_path / "state"), tmp_path / "state.ext4")
