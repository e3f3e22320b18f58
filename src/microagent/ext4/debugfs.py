"""The one way microagent drives ``debugfs``: batches of commands, parsers, streaming.

``debugfs`` reads and writes unmounted ext4 images without root. Everything that talks to it
goes through :func:`run_debugfs` (a script on stdin, output split per command) or
:class:`InodeStream` (file contents through a pipe); paths are quoted by :func:`quote`.
debugfs exits 0 after most failures, so callers look at :attr:`Script.errors`. Also here: the
parsers of what debugfs prints (``ls -p``, ``stat``, ``ea_list``), symlink targets, journal
replay and file system checks, and the script that gives an ``mke2fs -d`` image the owners and
modes a layer recorded.

Untrusted images: debugfs reads its script with ``fgets`` into an 8 KiB buffer, so a line of
8192 bytes or more is cut and *the rest runs as a command of its own* (``dump``, ``rdump`` and
``write`` read and write host files). Every script line is therefore refused from
:data:`MAX_COMMAND` bytes on, whoever built it; callers walk images by inode or one directory
at a time so that honest paths never come near it. An image a guest wrote (or one downloaded)
is checked by ``e2fsck`` (:func:`check_guest_image`, :func:`check_image`) before it is read.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from microagent.errors import (
    IntegrityError,
    InvalidInputError,
    ToolError,
)
from microagent.frozen import Frozen
from microagent.layers.stagemeta import Kind, PathMeta, StageMetadata
from microagent.runner import run, spawn

CHUNK = 1 << 20
MAX_COMMAND = 4096  # script lines are refused from this many bytes on (debugfs cuts at 8191)
MAX_SYMLINK = 4095  # longest symlink target: one block minus one (the kernel's limit)
FSCK_TIMEOUT = 600.0
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


def quote(path: str, *, raw_bytes: bool = False) -> str:
    """A path as one debugfs argument (double quotes, ``""`` for a literal quote), or
    IntegrityError if debugfs cannot express it. ``raw_bytes`` allows names that are not
    UTF-8 (kept as surrogate escapes) for scripts whose output is not parsed."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise IntegrityError(f"path {path!r} has control characters; debugfs cannot express it")
    if not raw_bytes:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise IntegrityError(
                f"path {path!r} is not valid UTF-8; debugfs output cannot express it"
            ) from exc
    return '"' + path.replace('"', '""') + '"'


@dataclass(frozen=True, eq=False, repr=False)
class Script(Frozen):
    """What a batch of debugfs commands printed: one output per command, and stderr."""

    outputs: tuple[str, ...]
    errors: tuple[str, ...]

    def unexpected(self, allowed: Sequence[str] = ()) -> list[str]:
        """stderr lines that are not one of the ``allowed`` messages."""
        return [e for e in self.errors if not any(a in e for a in allowed)]


def run_debugfs(
    image: Path,
    commands: Sequence[str],
    *,
    write: bool = False,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    split: bool = True,
) -> Script:
    """Run ``commands`` as one ``debugfs -f -`` script and split its output per command.

    Commands are encoded keeping surrogate escapes (names that are not UTF-8); with
    ``split=False`` the output is not followed per command (scripts with such names).
    debugfs exits 0 after most failures, so callers must look at :attr:`Script.errors`.
    """
    argv = ["debugfs", *(["-w"] if write else []), "-f", "-", str(image)]
    done = run(argv, input=encode_script(image, commands), cwd=cwd, env=env)
    errors = tuple(
        line for line in done.stderr.split("\n") if line.strip() and not line.startswith(_NOISE)
    )
    outputs = _split_outputs(done.stdout, commands, image) if split else ()
    return Script(outputs, errors)


def encode_script(image: Path, commands: Sequence[str]) -> bytes:
    """``commands`` as a debugfs script, one per line, or IntegrityError naming ``image``
    if a line could be cut (:data:`MAX_COMMAND` bytes or more) or split (a line break)."""
    lines = [c.encode("utf-8", "surrogateescape") for c in commands]
    for line in lines:
        if len(line) >= MAX_COMMAND or any(b in line for b in (b"\n", b"\r", b"\0")):
            shown = line[:60].decode("utf-8", "replace")
            raise IntegrityError(
                f"{image}: refusing a debugfs command of {len(line)} bytes "
                f"(limit {MAX_COMMAND - 1}, no line breaks): {shown!r}…",
                hint="debugfs would cut the line and run the rest as a command of its own; "
                "a path this long comes from a damaged or hostile image",
            )
    return b"".join(line + b"\n" for line in lines)


