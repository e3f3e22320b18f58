"""Every flag value is held to the limits of what it stands for, before anything happens.

A flag that overrides a spec field (``--memory``, ``--cpus``, ``--size-mib``, ...) accepts what
the field's JSON Schema accepts; every ``--timeout`` is a finite, positive number of seconds
(0 only where it means something); ``run`` refuses option-like words after IMAGE without
``--`` and a ``--rootfs`` that is not an ext4 image. Each bad value exits 2 with a hint, in
text and in JSON, and leaves the store, the temp dir and the project as they were.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from microagent.compiler.overrides import MAX_SECONDS, Overrides
from microagent.compiler.schema import field_range
from microagent.errors import InvalidInputError
from testenv import standin
from testenv.fakeguest import ext4_like

DIGEST = "sha256:" + "12" * 32


@pytest.fixture
def home(fake_backend: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The store and the temp dir inside tmp_path, so a snapshot of it sees every write."""
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return tmp_path / "home"


@pytest.fixture
def spec(home: Path, tmp_path: Path) -> Path:
    """A spec that plans offline (a digest) and would build and create with the fake backend
    if the flags let it."""
    path = tmp_path / "proj" / "microagent.yaml"
    path.parent.mkdir()
    path.write_text(f"name: lim\nimage: python:3.13-slim@{DIGEST}\nsetup: [echo hi]\n")
    return path


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    return {
        str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def refused(
    capsys: pytest.CaptureFixture[str], root: Path, args: list[str], kind: str = "invalid_input"
) -> dict[str, Any]:
    """``args`` exits 2 with a hint in text and in JSON, and changes nothing under ``root``."""
    before = snapshot(root)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "\nhint: " in err and "Traceback" not in err, err
    assert main(["--json", *args]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == kind and error["hint"], error
    assert snapshot(root) == before
    return dict(error)


SPEC_FLAGS = [
    (["--memory", "-1"], "--memory -1: must be at least 64", "64 to 1048576"),
    (["--memory", "0"], "--memory 0: must be at least 64", "64 to 1048576"),
    (["--memory", "99999999999"], "must be at most 1048576", "resources.memoryMiB"),
    (["--cpus", "0"], "--cpus 0: must be at least 1", "1 to 64"),
    (["--cpus", "-2"], "--cpus -2: must be at least 1", "1 to 64"),
    (["--cpus", "65"], "--cpus 65: must be at most 64", "resources.cpuCount"),
    (["--size-mib", "-5"], "--size-mib -5: must be at least 0", "0 to 16777216"),
    (["--size-mib", "17000000"], "must be at most 16777216", "resources.sizeMiB"),
    (["--network", "bridge"], "--network 'bridge': must be one of: user, isolated", "network"),
    (["--profile", "smal"], "--profile 'smal': must be one of", "did you mean 'small'?"),
]


@pytest.mark.parametrize("command", ["validate", "plan", "build", "create"])
@pytest.mark.parametrize(("flags", "message", "hint"), SPEC_FLAGS, ids=str)
def test_spec_override_out_of_range_is_refused(
    *,
    spec: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    flags: list[str],
    message: str,
    hint: str,
) -> None:
    offline = ["--offline"] if command == "plan" else []
    error = refused(capsys, tmp_path, [command, "-f", str(spec), *offline, *flags])
    assert message in error["message"]
    assert hint in error["hint"]


def test_spec_overrides_accept_the_whole_range(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bounds themselves are allowed and reach the plan as given (``--cpus`` is not
    replaced by the profile's); the control case for the refusals above."""
    (low_mem, high_mem), (_low_cpu, high_cpu) = (
        field_range("resources.memoryMiB") or (0, 0),
        field_range("resources.cpuCount") or (0, 0),
    )
    args = ["--json", "plan", "-f", str(spec), "--offline", "--cpus", str(high_cpu)]
    for memory in (low_mem, high_mem):
        assert main([*args, "--memory", str(memory)]) == 0
        plan = json.loads(capsys.readouterr().out)
        (config,) = [s for s in plan["steps"] if s["kind"] == "config"]
        resources = json.dumps(config["inputs"])
        assert f'"memoryMiB": {memory}' in resources and f'"cpuCount": {high_cpu}' in resources


def test_help_states_the_schema_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    """The ranges written in --help are the schema's (one source of truth, checked)."""
    assert main(["plan", "--help"]) == 0
    helptext = " ".join(capsys.readouterr().out.split())
    for field in ("resources.memoryMiB", "resources.cpuCount"):
        low, high = field_range(field) or (0, 0)
        assert f"{low} to {high}" in helptext
    assert f"up to {(field_range('resources.sizeMiB') or (0, 0))[1]}" in helptext
    assert main(["run", "--help"]) == 0
    helptext = " ".join(capsys.readouterr().out.split())
    low, high = field_range("resources.memoryMiB") or (0, 0)
    assert f"{low} to {high}" in helptext


def test_overrides_are_checked_in_the_library_too() -> None:
    with pytest.raises(InvalidInputError, match="--memory -1: must be at least 64"):
        Overrides(memory_mib=-1)
    with pytest.raises(InvalidInputError, match="--cpus 0"):
        Overrides(cpu_count=0)
    assert Overrides(memory_mib=64, cpu_count=1, size_mib=0).size_mib == 0


def test_publish_with_an_isolated_network_is_refused(
    spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["create", "-f", str(spec), "--network", "isolated", "-p", "8080:80"]
    assert "--publish needs network mode 'user'" in refused(capsys, tmp_path, args)["message"]
    args = ["create", "-f", str(spec), "-p", "80:99999"]
    assert "guest port 99999 is not 1-65535" in refused(capsys, tmp_path, args)["message"]


# -- timeouts -----------------------------------------------------------------------------------

TIMEOUTS = [
    (["create", "-f", "SPEC", "--timeout", "-1"], "must be more than 0"),
    (["create", "-f", "SPEC", "--timeout", "0"], "must be more than 0"),
    (["build", "-f", "SPEC", "--timeout", "inf"], "--timeout inf"),
    (["halt", "ws", "--timeout", "-3"], "--timeout -3: must be more than 0"),
    (["halt", "ws", "--timeout", "0"], "microagent kill"),
    (["stop", "ws", "--timeout", "-1"], "must be more than 0"),
    (["wait", "ws", "--timeout", "-1"], "must be 0 to 2592000 seconds (0: look once)"),
    (["wait", "ws", "--timeout", "nan"], "--timeout nan"),
    (["start", "ws", "--wait", "--timeout", "-1"], "(0: do not wait)"),
    (["exec", "ws", "--timeout", "0", "--", "true"], "must be more than 0"),
    (["exec", "ws", "--timeout", str(MAX_SECONDS + 1), "--", "true"], "at most 2592000"),
    (["run", "--rootfs", "ROOTFS", "--timeout", "-1", "--", "true"], "must be more than 0"),
    (["run", "--rootfs", "ROOTFS", "--timeout", "0", "--", "true"], "must be more than 0"),
]


@pytest.mark.parametrize(("args", "message"), TIMEOUTS, ids=" ".join)
def test_bad_timeouts_are_refused_before_anything_runs(
    spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Also before a workspace is looked up: ``ws`` does not exist, yet the flag is what is
    reported (exit 2, not 1)."""
    rootfs = ext4_like(tmp_path / "root.ext4")
    given = [{"SPEC": str(spec), "ROOTFS": str(rootfs)}.get(a, a) for a in args]
    error = refused(capsys, tmp_path, given)
    text = f"{error['message']} {error['hint']}"
    assert message in text
    if "halt" in args and "0" in args:
        assert error["hint"] == "to stop at once without a clean shutdown: microagent kill NAME"


def test_start_timeout_needs_wait(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = refused(capsys, tmp_path, ["start", "ws", "--timeout", "5"], kind="usage")
    assert (error["message"], error["hint"]) == (
        "--timeout needs --wait",
        "microagent start ws --wait --timeout 5",
    )


# -- run ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--memory", "-5"], "--memory -5: must be at least 64"),
        (["--memory", "2000000"], "--memory 2000000: must be at most 1048576"),
        (["--cpus", "0"], "--cpus 0: must be at least 1"),
        (["--cpus", "65"], "--cpus 65: must be at most 64"),
        (["--forward", "80:99999"], "--forward '80:99999': host port must be 1-65535"),
        (["--host-forward", "80=99999"], "--host-forward '80=99999': host port must be 1-65535"),
        (["--host-forward", "0=8080"], "expected GUESTPORT=HOSTPORT"),
        (["--network", "isolated", "--host-forward", "80=8080"], "--host-forward needs --network"),
        (["--network", "isolated", "--forward", "80:8080"], "--host-forward needs --network"),
        (["--network", "isolated", "-p", "8080:80"], "--publish needs --network user"),
        (["-p", "8080:99999"], "guest port 99999 is not 1-65535"),
    ],
    ids=" ".join,
)
def test_run_flags_are_refused_before_the_vm(
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    """Nothing reaches a VMM: ``--memory -5`` was handed to QEMU as ``-m -5``."""
    rootfs = ext4_like(tmp_path / "root.ext4")
    args = ["run", "--rootfs", str(rootfs), *flags, "--print-command", "--", "true"]
    assert message in refused(capsys, tmp_path, args)["message"]


def test_run_accepts_the_bounds(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"exitCode": 0, "stdout": "ok\n"}))
    rootfs = ext4_like(tmp_path / "root.ext4")
    args = ["run", "--rootfs", str(rootfs), "--memory", "64", "--cpus", "64", "--timeout", "5"]
    assert main(["--json", *args, "--", "true"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["stdout"] == "ok\n"


@pytest.mark.parametrize(
    "words",
    [
        ["IMAGE", "/bin/echo", "hi", "--print-command"],
        ["IMAGE", "ls", "-la"],
        ["--rootfs", "ROOTFS", "ls", "-la"],
        ["--rootfs", "ROOTFS", "sh", "-c", "true", "--timeout", "5"],
    ],
    ids=" ".join,
)
def test_run_refuses_option_like_words_without_a_separator(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    """``run IMAGE /bin/echo hi --print-command`` booted a VM running ``hi --print-command``;
    now nothing is pulled or booted (IMAGE is a layout that would be pulled)."""
    rootfs = ext4_like(tmp_path / "root.ext4")
    given = [{"IMAGE": "oci:nowhere", "ROOTFS": str(rootfs)}.get(w, w) for w in words]
    error = refused(capsys, tmp_path, ["run", *given], kind="usage")
    assert "looks like an option" in error["message"]
    assert error["hint"].startswith("use -- before the command: microagent run [OPTIONS] ")


@pytest.mark.parametrize(
    "words",
    [
        ["--rootfs", "ROOTFS", "--", "ls", "-la", "--print-command"],
        ["--rootfs", "ROOTFS", "cat", "-"],  # a lone dash is stdin, not an option
        ["--rootfs", "ROOTFS", "echo", "hi"],
    ],
    ids=" ".join,
)
def test_run_takes_option_like_words_after_the_separator(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    rootfs = ext4_like(tmp_path / "root.ext4")
    given = [{"ROOTFS": str(rootfs)}.get(w, w) for w in words]
    assert main(["--json", "run", "--print-command", *given]) == 0
    argv = json.loads(capsys.readouterr().out)["argv"]
    assert argv[0] == "fake-vmm"


def test_run_with_an_image_and_a_separator(
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    busybox_layout: standin.BuiltImage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shutil.copytree(busybox_layout.layout, tmp_path / "layout")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"stdout": "ran\n"}))
    for args in (
        ["run", "oci:layout", "--", "ls", "-la"],
        ["run", "--", "oci:layout", "ls", "-la"],  # `--` before IMAGE ends the options too
    ):
        assert main(["--json", *args]) == 0, capsys.readouterr()
        assert json.loads(capsys.readouterr().out)["result"]["stdout"] == "ran\n"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.ext4", "no such file"),
        (lambda d: d, "not a regular file"),
        (lambda d: _write(d / "in.json", b'{"a": 1}\n'), "not an ext4 file system image"),
        (lambda d: _write(d / "short.img", b"\x53\xef"), "not an ext4 file system image"),
        (lambda d: _write(d / "zeros.img", bytes(8192)), "not an ext4 file system image"),
    ],
    ids=["missing", "directory", "json", "short", "zeros"],
)
def test_run_rootfs_must_be_an_ext4_image(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, message: str
) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    path: Path = make(folder)
    error = refused(capsys, tmp_path, ["run", "--rootfs", str(path), "--", "true"])
    assert error["message"] == f"--rootfs {path}: " + error["message"].split(": ", 1)[1]
    assert message in error["message"]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- zero where it means something ----------------------------------------------------------------


@pytest.fixture
def project(home: Path, tmp_path: Path, busybox_layout: standin.BuiltImage) -> Path:
    proj = tmp_path / "bb"
    proj.mkdir()
    shutil.copytree(busybox_layout.layout, proj / "layout")
    (proj / "microagent.yaml").write_text(
        "name: ws\nimage: oci:layout:latest\nentrypoint: sleep 600\nrestart: never\n"
    )
    return proj


def cli(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> dict[str, Any]:
    capsys.readouterr()
    got = main(["--json", *args])
    out = capsys.readouterr().out
    assert got == code, out
    return dict(json.loads(out))


def test_zero_timeouts_mean_do_not_wait(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``start --wait --timeout 0`` returns once the VM runs; ``wait --timeout 0`` looks once."""
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"hang": True}))
    try:
        began = time.monotonic()
        started = cli(capsys, "start", "ws", "--wait", "--timeout", "0")
        assert "exitCode" not in started and started["state"] in {"starting", "running"}
        waited = cli(capsys, "wait", "ws", "--timeout", "0", code=124)
        assert waited["timedOut"] is True
        assert time.monotonic() - began < 10
    finally:
        main(["halt", "ws"])
