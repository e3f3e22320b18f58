"""The health probe: a command run through the guest agent on a schedule (spec ``health``).

The supervisor runs one :class:`HealthProber` per boot once the guest agent answers. A probe
passes when its command exits 0 within ``timeout_seconds``. The workspace is healthy after a
probe passes and unhealthy after ``retries`` consecutive failures; failures during the first
``start_period_seconds`` do not count (the agent may still be importing its SDK). Every
change of verdict is reported once through ``report`` (the supervisor writes it to
runtime.json and the event log).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_DETAIL = 200  # characters of a failing probe's output kept in the verdict


@dataclass(frozen=True)
class HealthCheck:
    """When and how to probe (the spec's ``health`` block)."""

    exec: tuple[str, ...]
    interval_seconds: float = 30.0
    timeout_seconds: float = 5.0
    retries: int = 3
    start_period_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "exec": list(self.exec),
            "intervalSeconds": self.interval_seconds,
            "timeoutSeconds": self.timeout_seconds,
            "retries": self.retries,
            "startPeriodSeconds": self.start_period_seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HealthCheck:
        return cls(
            exec=tuple(str(a) for a in data["exec"]),
            interval_seconds=float(data["intervalSeconds"]),
            timeout_seconds=float(data["timeoutSeconds"]),
            retries=int(data["retries"]),
            start_period_seconds=float(data["startPeriodSeconds"]),
        )


@dataclass(frozen=True)
class ProbeOutcome:
    """One probe: the exit code (None when it could not run) and what it printed or why."""

    exit_code: int | None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


Probe = Callable[[HealthCheck], ProbeOutcome]
Report = Callable[[dict[str, Any]], None]


class HealthProber(threading.Thread):
    """Runs ``probe`` every ``interval_seconds`` until stopped; reports verdict changes."""

    def __init__(self, check: HealthCheck, probe: Probe, report: Report) -> None:
        super().__init__(name="health", daemon=True)
        self.check, self.probe, self.report = check, probe, report
        self.stopping = threading.Event()
        self.began = time.monotonic()
        self.failures = 0
        self.probes = 0
        self.healthy: bool | None = None

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.step(self.probe(self.check))
            self.stopping.wait(self.check.interval_seconds)

    def step(self, outcome: ProbeOutcome) -> None:
        """Count one probe's outcome and report the verdict when it changes."""
        if self.stopping.is_set():
            return
        self.probes += 1
        if outcome.passed:
            self.failures = 0
            self._verdict(True, "probe passed")
            return
        if time.monotonic() - self.began < self.check.start_period_seconds:
            return  # still starting: failures do not count yet
        self.failures += 1
        if self.failures >= self.check.retries:
            why = outcome.detail.strip()[:MAX_DETAIL] or f"exit code {outcome.exit_code}"
            self._verdict(False, f"{self.failures} probes failed in a row: {why}")

    def _verdict(self, healthy: bool, detail: str) -> None:
        if healthy is self.healthy:
            return
        self.healthy = healthy
        self.report(
            {
                "ready": healthy,
                "observedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "detail": detail,
                "failures": self.failures,
                "probes": self.probes,
            }
        )
