"""Turn a flattened stage into a reproducible, read-only ext4 root filesystem image.

``mke2fs -d`` copies the tree without a mount or root; a ``debugfs`` pass then applies the
recorded owners, modes, device nodes and timestamps, so the image is right whoever ran the
build. Reproducible: the UUID and directory-hash seed derive from the build key, time is
frozen (``E2FSPROGS_FAKE_TIME``) and every inode's times are set from the layer metadata, so
the same inputs give a byte-identical image on any machine.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from microagent.errors import BuildError, ToolError
from microagent.layers.stagemeta import StageMetadata, debugfs_quote, fix_ownership_script
from microagent.runner import run

MIB = 1 << 20
BLOCK = 4096
MIN_SIZE_MIB = 64
DEFAULT_HEADROOM_MIB = 64
FIXED_TIME = 1577836800  # 2020-01-01: the build "now" (e2fsprogs treats 0 as unset)


@dataclass(frozen=True)
class RootfsInfo:
    path: Path
    size_bytes: int
    content_bytes: int
    uuid: str


def content_bytes(stage: Path) -> int:
    """Bytes the tree needs: files rounded up to blocks, one block per other entry."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(stage):
        total += BLOCK * (len(dirs) + 1)
        for name in files:
            st = (Path(root) / name).lstat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += -(-st.st_size // BLOCK) * BLOCK if st.st_size else BLOCK
    return total


def image_size_mib(data: int, *, size_mib: int | None, headroom_mib: int | None) -> int:
    """Size for ``data`` bytes: data + 5 % metadata overhead + headroom, rounded to 16 MiB."""
    need = data + max(data // 20, 16 * MIB) + (headroom_mib or DEFAULT_HEADROOM_MIB) * MIB
    auto = max(MIN_SIZE_MIB, -(-need // (16 * MIB)) * 16)
    if size_mib is None:
        return auto
    if size_mib * MIB < data + 16 * MIB:
        raise BuildError(
            f"sizeMiB {size_mib} is too small for {data // MIB} MiB of content",
            hint=f"use at least {auto} or leave sizeMiB unset",
        )
    return size_mib


def key_uuid(key: str) -> str:
    """A stable UUID derived from a build key."""
    return str(uuid.UUID(bytes=hashlib.sha256(key.encode()).digest()[:16], version=4))


def _times_script(meta: StageMetadata) -> str:
    """debugfs commands that date every inode from the layer metadata."""
    lines = []
    for path, m in meta:
        q = debugfs_quote(path)
        for field in ("mtime", "atime", "ctime", "crtime"):
            lines.append(f"sif {q} {field} @{m.mtime}")
    for field in ("mkfs_time", "lastcheck", "mtime", "wtime"):
        lines.append(f"ssv {field} @{FIXED_TIME}")
    return "".join(line + "\n" for line in lines)


def _debugfs(image: Path, script: str, env: dict[str, str]) -> None:
    if not script:
        return
    done = run(
        ["debugfs", "-w", "-f", "-", str(image)],
        input=script.encode("utf-8", "surrogateescape"),
        env=env,
    )
    problems = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and not line.startswith("debugfs ") and "Allocated inode" not in line
    ]
    if problems:
        raise BuildError("fixing owners in the image failed:\n" + "\n".join(problems[:10]))


def build_ext4(
    stage: Path,
    meta: StageMetadata,
    out: Path,
    *,
    key: str,
    size_mib: int | None = None,
    headroom_mib: int | None = None,
    label: str = "rootfs",
) -> RootfsInfo:
    """Write a reproducible ext4 image of ``stage`` at ``out`` (a new file)."""
    data = content_bytes(stage)
    size = image_size_mib(data, size_mib=size_mib, headroom_mib=headroom_mib)
    fs_uuid = key_uuid(key)
    env = {"E2FSPROGS_FAKE_TIME": str(FIXED_TIME), "SOURCE_DATE_EPOCH": str(FIXED_TIME)}
    argv = [
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        str(BLOCK),
        "-L",
        label,
        "-U",
        fs_uuid,
        "-E",
        f"hash_seed={fs_uuid},root_owner=0:0,lazy_itable_init=0,nodiscard",
        "-I",
        "256",
        "-d",
        str(stage),
        str(out),
        f"{size}M",
    ]
    try:
        run(argv, env=env)
    except ToolError as exc:
        raise BuildError(f"mke2fs could not build the root filesystem: {exc.message}") from exc
    _debugfs(out, fix_ownership_script(meta, stage=stage) + _times_script(meta), env)
    return RootfsInfo(out, size * MIB, data, fs_uuid)
