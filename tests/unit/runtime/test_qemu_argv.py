"""QEMU argv built by pure functions, compared with golden command lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from microagent.errors import InvalidInputError
from microagent.runtime.backend import (
    Accel,
    Availability,
    BootConfig,
    Disk,
    Forward,
    MachineType,
    NetworkConfig,
    PublishedPort,
)
from microagent.runtime.configdisk import NetworkMode
from microagent.runtime.qemu import (
    build_argv,
    choose_accel,
    kernel_cmdline,
    probe_argv,
    vcpus,
)

STATE = Path("/run/ma/s1")
DISKS = (
    Disk(Path("/store/rootfs/k.ext4"), readonly=True, serial="rootfs"),
    Disk(STATE / "state.ext4", serial="state"),
    Disk(STATE / "config.tar", readonly=True, serial="config"),
)


def config(**changes: object) -> BootConfig:
    base: dict[str, object] = {
        "kernel": Path("/kit/vmlinuz"),
        "initrd": Path("/kit/initrd.img"),
        "disks": DISKS,
        "state_dir": STATE,
    }
    base.update(changes)
    return BootConfig(**base)  # type: ignore[arg-type]


COMMON_TAIL = [
    "-drive", "id=vd0,file=/store/rootfs/k.ext4,format=raw,if=none,readonly=on",
    "-device", "virtio-blk-device,drive=vd0,serial=rootfs",
    "-drive", "id=vd1,file=/run/ma/s1/state.ext4,format=raw,if=none",
    "-device", "virtio-blk-device,drive=vd1,serial=state",
    "-drive", "id=vd2,file=/run/ma/s1/config.tar,format=raw,if=none,readonly=on",
    "-device", "virtio-blk-device,drive=vd2,serial=config",
    "-device", "virtio-serial-device,max_ports=3",
    "-chardev", "socket,id=ctl,path=/run/ma/s1/control.sock,server=on,wait=off",
    "-device", "virtserialport,chardev=ctl,name=microagent.ctl",
    "-chardev", "socket,id=agent,path=/run/ma/s1/agent.sock,server=on,wait=off",
    "-device", "virtserialport,chardev=agent,name=microagent.agent",
    "-qmp", "unix:/run/ma/s1/qmp.sock,server=on,wait=off",
]  # fmt: skip


def test_golden_microvm_tcg_isolated() -> None:
    argv = build_argv("/usr/bin/qemu-system-x86_64", config(), Accel.TCG, tsc_khz=2596152)
    assert argv == [
        "/usr/bin/qemu-system-x86_64",
        "-M", "microvm", "-accel", "tcg", "-cpu", "max",
        "-m", "1024", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", "file,id=serial0,path=/run/ma/s1/serial.log,append=on",
        "-serial", "chardev:serial0",
        "-kernel", "/kit/vmlinuz", "-initrd", "/kit/initrd.img",
        "-append",
        "console=ttyS0 quiet panic=-1 rcupdate.rcu_expedited=1 pci=off mitigations=off"
        " tsc_early_khz=2596152 tsc=reliable ma_transport=mmio",
        *COMMON_TAIL,
    ]  # fmt: skip


def test_golden_microvm_user_network_with_forwards() -> None:
    net = NetworkConfig(
        NetworkMode.USER,
        (Forward(80, host_port=18080), Forward(8443, unix_socket=Path("/run/my proxy;1.sock"))),
    )
    forwards = [(f, f.unix_socket or STATE / f"fwd-{f.guest_port}.sock") for f in net.forwards]
    argv = build_argv(
        "qemu", config(network=net, cpus=2), Accel.TCG, forwards=forwards, socat="/usr/bin/socat"
    )
    assert argv[argv.index("-smp") + 1] == "2"
    assert argv[-4:] == [
        "-netdev",
        "user,id=n0,ipv6=off,"
        "guestfwd=tcp:10.0.2.100:80-cmd:/usr/bin/socat STDIO UNIX-CONNECT:/run/ma/s1/fwd-80.sock,"
        "guestfwd=tcp:10.0.2.100:8443-cmd:/usr/bin/socat STDIO 'UNIX-CONNECT:/run/my proxy;1.sock'",
        "-device",
        "virtio-net-device,netdev=n0",
    ]


def test_golden_user_network_with_published_ports() -> None:
    published = (
        PublishedPort("127.0.0.1", 18080, 80),
        PublishedPort("0.0.0.0", 18081, 80),  # one namespace port per guest port
        PublishedPort("127.0.0.1", 2222, 22),
    )
    argv = build_argv(
        "qemu", config(network=NetworkConfig(NetworkMode.USER, published=published)), Accel.TCG
    )
    assert argv[-4:] == [
        "-netdev",
        "user,id=n0,ipv6=off,"
        "hostfwd=tcp:127.0.0.1:22-10.0.2.15:22,hostfwd=tcp:127.0.0.1:80-10.0.2.15:80",
        "-device",
        "virtio-net-device,netdev=n0",
    ]


def test_golden_q35_kvm() -> None:
    argv = build_argv("qemu", config(machine=MachineType.Q35, memory_mib=512), Accel.KVM, tsc_khz=1)
    assert argv[:9] == ["qemu", "-M", "q35", "-accel", "kvm", "-cpu", "host", "-m", "512"]
    assert argv[argv.index("-smp") + 1] == "2"
    append = argv[argv.index("-append") + 1]
    assert append == "console=ttyS0 quiet panic=-1 rcupdate.rcu_expedited=1 ma_transport=pci"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[:6] == [
        "virtio-blk-pci,drive=vd0,serial=rootfs",
        "virtio-blk-pci,drive=vd1,serial=state",
        "virtio-blk-pci,drive=vd2,serial=config",
        "virtio-serial-pci,max_ports=3",
        "virtserialport,chardev=ctl,name=microagent.ctl",
        "virtserialport,chardev=agent,name=microagent.agent",
    ]


def test_commas_in_paths_are_doubled() -> None:
    odd = config(disks=(Disk(Path("/a,b/root.ext4"), readonly=True),), state_dir=Path("/s,t"))
    argv = build_argv("qemu", odd, Accel.TCG)
    assert "id=vd0,file=/a,,b/root.ext4,format=raw,if=none,readonly=on" in argv
    assert "socket,id=ctl,path=/s,,t/control.sock,server=on,wait=off" in argv
    assert "socket,id=agent,path=/s,,t/agent.sock,server=on,wait=off" in argv


def test_auto_must_be_resolved_first() -> None:
    with pytest.raises(ValueError, match="resolve"):
        build_argv("qemu", config(), Accel.AUTO)


def test_kernel_cmdline_extra_words() -> None:
    text = kernel_cmdline(config(cmdline_extra=("rdinit=/nope",)))
    assert text.endswith("ma_transport=mmio rdinit=/nope")


def test_vcpus() -> None:
    assert (vcpus(0, Accel.TCG), vcpus(0, Accel.KVM), vcpus(3, Accel.TCG)) == (1, 2, 3)


def test_probe_argv_boots_the_kit_in_probe_mode() -> None:
    argv = probe_argv("qemu", Path("/k"), Path("/i"), Path("/t/serial.log"))
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[-1].endswith("ma_mode=probe")


def test_choose_accel() -> None:
    calls: list[int] = []

    def probe_ok() -> Availability:
        calls.append(1)
        return Availability(True, "booted")

    def probe_bad() -> Availability:
        return Availability(False, "MSR assertion")

    assert choose_accel(Accel.TCG, probe_ok) == (Accel.TCG, "requested")
    assert calls == []
    assert choose_accel(Accel.AUTO, probe_ok)[0] is Accel.KVM
    accel, why = choose_accel(Accel.AUTO, probe_bad)
    assert accel is Accel.TCG and "MSR assertion" in why
    assert choose_accel(Accel.parse(" TCG "), probe_ok) == (Accel.TCG, "requested")
    with pytest.raises(InvalidInputError, match="'warp' is not an accelerator"):
        Accel.parse("warp")