def _split_outputs(stdout: str, commands: Sequence[str], image: Path) -> tuple[str, ...]:
    # With -f, debugfs echoes each command as "debugfs: <command>" before its output.
    blocks: list[list[str]] = []
    for line in stdout.split("\n"):  # not splitlines(): names may hold U+2028
        if len(blocks) < len(commands) and line == f"debugfs: {commands[len(blocks)]}":
            blocks.append([])
        elif blocks:
            blocks[-1].append(line)
    if len(blocks) != len(commands):
        raise ToolError(f"could not follow debugfs output for {image}: expected echoed commands")
    return tuple("\n".join(b) for b in blocks)


# -- parsing what debugfs prints -------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class DirEntry(Frozen):
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
    """Entries (without ``.`` and ``..``) of an ``ls -p`` listing of directory ``where``.
    A line with inode 0 is no entry: debugfs lists the unused record at the start of a
    directory block too, and a name deleted there keeps its text (ext4 clears only the
    inode number of a block's first record)."""
    out: dict[str, DirEntry] = {}
    for line in output.split("\n"):
        if not line:
            continue
        m = _LS_LINE.fullmatch(line)
        if m is None:
            raise IntegrityError(
                f"{where}: cannot parse the directory listing line {line!r}",
                hint="a name with a newline or control character cannot be read by debugfs",
            )
        ino, mode, uid, gid, name, size = m.groups()
        if name not in (".", "..") and int(ino) != 0:
            out[name] = DirEntry(name, int(ino), int(mode, 8), int(uid), int(gid), int(size or 0))
    return out


@dataclass(frozen=True, eq=False, repr=False)
class Inode(Frozen):
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
    for line in output.split("\n"):
        if line.startswith(_FAST_LINK) and line.endswith('"'):
            return line[len(_FAST_LINK) : -1]
    return None


_XATTR_LINE = re.compile(r"  (\S+) \((\d+)\)(?: = (.*))?")


def parse_xattrs(output: str) -> dict[str, str]:
    """Extended attributes from ``ea_list``: name → value as printed (``"y"`` or hex bytes)."""
    out: dict[str, str] = {}
    for line in output.split("\n"):
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


def link_targets(image: Path, links: Sequence[Inode]) -> dict[int, str]:
    """The destinations of symlink inodes by inode number: fast ones as ``stat`` printed them,
    the rest streamed from their data block. A target that does not fit one block cannot be
    a real symlink and is refused (a crafted inode could make it any length)."""
    for inode in links:
        if inode.size > MAX_SYMLINK:
            raise IntegrityError(
                f"{image}: symlink inode {inode.ino} claims a {inode.size}-byte target "
                f"(at most {MAX_SYMLINK})",
                hint="the image is damaged or was crafted; its content cannot be trusted",
            )
    out = {i.ino: i.target for i in links if i.target is not None}
    slow = sorted({i.ino: i for i in links if i.target is None}.values(), key=lambda i: i.ino)
    with InodeStream(image, [i.ino for i in slow]) as stream:
        for inode in slow:
            raw = stream.read_exact(inode.size, f"symlink inode {inode.ino}")
            out[inode.ino] = raw.decode("utf-8", "surrogateescape")
    return out


# -- journal and checks ----------------------------------------------------------------------


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


def repair_image(image: Path, what: str = "disk image") -> int:
    """A full check that accepts every fix (``e2fsck -fy``), for an image a VM may have left
    mid-write (its VMM was killed). Returns e2fsck's exit code: 0 clean, 1 or 2 repaired;
    4 and up (errors left, or e2fsck failed) raise with its findings."""
    done = run(["e2fsck", "-fy", str(image)], check=False, timeout=FSCK_TIMEOUT)
    if done.returncode >= 4:
        found = "\n".join(_fsck_problems(done.stdout + "\n" + done.stderr))
        raise IntegrityError(
            f"{what} {image} has errors e2fsck -fy could not repair "
            f"(exit code {done.returncode}):\n{found}",
            hint="copy out what is still readable (`microagent cp`), then recreate the workspace",
        )
    return done.returncode


