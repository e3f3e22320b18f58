"""Build ext4 images from trees, and inspect them independently of the code under test."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
from pathlib import Path

MTIME = 1_600_000_000


def mkfs(src: Path, image: Path, size: str = "64M") -> Path:
    """``mke2fs -d``: an ext4 image holding the tree ``src`` (owners, modes, xattrs, nodes)."""
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(image), size],
        check=True,
        capture_output=True,
    )
    return image


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def opaque(path: Path) -> None:
    os.setxattr(path, "trusted.overlay.opaque", b"y")


def put(path: Path, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Path:
    """Write a file with owner, mode (after chown, which clears setuid) and a fixed mtime."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, uid, gid)
    path.chmod(mode)
    os.utime(path, (MTIME, MTIME))
    return path


def mkdir(path: Path, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


def fsck_clean(image: Path) -> None:
    """``e2fsck -fn`` finds nothing to fix."""
    done = subprocess.run(
        ["e2fsck", "-fn", str(image)], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def debugfs(image: Path, command: str) -> str:
    done = subprocess.run(
        ["debugfs", "-R", command, str(image)], capture_output=True, text=True, check=True
    )
    return done.stdout


def debugfs_w(image: Path, command: str) -> None:
    subprocess.run(["debugfs", "-w", "-R", command, str(image)], check=True, capture_output=True)


def inode_of(image: Path, path: str) -> dict[str, int] | None:
    """Type bits, mode, owner, size and mtime of ``path`` in the image, via ``debugfs stat``."""
    text = debugfs(image, f'stat "{path}"')
    head = re.search(r"Type: (\S+(?: special)?)\s+Mode:\s+(\d+)", text)
    if head is None:
        return None
    owner = re.search(r"User:\s*(\d+)\s+Group:\s*(\d+).*Size:\s*(\d+)", text)
    mtime = re.search(r"mtime: 0x([0-9a-f]+)", text)
    assert owner and mtime
    return {
        "type": {"regular": 1, "directory": 2, "symlink": 3}.get(head[1], 9),
        "mode": int(head[2], 8),
        "uid": int(owner[1]),
        "gid": int(owner[2]),
        "size": int(owner[3]),
        "mtime": int(mtime[1], 16),
    }


def read_image_file(image: Path, path: str, tmp: Path) -> bytes:
    out = tmp / "dumped"
    out.unlink(missing_ok=True)
    debugfs(image, f'dump "{path}" "{out}"')
    return out.read_bytes()


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything below ``root``: type, mode, owner, content or target, and file mtimes.

    Directory mtimes are left out: adding a child changes them on any real filesystem.
    """
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in [*dirnames, *files]:
            path = Path(dirpath, name)
            st = path.lstat()
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = (hashlib.sha256(path.read_bytes()).hexdigest(), int(st.st_mtime))
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            kind = stat.S_IFMT(st.st_mode)
            mode = stat.S_IMODE(st.st_mode)
            out[str(path.relative_to(root))] = (kind, mode, st.st_uid, st.st_gid, extra)
    return out


def build_lower(root: Path) -> Path:
    """The read-only root filesystem a workspace boots."""
    put(root / "etc/hosts", b"127.0.0.1 localhost\n")
    put(root / "etc/passwd", b"root:x:0:0\n")
    put(root / "etc/hostname", b"lower\n")
    put(root / "usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755)
    put(root / "usr/lib/libx.so", b"\x7fELF lib")
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("/usr/lib")
    put(root / "opt/app/a", b"a")
    put(root / "opt/app/sub/x", b"x")
    put(root / "var/cache/c1", b"c1")
    put(root / "data/deep/dir/lowerfile", b"lf")
    mkdir(root / "data/deep/dir", mode=0o700, uid=1000, gid=1001)
    mkdir(root / "data/deep", mode=0o711, uid=1000, gid=1000)
    for d in ("data/deep/dir", "data/deep", "data"):
        os.utime(root / d, (1_500_000_000, 1_500_000_000))
    mkdir(root / "workspace", uid=1000, gid=1000)
    put(root / "workspace/old1", b"old1")
    put(root / "workspace/old2", b"old2")
    put(root / "workspace/input.json", b'{"n": 1}', mode=0o640, uid=1000, gid=1000)
    mkdir(root / "tmp", mode=0o1777)
    return root


def build_state(root: Path) -> Path:
    """A state disk after a run: the overlay upper dir as the guest's kernel left it."""
    up = root / "upper"
    mkdir(up / "etc")
    whiteout(up / "etc/passwd")
    put(up / "etc/hostname", b"upper\n")
    mkdir(up / "opt/app")
    opaque(up / "opt/app")
    put(up / "opt/app/new", b"new")
    mkdir(up / "var")
    whiteout(up / "var/cache")
    mkdir(up / "workspace", uid=1000, gid=1000)
    put(up / "workspace/result.json", b'{"ok": true}\n', mode=0o600, uid=1000, gid=1000)
    whiteout(up / "workspace/old1")
    os.link(up / "workspace/old1", up / "workspace/old2")  # kernels share one whiteout inode
    mkdir(root / "work")
    return root
