"""The backends by name: one table instead of an if-chain.

``qemu`` boots real microVMs (KVM when a test boot works, TCG otherwise); ``fake`` boots
nothing and plays back what its outcome says (tests, and every path above the VMM);
``firecracker`` and ``vz`` are honest seams that report they cannot run here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from microagent.errors import InvalidInputError
from microagent.runtime.backend import Backend
from microagent.runtime.firecracker import FirecrackerBackend
from microagent.runtime.qemu import QemuBackend
from microagent.runtime.vz import VzBackend

Factory = Callable[[Path | None, str | None], Backend]


def _fake(_probes: Path | None, outcome: str | None) -> Backend:
    # A real start's supervisor imports this module before it launches the VMM.
    # deferred: the fake backend (tests, demos) is off that path
    from microagent.runtime.fake import FakeBackend, outcome_handler

    return FakeBackend(outcome_handler(outcome))


BACKENDS: Mapping[str, Factory] = {
    "qemu": lambda probes, _fake: QemuBackend(cache_dir=probes),
    "fake": _fake,
    "firecracker": lambda _probes, _fake: FirecrackerBackend(),
    "vz": lambda _probes, _fake: VzBackend(),
}


def get_backend(
    name: str, *, probes_dir: Path | None = None, fake_outcome: str | None = None
) -> Backend:
    """The backend called ``name``; ``probes_dir`` caches host probes (KVM, TSC) across
    boots; ``fake_outcome`` is what the fake backend's guest does (JSON, tests)."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise InvalidInputError(
            f"unknown backend {name!r}", hint=f"use one of: {', '.join(sorted(BACKENDS))}"
        )
    return factory(probes_dir, fake_outcome)
