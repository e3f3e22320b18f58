"""Guest speed settings on the QEMU command line (issue 15 item 2; bench/bench_guest.py)."""

from __future__ import annotations

from pathlib import Path

from microagent.runtime.backend import Accel, BootConfig, MachineType
from microagent.runtime.qemu import build_argv


def append_words(accel: Accel, tsc_khz: int | None, machine: MachineType) -> list[str]:
    config = BootConfig(
        kernel=Path("/kit/vmlinuz"),
        initrd=Path("/kit/initrd.img"),
        disks=(),
        state_dir=Path("/run/ma/s1"),
        machine=machine,
    )
    argv = build_argv("qemu", config, accel, tsc_khz=tsc_khz)
    return argv[argv.index("-append") + 1].split()


def test_tcg_guest_keeps_the_tsc_as_clocksource() -> None:
    for machine in MachineType:
        words = append_words(Accel.TCG, 2596152, machine)
        assert words[words.index("tsc_early_khz=2596152") + 1] == "tsc=reliable"


def test_kvm_guest_keeps_its_own_clock() -> None:
    # kvm-clock is the right clocksource under KVM; the TSC rate is not passed there either.
    words = append_words(Accel.KVM, 2596152, MachineType.MICROVM)
    assert not [w for w in words if w.startswith("tsc")]


def test_mitigations_off_under_tcg_only() -> None:
    # Under TCG the guest's code is translated: its speculation mitigations protect nothing.
    for machine in MachineType:
        assert "mitigations=off" in append_words(Accel.TCG, None, machine)
        assert not [w for w in append_words(Accel.KVM, None, machine) if "mitigations" in w]


def test_no_tsc_trust_without_a_known_rate() -> None:
    # Without a measured rate the kernel calibrates (or cannot): nothing to vouch for.
    words = append_words(Accel.TCG, None, MachineType.MICROVM)
    assert not [w for w in words if w.startswith("tsc")]
