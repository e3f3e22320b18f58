"""Boot real QEMU (TCG here): results, env/files delivery, the read-only rootfs, failures."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RunVM

from microagent.cli import main
from microagent.errors import InvalidInputError, VMError
from microagent.kit import guestkit
from microagent.kit.guestkit import GuestKit
from microagent.runtime import qemu
from microagent.runtime.backend import BootConfig, BootStalled, MachineType
from microagent.runtime.boot import RunRequest, prepare, run_once
from microagent.runtime.configdisk import GuestFile, Output
from microagent.runtime.qemu import QemuBackend
from microagent.store.content import Store
from testenv.upstream import Upstream

pytestmark = pytest.mark.vm


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_exit_code_and_output_are_captured(run_vm: RunVM, no_leftovers: None) -> None:
    result = run_vm("sh", "-c", "echo out; echo err >&2; printf 'no newline'; exit 7")
    assert result.exit_code == 7
    assert result.stdout == "out\nno newline"
    assert result.stderr == "err\n"
    assert result.error is None and not result.stopped
    assert result.started_at and result.finished_at
    assert {"guest.init", "guest.modules", "guest.mounts", "guest.exec"} <= set(result.timings)


def test_env_files_outputs_and_the_rootfs_stays_untouched(
    run_vm: RunVM, rootfs: Path, no_leftovers: None
) -> None:
    before = sha256(rootfs)
    script = (
        'echo "A=$A B=$B"; echo "PATH=$PATH HOME=$HOME"; pwd; hostname; cat /etc/hostname; '
        "cat /app/data.txt; ls -l /app/run.sh | cut -c1-10; /app/run.sh; "
        "echo written > /etc/new-file; rm /bin/ls; mkdir -p /out; "
        "echo '{\"n\": 42}' > /out/r.json; "
        "env | grep -c SECRET_FROM_HOST || true"
    )
    result = run_vm(
        "sh",
        "-c",
        script,
        env={"A": "1", "B": "two words"},
        files=(
            GuestFile("/app/data.txt", b"from the host\n"),
            GuestFile("/app/run.sh", b"#!/bin/sh\necho script ran\n", 0o755),
        ),
        outputs=(Output("result", "/out/r.json"), Output("missing", "/out/none")),
        hostname="vm-test",
        workdir="/app",
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "A=1 B=two words"
    assert lines[1] == f"PATH={guestkit.DEFAULT_PATH} HOME=/root"
    assert lines[2:6] == ["/app", "vm-test", "vm-test", "from the host"]
    assert lines[6] == "-rwxr-xr-x"
    assert lines[7] == "script ran"
    assert lines[8] == "0"
    assert json.loads(result.outputs["result"]["content"]) == {"n": 42}
    assert result.outputs["missing"] is None
    assert sha256(rootfs) == before


def test_command_not_found(run_vm: RunVM) -> None:
    result = run_vm("no-such-program", "arg")
    assert result.exit_code == 127
    assert result.error is not None and "no-such-program: command not found" in result.error


def test_isolated_has_no_network_interface(run_vm: RunVM) -> None:
    result = run_vm("sh", "-c", "ls /sys/class/net; wget -q -O- http://10.0.2.2/ || echo NO-NET")
    assert result.stdout.split() == ["lo", "NO-NET"]


def test_extra_ca_is_boot_time_only(
    kit: GuestKit, rootfs: Path, backend: QemuBackend, no_leftovers: None
) -> None:
    before = sha256(rootfs)
    request = RunRequest(
        rootfs=rootfs,
        command=(
            "sh",
            "-c",
            'for f in "$SSL_CERT_FILE" "$PIP_CERT" "$REQUESTS_CA_BUNDLE" '
            "/etc/ssl/certs/ca-certificates.crt; do "
            'echo "$(grep -c EXTRA-TEST-CA "$f") $(grep -c ORIGINAL-GUEST-BUNDLE "$f")"; done',
        ),
        extra_ca=b"EXTRA-TEST-CA\n",
        state_size_mib=64,
        timeout=90,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = prepare(request, kit, Path(tmp))
        with backend.boot(config) as machine:
            result = machine.wait()
        state = (Path(tmp) / "state.ext4").read_bytes()
    # all three variables and the guest's own bundle path show guest bundle + extra CA
    assert result.stdout.splitlines() == ["1 1"] * 4, result.stdout
    assert b"EXTRA-TEST-CA" not in state  # never written to the persistent disk
    assert sha256(rootfs) == before


def test_cli_run_exit_code_and_output(
    rootfs: Path,
    runtime_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MICROAGENT_HOME", str(runtime_home))
    code = main(
        [
            "run",
            "--rootfs",
            str(rootfs),
            "--network",
            "isolated",
            "--",
            "sh",
            "-c",
            "echo 42; exit 3",
        ]
    )
    assert code == 3
    assert capsys.readouterr().out == "42\n"


def test_q35_fallback_machine(run_vm: RunVM) -> None:
    assert run_vm("true", machine=MachineType.Q35).exit_code == 0


def test_kernel_panic_is_reported(
    kit: GuestKit, rootfs: Path, backend: QemuBackend, no_leftovers: None
) -> None:
    request = RunRequest(rootfs=rootfs, command=("true",), state_size_mib=64, timeout=60)
    with tempfile.TemporaryDirectory() as tmp:
        config = dataclasses.replace(
            prepare(request, kit, Path(tmp)), cmdline_extra=("rdinit=/no-such-init",)
        )
        began = time.monotonic()
        with pytest.raises(VMError, match="panicked"), backend.boot(config) as machine:
            machine.wait()
    assert time.monotonic() - began < 30


@pytest.fixture
def stalling(
    backend: QemuBackend, monkeypatch: pytest.MonkeyPatch, no_leftovers: None
) -> list[Path]:
    """A boot deadline shorter than any boot (every boot stalls); the VM directory of each
    boot ``backend`` makes in the test."""
    monkeypatch.setattr(qemu, "BOOT_TIMEOUT", 0.2)
    seen: list[Path] = []
    real_boot = backend.boot

    def counted(config: BootConfig, **kw: Any) -> Any:
        seen.append(config.state_dir)
        return real_boot(config, **kw)

    monkeypatch.setattr(backend, "boot", counted)
    return seen


def test_a_boot_that_stalls_is_tried_once_more_and_says_where_the_vcpu_was(
    kit: GuestKit, rootfs: Path, backend: QemuBackend, stalling: list[Path], tmp_path: Path
) -> None:
    """Each stalled boot saves the vCPUs' registers (QMP) and is stopped; run_once boots once
    more before it gives up, and no QEMU is left behind (``no_leftovers``)."""
    request = RunRequest(rootfs=rootfs, command=("true",), state_size_mib=64, timeout=60)
    with pytest.raises(BootStalled) as raised:
        run_once(request, backend=backend, kit=kit, vm_dir=tmp_path)
    assert len(stalling) == 2
    assert raised.value.message.startswith("the guest did not boot within 0.2s (VMM running")
    assert "RIP=" in raised.value.message
    assert raised.value.diagnosis == tmp_path / qemu.STALL_FILE
    dump = raised.value.diagnosis.read_text()
    assert dump.startswith("run state: running") and "RIP=" in dump and "CR3=" in dump


def test_bad_kernel_path_and_garbage_kernel(
    run_vm: RunVM, store: Store, tmp_path: Path, kit: GuestKit, no_leftovers: None
) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        guestkit.resolve_kit(store, kernel=tmp_path / "missing-vmlinuz")
    garbage = tmp_path / "garbage-vmlinuz"
    garbage.write_bytes(b"\x00not a kernel" * 1000)
    began = time.monotonic()
    with pytest.raises(VMError, match="exited before the guest booted") as raised:
        run_vm("true", kit=dataclasses.replace(kit, kernel=garbage))
    assert time.monotonic() - began < 10
    assert "qemu" in raised.value.hint  # the argv and the VMM's own message


def test_shutdown_from_another_thread_stops_the_workload(
    kit: GuestKit, rootfs: Path, backend: QemuBackend, no_leftovers: None
) -> None:
    """What a supervisor does on `halt`: shutdown() while another thread is in wait()."""
    import threading

    request = RunRequest(
        rootfs=rootfs,
        command=(
            "sh",
            "-c",
            "trap 'echo got TERM; exit 143' TERM; echo up; while :; do sleep 1; done",
        ),
        state_size_mib=64,
        timeout=90,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = prepare(request, kit, Path(tmp))
        streamed: list[bytes] = []
        with backend.boot(config) as machine:

            def halt_when_up() -> None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and b"up\n" not in b"".join(streamed):
                    time.sleep(0.05)
                machine.shutdown()

            helper = threading.Thread(target=halt_when_up)
            helper.start()
            began = time.monotonic()
            result = machine.wait(on_output=streamed.append)
            helper.join()
    assert result.stopped, result
    assert result.stdout == "up\ngot TERM\n", result  # TERM first: the workload cleans up
    assert result.exit_code == 143, result
    assert time.monotonic() - began < 30


def test_background_children_do_not_hold_the_run_open(run_vm: RunVM) -> None:
    began = time.monotonic()
    result = run_vm("sh", "-c", "sleep 300 & echo started-bg")
    assert result.exit_code == 0 and result.stdout == "started-bg\n"
    assert time.monotonic() - began < 30


def test_cli_run_with_a_credential_reaches_the_upstream_through_the_broker(
    rootfs: Path,
    runtime_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`run --credential`: the guest's command calls its base URL (busybox wget, over the
    guest agent's service channel to the gateway the CLI started), the upstream gets the key,
    the guest sees only the placeholder."""
    secret = "sk-ant-" + secrets.token_hex(16)
    monkeypatch.setenv("MICROAGENT_HOME", str(runtime_home))
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    script = (
        'echo "key=$ANTHROPIC_API_KEY"; '
        'wget -q -O - --header "x-api-key: $ANTHROPIC_API_KEY" '
        '--post-data "{\\"ping\\":1}" "$ANTHROPIC_BASE_URL/v1/messages"'
    )
    with Upstream(reply=b'{"type":"message","from":"upstream"}') as upstream:
        code = main(
            ["run", "--rootfs", str(rootfs), "--network", "isolated",
             "--credential", "anthropic",
             "--credential-upstream", f"anthropic=http://127.0.0.1:{upstream.port}",
             "--", "sh", "-c", script]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        assert '"from":"upstream"' in out
        assert secret not in out and "key=" in out
        assert [r.path for r in upstream.requests] == ["/v1/messages"]
        assert upstream.requests[0].headers["x-api-key"] == secret
        assert upstream.requests[0].body == b'{"ping":1}'
