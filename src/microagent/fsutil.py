"""Small filesystem helpers: durable (atomic) writes, JSON files, locks, removal, sizes, and
bounded JSON parsing for documents that come from outside (a guest)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from microagent.errors import HostIOError, InvalidInputError

# Every in-progress write in the store starts with this; nothing else may.
TEMP_PREFIX = ".tmp-"
NO_SPACE_HINT = (
    "free space on that file system: `microagent cache prune` removes unused cache entries "
    "(`--max-size SIZE` keeps the most recent), `microagent delete` unused workspaces; "
    "then run the command again"
)
# What a tool (mke2fs, debugfs, tar ...) prints when its output's file system is full.
NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "Could not allocate block")


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a full file system (ENOSPC, or EDQUOT: a quota is full)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def says_no_space(text: str) -> bool:
    """Whether a tool's output says its file system was full."""
    return any(marker in text for marker in NO_SPACE_TEXTS[:2])


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``path`` (or its
    nearest existing parent); None when that cannot be told."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def human_bytes(count: int) -> str:
    """``1.5 MiB``-style sizes for messages."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover (the loop returns)


def no_space(path: Path, need: int | None = None) -> HostIOError:
    """The error for a full file system at ``path``: where, about how much the write needed
    and how much is free, and what to free."""
    figures = [f"need ~{human_bytes(need)}"] if need else []
    free = free_bytes(path)
    if free is not None:
        figures.append(f"free {human_bytes(free)}")
    detail = f": {', '.join(figures)}" if figures else ""
    return HostIOError(f"no space left on device ({path}){detail}", hint=NO_SPACE_HINT)


def temp_sibling(final: Path) -> Path:
    """A fresh temp name in the same directory as ``final`` (so a rename is atomic); the
    random part is ``secrets.token_hex``'s (os.urandom) without importing ``secrets``."""
    return final.parent / f"{TEMP_PREFIX}{final.name}.{os.urandom(6).hex()}"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and directory below a directory (symlinks skipped)."""
    if not path.is_dir() or path.is_symlink():
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        return
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            child = Path(dirpath, name)
            if child.is_file() and not child.is_symlink():
                with child.open("rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def temp_file(directory: Path, stem: str = "") -> Iterator[tuple[BinaryIO, Path]]:
    """Open a new temp file in ``directory``; it is removed unless the caller renamed it."""
    path = directory / f"{TEMP_PREFIX}{stem}{os.urandom(8).hex()}"
    fh = path.open("xb")
    try:
        yield fh, path
    finally:
        try:
            fh.close()  # (may raise too: flushing what a full disk did not take)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via temp + fsync + rename, replacing any old content."""
    try:
        with temp_file(path.parent, path.name + ".") as (fh, tmp):
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
            tmp.replace(path)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space(path, len(data)) from exc
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Mapping[str, Any], mode: int = 0o644) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically (readers never see half)."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, text.encode(), mode)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply
        return None
    return data if isinstance(data, dict) else None


# A JSON string (escapes included); a run of anything but brackets; brackets as +1 / -1 steps.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_DEPTH_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")


def json_too_deep(text: str, max_depth: int) -> bool:
    """Whether arrays and objects in ``text`` nest deeper than ``max_depth``, judged without
    parsing (in linear time, at C speed): strings are cut out, and the running sum of the
    brackets left (+1 opening, -1 closing) is the nesting depth at each point."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    brackets = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    steps = memoryview(brackets.translate(_DEPTH_STEPS)).cast("b")
    return max(itertools.accumulate(steps), default=0) > max_depth


def load_json_bounded(data: str | bytes, *, max_bytes: int, max_depth: int) -> Any:
    """Parse untrusted JSON no longer than ``max_bytes`` (characters for text) and nested no
    deeper than ``max_depth``; the limits are checked before parsing, so a hostile document
    costs linear time and never exhausts the stack. InvalidInputError says what is wrong."""
    if len(data) > max_bytes:
        raise InvalidInputError(f"larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise InvalidInputError("not UTF-8 text") from exc
    if json_too_deep(text, max_depth):
        raise InvalidInputError(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"not valid JSON ({exc})") from exc


def link_no_replace(tmp: Path, final: Path) -> bool:
    """Publish ``tmp`` as ``final`` unless ``final`` exists; True when we published it."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if final.exists():
            return False
        tmp.replace(final)
        return True
    return True


@contextlib.contextmanager
def flocked(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed); yields False if busy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def remove_any(path: Path) -> None:
    """Remove a file, symlink or directory tree without following symlinks; missing is fine."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        _make_tree_writable(path)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _make_tree_writable(path: Path) -> None:
    # Directories without u+w (read-only trees built by a tool) cannot be emptied otherwise.
    with contextlib.suppress(OSError):
        path.chmod(path.stat().st_mode | stat.S_IRWXU)
    for dirpath, dirnames, _files in os.walk(path):
        for name in dirnames:
            child = Path(dirpath, name)
            with contextlib.suppress(OSError):
                if not child.is_symlink():
                    child.chmod(child.stat().st_mode | stat.S_IRWXU)


def usage(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of a file or a whole tree, symlinks not followed."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size, st.st_blocks * 512
    size, alloc = st.st_size, st.st_blocks * 512
    for dirpath, dirnames, files in os.walk(path):
        for name in (*dirnames, *files):
            with contextlib.suppress(FileNotFoundError):
                child = Path(dirpath, name).lstat()
                size += child.st_size
                alloc += child.st_blocks * 512
    return size, alloc
