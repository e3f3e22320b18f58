"""Copy files between the host and a stopped workspace's disks, without booting it.

The guest sees an overlay: the shared, read-only ROOTFS image as lower and the directory
``/upper`` of its own STATE image as upper (``/work`` is overlayfs' workdir). This module
reads and writes that merged view offline with debugfs, by overlay's rules: a whiteout
(character device 0/0) hides the lower path, an opaque directory hides everything below
it in the lower, a non-directory in the upper hides the lower entirely, and writes land in
the upper only, after copying missing parent directories up from the lower (owner, mode
and mtime kept). Symlinks along the way are followed inside the merged view.

The caller guarantees no VM is using the disks; a per-image ``flock`` keeps two copies
from racing each other. The rootfs image is only ever opened read-only.

The state disk is the guest's: a root process in it can write any bytes, leave the file
system marked clean, and plant symlinks meant to steer this code. So the state disk is
checked by ``e2fsck`` before every copy (a repairing one before writes, a read-only one
before reads); symlinks are followed with the kernel's bounds (:data:`PATH_MAX` bytes per
path, :data:`NAME_MAX` per component, :data:`MAX_SYMLINKS` links, targets within a block);
and debugfs is driven one directory at a time (``cd``, then one name per command, or
``<inode>``), so no command line grows with the path.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from microagent.errors import (
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ToolError,
)
from microagent.ext4.debugfs import (
    MISSING,
    Inode,
    InodeStream,
    check_image,
    link_targets,
    needs_fsck,
    overlay_xattr,
    parse_stat,
    parse_xattrs,
    quote,
    replay_journal,
    run_debugfs,
)
from microagent.ext4.mkfs import UPPER
from microagent.frozen import Frozen
from microagent.fsutil import free_bytes, no_space, says_no_space
from microagent.layers.stagemeta import Kind, PathMeta

__all__ = ["copy_in", "copy_out", "exists", "guest_parts", "make_dirs", "read_bytes"]

MAX_SYMLINKS = 40  # links followed in one lookup, as Linux (ELOOP beyond)
PATH_MAX = 4096  # a path has fewer bytes than this, as on Linux (ENAMETOOLONG)
NAME_MAX = 255  # bytes per component
READ_LIMIT = 16 << 20
NEW_FILE_MODE = 0o644
_TMP_PREFIX = ".microagent-cp-"


class Layer(enum.Enum):
    """Which disk a merged-view entry comes from."""

    UPPER = "upper"
    LOWER = "lower"


@dataclass(frozen=True, eq=False, repr=False)
class _Hit(Frozen):
    """An entry of the merged view: its layer and its inode there."""

    layer: Layer
    inode: Inode


@dataclass(frozen=True, eq=False, repr=False)
class _Probe(Frozen):
    """``stat`` of every prefix of a path (index 0 is the root) in both layers."""

    upper: tuple[Inode | None, ...]
    opaque: tuple[bool, ...]
    lower: tuple[Inode | None, ...]


@dataclass(frozen=True, eq=False, repr=False)
class _View(Frozen):
    """A guest path resolved in the merged view (symlinks in its parents followed)."""

    parts: tuple[str, ...]
    parents: tuple[_Hit, ...] = ()  # one directory per ancestor below the root
    target: _Hit | None = None  # the entry itself, None if absent
    upper_entry: Inode | None = None  # what the upper holds at the path (a whiteout, say)
    broken: str = ""  # why the parents cannot be used, e.g. "/a does not exist"
    parent_missing: bool = False  # broken because an ancestor does not exist


@dataclass(frozen=True, eq=False, repr=False)
class _Symlink(Frozen):
    """The walk met a symlink at component ``index`` (1-based) that must be followed."""

    index: int
    hit: _Hit


# -- public API ------------------------------------------------------------------------------


def copy_in(state_image: Path, rootfs_image: Path, host_src: Path, guest_path: str) -> int:
    """Write the host file ``host_src`` to ``guest_path`` in the merged view; return its size.

    The parent must exist in the merged view; an existing file is replaced keeping its
    owner and mode (new files: root, 0644); a whiteout at the name is removed.
    """
    size = _host_source(host_src)
    disks = _Disks(state_image, rootfs_image)
    with disks.locked(write=True):
        view = disks.resolve(guest_path, follow_last=True)
        _check_writable(view, guest_path)
        _write_upper(disks.state, view, host_src, size)
    return size


def make_dirs(state_image: Path, rootfs_image: Path, guest_path: str) -> None:
    """Make the directory ``guest_path`` exist in the merged view, like ``mkdir -p`` in the
    guest: each missing one is created in the upper (root, 0755) after copying up the parents
    only the lower has; one made where a whiteout hid the lower's is opaque, as overlayfs
    makes it."""
    parts = guest_parts(guest_path)
    disks = _Disks(state_image, rootfs_image)
    with disks.locked(write=True):
        for depth in range(1, len(parts) + 1):
            view = disks.resolve(_guest_path(parts[:depth]), follow_last=True)
            if view.broken:
                raise InvalidInputError(f"cannot create {guest_path}: {view.broken}")
            if view.target is None:
                _mkdir_upper(disks.state, view)
            elif view.target.inode.kind is not Kind.DIR:
                where = _guest_path(parts[:depth])
                raise InvalidInputError(f"cannot create {guest_path}: {where} is not a directory")


def _mkdir_upper(state: Path, view: _View) -> None:
    name = _here(view.parts[-1])
    cmds = _enter_parent(view, copy_up=True)
    if view.upper_entry is not None:  # a whiteout: the new directory hides the lower's
        cmds += [f"rm {name}", f"mkdir {name}", f"ea_set {name} trusted.overlay.opaque y"]
    else:
        cmds.append(f"mkdir {name}")
    done = run_debugfs(state, [*cmds, *_sif(name, PathMeta(Kind.DIR, 0o755, 0, 0, 0))], write=True)
    if done.errors:
        raise ToolError(f"could not create {_guest_path(view.parts)} in {state}: {done.errors[0]}")


def copy_out(state_image: Path, rootfs_image: Path, guest_path: str, host_dst: Path) -> int:
    """Copy the guest file ``guest_path`` to ``host_dst`` (a file, or a directory to put it
    in under the same name); return its size. The file appears atomically."""
    disks = _Disks(state_image, rootfs_image)
    with disks.locked(write=False):
        hit = _regular_file(disks.resolve(guest_path, follow_last=True), guest_path)
        dst = _host_destination(host_dst, guest_path)
        image = disks.image_of(hit.layer)
        tmp = f"{_TMP_PREFIX}{secrets.token_hex(6)}"
        _check_host_space(dst.parent, hit.inode.size)
        try:
            done = run_debugfs(image, [f"dump <{hit.inode.ino}> {quote(tmp)}"], cwd=dst.parent)
            if any(says_no_space(e) for e in done.errors):
                raise no_space(dst.parent, hit.inode.size)
            if done.errors:
                raise ToolError(f"could not read {guest_path} from {image}: {done.errors[0]}")
            _finish_host_file(dst.parent / tmp, dst, hit.inode, guest_path)
        finally:
            (dst.parent / tmp).unlink(missing_ok=True)
    return hit.inode.size


def read_bytes(
    state_image: Path, rootfs_image: Path, guest_path: str, *, limit: int = READ_LIMIT
) -> bytes:
    """The content of the guest file ``guest_path`` (at most ``limit`` bytes, else an error)."""
    disks = _Disks(state_image, rootfs_image)
    with disks.locked(write=False):
        hit = _regular_file(disks.resolve(guest_path, follow_last=True), guest_path)
        if hit.inode.size > limit:
            raise InvalidInputError(
                f"{guest_path} is {hit.inode.size} bytes, more than the {limit} allowed here"
            )
        with InodeStream(disks.image_of(hit.layer), [hit.inode.ino]) as stream:
            return stream.read_exact(hit.inode.size, guest_path)


def exists(state_image: Path, rootfs_image: Path, guest_path: str) -> bool:
    """Whether ``guest_path`` exists in the merged view (symlinks followed)."""
    disks = _Disks(state_image, rootfs_image)
    with disks.locked(write=False):
        view = disks.resolve(guest_path, follow_last=True)
    return not view.broken and view.target is not None


# -- the two disks ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class _Disks(Frozen):
    state: Path
    rootfs: Path

    def image_of(self, layer: Layer) -> Path:
        return self.state if layer is Layer.UPPER else self.rootfs

    @contextlib.contextmanager
    def locked(self, *, write: bool) -> Iterator[None]:
        """Hold a lock on the state image and check it: before a write (or when a journal is
        pending) a repairing ``e2fsck -fp``, before a read of a clean one ``e2fsck -fn``."""
        for image, what in ((self.state, "state disk"), (self.rootfs, "root filesystem")):
            if not image.is_file():
                raise NotFoundError(f"workspace {what} {image} does not exist")
        fd = os.open(self.state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            if write or needs_fsck(self.state):
                fcntl.flock(fd, fcntl.LOCK_EX)
                replay_journal(self.state, force=True)
            else:
                check_image(self.state, "workspace state disk")
            yield
        finally:
            os.close(fd)

    def resolve(self, guest_path: str, *, follow_last: bool) -> _View:
        """Find ``guest_path`` in the merged view, following symlinks like the guest would
        (and within the same bounds: path and name lengths, number of links)."""
        parts = guest_parts(guest_path)
        for _hop in range(MAX_SYMLINKS + 1):
            step = _walk(parts, self.probe(parts), follow_last=follow_last)
            if isinstance(step, _View):
                return step
            parts = _follow(parts, step.index, self.link_target(step.hit))
            _check_bounds(parts, f"{guest_path}: following symbolic links")
        raise InvalidInputError(f"{guest_path}: too many levels of symbolic links")

    def probe(self, parts: tuple[str, ...]) -> _Probe:
        """``stat`` every prefix of ``parts`` in the upper dir and in the rootfs."""
        up = self._stats(self.state, UPPER, parts)
        low = self._stats(self.rootfs, "/", parts)
        top = up[0][0]
        if top is None or top.kind is not Kind.DIR:
            raise IntegrityError(
                f"{self.state} has no {UPPER} directory; it is not a workspace state disk"
            )
        opaque = tuple(overlay_xattr(x, "opaque") == '"y"' for _, x in up)
        return _Probe(tuple(i for i, _ in up), opaque, tuple(i for i, _ in low))

    def _stats(
        self, image: Path, top: str, parts: tuple[str, ...]
    ) -> list[tuple[Inode | None, dict[str, str]]]:
        """``stat`` the directory ``top``, then each component of ``parts`` from inside its
        parent (``cd`` one name at a time), so no command names more than one component.

        When a ``cd`` fails (the name is missing or not a directory) the later ``stat``s run
        in the wrong directory; :func:`_walk` never looks at them, as it only goes on below
        a directory — exactly the entries ``cd`` could enter.
        """
        cmds = [f"stat {quote(top)}", f"cd {quote(top)}"]
        for name in parts:
            cmds += [f"stat {_here(name)}", f"cd {_here(name)}"]
        done = run_debugfs(image, cmds[:-1])
        problems = done.unexpected(MISSING)
        if problems:
            raise ToolError(f"debugfs could not read {image}: {problems[0]}")
        return [(parse_stat(out), parse_xattrs(out)) for out in done.outputs[::2]]

    def link_target(self, hit: _Hit) -> str:
        """The destination of a symlink inode (long ones are stored in a data block)."""
        return link_targets(self.image_of(hit.layer), [hit.inode])[hit.inode.ino]


# -- walking the merged view -------------------------------------------------------------------


def guest_parts(path: str) -> tuple[str, ...]:
    """Components of an absolute, clean guest path, or InvalidInputError."""
    parts = path.split("/")[1:] if path != "/" else []
    bad = not path.startswith("/") or any(p in ("", ".", "..") for p in parts)
    if bad or any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise InvalidInputError(
            f"guest path {path!r} must be absolute and clean",
            hint="e.g. /workspace/input.json (no '.', '..', '//', trailing '/' or control chars)",
        )
    _check_bounds(tuple(parts), f"guest path {path[:80]!r}")
    return tuple(parts)


def _check_bounds(parts: tuple[str, ...], what: str) -> None:
    """Linux's limits: a path under :data:`PATH_MAX` bytes, components of :data:`NAME_MAX`."""
    sizes = [len(p.encode("utf-8", "surrogateescape")) for p in parts]
    total = sum(sizes) + len(sizes)
    if total >= PATH_MAX or any(size > NAME_MAX for size in sizes):
        raise InvalidInputError(
            f"{what}: file name too long ({total} bytes, longest component {max(sizes)}; "
            f"the limits are {PATH_MAX - 1} and {NAME_MAX})",
            hint="the guest would get ENAMETOOLONG for this path too",
        )


