"""Host TSC rate measurement and its per-boot cache."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from microagent.runtime import hostclock


@pytest.mark.skipif(platform.machine() != "x86_64", reason="rdtsc is x86 only")
def test_measure_is_plausible() -> None:
    khz = hostclock.measure_tsc_khz(samples=1)
    assert khz is not None and 100_000 < khz < 10_000_000


def test_cache_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostclock, "_boot_id", lambda: "boot-1")
    monkeypatch.setattr(hostclock, "measure_tsc_khz", lambda: 1234)
    assert hostclock.tsc_khz(tmp_path) == 1234
    assert json.loads((tmp_path / "tsc-boot-1.json").read_text()) == {"khz": 1234}
    monkeypatch.setattr(hostclock, "measure_tsc_khz", lambda: 9999)
    assert hostclock.tsc_khz(tmp_path) == 1234
    assert hostclock.tsc_khz(None) == 9999
