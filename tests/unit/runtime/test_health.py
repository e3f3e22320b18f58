"""The health prober's verdicts: retries, the start period, reports only on change."""

from __future__ import annotations

import threading
from typing import Any

from microagent.runtime.health import HealthCheck, HealthProber, ProbeOutcome

CHECK = HealthCheck(exec=("true",), interval_seconds=0.01, timeout_seconds=1, retries=3)


def prober(check: HealthCheck = CHECK) -> tuple[HealthProber, list[dict[str, Any]]]:
    reports: list[dict[str, Any]] = []
    return HealthProber(check, lambda _c: ProbeOutcome(0), reports.append), reports


def test_healthy_after_one_pass_and_reported_once() -> None:
    p, reports = prober()
    p.step(ProbeOutcome(0))
    p.step(ProbeOutcome(0))
    assert [r["ready"] for r in reports] == [True]


def test_unhealthy_only_after_retries_consecutive_failures() -> None:
    p, reports = prober()
    p.step(ProbeOutcome(0))
    p.step(ProbeOutcome(1, "boom"))
    p.step(ProbeOutcome(1, "boom"))
    assert [r["ready"] for r in reports] == [True]
    p.step(ProbeOutcome(1, "boom"))
    assert [r["ready"] for r in reports] == [True, False]
    assert "3 probes failed in a row: boom" in reports[-1]["detail"]
    p.step(ProbeOutcome(0))
    assert [r["ready"] for r in reports] == [True, False, True]


def test_a_pass_resets_the_failure_count() -> None:
    p, reports = prober()
    for outcome in (1, 1, 0, 1, 1, 0):
        p.step(ProbeOutcome(outcome))
    assert [r["ready"] for r in reports] == [True]


def test_failures_in_the_start_period_do_not_count() -> None:
    p, reports = prober(HealthCheck(exec=("x",), retries=1, start_period_seconds=3600))
    for _ in range(5):
        p.step(ProbeOutcome(None, "agent not ready"))
    assert reports == []
    p.step(ProbeOutcome(0))
    assert [r["ready"] for r in reports] == [True]


def test_thread_probes_until_stopped() -> None:
    calls: list[int] = []
    flipped = threading.Event()

    def probe(_c: HealthCheck) -> ProbeOutcome:
        calls.append(1)
        if len(calls) >= 4:
            flipped.set()
            return ProbeOutcome(1, "down")
        return ProbeOutcome(0)

    reports: list[dict[str, Any]] = []
    p = HealthProber(
        HealthCheck(exec=("x",), interval_seconds=0.01, retries=1), probe, reports.append
    )
    p.start()
    assert flipped.wait(5)
    p.stop()
    p.join(5)
    assert not p.is_alive()
    assert [r["ready"] for r in reports][:2] == [True, False]


def test_check_round_trips_through_json() -> None:
    check = HealthCheck(("sh", "-c", "test -f /ok"), 2, 1, 4, 10)
    assert HealthCheck.from_json(check.to_json()) == check
