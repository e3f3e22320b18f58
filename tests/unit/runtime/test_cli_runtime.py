"""run / doctor / kernel commands in-process (no VM: --print-command, listings, errors)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.workspace import doctor
from microagent.workspace.doctor import Check, Status
from testenv.fakeguest import ext4_like


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    ext4_like(tmp_path / "root.ext4")  # run checks for an ext4 image
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MICROAGENT_KERNEL", str(tmp_path / "vmlinuz"))
    monkeypatch.setenv("MICROAGENT_INITRD", str(tmp_path / "initrd"))
    monkeypatch.setenv("MICROAGENT_ACCEL", "tcg")
    return tmp_path


def test_print_command_isolated(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["run", "--rootfs", str(env / "root.ext4"), "--network", "isolated", "--print-command",
         "--", "echo", "hi"]
    )  # fmt: skip
    assert code == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[3].endswith("qemu-system-x86_64")
    assert argv[argv.index("-kernel") + 1] == str(env / "vmlinuz")
    assert f"id=vd0,file={env / 'root.ext4'},format=raw,if=none,readonly=on" in argv
    assert "-netdev" not in argv
    assert argv[1:3] == ["--pdeathsig", "KILL"] and argv[0].endswith("setpriv")


def test_print_command_json_user(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["--json", "run", "--rootfs", str(env / "root.ext4"), "--forward", "80:18080",
         "--print-command", "--", "true"]
    )  # fmt: skip
    assert code == 0
    argv = json.loads(capsys.readouterr().out)["argv"]
    assert argv[:3] == ["ip", "netns", "exec"]
    assert any("guestfwd=tcp:10.0.2.100:80-cmd:" in a for a in argv)


def test_bad_forward_and_env(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run", "--rootfs", str(env / "root.ext4"), "--print-command"]
    assert main([*base, "--forward", "x:1", "--", "true"]) == 2
    assert "GUESTPORT:HOSTPORT" in capsys.readouterr().err
    assert main([*base, "-e", "1X=2", "--", "true"]) == 2


def test_missing_kernel_is_a_clear_error(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["run", "--rootfs", str(env / "root.ext4"), "--kernel", str(env / "nope"),
         "--initrd", str(env / "initrd"), "--", "true"]
    )  # fmt: skip
    assert code == 2
    assert f"kernel {env / 'nope'} does not exist" in capsys.readouterr().err


def test_kernel_ls_empty(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel", "ls"]) == 0
    assert capsys.readouterr().out.strip() == "no kits"
    assert main(["--json", "kernel", "ls"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "schemaVersion": 1, "kits": []}


@pytest.fixture
def host_checks(monkeypatch: pytest.MonkeyPatch) -> dict[str, Status]:
    """The host probes of ``doctor`` replaced: every check is ok, root, unless the test puts
    a check's name in the returned dict (so the host this runs on decides nothing)."""
    bad: dict[str, Status] = {}

    def check(name: str, required: bool) -> Check:
        status = bad.get(name, Status.OK)
        hint = f"fix {name}" if status is not Status.OK else ""
        return Check(name, status, f"{name} detail", hint, required)

    monkeypatch.setattr(doctor, "check_qemu", lambda: check("qemu", True))
    monkeypatch.setattr(doctor, "check_accel", lambda _store: check("kvm", False))
    monkeypatch.setattr(doctor, "_tool", lambda _n, what, *, required: check(what, required))
    monkeypatch.setattr(doctor, "check_network", lambda: [check("network", False)])
    monkeypatch.setattr(doctor, "check_kit", lambda _store: check("guest kit", False))
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 0)
    return bad


@pytest.mark.parametrize(
    ("bad", "verdict", "code"),
    [
        ({}, "ok", 0),
        ({"guest kit": Status.WARN}, "degraded", 0),
        ({"debugfs": Status.FAIL}, "degraded", 0),  # not required
        ({"qemu": Status.FAIL, "network": Status.WARN}, "failed", 1),
        ({"mke2fs": Status.FAIL}, "failed", 1),
    ],
    ids=["all-ok", "warning", "optional-fails", "required-fails", "mke2fs-fails"],
)
@pytest.mark.usefixtures("env")
def test_doctor_json(
    capsys: pytest.CaptureFixture[str],
    host_checks: dict[str, Status],
    bad: dict[str, Status],
    verdict: str,
    code: int,
) -> None:
    """The verdict and the exit code follow the checks."""
    host_checks.update(bad)
    got = main(["--json", "doctor"])
    data = json.loads(capsys.readouterr().out)
    assert (got, data["verdict"], data["ok"]) == (code, verdict, code == 0)
    names = ["qemu", "kvm", "mke2fs", "debugfs", "network", "guest kit", "store"]
    assert [c["name"] for c in data["checks"]] == names
    assert all({"name", "status", "detail", "hint", "required"} <= set(c) for c in data["checks"])
    failed = [n for n, s in bad.items() if s is Status.FAIL and n in ("qemu", "mke2fs")]
    if failed:
        (name,) = failed
        assert data["error"]["message"] == f"this host cannot run microVMs ({name}: {name} detail)"
        assert data["error"]["hint"] == f"fix {name}"
    else:
        assert data.get("error") is None


def test_run_reaches_the_configured_backend(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_BACKEND", "fake")
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"exitCode": 3, "stdout": "from fake\n"}))
    assert main(["--json", "run", "--rootfs", str(env / "root.ext4"), "--", "true"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert (data["backend"], data["result"]["stdout"]) == ("fake", "from fake\n")
    argv = ["run", "--rootfs", str(env / "root.ext4"), "--host-forward", "x=1", "--", "true"]
    assert main(argv) == 2
    assert "GUESTPORT=HOSTPORT" in capsys.readouterr().err
