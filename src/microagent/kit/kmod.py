"""Kernel modules without kmod: read ``.modinfo`` from ELF files and order modules for insmod.

Debian ships no ``modules.dep`` in the kernel package, so dependencies come from the
``depends=`` entry each module records in its ``.modinfo`` section.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from microagent.errors import BuildError

_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class ModuleInfo:
    """A module's name and the modules it needs loaded first."""

    name: str
    depends: tuple[str, ...]


def module_name(filename: str) -> str:
    """``virtio-rng.ko.xz`` -> ``virtio_rng`` (the name the kernel uses)."""
    base = filename.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def decompress_module(filename: str, data: bytes) -> bytes:
    """Plain ``.ko`` bytes from a possibly compressed module file."""
    import zstandard  # deferred: only a guest kit build decompresses; keeps it off start-up

    try:
        if filename.endswith(".xz"):
            return lzma.decompress(data)
        if filename.endswith(".zst"):
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=256 << 20)
    except (lzma.LZMAError, zstandard.ZstdError) as exc:
        raise BuildError(f"cannot decompress kernel module {filename}: {exc}") from exc
    if filename.endswith(".gz"):
        return gzip.decompress(data)
    return data


_SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(module: bytes) -> bytes:
    """Drop an appended module signature: unsigned modules load without the in-guest
    hash and RSA check (slow under emulation); the kernel does not enforce signatures."""
    if not module.endswith(_SIG_MAGIC):
        return module
    info_end = len(module) - len(_SIG_MAGIC)
    sig_len = struct.unpack(">I", module[info_end - 4 : info_end])[0]
    cut = info_end - 12 - sig_len
    if cut <= 0:
        raise BuildError("corrupt module signature trailer")
    return module[:cut]


def _section(elf: bytes, wanted: str) -> bytes | None:
    """The contents of the named section of a 64-bit ELF file, or None."""
    if elf[:4] != _ELF_MAGIC or elf[4] != 2:
        raise BuildError("kernel module is not a 64-bit ELF file")
    order = "<" if elf[5] == 1 else ">"
    shoff = struct.unpack_from(order + "Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", elf, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name = struct.unpack_from(order + "I", elf, base)[0]
        offset, size = struct.unpack_from(order + "QQ", elf, base + 0x18)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    names = elf[str_off : str_off + str_size]
    for index in range(shnum):
        name_off, offset, size = header(index)
        end = names.find(b"\0", name_off)
        if names[name_off:end].decode("ascii", "replace") == wanted:
            return elf[offset : offset + size]
    return None


def read_modinfo(filename: str, elf: bytes) -> ModuleInfo:
    """Parse the ``.modinfo`` section: the module's name and ``depends=`` list."""
    try:
        section = _section(elf, ".modinfo")
    except struct.error as exc:
        raise BuildError(f"kernel module {filename} is truncated: {exc}") from exc
    fields: dict[str, str] = {}
    for item in (section or b"").split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep and key not in fields:
            fields[key] = value
    name = fields.get("name") or module_name(filename)
    depends = tuple(d for d in fields.get("depends", "").split(",") if d)
    return ModuleInfo(name, depends)


def load_order(
    roots: Iterable[str],
    infos: Mapping[str, ModuleInfo],
    *,
    preferred: Sequence[str] = (),
    exclude: Iterable[str] = (),
) -> list[str]:
    """Every module ``roots`` need, dependencies first; ties follow ``preferred`` order.

    Modules in ``exclude`` are assumed loaded already. A missing module is a BuildError.
    """
    rank = {name: i for i, name in enumerate(preferred)}
    done = set(exclude)
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in path:
            raise BuildError(f"kernel module dependency cycle: {' -> '.join((*path, name))}")
        info = infos.get(name)
        if info is None:
            needed = f" (needed by {path[-1]})" if path else ""
            raise BuildError(f"kernel module {name!r} is not in the kernel package{needed}")
        for dep in sorted(info.depends, key=lambda d: (rank.get(d, len(rank)), d)):
            visit(dep, (*path, name))
        done.add(name)
        order.append(name)

    for root in roots:
        visit(root, ())
    return order