def check_image(image: Path, what: str = "disk image") -> None:
    """Refuse ``image`` unless a read-only full check (``e2fsck -fn``) finds nothing wrong.

    debugfs trusts what it reads; this is what stands between a crafted image (a symlink
    inode with a huge target, a directory loop, overlapping blocks) and the host tools.
    """
    done = run(["e2fsck", "-fn", str(image)], check=False, timeout=FSCK_TIMEOUT)
    if done.returncode != 0:
        found = "\n".join(_fsck_problems(done.stdout + "\n" + done.stderr))
        raise IntegrityError(
            f"{what} {image} has file system errors (e2fsck -fn exit code "
            f"{done.returncode}); refusing to read it:\n{found}",
            hint=f"its content cannot be trusted; `e2fsck -fy {image}` repairs it "
            "(damaged files may be lost)",
        )


_FSCK_QUESTION = re.compile(r"(?:^|\s+)[A-Z][^.?]*\? no$")  # "Fix? no", "Clear? no"
_FSCK_NOISE = ("Pass ", "e2fsck ", "WARNING: Filesystem still has errors", "non-contiguous")


def _fsck_problems(output: str, limit: int = 8) -> list[str]:
    """What ``e2fsck -n`` found, without its banners, summary and unanswered questions."""
    lines = [_FSCK_QUESTION.sub("", ln).strip() for ln in output.splitlines()]
    return [ln for ln in lines if ln and not any(n in ln for n in _FSCK_NOISE)][:limit]


def check_guest_image(image: Path, what: str = "disk image") -> None:
    """Make an image a guest wrote safe to read with debugfs.

    A pending journal (or a file system not marked clean) is replayed and repaired by
    :func:`replay_journal` (a full ``e2fsck -fp``); one marked clean still gets
    :func:`check_image`: a root process in the guest can write its disk raw and leave the
    clean flag set.
    """
    if needs_fsck(image):
        replay_journal(image, force=True)
    else:
        check_image(image, what)


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
            script.write_bytes(encode_script(image, [f"dump <{ino}> {target}" for ino in inodes]))
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


# -- ownership and modes of an mke2fs -d image -------------------------------------------


def fix_ownership_script(meta: StageMetadata, *, stage: Path | None = None) -> str:
    """``debugfs -w -f -`` commands giving an ``mke2fs -d`` image the recorded metadata.

    Sets uid, gid and mode (with type bits) of every path, and creates recorded device
    nodes with ``mknod``. With ``stage`` given, paths whose stage copy already has the
    right owner and mode are skipped (the common case when flattening ran as root). Encode
    the result with ``errors="surrogateescape"`` (non-UTF-8 names are kept as bytes).
    """
    lines: list[str] = []
    for path, m in meta:
        if m.kind.is_device:
            lines += _mknod_lines(path, m)
        elif stage is None or not _stage_matches(stage, path, m):
            lines += _sif_lines(path, m)
    return "".join(line + "\n" for line in lines)


def _sif_lines(path: str, m: PathMeta) -> list[str]:
    q = quote(path, raw_bytes=True)
    return [f"sif {q} uid {m.uid}", f"sif {q} gid {m.gid}", f"sif {q} mode 0{m.st_mode:o}"]


def _mknod_lines(path: str, m: PathMeta) -> list[str]:
    # debugfs' mknod takes a bare name in the current directory, not a path.
    parent, _, name = path.rpartition("/")
    kind = "c" if m.kind is Kind.CHAR else "b"
    return [
        f"cd {quote(parent or '/', raw_bytes=True)}",
        f"mknod {quote(name, raw_bytes=True)} {kind} {m.major} {m.minor}",
        "cd /",
        *_sif_lines(path, m),
        f"sif {quote(path, raw_bytes=True)} mtime @{m.mtime}",
    ]


def _stage_matches(stage: Path, path: str, m: PathMeta) -> bool:
    try:
        st = os.lstat(stage / path.lstrip("/"))
    except OSError:
        return False
    return (st.st_uid, st.st_gid, st.st_mode) == (m.uid, m.gid, m.st_mode)
