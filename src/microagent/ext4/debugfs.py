"""Read an overlay upper dir straight out of an unmounted ext4 image, and export it as a layer.

No mount, no FUSE: ``debugfs`` does the reading. The tree is listed level by level with
batched ``ls -p`` scripts (one debugfs run per directory depth), every inode is ``stat``ed
once in one more batch (type, mode with setuid/setgid/sticky, owner, mtime, device numbers,
xattrs such as the opaque marker), and file contents stream through a pipe from one last
debugfs run straight into the tar — nothing is unpacked on the host. Whiteouts (character
devices 0/0) become ``.wh.<name>`` entries, opaque directories a ``.wh..wh..opq`` entry, and
the tar is written by the same normaliser as
:func:`~microagent.layers.apply.export_upper_as_layer`.

The small debugfs toolkit here (running batches, parsing ``ls -p``/``stat``/``ea_list``,
streaming inodes, replaying a journal) is shared with ``runtime/diskcopy.py``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from microagent.errors import (
    BuildError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ToolError,
)
from microagent.layers.stagemeta import Kind, PathMeta, debugfs_quote
from microagent.layers.tarwrite import CHUNK, ExportedLayer, UpperEntry, export_entries
from microagent.runner import run, spawn

__all__ = [
    "DirEntry",
    "ExportedLayer",
    "Inode",
    "InodeStream",
    "Script",
    "export_upper_image",
    "needs_fsck",
    "overlay_xattr",
    "parse_ls",
    "parse_stat",
    "parse_xattrs",
    "quote",
    "replay_journal",
    "run_debugfs",
]

# stderr lines of a lookup that simply found nothing
MISSING = ("File not found by ext2_lookup", "Ext2 inode is not a directory")
_NOISE = ("debugfs ", "Allocated inode:")  # the version banner; write's chatter
_LOG_NOISE = ("debugfs ", "debugfs: dump <")  # banner and echoed commands of a stream
_KIND_OF_TYPE = {k.type_bits: k for k in Kind}
_KIND_OF_NAME = {
    "regular": Kind.FILE,
    "directory": Kind.DIR,
    "symlink": Kind.SYMLINK,
    "FIFO": Kind.FIFO,
    "character special": Kind.CHAR,
    "block special": Kind.BLOCK,
}
_OVERLAY_NS = ("trusted.overlay.", "user.overlay.")


# -- running debugfs -----------------------------------------------------------------------


def quote(path: str) -> str:
    """A path as one debugfs argument, or IntegrityError if debugfs cannot express it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise IntegrityError(
            f"path {path!r} is not valid UTF-8; debugfs output cannot express it"
        ) from exc
    return debugfs_quote(path)


@dataclass(frozen=True)
class Script:
    """What a batch of debugfs commands printed: one output per command, and stderr."""

    outputs: tuple[str, ...]
    errors: tuple[str, ...]

    def unexpected(self, allowed: Sequence[str] = ()) -> list[str]:
        """stderr lines that are not one of the ``allowed`` messages."""
        return [e for e in self.errors if not any(a in e for a in allowed)]


def run_debugfs(
    image: Path, commands: Sequence[str], *, write: bool = False, cwd: Path | None = None
) -> Script:
    """Run ``commands`` as one ``debugfs -f -`` script and split its output per command.

    debugfs exits 0 after most failures, so callers must look at :attr:`Script.errors`.
    """
    argv = ["debugfs", *(["-w"] if write else []), "-f", "-", str(image)]
    script = "".join(c + "\n" for c in commands).encode("utf-8")
    done = run(argv, input=script, cwd=cwd)
    errors = tuple(
        line for line in done.stderr.splitlines() if line.strip() and not line.startswith(_NOISE)
    )
    return Script(_split_outputs(done.stdout, commands, image), errors)


def _split_outputs(stdout: str, commands: Sequence[str], image: Path) -> tuple[str, ...]:
    # With -f, debugfs echoes each command as "debugfs: <command>" before its output.
    blocks: list[list[str]] = []
    for line in stdout.splitlines():
        if len(blocks) < len(commands) and line == f"debugfs: {commands[len(blocks)]}":
            blocks.append([])
        elif blocks:
            blocks[-1].append(line)
    if len(blocks) != len(commands):
        raise ToolError(f"could not follow debugfs output for {image}: expected echoed commands")
    return tuple("\n".join(b) for b in blocks)


