"""Disk-tool fixtures: a root filesystem image and a state image with an overlay upper dir.

Building them needs root (whiteout devices, trusted.* xattrs, chown) and e2fsprogs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from disk_kit import build_lower, build_state, mkfs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (whiteout devices, trusted xattrs, chown)")
    if not all(shutil.which(t) for t in ("mke2fs", "debugfs", "e2fsck")):
        reasons.append("needs e2fsprogs")
    if reasons:
        here = Path(__file__).parent
        for item in items:
            if Path(str(item.fspath)).parent == here:
                item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return mkfs(build_lower(tmp_path / "lower"), tmp_path / "rootfs.ext4")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return mkfs(build_state(tmp_path / "state"), tmp_path / "state.ext4")
