"""Fault campaigns (issue: reliability): how many runs, and the figures they produce.

``MICROAGENT_FAULT_SCALE`` picks the size: ``ci`` (the default: the reduced campaign that runs
inside ``make test``) or ``full`` (``make faults``). ``MICROAGENT_FAULT_REPORT`` names a JSON-lines
file every campaign appends one row to when it ends; ``scripts/faults.py`` runs the full campaign
and renders ``docs/reliability.md`` from those rows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

SCALES = ("ci", "full")


@dataclass
class Tally:
    """One campaign's figures; the test fills them in and asserts the goals itself."""

    campaign: str
    command: str
    runs: int = 0
    faults: int = 0
    corrupt: int = 0
    stuck: int = 0
    tracebacks: int = 0
    lost: int = 0
    scale: str = "ci"
    # added for the kill/concurrency campaigns (H4); the report renders them when set
    leftover: int = 0  # temp files/locks a killed writer left (garbage, never served)
    seed: int | None = None
    notes: str = ""
    seconds: float = 0.0


def fault_scale() -> str:
    scale = os.environ.get("MICROAGENT_FAULT_SCALE", "ci")
    if scale not in SCALES:
        raise pytest.UsageError(f"MICROAGENT_FAULT_SCALE={scale!r}: expected one of {SCALES}")
    return scale


@pytest.fixture
def scaled() -> Callable[[int, int], int]:
    """``scaled(ci, full)``: the number of runs for the current scale."""
    scale = fault_scale()
    return lambda ci, full: ci if scale == "ci" else full


@pytest.fixture
def campaign() -> Iterator[Callable[[str, str], Tally]]:
    """``campaign(name, command)`` gives a :class:`Tally`; each is appended to the report file
    (when ``MICROAGENT_FAULT_REPORT`` is set) after the test, pass or fail."""
    tallies: list[Tally] = []

    def make(name: str, command: str) -> Tally:
        tally = Tally(campaign=name, command=command, scale=fault_scale())
        tallies.append(tally)
        return tally

    began = time.monotonic()
    yield make
    for tally in tallies:
        tally.seconds = tally.seconds or round(time.monotonic() - began, 1)
    report = os.environ.get("MICROAGENT_FAULT_REPORT")
    if report:
        with Path(report).open("a", encoding="utf-8") as out:
            for tally in tallies:
                out.write(json.dumps(asdict(tally), sort_keys=True) + "\n")
