"""The declared ``files`` as a flat, sorted list of guest entries with a tree digest, and the
rule for every host path a spec names.

Each entry records guest path, type, mode, size and content sha256 — never mtime or owner —
so touching a file or cloning the repo elsewhere changes nothing, while any content or mode
edit changes the digest.

A spec travels with a repository, and what it names goes into the guest and into layers
``build --push`` publishes, so a host path in it is relative to the spec's folder and, with
every symlink followed, stays inside it (:func:`resolve_inside`). Inside a declared folder a
symlink is delivered as a symlink: its target is recorded, never followed or read.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from microagent.compiler.spec import FileEntry
from microagent.digests import canonical_json, sha256_digest
from microagent.errors import InvalidInputError
from microagent.frozen import Frozen

CHUNK = 1 << 20
INSIDE_HINT = (
    "paths in a spec are relative to its folder and stay inside it: "
    "copy or move the file next to microagent.yaml"
)


def resolve_inside(raw: str, base: Path) -> Path:
    """``raw``, relative to ``base``, with every symlink followed; InvalidInputError when it
    is absolute, home-relative (``~``) or ends up outside ``base`` (``..``, or a symlink that
    points out)."""
    if "\x00" in raw:
        raise InvalidInputError(f"{raw!r} contains a NUL character")
    if raw.startswith("~"):
        raise InvalidInputError(f"{raw!r} is relative to a home folder", hint=INSIDE_HINT)
    if PurePosixPath(raw).is_absolute():
        raise InvalidInputError(f"{raw!r} is an absolute path", hint=INSIDE_HINT)
    root = base.resolve()
    try:
        resolved = (root / raw).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise InvalidInputError(f"cannot resolve {raw!r}: {exc}") from exc
    if not resolved.is_relative_to(root):
        raise InvalidInputError(
            f"{raw!r} leads outside the spec's folder (to {resolved})", hint=INSIDE_HINT
        )
    return resolved


EXT_MAGIC_OFFSET = 1024 + 0x38  # s_magic in the superblock, 1 KiB into the image
EXT_MAGIC = b"\x53\xef"  # 0xEF53, little-endian: ext2, ext3 and ext4 alike


def has_ext_superblock(path: Path) -> bool:
    """Whether ``path`` starts like an ext2/3/4 file system image (the superblock magic).

    A quick look for messages, not a check: the image's content is checked by ``e2fsck``
    before anything uses it. OSError when the file cannot be read.
    """
    with path.open("rb") as fh:
        fh.seek(EXT_MAGIC_OFFSET)
        return fh.read(len(EXT_MAGIC)) == EXT_MAGIC


@dataclass(frozen=True, eq=False, repr=False)
class FileItem(Frozen):
    """One guest entry: a regular file, a folder or a symlink."""

    dst: str
    kind: str  # "file" | "dir" | "symlink"
    mode: int
    size: int = 0
    sha256: str = ""
    target: str = ""
    src: Path | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.dst, "type": self.kind, "mode": f"{self.mode:04o}"}
        if self.kind == "file":
            out.update(size=self.size, sha256=self.sha256)
        if self.kind == "symlink":
            out["target"] = self.target
        return out


@dataclass(frozen=True, eq=False, repr=False)
class FileTree(Frozen):
    items: tuple[FileItem, ...]
    digest: str

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.items)


def hash_file(path: Path) -> tuple[int, str]:
    """Size and hex sha256 of a file's content."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def default_mode(st_mode: int) -> int:
    """Folders and executables 0755, everything else 0644 (owner bits never widen)."""
    if stat.S_ISDIR(st_mode) or st_mode & 0o111:
        return 0o755
    return 0o644


def _item(src: Path, dst: str, mode: int | None) -> FileItem:
    info = src.lstat()
    if stat.S_ISLNK(info.st_mode):
        return FileItem(dst, "symlink", 0o777, target=str(src.readlink()), src=src)
    chosen = mode if mode is not None else default_mode(info.st_mode)
    if stat.S_ISDIR(info.st_mode):
        return FileItem(dst, "dir", chosen, src=src)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInputError(f"{src} is not a regular file, folder or symlink")
    size, sha = hash_file(src)
    return FileItem(dst, "file", chosen, size, sha, src=src)


def _top(entry: FileEntry, root: Path | None) -> Path:
    """The entry's source with symlinks followed, checked to be inside ``root`` when given."""
    src = entry.src.resolve()
    if root is not None and not src.is_relative_to(root.resolve()):
        raise InvalidInputError(
            f"declared file {entry.src} leads outside the spec's folder (to {src})",
            hint=INSIDE_HINT,
        )
    return src


def _walk(entry: FileEntry, root: Path | None) -> Iterator[FileItem]:
    src = _top(entry, root)
    if not stat.S_ISDIR(src.stat().st_mode):
        yield _item(src, entry.dst, entry.mode)
        return
    yield FileItem(entry.dst, "dir", entry.mode or 0o755, src=src)
    for folder, dirs, names in os.walk(src):  # symlinks inside are items, never followed
        dirs.sort()
        rel_root = Path(folder).relative_to(src).as_posix()
        for name in sorted(dirs + names):
            dst = posixpath.normpath(posixpath.join(entry.dst, rel_root, name))
            yield _item(Path(folder) / name, dst, None)


def collect(entries: tuple[FileEntry, ...], root: Path | None = None) -> FileTree:
    """Walk every declared file or folder; the result is sorted by guest path.

    With ``root`` (the spec's folder), an entry whose source leads outside it is refused.
    """
    items: dict[str, FileItem] = {}
    try:
        for entry in entries:
            for item in _walk(entry, root):
                items[item.dst] = item
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read declared file {exc.filename}: {exc.strerror}",
            hint="check the `files` entries in the spec",
        ) from exc
    ordered = tuple(items[k] for k in sorted(items))
    digest = sha256_digest(canonical_json([i.to_json() for i in ordered]))
    return FileTree(ordered, digest)