# -- parsing what debugfs prints -------------------------------------------------------------


@dataclass(frozen=True)
class DirEntry:
    """One line of ``ls -p``: a name in a directory and its inode's type, mode and owner."""

    name: str
    ino: int
    st_mode: int
    uid: int
    gid: int
    size: int

    @property
    def kind(self) -> Kind | None:
        """The entry's type; None for a socket (a tar cannot hold one)."""
        return _KIND_OF_TYPE.get(stat.S_IFMT(self.st_mode))


_LS_LINE = re.compile(r"/(\d+)/(\d+)/(\d+)/(\d+)/([^/]*)/(\d*)/")


def parse_ls(output: str, where: str) -> dict[str, DirEntry]:
    """Entries (without ``.`` and ``..``) of an ``ls -p`` listing of directory ``where``."""
    out: dict[str, DirEntry] = {}
    for line in output.splitlines():
        if not line:
            continue
        m = _LS_LINE.fullmatch(line)
        if m is None:
            raise IntegrityError(
                f"{where}: cannot parse the directory listing line {line!r}",
                hint="a name with a newline or control character cannot be read by debugfs",
            )
        ino, mode, uid, gid, name, size = m.groups()
        if name not in (".", ".."):
            out[name] = DirEntry(name, int(ino), int(mode, 8), int(uid), int(gid), int(size or 0))
    return out


@dataclass(frozen=True)
class Inode:
    """What ``stat`` says about one inode."""

    ino: int
    kind: Kind | None  # None: a socket
    mode: int  # permission and special bits
    uid: int
    gid: int
    size: int
    mtime: int
    major: int = 0
    minor: int = 0
    target: str | None = None  # a fast symlink's destination

    @property
    def whiteout(self) -> bool:
        return self.kind is Kind.CHAR and self.major == 0 and self.minor == 0

    def meta(self) -> PathMeta:
        if self.kind is None:
            raise InvalidInputError(f"inode {self.ino} is a socket")
        return PathMeta(self.kind, self.mode, self.uid, self.gid, self.mtime, *self.dev())

    def dev(self) -> tuple[int, int]:
        return (self.major, self.minor) if self.kind in (Kind.CHAR, Kind.BLOCK) else (0, 0)


_STAT_HEAD = re.compile(r"Inode: (\d+)\s+Type: (.+?)\s+Mode:\s+(\d+)")
_STAT_OWNER = re.compile(r"User:\s*(\d+)\s+Group:\s*(\d+).*Size:\s*(\d+)", re.M)
_STAT_MTIME = re.compile(r"^\s*mtime: 0x([0-9a-f]+)(?::([0-9a-f]+))?", re.M)
_STAT_DEV = re.compile(r"Device major/minor number: (\d+):(\d+)")
_FAST_LINK = 'Fast link dest: "'


def parse_stat(output: str) -> Inode | None:
    """The inode ``stat`` printed, or None if it printed nothing (no such path)."""
    head = _STAT_HEAD.search(output)
    owner = _STAT_OWNER.search(output)
    mtime = _STAT_MTIME.search(output)
    if head is None:
        return None
    if owner is None or mtime is None:
        raise ToolError(f"cannot parse debugfs stat output:\n{output[:400]}")
    dev = _STAT_DEV.search(output)
    major, minor = (int(dev[1]), int(dev[2])) if dev else (0, 0)
    return Inode(
        ino=int(head[1]),
        kind=_KIND_OF_NAME.get(head[2]),
        mode=int(head[3], 8) & 0o7777,
        uid=int(owner[1]),
        gid=int(owner[2]),
        size=int(owner[3]),
        mtime=_seconds(mtime[1], mtime[2]),
        major=major,
        minor=minor,
        target=_fast_link(output),
    )


def _seconds(low: str, extra: str | None) -> int:
    """ext4 time: a signed 32-bit count plus two epoch bits from the extra field."""
    value = int(low, 16)
    value -= (value & 0x80000000) << 1
    return value + ((int(extra, 16) & 3) << 32 if extra else 0)