def _walk(parts: tuple[str, ...], probe: _Probe, *, follow_last: bool) -> _View | _Symlink:
    """Merge the two layers component by component, as overlayfs' lookup does."""
    upper_ok = lower_ok = True
    parents: list[_Hit] = []
    for i in range(1, len(parts) + 1):
        last = i == len(parts)
        up = probe.upper[i] if upper_ok else None
        low = probe.lower[i] if lower_ok else None
        hit, upper_ok, lower_ok = _merge(up, low, opaque=probe.opaque[i])
        if hit is None:
            if last:
                return _View(parts, tuple(parents), None, up)
            why = f"{_guest_path(parts[:i])} does not exist"
            return _View(parts, tuple(parents), broken=why, parent_missing=True)
        if hit.inode.kind is Kind.SYMLINK and (follow_last or not last):
            return _Symlink(i, hit)
        if last:
            return _View(parts, tuple(parents), hit, up)
        if hit.inode.kind is not Kind.DIR:
            return _View(
                parts, tuple(parents), broken=f"{_guest_path(parts[:i])} is not a directory"
            )
        parents.append(hit)
    return _View(parts, (), _Hit(Layer.UPPER, probe.upper[0]) if probe.upper[0] else None)


def _merge(up: Inode | None, low: Inode | None, *, opaque: bool) -> tuple[_Hit | None, bool, bool]:
    """The merged entry for one name, and whether each layer continues below it."""
    if up is not None and up.whiteout:
        return None, False, False
    if up is not None:
        is_dir = up.kind is Kind.DIR
        below = is_dir and not opaque and low is not None and low.kind is Kind.DIR
        return _Hit(Layer.UPPER, up), is_dir, below
    if low is not None:
        return _Hit(Layer.LOWER, low), False, low.kind is Kind.DIR
    return None, False, False


