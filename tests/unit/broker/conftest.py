"""Fixtures shared by the broker's tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory: a unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mab-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
