"""`run --rootfs FILE --layer IMAGE...`: the layer drives on the VMM's command line, and the
refusals (exit 2) before anything boots."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.runtime.boot import MAX_EXTRA_DISKS
from testenv.fakeguest import ext4_like


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    for name in ("root", "low", "top"):
        ext4_like(tmp_path / f"{name}.ext4")
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MICROAGENT_KERNEL", str(tmp_path / "vmlinuz"))
    monkeypatch.setenv("MICROAGENT_INITRD", str(tmp_path / "initrd"))
    monkeypatch.setenv("MICROAGENT_ACCEL", "tcg")
    return tmp_path


def test_print_command_shows_the_layer_drives_read_only(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["run", "--rootfs", str(env / "root.ext4"), "--layer", str(env / "low.ext4"),
         "--layer", str(env / "top.ext4"), "--network", "isolated", "--print-command",
         "--", "true"]
    )  # fmt: skip
    assert code == 0
    argv = shlex.split(capsys.readouterr().out)
    assert f"id=vd3,file={env / 'low.ext4'},format=raw,if=none,readonly=on" in argv
    assert f"id=vd4,file={env / 'top.ext4'},format=raw,if=none,readonly=on" in argv
    devices = [a for a in argv if a.startswith("virtio-blk")]
    assert [d.rsplit("serial=", 1)[1] for d in devices][3:] == ["layer-1", "layer-2"]


def test_run_with_layers_reaches_the_backend(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_BACKEND", "fake")
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"exitCode": 0, "stdout": "ok\n"}))
    argv = ["--json", "run", "--rootfs", str(env / "root.ext4"), "--layer", str(env / "top.ext4")]
    assert main([*argv, "--", "true"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["stdout"] == "ok\n"


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    assert main(["--json", "run", "--print-command", *argv, "--", "true"]) == 2
    error: dict[str, str] = json.loads(capsys.readouterr().out)["error"]
    return error


def test_run_refuses_bad_layers_before_anything_boots(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ["--rootfs", str(env / "root.ext4")]
    error = refusal([*root, "--layer", str(env / "missing.ext4")], capsys)
    assert error["message"] == f"--layer {env / 'missing.ext4'}: no such file"
    (env / "text").write_text("not a file system")
    error = refusal([*root, "--layer", str(env / "text")], capsys)
    assert "not an ext4 file system image" in error["message"]
    assert "overlayfs form" in error["hint"]
    error = refusal([*root, "--layer", str(env)], capsys)
    assert error["message"] == f"--layer {env}: not a regular file"
    many = [w for _ in range(MAX_EXTRA_DISKS + 1) for w in ("--layer", str(env / "top.ext4"))]
    error = refusal([*root, *many], capsys)
    assert error["message"] == f"{MAX_EXTRA_DISKS + 1} layers, but a VM takes at most 16"
    assert "merge layers" in error["hint"]
    error = refusal(["--layer", str(env / "top.ext4"), "python:3.13-slim"], capsys)
    assert error["message"].startswith("--layer needs --rootfs")
    assert "--rootfs ROOT.ext4 --layer LAYER.ext4" in error["hint"]


def test_help_says_what_a_layer_is(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--layer IMAGE" in text
    assert "character device 0/0" in text and "trusted.overlay.opaque=y" in text