def _follow(parts: tuple[str, ...], index: int, target: str) -> tuple[str, ...]:
    """The path after replacing component ``index`` (1-based), a symlink, by ``target``."""
    base = () if target.startswith("/") else parts[: index - 1]
    out: list[str] = []
    for comp in (*base, *target.split("/"), *parts[index:]):
        if comp == "..":
            if out:
                out.pop()
        elif comp not in ("", "."):
            out.append(comp)
    return tuple(out)


def _guest_path(parts: Sequence[str]) -> str:
    return "/" + "/".join(parts)


def _here(name: str) -> str:
    """One name in debugfs' current directory as an argument (``./``: never ``<inode>``)."""
    return quote("./" + name)


# -- copy in ---------------------------------------------------------------------------------


def _host_source(src: Path) -> int:
    try:
        st = src.stat()
    except FileNotFoundError as exc:
        raise NotFoundError(f"{src} does not exist") from exc
    except OSError as exc:
        raise InvalidInputError(f"cannot read {src}: {exc.strerror or exc}") from exc
    if not src.is_file():
        raise InvalidInputError(f"{src} is not a regular file; only files can be copied")
    return st.st_size


def _check_writable(view: _View, guest_path: str) -> None:
    if view.parent_missing:
        raise NotFoundError(
            f"cannot copy to {guest_path}: parent directory does not exist ({view.broken})",
            hint="copy into a directory that exists in the workspace (it is not created)",
        )
    if view.broken:
        raise InvalidInputError(f"cannot copy to {guest_path}: {view.broken}")
    if not view.parts:
        raise InvalidInputError("cannot copy to /: it is a directory")
    kind = view.target.inode.kind if view.target else None
    if kind is Kind.DIR:
        raise InvalidInputError(
            f"{guest_path} is a directory in the workspace",
            hint=f"give the full destination path, e.g. {guest_path.rstrip('/')}/NAME",
        )
    if kind not in (None, Kind.FILE):
        raise InvalidInputError(f"{guest_path} exists and is not a regular file")