def _fast_link(output: str) -> str | None:
    for line in output.splitlines():
        if line.startswith(_FAST_LINK) and line.endswith('"'):
            return line[len(_FAST_LINK) : -1]
    return None


_XATTR_LINE = re.compile(r"  (\S+) \((\d+)\)(?: = (.*))?")


def parse_xattrs(output: str) -> dict[str, str]:
    """Extended attributes from ``ea_list``: name → value as printed (``"y"`` or hex bytes)."""
    out: dict[str, str] = {}
    for line in output.splitlines():
        m = _XATTR_LINE.fullmatch(line)
        if m is not None:
            out[m[1]] = m[3] or ""
    return out


def overlay_xattr(xattrs: dict[str, str], name: str) -> str | None:
    """The overlay xattr ``name`` (``opaque``, ``redirect`` ...) in either namespace."""
    for ns in _OVERLAY_NS:
        if ns + name in xattrs:
            return xattrs[ns + name]
    return None


# -- journal -------------------------------------------------------------------------------


def replay_journal(image: Path, *, force: bool = False) -> None:
    """Make what a guest wrote visible to debugfs (which never replays a journal).

    Runs ``e2fsck -fp`` when the image needs recovery or is not clean, or always with
    ``force``. Exit codes 0-3 mean clean or fixed; 4 and up raise with e2fsck's output.
    """
    if not force and not needs_fsck(image):
        return
    done = run(["e2fsck", "-fp", str(image)], check=False)
    if done.returncode >= 4:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise IntegrityError(
            f"{image}: the file system has errors e2fsck -p cannot repair "
            f"(exit code {done.returncode}):\n{tail}",
            hint=f"repair it with `e2fsck -fy {image}` (may lose damaged files)",
        )


def needs_fsck(image: Path) -> bool:
    """Whether the image has a journal to replay or was not cleanly unmounted."""
    sb = run_debugfs(image, ["stats -h"])
    if sb.errors:
        raise IntegrityError(f"{image} is not a readable ext4 image: {sb.errors[0]}")
    text = sb.outputs[0]
    features = re.search(r"^Filesystem features:(.*)$", text, re.M)
    state = re.search(r"^Filesystem state:\s*(.*)$", text, re.M)
    return bool(
        (features and "needs_recovery" in features[1].split())
        or (state and state[1].strip() != "clean")
    )


# -- streaming inode contents ---------------------------------------------------------------


