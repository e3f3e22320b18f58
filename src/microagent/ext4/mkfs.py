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
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from microagent.errors import BuildError, ConflictError, InvalidInputError, ToolError
from microagent.ext4.debugfs import fix_ownership_script, quote, run_debugfs
from microagent.frozen import Frozen
from microagent.fsutil import no_space, says_no_space
from microagent.layers.stagemeta import StageMetadata
from microagent.runner import run

MIB = 1 << 20
BLOCK = 4096
MIN_SIZE_MIB = 64
DEFAULT_HEADROOM_MIB = 64
FIXED_TIME = 1577836800  # 2020-01-01: the build "now" (e2fsprogs treats 0 as unset)


@dataclass(frozen=True, eq=False, repr=False)
class RootfsInfo(Frozen):
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
        q = quote(path, raw_bytes=True)
        for field in ("mtime", "atime", "ctime", "crtime"):
            lines.append(f"sif {q} {field} @{m.mtime}")
    for field in ("mkfs_time", "lastcheck", "mtime", "wtime"):
        lines.append(f"ssv {field} @{FIXED_TIME}")
    return "".join(line + "\n" for line in lines)


def _debugfs(image: Path, script: str, env: dict[str, str]) -> None:
    if not script:
        return
    # Lines end at "\n" only: splitlines() would also break a name at U+0085 or U+2028.
    lines = script.removesuffix("\n").split("\n")
    done = run_debugfs(image, lines, write=True, env=env, split=False)
    if any(says_no_space(e) for e in done.errors):
        raise no_space(image.parent)
    if done.errors:
        raise BuildError("fixing owners in the image failed:\n" + "\n".join(done.errors[:10]))


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
    run_mke2fs(argv, env, out, size, "the root filesystem")
    _debugfs(out, fix_ownership_script(meta, stage=stage) + _times_script(meta), env)
    return RootfsInfo(out, size * MIB, data, fs_uuid)


# -- state disks (overlay upper) ----------------------------------------------------------

UPPER = "/upper"
WORK = "/work"
MIN_STATE_MIB = 16


def make_state_disk(path: Path, size_mib: int, *, journal: bool = True) -> Path:
    """Create a sparse ext4 state image with empty, root-owned ``/upper`` and ``/work``.

    Workspace disks keep a journal (they live across many boots); a throwaway disk (one-shot
    runs) has none: faster to mount, nothing to replay, nothing written up front.
    """
    if size_mib < MIN_STATE_MIB:
        raise InvalidInputError(f"state disk size {size_mib} MiB is below {MIN_STATE_MIB} MiB")
    if path.exists():
        raise ConflictError(f"{path} already exists; refusing to overwrite a state disk")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".state-") as tmp:
        skel, image = Path(tmp) / "skel", Path(tmp) / "state.ext4"
        skel.mkdir()
        skel.chmod(0o755)
        for name in (UPPER, WORK):
            (skel / name.lstrip("/")).mkdir(parents=True)
            (skel / name.lstrip("/")).chmod(0o755)
        with image.open("wb") as fh:
            # A sized sparse file lets mke2fs punch it and skip zeroing inode tables.
            fh.truncate(size_mib << 20)
        features = [] if journal else ["-O", "^has_journal"]
        try:
            run(
                ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "state",
                 *features, "-E", "root_owner=0:0,lazy_journal_init=1", "-d", str(skel),
                 str(image)],
                timeout=120,
            )  # fmt: skip
        except ToolError as exc:
            if says_no_space(exc.message):  # (the metadata mke2fs writes: a few MiB)
                raise no_space(path.parent) from exc
            raise
        if os.geteuid() != 0 or os.getegid() != 0:
            _chown_skeleton(image)
        image.replace(path)
    return path


def _chown_skeleton(image: Path) -> None:
    """Make /upper and /work root-owned when mke2fs copied a non-root owner."""
    cmds = [f"sif {d} {field} 0" for d in (UPPER, WORK) for field in ("uid", "gid")]
    done = run_debugfs(image, cmds, write=True)
    if done.errors:
        raise ToolError(f"could not set owners in {image}: {done.errors[0]}")


def run_mke2fs(argv: list[str], env: dict[str, str], out: Path, size_mib: int, what: str) -> None:
    """Run ``mke2fs`` (``argv``) making ``out``: a full disk is the no-space error (with the
    ``size_mib`` it needed), any other failure a BuildError naming ``what``."""
    try:
        run(argv, env=env)
    except ToolError as exc:
        if says_no_space(exc.message):
            raise no_space(out.parent, size_mib * MIB) from exc
        raise BuildError(f"mke2fs could not build {what}: {exc.message}") from exc
