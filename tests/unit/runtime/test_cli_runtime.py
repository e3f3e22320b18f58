"""run / doctor / kernel commands in-process (no VM: --print-command, listings, errors)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.compiler.files import EXT_MAGIC, EXT_MAGIC_OFFSET


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    root = bytearray(4096)
    root[EXT_MAGIC_OFFSET : EXT_MAGIC_OFFSET + 2] = EXT_MAGIC  # run checks for an ext4 image
    (tmp_path / "root.ext4").write_bytes(bytes(root))
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


def test_doctor_json(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--json", "doctor"])
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] in {"ok", "degraded", "failed"}
    assert code == (1 if data["verdict"] == "failed" else 0)
    assert all({"name", "status", "detail", "hint", "required"} <= set(c) for c in data["checks"])


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