class InodeStream:
    """The contents of some inodes, back to back, through one pipe from one debugfs.

    ``dump <ino> /proc/self/fd/N`` reopens the pipe debugfs inherited, so nothing is
    written to disk and the pipe only reaches EOF when debugfs exits. Read exactly each
    inode's size, in order; :meth:`close` checks that nothing was missing or left over.
    """

    def __init__(self, image: Path, inodes: Sequence[int]) -> None:
        self.image = image
        self._tmp = tempfile.TemporaryDirectory(prefix="microagent-debugfs-")
        self._log = Path(self._tmp.name) / "log"
        self._fd, write_fd = os.pipe()
        try:
            script = Path(self._tmp.name) / "script"
            target = f'"/proc/self/fd/{write_fd}"'
            script.write_text("".join(f"dump <{ino}> {target}\n" for ino in inodes))
            argv = ["debugfs", "-f", str(script), str(image)]
            self._proc = spawn(argv, stdout=self._log, pass_fds=(write_fd,)) if inodes else None
        except BaseException:
            os.close(self._fd)
            self._tmp.cleanup()
            raise
        finally:
            os.close(write_fd)

    def __enter__(self) -> InodeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(check=exc[0] is None)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the stream."""
        chunks: list[bytes] = []
        want = size if size >= 0 else 1 << 62
        while want > 0 and (chunk := os.read(self._fd, min(want, CHUNK))):
            chunks.append(chunk)
            want -= len(chunk)
        return b"".join(chunks)

    def read_exact(self, size: int, what: str) -> bytes:
        data = self.read(size)
        if len(data) != size:
            raise IntegrityError(f"{self.image}: {what}: got {len(data)} of {size} bytes")
        return data

    def close(self, *, check: bool = True) -> None:
        """Stop debugfs (if still running) and, with ``check``, raise on any problem."""
        leftover = self.read(1) if check else b""
        os.close(self._fd)  # a debugfs still writing now gets EPIPE and exits
        code = self._proc.wait() if self._proc is not None else 0
        log = self._log.read_text(errors="replace") if self._log.exists() else ""
        self._tmp.cleanup()
        errors = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith(_LOG_NOISE)]
        if check and (leftover or code != 0 or errors):
            detail = errors[0] if errors else f"exit code {code}, leftover={bool(leftover)}"
            raise ToolError(f"debugfs could not dump inodes of {self.image}: {detail}")


# -- exporting an upper dir -------------------------------------------------------------------


def export_upper_image(
    state_image: Path, out_tar: Path, *, upper: str = "/upper", mtime: int | None = None
) -> ExportedLayer:
    """Write the overlay upper dir ``upper`` of an ext4 image as an OCI layer tar.

    Owners, modes (setuid/setgid/sticky too), mtimes, symlinks, hard links and device
    nodes are kept; whiteouts and opaque dirs become ``.wh.`` entries. The same image
    contents give the same bytes; ``mtime`` (e.g. ``$SOURCE_DATE_EPOCH``) replaces every
    entry's time. A pending journal is replayed first, so the image is modified then.
    """
    root = _clean_abs(upper)
    if not state_image.is_file():
        raise NotFoundError(f"disk image {state_image} does not exist")
    replay_journal(state_image)
    reader = _UpperReader(state_image, root)
    entries = reader.entries()
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    part = out_tar.with_name(f".{out_tar.name}.{os.getpid()}.part")
    try:
        with InodeStream(state_image, _content_inodes(entries)) as stream, part.open("wb") as fh:
            layer = export_entries(_with_content(entries, stream), fh, mtime=mtime)
        part.replace(out_tar)
    finally:
        part.unlink(missing_ok=True)
    return layer


def _clean_abs(path: str) -> str:
    parts = path.split("/")
    if not path.startswith("/") or path == "/" or any(p in ("", ".", "..") for p in parts[1:]):
        raise InvalidInputError(f"upper dir {path!r} must be a clean absolute path below /")
    return path


def _content_inodes(entries: list[UpperEntry]) -> list[int]:
    """Inodes whose bytes the tar writer reads, in the order it reads them."""
    seen: set[object] = set()
    out: list[int] = []
    for e in entries:  # already in tar order
        if e.meta.kind is Kind.FILE and e.link_key not in seen:
            seen.add(e.link_key)
            if e.size > 0 and isinstance(e.link_key, int):
                out.append(e.link_key)
    return out


def _with_content(entries: list[UpperEntry], stream: InodeStream) -> Iterator[UpperEntry]:
    for e in entries:
        if e.meta.kind is Kind.FILE:
            yield dataclasses.replace(e, content=cast(BinaryIO, stream))
        else:
            yield e


Listing = dict[tuple[str, ...], dict[str, DirEntry]]


@dataclass
class _UpperReader:
    """Lists an upper dir level by level (``ls -p``), then ``stat``s every inode once."""

    image: Path
    root: str
    max_depth: int = 256

    def path(self, parts: tuple[str, ...]) -> str:
        return "/".join((self.root, *parts))

    def entries(self) -> list[UpperEntry]:
        """Every entry below the root, in tar order (content not attached yet)."""
        listing = self._list()
        inodes = self._stat({e.ino for kids in listing.values() for e in kids.values()})
        targets = self._slow_targets(listing, inodes)
        out: list[UpperEntry] = []
        for parts, kids in listing.items():
            for name, ent in kids.items():
                entry = self._entry((*parts, name), ent, inodes[ent.ino], targets)
                if entry is not None:
                    out.append(entry)
        return sorted(out, key=UpperEntry.tar_parts)

    def _list(self) -> Listing:
        first = run_debugfs(self.image, [f"stat {quote(self.root)}", f"ls -p {quote(self.root)}"])
        top = parse_stat(first.outputs[0])
        if top is None or top.kind is not Kind.DIR:
            raise NotFoundError(f"{self.image} has no directory {self.root}")
        listing: Listing = {(): self._parse((), first.outputs[1])}
        level, seen = listing.copy(), {top.ino}
        for _depth in range(self.max_depth):
            subdirs = [
                ((*p, n), e.ino) for p, kids in level.items() for n, e in kids.items()
                if e.kind is Kind.DIR
            ]  # fmt: skip
            if not subdirs:
                return listing
            if seen.intersection(ino for _, ino in subdirs):
                raise IntegrityError(f"{self.image}: directory loop below {self.root}")
            seen.update(ino for _, ino in subdirs)
            done = run_debugfs(self.image, [f"ls -p <{ino}>" for _, ino in subdirs])
            if done.errors:
                raise ToolError(f"debugfs could not list {self.image}: {done.errors[0]}")
            level = {
                p: self._parse(p, out) for (p, _), out in zip(subdirs, done.outputs, strict=True)
            }
            listing.update(level)
        raise IntegrityError(f"{self.image}: {self.root} is nested deeper than {self.max_depth}")

    def _parse(self, parts: tuple[str, ...], output: str) -> dict[str, DirEntry]:
        kids = parse_ls(output, self.path(parts))
        for name in kids:
            if "\ufffd" in name or any(ord(c) < 0x20 or c == "\x7f" for c in name):
                raise IntegrityError(
                    f"{self.image}: {self.path(parts)}: the name {name!r} cannot be exported",
                    hint="names must be valid UTF-8 without control characters",
                )
        return kids

    def _stat(self, inos: set[int]) -> dict[int, tuple[Inode, dict[str, str]]]:
        order = sorted(inos)
        done = run_debugfs(self.image, [f"stat <{ino}>" for ino in order])
        if done.errors:
            raise ToolError(f"debugfs stat failed in {self.image}: {done.errors[0]}")
        out: dict[int, tuple[Inode, dict[str, str]]] = {}
        for ino, text in zip(order, done.outputs, strict=True):
            inode = parse_stat(text)
            if inode is None:
                raise ToolError(f"debugfs printed nothing for inode {ino} of {self.image}")
            out[ino] = (inode, parse_xattrs(text))
        return out

    def _slow_targets(
        self, listing: Listing, inodes: dict[int, tuple[Inode, dict[str, str]]]
    ) -> dict[int, str]:
        """Targets of symlinks too long to live in the inode (``stat`` does not show them)."""
        slow = sorted(
            {
                e.ino for kids in listing.values() for e in kids.values()
                if e.kind is Kind.SYMLINK and inodes[e.ino][0].target is None
            }
        )  # fmt: skip
        out: dict[int, str] = {}
        with InodeStream(self.image, slow) as stream:
            for ino in slow:
                raw = stream.read_exact(inodes[ino][0].size, f"symlink inode {ino}")
                out[ino] = raw.decode("utf-8", "surrogateescape")
        return out

    def _entry(
        self,
        parts: tuple[str, ...],
        ent: DirEntry,
        found: tuple[Inode, dict[str, str]],
        targets: dict[int, str],
    ) -> UpperEntry | None:
        inode, xattrs = found
        if inode.kind is None:
            return None  # sockets cannot be represented in a tar
        self._refuse_overlay_features(parts, inode.kind, xattrs)
        meta = inode.meta()
        if inode.kind is Kind.DIR:
            return UpperEntry(parts, meta, opaque=overlay_xattr(xattrs, "opaque") == '"y"')
        if inode.kind is Kind.SYMLINK:
            target = inode.target if inode.target is not None else targets[ent.ino]
            return UpperEntry(parts, meta, target=target)
        if inode.kind is Kind.FILE:
            return UpperEntry(parts, meta, size=inode.size, link_key=ent.ino)
        return UpperEntry(parts, meta)

    def _refuse_overlay_features(
        self, parts: tuple[str, ...], kind: Kind, xattrs: dict[str, str]
    ) -> None:
        # With redirect_dir or metacopy the upper dir alone does not hold the content.
        for feature, applies in (("redirect", kind is Kind.DIR), ("metacopy", kind is Kind.FILE)):
            if applies and overlay_xattr(xattrs, feature) is not None:
                raise BuildError(
                    f"{self.path(parts)}: overlay {feature} is in use; the upper dir "
                    "cannot be exported",
                    hint="mount the overlay with redirect_dir=off,metacopy=off",
                )
