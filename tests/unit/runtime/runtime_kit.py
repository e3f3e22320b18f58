"""Test helpers: tiny ELF kernel modules, .deb packages and a signed file:// Debian mirror."""

from __future__ import annotations

import atexit
import functools
import hashlib
import io
import lzma
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from microagent.kit import debian
from microagent.runner import find_tool, run


def make_ko(name: str, depends: Sequence[str] = (), *, with_name: bool = True) -> bytes:
    """A minimal 64-bit little-endian ELF file whose only real section is .modinfo."""
    fields = [b"license=GPL", b"depends=" + ",".join(depends).encode(), b"vermagic=6.1.0 SMP"]
    if with_name:
        fields.append(b"name=" + name.encode())
    modinfo = b"\0".join(fields) + b"\0"
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    off_modinfo = 64
    off_shstr = off_modinfo + len(modinfo)
    shoff = (off_shstr + len(shstrtab) + 7) // 8 * 8
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def section(name_off: int, kind: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_off, kind, 0, 0, offset, size, 0, 0, 1, 0)

    body = header + modinfo + shstrtab
    body += b"\0" * (shoff - len(body))
    body += b"\0" * 64
    body += section(1, 1, off_modinfo, len(modinfo))
    body += section(10, 3, off_shstr, len(shstrtab))
    return body


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}".encode() + b"`\n"
    return header + data + (b"\n" if len(data) % 2 else b"")


def tar_bytes(files: Mapping[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith("busybox") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_deb(files: Mapping[str, bytes], compression: str = "xz") -> bytes:
    """A .deb: ar archive with debian-binary, control.tar.gz and data.tar.<compression>."""
    control = tar_bytes({"./control": b"Package: x\n"}, "w:gz")
    if compression == "zst":
        data = zstandard.ZstdCompressor().compress(tar_bytes(files))
        data_name = "data.tar.zst"
    else:
        modes = {"xz": "w:xz", "gz": "w:gz", "": "w"}
        data = tar_bytes(files, modes[compression])
        data_name = "data.tar" + (f".{compression}" if compression else "")
    return (
        b"!<arch>\n"
        + _ar_member("debian-binary", b"2.0\n")
        + _ar_member("control.tar.gz", control)
        + _ar_member(data_name, data)
    )


KERNEL_VERSION = "6.1.0-99-cloud-amd64"
MODULE_DEPS = {
    "virtio_ring": (),
    "virtio": (),
    "virtio_mmio": ("virtio", "virtio_ring"),
    "virtio_pci_legacy_dev": (),
    "virtio_pci_modern_dev": (),
    "virtio_pci": ("virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"),
    "virtio_blk": ("virtio", "virtio_ring"),
    "virtio_console": ("virtio", "virtio_ring"),
    "failover": (),
    "net_failover": ("failover",),
    "virtio_net": ("virtio_ring", "virtio", "net_failover"),
    "overlay": (),
    "unrelated": (),
}
MODULE_DIRS = {"overlay": "fs/overlayfs", "failover": "net/core", "net_failover": "drivers/net"}


def kernel_files(version: str = KERNEL_VERSION) -> dict[str, bytes]:
    files = {f"./boot/vmlinuz-{version}": b"KERNEL-IMAGE-" + version.encode()}
    for name, deps in MODULE_DEPS.items():
        directory = MODULE_DIRS.get(name, "drivers/virtio")
        path = f"./lib/modules/{version}/kernel/{directory}/{name}.ko"
        if name == "virtio_net":
            path += ".xz"
            files[path] = lzma.compress(make_ko(name, deps))
        else:
            files[path] = make_ko(name, deps)
    return files


def stanza(name: str, version: str, filename: str, data: bytes, depends: str = "") -> str:
    lines = [
        f"Package: {name}",
        f"Version: {version}",
        "Architecture: amd64",
    ]
    if depends:
        lines.append(f"Depends: {depends}")
    lines += [
        f"Filename: {filename}",
        f"Size: {len(data)}",
        f"SHA256: {hashlib.sha256(data).hexdigest()}",
        "Description: test package",
        " with a continuation line",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ArchiveKey:
    """A throwaway OpenPGP signing key standing in for Debian's archive key."""

    home: Path  # GNUPGHOME with the secret key
    keyring: Path  # the public key, exported as gpgv reads it

    def gpg(self, *args: str, data: bytes | None = None) -> str:
        base = [find_tool("gpg"), "--batch", "--homedir", str(self.home), "--pinentry-mode"]
        return run([*base, "loopback", "--passphrase", "", *args], input=data).stdout

    def clearsign(self, text: bytes) -> bytes:
        return self.gpg("--clearsign", "--output", "-", data=text).encode()

    def stop(self) -> None:
        run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"], check=False)
        shutil.rmtree(self.home, ignore_errors=True)


@functools.cache
def archive_key(name: str = "archive") -> ArchiveKey:
    """A signing key made once per test process (its gpg-agent is stopped at exit)."""
    home = Path(tempfile.mkdtemp(prefix="ma-gpg-"))  # short: the agent's socket lives here
    home.chmod(0o700)
    key = ArchiveKey(home, home / "keyring.gpg")
    atexit.register(key.stop)
    uid = f"microagent test {name} <{name}@example.invalid>"
    key.gpg("--quick-gen-key", uid, "ed25519", "sign", "never")
    key.gpg("--output", str(key.keyring), "--export")
    return key


def release_text(root: Path, suite: str = "bookworm") -> bytes:
    """A ``Release`` for the suite listing every Packages.xz under it (SHA256 and size)."""
    dists = root / "dists" / suite
    lines = []
    for index in sorted(dists.glob("*/binary-*/Packages.xz")):
        data = index.read_bytes()
        rel = index.relative_to(dists).as_posix()
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {rel}")
    head = f"Origin: Test\nSuite: stable\nCodename: {suite}\nComponents: main\n"
    md5 = " 00000000000000000000000000000000 1 main/binary-amd64/Packages.xz\n"
    return (head + "MD5Sum:\n" + md5 + "SHA256:\n" + "\n".join(lines) + "\n").encode()


def sign_mirror(root: Path, key: ArchiveKey | None = None, suite: str = "bookworm") -> Path:
    """(Re)write the suite's ``InRelease``, clearsigned by ``key`` (default: archive_key())."""
    signed = (key or archive_key()).clearsign(release_text(root, suite))
    (root / "dists" / suite / "InRelease").write_bytes(signed)
    return root


def mirror_of(root: Path, key: ArchiveKey | None = None) -> debian.Mirror:
    """The file:// mirror at ``root``, trusting ``key`` (default: archive_key())."""
    return debian.Mirror(url=root.as_uri(), keyring=(key or archive_key()).keyring)


def make_mirror(
    root: Path, *, kernel_version: str = KERNEL_VERSION, busybox: bytes = b"BB"
) -> Path:
    """A signed file:// Debian mirror with a cloud kernel meta package, the kernel and
    busybox-static (trusted through :func:`mirror_of`)."""
    pool = root / "pool/main"
    pool.mkdir(parents=True, exist_ok=True)
    kernel = make_deb(kernel_files(kernel_version))
    bbdeb = make_deb({"./bin/busybox": busybox, "./usr/share/doc/x": b"doc"}, "zst")
    meta = make_deb({"./usr/share/doc/meta": b""}, "xz")
    entries = [
        ("linux-image-cloud-amd64", "1", "meta.deb", meta, f"linux-image-{kernel_version} (= 1)"),
        (f"linux-image-{kernel_version}", "1", "kernel.deb", kernel, "kmod, linux-base (>= 4.3~)"),
        ("busybox-static", "1:1.35", "busybox.deb", bbdeb, ""),
    ]
    text = []
    for name, version, fname, data, deps in entries:
        (pool / fname).write_bytes(data)
        text.append(stanza(name, version, f"pool/main/{fname}", data, deps))
    index = root / "dists/bookworm/main/binary-amd64"
    index.mkdir(parents=True, exist_ok=True)
    (index / "Packages.xz").write_bytes(lzma.compress("\n".join(text).encode()))
    return sign_mirror(root)