def _write_upper(state: Path, view: _View, host_src: Path, size: int) -> None:
    """Stage the file under a temporary name, then swap it in (old file kept on failure).

    Every script first enters the parent's upper directory (:func:`_enter_parent`) and then
    names single entries, so no line grows with the depth of the path.
    """
    tmp = _here(f"{_TMP_PREFIX}{secrets.token_hex(6)}")
    final = _here(view.parts[-1])
    _check_host_space(state, size, sparse_image=state)
    with tempfile.TemporaryDirectory(prefix="microagent-cp-") as hostdir:
        (Path(hostdir) / "src").symlink_to(host_src.absolute())
        cmds = [*_enter_parent(view, copy_up=True), *_write_cmds(tmp, _new_meta(view))]
        done = run_debugfs(state, [*cmds, f"stat {tmp}"], write=True, cwd=Path(hostdir))
    written = parse_stat(done.outputs[-1])
    if done.errors or written is None or written.size != size:
        run_debugfs(state, [*_enter_parent(view, copy_up=False), f"rm {tmp}"], write=True)
        _raise_write_failed(state, view, done.errors, written)
    swap = _enter_parent(view, copy_up=False)
    swap += [f"rm {final}"] if view.upper_entry is not None else []
    swap += [f"ln {tmp} {final}", f"unlink {tmp}"]
    done = run_debugfs(state, swap, write=True)
    if done.errors:
        raise ToolError(f"could not put {_guest_path(view.parts)} in place: {done.errors[0]}")


