"""Kernel module metadata from .modinfo and the insmod order."""

from __future__ import annotations

import lzma

import pytest
import zstandard
from runtime_kit import MODULE_DEPS, make_ko

from microagent.errors import BuildError
from microagent.kit import kmod
from microagent.kit.guestkit import PREFERRED_ORDER


def infos() -> dict[str, kmod.ModuleInfo]:
    return {n: kmod.read_modinfo(f"{n}.ko", make_ko(n, d)) for n, d in MODULE_DEPS.items()}


def test_read_modinfo() -> None:
    info = kmod.read_modinfo("x/virtio_net.ko", make_ko("virtio_net", ["virtio", "net_failover"]))
    assert info == kmod.ModuleInfo("virtio_net", ("virtio", "net_failover"))


def test_name_falls_back_to_file_name() -> None:
    info = kmod.read_modinfo("drivers/virtio-rng.ko.xz", make_ko("x", [], with_name=False))
    assert info == kmod.ModuleInfo("virtio_rng", ())


def test_not_elf() -> None:
    with pytest.raises(BuildError, match="not a 64-bit ELF"):
        kmod.read_modinfo("a.ko", b"MZ" + b"\0" * 100)


def test_decompress_variants() -> None:
    raw = make_ko("a")
    assert kmod.decompress_module("a.ko.xz", lzma.compress(raw)) == raw
    assert kmod.decompress_module("a.ko.zst", zstandard.ZstdCompressor().compress(raw)) == raw
    assert kmod.decompress_module("a.ko", raw) == raw
    with pytest.raises(BuildError, match="cannot decompress"):
        kmod.decompress_module("a.ko.xz", b"junk")


def test_full_order_matches_the_measured_one() -> None:
    roots = ["virtio_mmio", "virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "overlay"]
    assert kmod.load_order(roots, infos(), preferred=PREFERRED_ORDER) == list(PREFERRED_ORDER)


def test_dependencies_always_come_first() -> None:
    order = kmod.load_order(["virtio_net"], infos())
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    assert "overlay" not in order


def test_exclude_skips_loaded_modules() -> None:
    assert kmod.load_order(["virtio_blk"], infos(), exclude={"virtio", "virtio_ring"}) == [
        "virtio_blk"
    ]


def test_missing_dependency_names_who_needs_it() -> None:
    table = {"a": kmod.ModuleInfo("a", ("b",))}
    with pytest.raises(BuildError, match="'b' is not in the kernel package \\(needed by a\\)"):
        kmod.load_order(["a"], table)


def test_cycle_is_reported() -> None:
    table = {"a": kmod.ModuleInfo("a", ("b",)), "b": kmod.ModuleInfo("b", ("a",))}
    with pytest.raises(BuildError, match="cycle: a -> b -> a"):
        kmod.load_order(["a"], table)


def test_strip_signature() -> None:
    import struct

    raw = make_ko("a")
    signature = b"S" * 681
    info = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + struct.pack(">I", len(signature))
    signed = raw + signature + info + b"~Module signature appended~\n"
    assert kmod.strip_signature(signed) == raw
    assert kmod.strip_signature(raw) == raw
