"""Apply OCI layer tarballs, in order, into a stage directory — safely.

Nothing a layer says is trusted. Entries are written one by one (never ``extractall``);
every parent directory is opened with ``O_NOFOLLOW`` relative to the previous one, so no
symlink — whether in this layer or planted by an earlier one — is ever followed, and no
write can land outside the stage. An entry that tries (``..``, a symlink or non-directory
in its parent chain, a hard link to something outside or missing, an absurd name, too many
entries) is refused with an IntegrityError naming the layer and the entry. A leading ``/``
or ``./`` is normal in layers and simply means the stage root.

OCI whiteouts are honoured: ``.wh.<name>`` deletes ``<name>`` from lower layers and
``.wh..wh..opq`` empties its directory of lower-layer entries; entries of the same layer
survive both, in whatever order they come. Whiteout files never appear in the stage.

Ownership, modes and device nodes are recorded in a :class:`StageMetadata` (kept outside
the stage) because an unprivileged user cannot apply them; see ``ext4.debugfs``.
As root, owners and modes are applied to the stage too. Device nodes are never created on
the host: they are recorded (or refused, with ``Limits(allow_devices=False)``).

A layer applied alone onto an empty stage with :class:`OverlayMarks` (a layer disk, see
``ext4.layerdisk``) keeps its whiteouts in overlayfs form instead: ``.wh.<name>`` is recorded
as a character device 0/0 named ``<name>`` (owner, mode and mtime from the tar) and
``.wh..wh..opq`` as its directory's path in :attr:`OverlayMarks.opaque`; every check is the
same.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import queue
import re
import shutil
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NoReturn, Protocol, cast

from microagent.digests import Digest
from microagent.errors import BuildError, IntegrityError
from microagent.layers.stagemeta import Kind, PathMeta, StageMetadata
from microagent.store.content import Store
from microagent.store.records import LayerRef

__all__ = [
    "LayerSource",
    "Limits",
    "OverlayMarks",
    "apply_layer",
    "finish_stage",
    "flatten",
    "stored_layers",
]

CHUNK = 1 << 20
# tarfile's stream mode copies what it has buffered on every read (a 512-byte header too):
# small reads keep that cheap (with 1 MiB reads each header cost ~2 MiB of copying)
TAR_READ = 32 << 10
DECODED = 128 << 10  # bytes per hand-over from the decoding thread: stays in the CPU cache
AHEAD = 64  # hand-overs a layer's decoding thread may run ahead of the tar walk (8 MiB)
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_ID = 2**32 - 2
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Limits:
    """Bounds on what one layer may contain."""

    max_entries: int = 1_000_000
    max_depth: int = 128
    max_name_bytes: int = 255
    max_path_bytes: int = 4096
    max_bytes: int = 64 * 1024**3  # file content, uncompressed
    allow_devices: bool = True  # record char/block devices (never created on the host)


@dataclass(frozen=True)
class LayerSource:
    """One layer to flatten: a name for messages, a way to open its (compressed) bytes,
    and optionally its diff_id (sha256 of the uncompressed tar) to verify."""

    name: str
    open: Callable[[], BinaryIO]
    diff_id: Digest | None = None

    @classmethod
    def from_path(
        cls, path: Path, name: str | None = None, diff_id: Digest | None = None
    ) -> LayerSource:
        """A layer stored in a file (e.g. a blob in the store)."""
        return cls(name or path.name, lambda: path.open("rb"), diff_id)

    @classmethod
    def stored(cls, store: Store, layer: LayerRef, index: int) -> LayerSource:
        """Layer ``index`` of a step, from its blob in the store (diff_id checked)."""
        name = f"layer {index} ({layer.digest[:19]})"
        return cls.from_path(store.blob_path(layer.digest), name, Digest.parse(layer.diff_id))


@dataclass
class OverlayMarks:
    """What one layer's whiteouts say, kept in overlayfs form rather than applied: the paths
    whose lower entry the layer removes (its ``.wh.<name>`` entries, recorded in the metadata
    as character devices 0/0, and names it wrote twice, the first entry replaced: a flatten
    removes the lower entry with it) and the directories its ``.wh..wh..opq`` markers make
    opaque. A path in :attr:`hidden` that the layer leaves a directory hides the lower one's
    children (it is opaque too); one it leaves anything else hides the lower entry by
    itself."""

    hidden: set[str] = field(default_factory=set)
    opaque: set[str] = field(default_factory=set)


def stored_layers(store: Store, layers: Sequence[LayerRef]) -> list[LayerSource]:
    """A step's layer chain, in order, from the store."""
    return [LayerSource.stored(store, layer, i) for i, layer in enumerate(layers)]


