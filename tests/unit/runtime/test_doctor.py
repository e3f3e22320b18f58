"""doctor: verdicts and individual checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from microagent.store.content import Store
from microagent.workspace import doctor
from microagent.workspace.doctor import Check, Report, Status


def test_verdicts() -> None:
    ok = Check("a", Status.OK, "")
    warn = Check("b", Status.WARN, "", "hint")
    fail_optional = Check("c", Status.FAIL, "")
    fail_required = Check("d", Status.FAIL, "", required=True)
    assert Report((ok,)).verdict == "ok"
    assert Report((ok, warn, fail_optional)).verdict == "degraded"
    report = Report((ok, fail_required))
    assert report.verdict == "failed" and report.to_json()["ok"] is False
    assert "verdict: failed" in report.render()


def test_store_check(tmp_path: Path) -> None:
    assert doctor.check_store(tmp_path / "new").status is Status.OK
    blocker = tmp_path / "file"
    blocker.write_text("")
    check = doctor.check_store(blocker / "sub")
    assert check.status is Status.FAIL and check.required


def test_missing_qemu_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("microagent.runner.shutil.which", lambda *a, **k: None)
    check = doctor.check_qemu()
    assert check.status is Status.FAIL and "apt-get install qemu-system-x86" in check.hint


def test_diagnose_reports_every_area(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.qemu, "kvm_device_problem", lambda: "/dev/kvm does not exist")
    report = doctor.diagnose(Store(tmp_path))
    names = {c.name for c in report.checks}
    assert {"qemu", "kvm", "tcg", "mke2fs", "network", "guest kit", "store"} <= names
    kit = next(c for c in report.checks if c.name == "guest kit")
    assert kit.status is Status.WARN and kit.hint == "microagent kernel install"
    assert report.verdict in {"degraded", "failed"}
