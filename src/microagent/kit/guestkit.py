"""The guest kit: a Linux kernel plus an initramfs (busybox, a few modules, our /init).

Built from Debian's ``linux-image-cloud-<arch>`` and ``busybox-static`` packages (found through
the suite's signed ``InRelease``, each verified against the signed index; see
:mod:`microagent.kit.debian`) and kept in the store as
``kits/<key>/{vmlinuz,initrd.img,kit.json}``. The key is the sha256 of a canonical manifest:
both package digests, the module roots, the init templates, the guest agent's source and the
recipe version. The guest agent (:mod:`microagent.kit.agentbin`) is compiled on the host and
shipped as ``/lib/microagent/ma-agent``.
A user's own kernel (and initrd) can stand in for the Debian one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from microagent.digests import canonical_json
from microagent.errors import BuildError, InvalidInputError
from microagent.kit import agentbin, debian, kernelimage, kmod
from microagent.kit.initramfs import CpioEntry, with_parents, write_initramfs
from microagent.runtime import agentproto
from microagent.runtime.control import BEGIN_MARKER, END_MARKER, PORT_NAME, PROBE_MARKER
from microagent.settings import Settings
from microagent.store.content import Store

RECIPE_VERSION = 3  # 2: uncompressed vmlinux (PVH) when possible; 3: uncompressed initramfs
BUSYBOX_PACKAGE = "busybox-static"
STREAM_CAP = 64 * 1024
OUTPUT_CAP = 256 * 1024
STOP_GRACE_SECONDS = 3
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TEMPLATES = ("init.sh.j2", "json.awk", "fstab.early", "fstab.disks", "fstab.root")
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
# Shipped as-is under /lib/microagent in the initramfs.
STATIC_FILES = ("json.awk", "fstab.early", "fstab.disks", "fstab.root")
AGENT_PATH = "lib/microagent/ma-agent"  # the guest agent in the initramfs

# Modules the init loads, by group; each group brings its dependencies (from .modinfo).
MODULE_ROOTS: Mapping[str, tuple[str, ...]] = {
    "mmio": ("virtio_mmio",),
    "pci": ("virtio_pci",),
    "disk": ("virtio_blk",),
    "late": ("virtio_console", "overlay"),
    "net": ("virtio_net",),
}
# Tie-break order for modules with no dependency between them (measured to work).
PREFERRED_ORDER = (
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "overlay",
)

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


@dataclass(frozen=True)
class GuestKit:
    """What a backend boots: kernel + initrd, and where they came from."""

    kernel: Path
    initrd: Path
    key: str = ""
    kernel_version: str = ""
    source: str = "store"  # "store", "user" or "placeholder" (the fake backend boots nothing)
    manifest: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "kernelVersion": self.kernel_version,
            "source": self.source,
            "current": bool(self.manifest.get("recipeDigest") == recipe_digest()),
            "installedAt": self.manifest.get("installedAt"),
        }


# -- recipe and key ----------------------------------------------------------------------------


def _template_text(name: str) -> str:
    return resources.files("microagent.kit").joinpath("templates", name).read_text()


def recipe() -> dict[str, Any]:
    """Everything about how a kit is built that is not a downloaded package."""
    return {
        "recipe": RECIPE_VERSION,
        "moduleRoots": {k: list(v) for k, v in MODULE_ROOTS.items()},
        "preferredOrder": PREFERRED_ORDER,
        "templates": {n: hashlib.sha256(_template_text(n).encode()).hexdigest() for n in TEMPLATES},
        "params": _render_params_static(),
        "agentSource": agentbin.source_digest(),
    }


def recipe_digest() -> str:
    """sha256 of :func:`recipe`: kits with another value were built by other code."""
    return hashlib.sha256(canonical_json(recipe())).hexdigest()


def kit_key(arch: str, kernel: debian.DebPackage, busybox: debian.DebPackage) -> str:
    """The store key of the kit built from these two packages with the current recipe."""
    manifest = {
        "arch": arch,
        "kernelDeb": kernel.sha256,
        "busyboxDeb": busybox.sha256,
        "recipe": recipe_digest(),
    }
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def _render_params_static() -> dict[str, Any]:
    return {
        "port": PORT_NAME,
        "stream_cap": STREAM_CAP,
        "output_cap": OUTPUT_CAP,
        "stop_grace": STOP_GRACE_SECONDS,
        "default_path": DEFAULT_PATH,
        "begin_marker": BEGIN_MARKER,
        "end_marker": END_MARKER,
        "probe_marker": PROBE_MARKER,
        "agent_port": agentproto.PORT_NAME,
        "agent_path": "/" + AGENT_PATH,
    }


def render_init(modules: Mapping[str, list[str]]) -> str:
    """The /init script for the given module groups."""
    import jinja2  # deferred: ~20 ms to import; only building the guest kit renders /init

    # Shell uses "{%" (printf formats) and "{#", so blocks and comments get other delimiters.
    env = jinja2.Environment(
        block_start_string="<%",
        block_end_string="%>",
        comment_start_string="<#",
        comment_end_string="#>",
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    try:
        template = env.from_string(_template_text("init.sh.j2"))
        return template.render(recipe=RECIPE_VERSION, modules=modules, **_render_params_static())
    except jinja2.TemplateError as exc:
        raise BuildError(f"cannot render the guest init template: {exc}") from exc


# -- reading the packages ----------------------------------------------------------------------


@dataclass
class _KernelParts:
    version: str = ""
    vmlinuz: bytes = b""
    modules: dict[str, tuple[kmod.ModuleInfo, bytes]] = field(default_factory=dict)


def _read_kernel_deb(deb: Path) -> _KernelParts:
    parts = _KernelParts()
    for info, fh in debian.iter_data(deb):
        name = info.name.lstrip("./")
        if fh is None or not info.isfile():
            continue
        if name.startswith("boot/vmlinuz-"):
            parts.vmlinuz = fh.read()
            parts.version = name.removeprefix("boot/vmlinuz-")
        elif name.startswith("lib/modules/") and ".ko" in name.rsplit("/", 1)[-1]:
            elf = kmod.strip_signature(kmod.decompress_module(name, fh.read()))
            mod = kmod.read_modinfo(name, elf)
            parts.modules[mod.name] = (mod, elf)
    if not parts.vmlinuz:
        raise BuildError(f"no boot/vmlinuz-* in kernel package {deb.name}")
    return parts


def _read_busybox_deb(deb: Path) -> bytes:
    for info, fh in debian.iter_data(deb):
        name = info.name.lstrip("./")
        if fh is not None and info.isfile() and name in {"bin/busybox", "usr/bin/busybox"}:
            return fh.read()
    raise BuildError(f"no bin/busybox in {deb.name}")


def module_groups(infos: Mapping[str, kmod.ModuleInfo]) -> dict[str, list[str]]:
    """Per group, the modules to insmod in order (shared transport deps listed once)."""
    order = kmod.load_order
    mmio = order(MODULE_ROOTS["mmio"], infos, preferred=PREFERRED_ORDER)
    pci = order(MODULE_ROOTS["pci"], infos, preferred=PREFERRED_ORDER)
    shared = set(mmio) & set(pci)
    disk = order(MODULE_ROOTS["disk"], infos, preferred=PREFERRED_ORDER, exclude=shared)
    loaded = shared | set(disk)
    late = order(MODULE_ROOTS["late"], infos, preferred=PREFERRED_ORDER, exclude=loaded)
    loaded |= set(late)
    net = order(MODULE_ROOTS["net"], infos, preferred=PREFERRED_ORDER, exclude=loaded)
    return {"mmio": mmio, "pci": pci, "disk": disk, "late": late, "net": net}


def initramfs_entries(
    busybox: bytes, init: str, modules: Mapping[str, bytes], *, agent: bytes
) -> list[CpioEntry]:
    """The initramfs tree: busybox, /init, the guest agent, json.awk, the module files and a
    console node."""
    dirs = ("bin", "dev", "proc", "sys", "run", "tmp", "ma", "lower", "state", "cfg", "newroot")
    entries = [CpioEntry.directory(d) for d in (*dirs, "lib/modules", "lib/microagent")]
    entries += [
        CpioEntry.chardev("dev/console", 5, 1),
        CpioEntry.file("bin/busybox", busybox, 0o755),
        CpioEntry.file("init", init.encode(), 0o755),
        CpioEntry.file(AGENT_PATH, agent, 0o755),
    ]
    entries += [
        CpioEntry.file(f"lib/microagent/{name}", _template_text(name).encode())
        for name in STATIC_FILES
    ]
    # Copied onto the guest's devtmpfs at boot (the same instance the new root mounts).
    entries += [
        CpioEntry.directory("lib/microagent/dev/pts"),
        CpioEntry.directory("lib/microagent/dev/shm", 0o1777),
    ]
    entries += [
        CpioEntry.symlink(f"lib/microagent/dev/{name}", target)
        for name, target in DEV_LINKS.items()
    ]

    entries.append(CpioEntry.symlink("bin/sh", "busybox"))
    entries += [CpioEntry.file(f"lib/modules/{n}.ko", data) for n, data in sorted(modules.items())]
    return with_parents(entries)


# -- building and finding kits -----------------------------------------------------------------


@dataclass(frozen=True)
class _Sources:
    arch: str
    kernel: debian.DebPackage
    busybox: debian.DebPackage
    mirror: str


def _build(store: Store, src: _Sources, key: str, progress: Progress) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        progress(f"unpacking {src.kernel.name} {src.kernel.version}")
        kernel = _read_kernel_deb(store.blob_path(src.kernel.digest))
        busybox = _read_busybox_deb(store.blob_path(src.busybox.digest))
        groups = module_groups({n: info for n, (info, _) in kernel.modules.items()})
        needed = {n for names in groups.values() for n in names}
        agent = agentbin.agent_binary(store, src.arch, progress=progress).read_bytes()
        tmp.mkdir()
        kernel_name = _write_kernel(tmp, kernel.vmlinuz, progress)
        modules = {n: kernel.modules[n][1] for n in needed}
        entries = initramfs_entries(busybox, render_init(groups), modules, agent=agent)
        write_initramfs(tmp / "initrd.img", entries)
        manifest = _manifest(src, key, kernel.version, groups)
        manifest["kernelFile"] = kernel_name
        manifest["agentSha256"] = hashlib.sha256(agent).hexdigest()
        (tmp / "kit.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    return build


def _write_kernel(directory: Path, bzimage: bytes, progress: Progress) -> str:
    """Write ``vmlinux`` (ELF with a PVH entry, boots faster) if the image has one, else
    the bzImage as ``vmlinuz``; return the file name."""
    progress("extracting the uncompressed kernel")
    try:
        elf = kernelimage.vmlinux_from_bzimage(bzimage)
    except BuildError as exc:
        progress(f"keeping the compressed kernel ({exc.message})")
        elf = None
    name = "vmlinux" if elf is not None else "vmlinuz"
    (directory / name).write_bytes(elf if elf is not None else bzimage)
    return name


def _manifest(
    src: _Sources, key: str, version: str, groups: Mapping[str, list[str]]
) -> dict[str, Any]:
    def pkg(p: debian.DebPackage) -> dict[str, Any]:
        return {
            "name": p.name,
            "version": p.version,
            "architecture": p.architecture,
            "filename": p.filename,
            "size": p.size,
            "sha256": p.sha256,
        }

    return {
        "key": key,
        "arch": src.arch,
        "kernelVersion": version,
        "packages": {"kernel": pkg(src.kernel), "busybox": pkg(src.busybox)},
        "mirror": src.mirror,
        "modules": dict(groups),
        "recipe": recipe(),
        "recipeDigest": recipe_digest(),
        "installedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _build_kit(
    store: Store, src: _Sources, progress: Progress, retry: debian.Retry = debian.RETRY
) -> GuestKit:
    key = kit_key(src.arch, src.kernel, src.busybox)
    name = f"kits/{key}"
    if not store.has_entry(name):
        for package in (src.kernel, src.busybox):
            if not store.has_blob(package.digest):
                size = f"{package.size / 1e6:.1f} MB"
                progress(f"downloading {package.name} {package.version} ({size})")
            mirror = debian.Mirror(src.mirror)
            debian.download(store, mirror, package, progress, retry=retry)
    path = store.build_once(name, _build(store, src, key, progress))
    return _load(path)


def install_kit(
    store: Store,
    mirror: debian.Mirror | None = None,
    *,
    arch: str | None = None,
    progress: Progress = _quiet,
    retry: debian.Retry = debian.RETRY,
) -> GuestKit:
    """Fetch the newest kernel and busybox packages from the mirror and build (or reuse) a kit.

    The mirror is not trusted: the suite must be signed by a key in ``mirror.keyring``.
    Transient download failures are retried as ``retry`` says, each retry told to
    ``progress`` (see :func:`microagent.kit.debian.fetch`).
    """
    mirror = mirror or debian.Mirror()
    arch = arch or debian.debian_arch()
    progress(f"reading {mirror.release_url()} and {mirror.index_path(arch)}")
    index = debian.fetch_index(mirror, arch, retry=retry, say=progress)
    meta = debian.require(index, f"linux-image-cloud-{arch}", mirror)
    image_names = [d for d in meta.depends if d.startswith("linux-image-")]
    if not image_names:
        raise BuildError(f"{meta.name} {meta.version} depends on no linux-image package")
    kernel = debian.require(index, image_names[0], mirror)
    busybox = debian.require(index, BUSYBOX_PACKAGE, mirror)
    return _build_kit(store, _Sources(arch, kernel, busybox, mirror.url), progress, retry)


def _load(path: Path) -> GuestKit:
    manifest = json.loads((path / "kit.json").read_text())
    return GuestKit(
        kernel=path / str(manifest.get("kernelFile", "vmlinuz")),
        initrd=path / "initrd.img",
        key=str(manifest.get("key", path.name)),
        kernel_version=str(manifest.get("kernelVersion", "")),
        manifest=manifest,
    )


def _iter_kits(store: Store) -> Iterator[GuestKit]:
    directory = store.root / "kits"
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not (path / "kit.json").is_file():
            continue
        try:
            yield _load(path)
        except (OSError, ValueError):
            continue


def list_kits(store: Store) -> list[GuestKit]:
    """Every kit in the store, newest first."""
    kits = list(_iter_kits(store))
    return sorted(kits, key=lambda k: str(k.manifest.get("installedAt", "")), reverse=True)


def find_kit(store: Store, arch: str | None = None) -> GuestKit | None:
    """The newest kit built with the current recipe for ``arch``, if any."""
    arch = arch or debian.debian_arch()
    for kit in list_kits(store):
        if kit.manifest.get("recipeDigest") == recipe_digest() and kit.manifest.get("arch") == arch:
            store.touch(f"kits/{kit.key}")
            return kit
    return None


def prune_kits(store: Store) -> list[GuestKit]:
    """Remove kits the current code would not boot (older recipe); return what went.

    A running VM is unaffected: QEMU reads the kernel and initrd when it starts.
    """
    removed = []
    for kit in list_kits(store):
        outdated = kit.manifest.get("recipeDigest") != recipe_digest()
        if outdated and store.remove(f"kits/{kit.key}"):
            removed.append(kit)
    return removed


def _rebuild_offline(store: Store, arch: str, progress: Progress) -> GuestKit | None:
    """Rebuild a kit with the current recipe from packages an older kit left in the store
    (their blobs were verified against a signed index when they were downloaded)."""
    for old in list_kits(store):
        packages = old.manifest.get("packages", {})
        if old.manifest.get("arch") != arch or not isinstance(packages, dict):
            continue
        try:
            kernel, busybox = (_package(packages[k]) for k in ("kernel", "busybox"))
        except (KeyError, TypeError, ValueError):
            continue
        if store.has_blob(kernel.digest) and store.has_blob(busybox.digest):
            mirror = str(old.manifest.get("mirror", debian.DEFAULT_MIRROR))
            return _build_kit(store, _Sources(arch, kernel, busybox, mirror), progress)
    return None


def _package(data: Mapping[str, Any]) -> debian.DebPackage:
    return debian.DebPackage(
        name=str(data["name"]),
        version=str(data["version"]),
        architecture=str(data["architecture"]),
        filename=str(data["filename"]),
        size=int(data["size"]),
        sha256=str(data["sha256"]),
    )


def ensure_kit(
    store: Store,
    *,
    mirror: debian.Mirror | None = None,
    arch: str | None = None,
    progress: Progress = _quiet,
) -> GuestKit:
    """A usable kit: the current one, else rebuilt from cached packages, else installed."""
    arch = arch or debian.debian_arch()
    found = find_kit(store, arch)
    if found is not None:
        return found
    rebuilt = _rebuild_offline(store, arch, progress)
    if rebuilt is not None:
        return rebuilt
    progress("no guest kit yet: building one (first use downloads ~30 MB from Debian)")
    return install_kit(store, mirror, arch=arch, progress=progress)


def _user_path(value: Path | None, what: str) -> Path | None:
    if value is None:
        return None
    path = value.expanduser()
    if not path.is_file():
        raise InvalidInputError(
            f"{what} {path} does not exist or is not a file",
            hint=f"pass an existing file (--{what} or $MICROAGENT_{what.upper()})",
        )
    return path.resolve()


def resolve_kit(
    store: Store,
    *,
    kernel: Path | None = None,
    initrd: Path | None = None,
    mirror: debian.Mirror | None = None,
    progress: Progress = _quiet,
) -> GuestKit:
    """The kit to boot: the user's ``kernel``/``initrd`` (flags or settings), else the store's.

    A user kernel without an initrd gets the store kit's initramfs: such a kernel must have
    virtio and overlayfs built in or match the kit's modules.
    """
    user_kernel = _user_path(kernel, "kernel")
    user_initrd = _user_path(initrd, "initrd")
    if user_kernel and user_initrd:
        return GuestKit(user_kernel, user_initrd, source="user")
    kit = ensure_kit(store, mirror=mirror, progress=progress)
    if user_kernel or user_initrd:
        return GuestKit(
            user_kernel or kit.kernel,
            user_initrd or kit.initrd,
            key=kit.key,
            kernel_version="" if user_kernel else kit.kernel_version,
            source="user",
            manifest=kit.manifest,
        )
    return kit


def kit_for(settings: Settings, store: Store, progress: Progress = _quiet) -> GuestKit:
    """The kit the settings ask for (their kernel, initrd, Debian mirror and keyring)."""
    mirror = debian.Mirror.of(
        settings.debian_mirror, settings.debian_suite, settings.debian_keyring
    )
    return resolve_kit(
        store, kernel=settings.kernel, initrd=settings.initrd, mirror=mirror, progress=progress
    )