def flatten(
    stage: Path,
    layers: Sequence[LayerSource],
    *,
    limits: Limits = Limits(),
    meta: StageMetadata | None = None,
) -> StageMetadata:
    """Apply ``layers`` in order into ``stage`` (created if missing) and return the metadata.

    On an IntegrityError the stage is left half-built; the caller discards it.
    """
    stage.mkdir(parents=True, exist_ok=True)
    meta = meta if meta is not None else StageMetadata()
    ahead: list[_LayerReader] = []  # this layer's reader and the next one's, decoding
    try:
        for i, source in enumerate(layers):
            for later in layers[i + len(ahead) : i + 2]:
                ahead.append(_LayerReader.opening(later.open, later.diff_id))
            reader = ahead.pop(0)
            try:
                _apply_read(
                    stage,
                    reader,
                    layer_name=source.name,
                    meta=meta,
                    limits=limits,
                    diff_id=source.diff_id,
                )
            finally:
                reader.close()
    finally:
        for reader in ahead:
            reader.close()
    finish_stage(stage, meta)
    return meta


def apply_layer(
    stage: Path,
    fileobj: BinaryIO,
    *,
    layer_name: str,
    meta: StageMetadata,
    limits: Limits = Limits(),
    diff_id: Digest | None = None,
    marks: OverlayMarks | None = None,
) -> None:
    """Apply one layer (plain, gzip or zstd tar, detected by magic bytes) onto ``stage``;
    with ``marks`` (an empty stage only) its whiteouts are kept in overlayfs form."""
    reader = _LayerReader.opening(lambda: fileobj, diff_id, close=False)
    try:
        _apply_read(
            stage,
            reader,
            layer_name=layer_name,
            meta=meta,
            limits=limits,
            diff_id=diff_id,
            marks=marks,
        )
    finally:
        reader.close()


def _apply_read(
    stage: Path,
    reader: _LayerReader,
    *,
    layer_name: str,
    meta: StageMetadata,
    limits: Limits,
    diff_id: Digest | None,
    marks: OverlayMarks | None = None,
) -> None:
    root_fd = os.open(stage, _DIR_FLAGS)
    try:
        applier = _Applier(root_fd, layer_name, meta, limits, marks=marks)
        try:
            _apply_members(reader, applier)
        finally:
            applier.drop_dirs()
        reader.finish()
    except (_CorruptStream, tarfile.TarError) as exc:
        raise IntegrityError(f"layer {layer_name}: corrupt or truncated layer: {exc}") from exc
    finally:
        os.close(root_fd)
    if diff_id is not None and reader.digest() != diff_id:
        raise IntegrityError(
            f"layer {layer_name}: uncompressed content is {reader.digest()}, "
            f"but the image says its diff_id is {diff_id}"
        )


def _apply_members(reader: _LayerReader, applier: _Applier) -> None:
    stream = cast(BinaryIO, reader)  # tarfile's stream mode only calls read()
    with tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_READ, errors="surrogateescape") as tf:
        while (member := tf.next()) is not None:
            applier.apply(member, tf)
            _forget_members(tf)


def _forget_members(tf: tarfile.TarFile) -> None:
    # tarfile keeps every header it has read; streaming needs none of them.
    members: list[tarfile.TarInfo] = getattr(tf, "members", [])
    members.clear()