def _check_host_space(where: Path, size: int, *, sparse_image: Path | None = None) -> None:
    """Refuse up front when the host file system cannot take ``size`` more bytes (plus room
    for metadata): a copy that runs out half-way would leave a half-written file, or a state
    disk whose free counts no longer add up. A sparse image grows at most to its full size."""
    need = size + size // 32 + (1 << 20)
    if sparse_image is not None:
        st = sparse_image.stat()
        need = min(need, max(st.st_size - st.st_blocks * 512, 0))
    free = free_bytes(where)
    if free is not None and free < need:
        raise no_space(where, need)


def _raise_write_failed(
    state: Path, view: _View, errors: Sequence[str], written: Inode | None
) -> NoReturn:
    detail = errors[0] if errors else f"wrote {written.size if written else 0} bytes"
    if any("Could not allocate" in e or "No space" in e for e in errors):
        raise ToolError(
            f"the state disk {state} is full: cannot write {_guest_path(view.parts)} ({detail})",
            hint="free space in the workspace, or recreate it with a bigger sizeMiB",
        )
    raise ToolError(f"could not write {_guest_path(view.parts)} into {state}: {detail}")


def _enter_parent(view: _View, *, copy_up: bool) -> list[str]:
    """Commands that make the parent's directory in the upper debugfs' current one: by inode
    where the upper has it, by name below that; with ``copy_up`` the directories only the
    lower has are created first, like overlay's copy-up (owner, mode and mtime kept)."""
    cmds = [f"cd {quote(UPPER)}"]
    for name, hit in zip(view.parts, view.parents, strict=False):
        if hit.layer is Layer.UPPER:
            cmds.append(f"cd <{hit.inode.ino}>")
            continue
        q = _here(name)
        if copy_up:
            cmds += [f"mkdir {q}", *_sif(q, hit.inode.meta()), f"sif {q} mtime @{hit.inode.mtime}"]
        cmds.append(f"cd {q}")
    return cmds


def _new_meta(view: _View) -> PathMeta:
    """Owner and mode of the file replaced, if any, else root-owned 0644."""
    if view.target is not None:
        old = view.target.inode
        return PathMeta(Kind.FILE, old.mode, old.uid, old.gid, 0)
    return PathMeta(Kind.FILE, NEW_FILE_MODE, 0, 0, 0)


def _write_cmds(q: str, meta: PathMeta) -> list[str]:
    return [f'write "src" {q}', *_sif(q, meta)]


def _sif(q: str, meta: PathMeta) -> list[str]:
    return [f"sif {q} uid {meta.uid}", f"sif {q} gid {meta.gid}", f"sif {q} mode 0{meta.st_mode:o}"]


# -- copy out --------------------------------------------------------------------------------


def _regular_file(view: _View, guest_path: str) -> _Hit:
    if view.broken or view.target is None:
        raise NotFoundError(f"{guest_path}: no such file in the workspace")
    kind = view.target.inode.kind
    if kind is Kind.DIR:
        raise InvalidInputError(f"{guest_path} is a directory; only regular files can be copied")
    if kind is not Kind.FILE:
        raise InvalidInputError(f"{guest_path} is not a regular file")
    return view.target


def _host_destination(host_dst: Path, guest_path: str) -> Path:
    dst = host_dst / guest_path.rsplit("/", 1)[1] if host_dst.is_dir() else host_dst
    if not dst.parent.is_dir():
        raise NotFoundError(f"host directory {dst.parent} does not exist")
    if dst.is_dir():
        raise InvalidInputError(f"{dst} is a directory")
    return dst


def _finish_host_file(tmp: Path, dst: Path, inode: Inode, guest_path: str) -> None:
    st = tmp.stat() if tmp.exists() else None
    if st is None or st.st_size != inode.size:
        got = st.st_size if st else 0
        raise IntegrityError(f"{guest_path}: copied {got} bytes, the file has {inode.size}")
    # debugfs created the file 0666 minus the umask; keep the guest's mode within that.
    created = st.st_mode & 0o666
    allowed = created | (created & 0o444) >> 2
    tmp.chmod(inode.mode & 0o777 & allowed)
    tmp.replace(dst)
