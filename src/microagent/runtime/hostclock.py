"""The host's TSC frequency, for TCG guests.

Under TCG an x86 guest reads the host's TSC. On ``-M microvm`` (no HPET, no ACPI PM timer) the
guest kernel calibrates it against the PIT, which fails now and then under emulation; the
kernel then marks the TSC unstable and, measured here, hangs early in about one boot in three.
Passing ``tsc_early_khz=`` skips that calibration. We measure the rate by reading the TSC
around a short sleep (a four-instruction function in an executable page), once per host boot.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])
_SAMPLE_SECONDS = 0.03
_keep: list[object] = []  # the executable page must outlive the function pointer


def _rdtsc_function() -> Callable[[], int] | None:
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, AttributeError, ValueError):
        return None  # W^X policy or no mmap
    page.write(_RDTSC)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    func = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
    _keep.extend((page, func))
    return lambda: int(func())


def measure_tsc_khz(samples: int = 3) -> int | None:
    """TSC ticks per millisecond, measured against the monotonic clock (None if impossible)."""
    rdtsc = _rdtsc_function()
    if rdtsc is None:
        return None
    rates = []
    for _ in range(samples):
        t0, c0 = time.perf_counter_ns(), rdtsc()
        time.sleep(_SAMPLE_SECONDS)
        c1, t1 = rdtsc(), time.perf_counter_ns()
        if t1 > t0 and c1 > c0:
            rates.append((c1 - c0) * 1_000_000 / (t1 - t0))
    return round(statistics.median(rates)) if rates else None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def tsc_khz(cache_dir: Path | None = None) -> int | None:
    """The host TSC rate in kHz, cached per host boot in ``cache_dir``."""
    boot = _boot_id()
    cached = cache_dir / f"tsc-{boot}.json" if cache_dir and boot else None
    if cached is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return int(json.loads(cached.read_text())["khz"])
    khz = measure_tsc_khz()
    if khz is not None and cached is not None:
        with contextlib.suppress(OSError):
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"khz": khz}))
            tmp.replace(cached)
    return khz