def finish_stage(stage: Path, meta: StageMetadata) -> None:
    """Set recorded directory mtimes (adding children changed them); call after the last layer."""
    root_fd = os.open(stage, _DIR_FLAGS)
    try:
        _fix_dir_times(root_fd, "/", meta)
    finally:
        os.close(root_fd)


def _fix_dir_times(dir_fd: int, path: str, meta: StageMetadata) -> None:
    with os.scandir(dir_fd) as it:
        subdirs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
    for name in subdirs:
        child = _join(path, name)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            _fix_dir_times(fd, child, meta)
        finally:
            os.close(fd)
    m = meta.get(path)
    if m is not None:
        os.utime(dir_fd, ns=(m.mtime * 10**9, m.mtime * 10**9))


# -- reading the layer stream ---------------------------------------------------------------


class _CorruptStream(Exception):
    """The layer's bytes could not be read or decompressed."""


class _Stopped(Exception):
    """The reader was closed before the layer's end (the tar walk failed)."""


class _Reads(Protocol):
    def read(self, size: int, /) -> bytes: ...


class _LayerReader:
    """Decompresses (chosen by magic bytes) and hashes a layer in a thread of its own (zstd,
    zlib and sha256 release the GIL) and hands tarfile the decoded chunks, so decoding
    overlaps the tar walk. At most :data:`AHEAD` chunks wait; a decoding error is raised
    from :meth:`read`."""

    def __init__(self) -> None:
        self._hasher = Digest.of_bytes(b"").hasher()
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(AHEAD)
        self._pending = b""
        self._offset = 0
        self._done = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def opening(
        cls, open_raw: Callable[[], BinaryIO], diff_id: Digest | None, *, close: bool = True
    ) -> _LayerReader:
        """Start decoding what ``open_raw()`` returns (closed when done, with ``close``)."""
        reader = cls()
        if diff_id is not None:
            reader._hasher = diff_id.hasher()
        reader._thread = threading.Thread(target=reader._pump, args=(open_raw, close), daemon=True)
        reader._thread.start()
        return reader

    def _pump(self, open_raw: Callable[[], BinaryIO], close: bool) -> None:
        try:
            if close:
                with open_raw() as raw:  # (a source may read the rest on a clean exit)
                    self._decode(raw)
            else:
                self._decode(open_raw())
            self._chunks.put(b"")  # only now: the source is done with, too
        except BaseException as exc:  # handed to the reader, re-raised there
            self._chunks.put(exc)

    def _decode(self, raw: BinaryIO) -> None:
        stream = _decoder(raw)
        while chunk := _guard(lambda: stream.read(DECODED)):
            if self._stop.is_set():
                raise _Stopped
            self._hasher.update(chunk)
            self._chunks.put(chunk)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the current chunk (tarfile's stream mode reads on)."""
        if self._offset >= len(self._pending):
            if self._done:
                return b""
            item = self._chunks.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._pending, self._offset, self._done = item, 0, not item
        end = len(self._pending) if size is None or size < 0 else self._offset + size
        data = self._pending[self._offset : end]
        self._offset += len(data)
        return data

    def finish(self) -> None:
        """Read (and hash) whatever follows the tar's end-of-archive blocks."""
        while self.read(CHUNK):
            pass

    def digest(self) -> Digest:
        return Digest.from_hasher(self._hasher)

    def close(self) -> None:
        """Stop the decoding thread (draining its queue so a blocked put can finish)."""
        self._stop.set()
        while self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._chunks.get(timeout=0.05)
        if self._thread is not None:
            self._thread.join()


def _decoder(raw: BinaryIO) -> _Reads:
    """A reader of the decompressed bytes of ``raw`` (gzip, zstd or plain, by magic bytes)."""
    head = _guard(lambda: _read_head(raw, 4))
    plain = _PrefixedReader(head, raw)
    if head.startswith(GZIP_MAGIC):
        # cast: both decoders only ever call read() on their source
        return gzip.GzipFile(fileobj=cast(BinaryIO, plain), mode="rb")
    if head.startswith(ZSTD_MAGIC):
        import zstandard  # deferred: ~10 ms to import; a cache-hit create never (de)compresses

        dctx = zstandard.ZstdDecompressor()
        return dctx.stream_reader(cast(BinaryIO, plain), read_size=CHUNK, read_across_frames=True)
    return plain


class _PrefixedReader:
    """Returns ``prefix`` first, then the rest of ``raw``."""

    def __init__(self, prefix: bytes, raw: BinaryIO) -> None:
        self._prefix = prefix
        self._raw = raw

    def read(self, size: int = -1, /) -> bytes:
        if not self._prefix:
            return self._raw.read(size)
        if size is None or size < 0:
            out, self._prefix = self._prefix + self._raw.read(), b""
        else:
            out, self._prefix = self._prefix[:size], self._prefix[size:]
        return out


def _guard(fn: Callable[[], bytes]) -> bytes:
    import zstandard  # deferred: ~10 ms to import; a cache-hit create never (de)compresses

    try:
        return fn()
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise _CorruptStream(str(exc) or type(exc).__name__) from exc


def _read_head(raw: BinaryIO, size: int) -> bytes:
    head = b""
    while len(head) < size and (chunk := raw.read(size - len(head))):
        head += chunk
    return head


# -- applying entries ---------------------------------------------------------------------


@dataclass
class _Applier:
    """Applies the members of one layer, tracking what this layer itself created."""

    root_fd: int
    layer: str
    meta: StageMetadata
    limits: Limits
    touched: set[str] = field(default_factory=set)
    entries: int = 0
    content_bytes: int = 0
    dirs: list[tuple[str, int]] = field(default_factory=list)  # cached walk: (name, fd)
    as_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    marks: OverlayMarks | None = None  # whiteouts kept in overlayfs form (a layer disk)

    def refuse(self, entry: str, reason: str) -> NoReturn:
        raise IntegrityError(
            f"layer {self.layer}: entry {entry!r}: {reason}",
            hint="the image contains an unsafe or malformed layer; refusing to unpack it",
        )

    def apply(self, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            self.refuse(member.name, f"more than {self.limits.max_entries} entries in one layer")
        parts = self.split(member.name, member.name)
        try:
            if parts and parts[-1].startswith(WHITEOUT):
                self.whiteout(member, parts)
            else:
                self.apply_entry(member, parts, tf)
        except OSError as exc:
            raise BuildError(
                f"layer {self.layer}: entry {member.name!r}: cannot write the stage: "
                f"{exc.strerror or exc}"
            ) from exc

    def apply_entry(
        self, member: tarfile.TarInfo, parts: tuple[str, ...], tf: tarfile.TarFile
    ) -> None:
        kind = _kind_of(member)
        if kind is None:
            self.refuse(member.name, f"unsupported tar entry type {member.type!r}")
        meta = self.meta_of(member, kind)
        if not parts:
            self.root_entry(member, meta)
            return
        if member.islnk():
            self.hardlink(member, parts)
            return
        pfd = self.open_dir(member.name, parts[:-1], create=True)
        assert pfd is not None
        try:
            self.create(pfd, member, parts, meta, tf)
        finally:
            os.close(pfd)
        self.touch(parts)

    # names and parents -------------------------------------------------------------------

    def split(self, entry: str, name: str) -> tuple[str, ...]:
        """Normalise a member name (or link target) into path components, or refuse it."""
        lim = self.limits
        if "\x00" in name:
            self.refuse(entry, "NUL character in name")
        if _longer(name, lim.max_path_bytes):
            self.refuse(entry, f"name longer than {lim.max_path_bytes} bytes")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if len(parts) > lim.max_depth:
            self.refuse(entry, f"path deeper than {lim.max_depth} components")
        clean = _CONTROL.search(name) is None  # one scan, not one per component
        for i, part in enumerate(parts):
            self.check_component(entry, part, last=i == len(parts) - 1, clean=clean)
        return parts

    def check_component(self, entry: str, part: str, *, last: bool, clean: bool = False) -> None:
        if part == "..":
            self.refuse(entry, "'..' component (would escape the root)")
        if not clean and _CONTROL.search(part):
            self.refuse(entry, "control character in name")
        if _longer(part, self.limits.max_name_bytes):
            self.refuse(entry, f"name component longer than {self.limits.max_name_bytes} bytes")
        if not last and part.startswith(WHITEOUT):
            self.refuse(entry, "whiteout name used as a directory")

    def open_dir(self, entry: str, parts: Sequence[str], *, create: bool) -> int | None:
        """fd of the directory at ``parts`` without following any symlink; None if missing.

        The fds of the last walk are kept (``dirs``) so siblings do not re-walk the path.
        Removals only ever hit entries below the walked chain, but :meth:`remove_at` drops
        the cache anyway so a removed directory can never be written through a stale fd.
        """
        common = 0
        while common < min(len(parts), len(self.dirs)) and self.dirs[common][0] == parts[common]:
            common += 1
        self.drop_dirs(keep=common)
        fd = self.dirs[-1][1] if self.dirs else self.root_fd
        for i in range(common, len(parts)):
            nfd = self.open_child_dir(entry, fd, parts[i], parts[: i + 1], create=create)
            if nfd is None:
                return None
            self.dirs.append((parts[i], nfd))
            fd = nfd
        return os.dup(fd)

    def drop_dirs(self, keep: int = 0) -> None:
        """Close the cached directory fds beyond the first ``keep``."""
        while len(self.dirs) > keep:
            os.close(self.dirs.pop()[1])

    def remove_at(self, dfd: int, name: str, st: os.stat_result) -> None:
        """Remove an entry (a whole tree for a directory) without following symlinks."""
        self.drop_dirs()
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)

    def open_child_dir(
        self, entry: str, fd: int, comp: str, parts: Sequence[str], *, create: bool
    ) -> int | None:
        try:
            return os.open(comp, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            what = "a symlink" if _is_symlink(fd, comp) else "not a directory"
            self.refuse(entry, f"parent {_path(parts)} is {what}")
        os.mkdir(comp, 0o755 if self.as_root else 0o700, dir_fd=fd)
        self.meta.set(_path(parts), PathMeta(Kind.DIR, 0o755, 0, 0, 0))
        self.touch(parts)
        return os.open(comp, _DIR_FLAGS, dir_fd=fd)

    def touch(self, parts: Sequence[str]) -> None:
        """Mark a path and its ancestors as created by this layer."""
        for n in range(len(parts), 0, -1):
            p = _path(parts[:n])
            if p in self.touched:
                return
            self.touched.add(p)

    # entry kinds ---------------------------------------------------------------------------

    def meta_of(self, member: tarfile.TarInfo, kind: Kind) -> PathMeta:
        for what, value in (("uid", member.uid), ("gid", member.gid)):
            if not 0 <= value <= MAX_ID:
                self.refuse(member.name, f"{what} {value} out of range")
        mode = 0o777 if kind is Kind.SYMLINK else member.mode & 0o7777
        mtime = min(max(int(member.mtime), 0), 2**34 - 1)
        major, minor = (member.devmajor, member.devminor) if kind.is_device else (0, 0)
        if not (0 <= major < 2**12 and 0 <= minor < 2**20):
            self.refuse(member.name, "device number out of range")
        return PathMeta(kind, mode, member.uid, member.gid, mtime, major, minor)

    def root_entry(self, member: tarfile.TarInfo, meta: PathMeta) -> None:
        if meta.kind is not Kind.DIR:
            self.refuse(member.name, "the root can only be a directory")
        self.meta.set("/", meta)
        self.set_owner_mode(self.root_fd, meta)

    def create(
        self,
        pfd: int,
        member: tarfile.TarInfo,
        parts: tuple[str, ...],
        meta: PathMeta,
        tf: tarfile.TarFile,
    ) -> None:
        path, base = _path(parts), parts[-1]
        if meta.kind.is_device and not self.limits.allow_devices:
            self.refuse(member.name, "device nodes are not allowed")
        existing_dir = self.clear(pfd, base, path, keep_dir=meta.kind is Kind.DIR)
        if meta.kind is Kind.FILE:
            self.write_file(pfd, base, member, meta, tf)
        elif meta.kind is Kind.DIR:
            self.make_dir(pfd, base, meta, existing=existing_dir)
        elif meta.kind is Kind.SYMLINK:
            self.make_symlink(pfd, base, member, meta)
        elif meta.kind is Kind.FIFO:
            os.mkfifo(base, 0o600, dir_fd=pfd)
            self.set_owner_mode_at(pfd, base, meta)
        self.meta.set(path, meta)  # devices: recorded only, never created on the host

    def clear(self, pfd: int, base: str, path: str, *, keep_dir: bool) -> bool:
        """Make room for a new entry; True if an existing directory is kept (merged)."""
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            self.meta.discard(path)  # a recorded device has no file on disk
            return False
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        self.remove_at(pfd, base, st)
        if stat.S_ISDIR(st.st_mode):
            self.meta.remove_tree(path)
        else:
            self.meta.discard(path)
        if self.marks is not None:  # a flatten would have removed the lower entry with it
            self.marks.hidden.add(path)
        return False

    def write_file(
        self, pfd: int, base: str, member: tarfile.TarInfo, meta: PathMeta, tf: tarfile.TarFile
    ) -> None:
        self.content_bytes += member.size
        if self.content_bytes > self.limits.max_bytes:
            self.refuse(member.name, f"layer content exceeds {self.limits.max_bytes} bytes")
        src = tf.extractfile(member)
        fd = os.open(base, _NEW_FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            if src is not None:
                with open(fd, "wb", closefd=False) as out:
                    shutil.copyfileobj(src, out, CHUNK)
            self.set_owner_mode(fd, meta)
            os.utime(fd, ns=(meta.mtime * 10**9, meta.mtime * 10**9))
        finally:
            os.close(fd)

    def make_dir(self, pfd: int, base: str, meta: PathMeta, *, existing: bool) -> None:
        if not existing:
            os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            self.set_owner_mode(fd, meta)
        finally:
            os.close(fd)

    def make_symlink(self, pfd: int, base: str, member: tarfile.TarInfo, meta: PathMeta) -> None:
        target = member.linkname
        if not target or "\x00" in target or len(os.fsencode(target)) > 4095:
            self.refuse(member.name, "invalid symlink target")
        os.symlink(target, base, dir_fd=pfd)
        if self.as_root:
            os.chown(base, meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(base, ns=(meta.mtime * 10**9,) * 2, dir_fd=pfd, follow_symlinks=False)

    def hardlink(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        entry = member.name
        target = self.split(entry, member.linkname)
        if not target or target == parts or _path(target).startswith(_path(parts) + "/"):
            self.refuse(entry, f"hard link to {member.linkname!r} would be circular")
        tfd = self.open_dir(entry, target[:-1], create=False)
        if tfd is None:
            self.refuse(entry, f"hard link target {member.linkname!r} does not exist")
        try:
            self.link_from(tfd, member, parts, target)
        finally:
            os.close(tfd)

    def link_from(
        self, tfd: int, member: tarfile.TarInfo, parts: tuple[str, ...], target: tuple[str, ...]
    ) -> None:
        tmeta = self.meta.get(_path(target))
        whiteout = tmeta is not None and tmeta.kind is Kind.CHAR
        if self.marks is not None and _path(target) in self.marks.hidden and whiteout:
            self.refuse(member.name, f"hard link target {member.linkname!r} does not exist")
        try:
            st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError:
            if tmeta is None or not tmeta.kind.is_device:
                self.refuse(member.name, f"hard link target {member.linkname!r} does not exist")
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            self.refuse(member.name, "hard link to a directory")
        pfd = self.open_dir(member.name, parts[:-1], create=True)
        assert pfd is not None
        try:
            self.clear(pfd, parts[-1], _path(parts), keep_dir=False)
            if st is not None:
                os.link(
                    target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False
                )
        finally:
            os.close(pfd)
        if tmeta is not None:
            self.meta.set(_path(parts), tmeta)
        self.touch(parts)

    def whiteout(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        entry, base, parent = member.name, parts[-1], parts[:-1]
        if base == OPAQUE:
            self.opaque(entry, parent)
            return
        if base.startswith(WHITEOUT * 2):
            return  # other aufs bookkeeping (.wh..wh.plnk ...): not part of the image
        name = base[len(WHITEOUT) :]
        if name in ("", ".", ".."):
            self.refuse(entry, "whiteout of an invalid name")
        path = _path((*parent, name))
        pfd = self.open_dir(entry, parent, create=self.marks is not None)
        if pfd is None or path in self.touched:
            if pfd is not None:
                os.close(pfd)
            return
        try:
            self.clear(pfd, name, path, keep_dir=False)
        finally:
            os.close(pfd)
        if self.marks is not None:  # kept as overlayfs keeps it: a char device 0/0
            kept = self.meta_of(member, Kind.FILE)
            self.meta.set(path, PathMeta(Kind.CHAR, kept.mode, kept.uid, kept.gid, kept.mtime))
            self.marks.hidden.add(path)

    def opaque(self, entry: str, parent: tuple[str, ...]) -> None:
        dfd = self.open_dir(entry, parent, create=True)
        assert dfd is not None
        if self.marks is not None:  # nothing of a lower layer is here to remove
            os.close(dfd)
            self.marks.opaque.add(_path(parent))
            self.touch(parent)
            return
        try:
            self.remove_untouched(dfd, _path(parent))
        finally:
            os.close(dfd)
        self.meta.remove_children(_path(parent), keep=self.touched.__contains__)
        self.touch(parent)

    def remove_untouched(self, dfd: int, path: str) -> None:
        """Delete everything below ``path`` that this layer did not create."""
        for name in sorted(os.listdir(dfd)):
            child = _join(path, name)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if child not in self.touched:
                self.remove_at(dfd, name, st)
            elif stat.S_ISDIR(st.st_mode):
                cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    self.remove_untouched(cfd, child)
                finally:
                    os.close(cfd)

    # owners and modes ----------------------------------------------------------------------

    def stage_mode(self, meta: PathMeta) -> int:
        """The mode on the host: the real one as root, else with owner access kept."""
        if self.as_root:
            return meta.mode
        return meta.mode | (0o700 if meta.kind is Kind.DIR else 0o600)

    def set_owner_mode(self, fd: int, meta: PathMeta) -> None:
        if self.as_root:
            os.fchown(fd, meta.uid, meta.gid)  # before chmod: chown clears setuid bits
        os.fchmod(fd, self.stage_mode(meta))

    def set_owner_mode_at(self, pfd: int, base: str, meta: PathMeta) -> None:
        # Only for entries this layer just created (never a symlink), so following is moot.
        if self.as_root:
            os.chown(base, meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
        os.chmod(base, self.stage_mode(meta), dir_fd=pfd)
        os.utime(base, ns=(meta.mtime * 10**9,) * 2, dir_fd=pfd, follow_symlinks=False)


def _kind_of(member: tarfile.TarInfo) -> Kind | None:
    if member.isreg():
        return Kind.FILE
    if member.islnk():
        return Kind.FILE  # resolved against its target
    return {
        tarfile.DIRTYPE: Kind.DIR,
        tarfile.SYMTYPE: Kind.SYMLINK,
        tarfile.FIFOTYPE: Kind.FIFO,
        tarfile.CHRTYPE: Kind.CHAR,
        tarfile.BLKTYPE: Kind.BLOCK,
    }.get(member.type)


def _longer(name: str, limit: int) -> bool:
    """Whether ``name`` takes more than ``limit`` bytes on disk (a character takes at most
    four, so short names need no encoding)."""
    return len(name) * 4 > limit and len(os.fsencode(name)) > limit


def _is_symlink(dfd: int, name: str) -> bool:
    with contextlib.suppress(OSError):
        return stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
    return False


def _path(parts: Sequence[str]) -> str:
    return "/" + "/".join(parts)


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name
