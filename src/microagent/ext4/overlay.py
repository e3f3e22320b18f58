"""Copy files between the host and a stopped workspace's disks, without booting it.

The guest sees an overlay: shared, read-only root images as lowers (one flattened ROOTFS
image, or a stack of layer disks, top first: ``ext4.layerdisk``) and the directory
``/upper`` of its own STATE image as upper (``/work`` is overlayfs' workdir). This module
reads and writes that merged view offline with debugfs, by overlay's rules, in every layer
from the upper down: a whiteout (character device 0/0) hides the path in the layers below
it, an opaque directory hides everything below it in the layers below, a non-directory
hides the layers below entirely, a directory continues below only into directories, and an
entry is read from the topmost layer holding it. Writes land in the upper only, after
copying missing parent directories up from whichever lower holds them (owner, mode and mtime
kept). Symlinks along the way are followed inside the merged view.

The caller guarantees no VM is using the disks; a per-image ``flock`` keeps two copies
from racing each other. The root images are only ever opened read-only, and read with the
same bounds as the state disk (they come from the store, not the guest, but their names and
links are still not trusted).

The state disk is the guest's: a root process in it can write any bytes, leave the file
system marked clean, and plant symlinks meant to steer this code. So the state disk is
checked by ``e2fsck`` before every copy (a repairing one before writes, a read-only one
before reads); symlinks are followed with the kernel's bounds (:data:`PATH_MAX` bytes per
path, :data:`NAME_MAX` per component, :data:`MAX_SYMLINKS` links, targets within a block);
and debugfs is driven one directory at a time (``cd``, then one name per command, or
``<inode>``), so no command line grows with the path. A layer is only read when the walk
reaches it (one debugfs run per layer and lookup).
"""

from __future__ import annotations

import contextlib
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

__all__ = [
    "Found",
    "Lowers",
    "copy_in",
    "copy_out",
    "exists",
    "guest_parts",
    "lookup",
    "make_dirs",
    "read_bytes",
]

MAX_SYMLINKS = 40  # links followed in one lookup, as Linux (ELOOP beyond)
PATH_MAX = 4096  # a path has fewer bytes than this, as on Linux (ENAMETOOLONG)
NAME_MAX = 255  # bytes per component
MAX_LOWERS = 500  # overlayfs' own limit on stacked layers (OVL_MAX_STACK)
READ_LIMIT = 16 << 20
NEW_FILE_MODE = 0o644
_TMP_PREFIX = ".microagent-cp-"


Lowers = Path | Sequence[Path]  # one root image, or a stack of them (top first)
UPPER_LAYER = 0  # layer numbers: the upper, then the lowers from the top (1, 2, ...)


@dataclass(frozen=True, eq=False, repr=False)
class _Hit(Frozen):
    """An entry of the merged view: its layer's number and its inode there."""

    layer: int
    inode: Inode


@dataclass(frozen=True, eq=False, repr=False)
class Found(Frozen):
    """An entry of the merged view (:func:`lookup`): the image and inode it is read from."""

    layer: int  # 0: the state disk's upper; 1...: the lowers, from the top
    image: Path
    inode: Inode


@dataclass(frozen=True, eq=False, repr=False)
class _Level(Frozen):
    """``stat`` of every prefix of a path in one layer (index 0: the layer's root)."""

    inodes: tuple[Inode | None, ...]
    opaque: tuple[bool, ...]


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


def copy_in(state_image: Path, rootfs_image: Lowers, host_src: Path, guest_path: str) -> int:
    """Write the host file ``host_src`` to ``guest_path`` in the merged view; return its size.

    The parent must exist in the merged view; an existing file is replaced keeping its
    owner and mode (new files: root, 0644); a whiteout at the name is removed.
    """
    size = _host_source(host_src)
    disks = _Disks.of(state_image, rootfs_image)
    with disks.locked(write=True):
        view = disks.resolve(guest_path, follow_last=True)
        _check_writable(view, guest_path)
        _write_upper(disks.state, view, host_src, size)
    return size


def make_dirs(state_image: Path, rootfs_image: Lowers, guest_path: str) -> None:
    """Make the directory ``guest_path`` exist in the merged view, like ``mkdir -p`` in the
    guest: each missing one is created in the upper (root, 0755) after copying up the parents
    only the lower has; one made where a whiteout hid the lower's is opaque, as overlayfs
    makes it."""
    parts = guest_parts(guest_path)
    disks = _Disks.of(state_image, rootfs_image)
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


def copy_out(state_image: Path, rootfs_image: Lowers, guest_path: str, host_dst: Path) -> int:
    """Copy the guest file ``guest_path`` to ``host_dst`` (a file, or a directory to put it
    in under the same name); return its size. The file appears atomically."""
    disks = _Disks.of(state_image, rootfs_image)
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
    state_image: Path, rootfs_image: Lowers, guest_path: str, *, limit: int = READ_LIMIT
) -> bytes:
    """The content of the guest file ``guest_path`` (at most ``limit`` bytes, else an error)."""
    disks = _Disks.of(state_image, rootfs_image)
    with disks.locked(write=False):
        hit = _regular_file(disks.resolve(guest_path, follow_last=True), guest_path)
        if hit.inode.size > limit:
            raise InvalidInputError(
                f"{guest_path} is {hit.inode.size} bytes, more than the {limit} allowed here"
            )
        with InodeStream(disks.image_of(hit.layer), [hit.inode.ino]) as stream:
            return stream.read_exact(hit.inode.size, guest_path)


def exists(state_image: Path, rootfs_image: Lowers, guest_path: str) -> bool:
    """Whether ``guest_path`` exists in the merged view (symlinks followed)."""
    disks = _Disks.of(state_image, rootfs_image)
    with disks.locked(write=False):
        view = disks.resolve(guest_path, follow_last=True)
    return not view.broken and view.target is not None


def lookup(
    state_image: Path, rootfs_image: Lowers, guest_path: str, *, follow_last: bool = False
) -> Found | None:
    """The entry at ``guest_path`` in the merged view (symlinks in its parents followed, the
    last one too with ``follow_last``), or None when there is none: where it is read from."""
    disks = _Disks.of(state_image, rootfs_image)
    with disks.locked(write=False):
        view = disks.resolve(guest_path, follow_last=follow_last)
    if view.broken or view.target is None:
        return None
    return Found(view.target.layer, disks.image_of(view.target.layer), view.target.inode)


# -- the disks -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class _Disks(Frozen):
    state: Path
    lowers: tuple[Path, ...]  # top first

    @classmethod
    def of(cls, state: Path, rootfs: Lowers) -> _Disks:
        """The state disk over one root image or a stack of them (top first)."""
        lowers = (rootfs,) if isinstance(rootfs, (str, os.PathLike)) else tuple(rootfs)
        if not lowers:
            raise InvalidInputError("no root filesystem image to read the workspace from")
        if len(lowers) > MAX_LOWERS:
            raise InvalidInputError(
                f"{len(lowers)} root images stacked; overlayfs takes at most {MAX_LOWERS}"
            )
        return cls(state, tuple(Path(p) for p in lowers))

    @property
    def layers(self) -> int:
        """The upper and the lowers."""
        return 1 + len(self.lowers)

    def image_of(self, layer: int) -> Path:
        return self.state if layer == UPPER_LAYER else self.lowers[layer - 1]

    @contextlib.contextmanager
    def locked(self, *, write: bool) -> Iterator[None]:
        """Hold a lock on the state image and check it: before a write (or when a journal is
        pending) a repairing ``e2fsck -fp``, before a read of a clean one ``e2fsck -fn``."""
        roots = [(image, "root filesystem") for image in self.lowers]
        for image, what in ((self.state, "state disk"), *roots):
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
            step = _walk(parts, _Probe(self, parts), follow_last=follow_last)
            if isinstance(step, _View):
                return step
            parts = _follow(parts, step.index, self.link_target(step.hit))
            _check_bounds(parts, f"{guest_path}: following symbolic links")
        raise InvalidInputError(f"{guest_path}: too many levels of symbolic links")

    def level(self, layer: int, parts: tuple[str, ...]) -> _Level:
        """``stat`` every prefix of ``parts`` in one layer: the upper dir or a lower image."""
        top = UPPER if layer == UPPER_LAYER else "/"
        found = self._stats(self.image_of(layer), top, parts)
        root = found[0][0]
        if layer == UPPER_LAYER and (root is None or root.kind is not Kind.DIR):
            raise IntegrityError(
                f"{self.state} has no {UPPER} directory; it is not a workspace state disk"
            )
        opaque = tuple(overlay_xattr(x, "opaque") == '"y"' for _, x in found)
        return _Level(tuple(i for i, _ in found), opaque)

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


class _Probe:
    """The layers' ``stat`` of every prefix of one path, each layer read when first needed."""

    def __init__(self, disks: _Disks, parts: tuple[str, ...]) -> None:
        self._disks = disks
        self._parts = parts
        self._levels: dict[int, _Level] = {}
        self.layers = disks.layers

    def level(self, layer: int) -> _Level:
        if layer not in self._levels:
            self._levels[layer] = self._disks.level(layer, self._parts)
        return self._levels[layer]


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
    """Merge the layers component by component, as overlayfs' lookup does."""
    active = tuple(range(probe.layers))  # the layers the path goes on in (all at the root)
    parents: list[_Hit] = []
    for i in range(1, len(parts) + 1):
        last = i == len(parts)
        up = probe.level(UPPER_LAYER).inodes[i] if UPPER_LAYER in active else None
        hit, active = _merge(probe, active, i)
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
    root = probe.level(UPPER_LAYER).inodes[0]
    return _View(parts, (), _Hit(UPPER_LAYER, root) if root else None)


def _merge(probe: _Probe, active: Sequence[int], i: int) -> tuple[_Hit | None, tuple[int, ...]]:
    """The merged entry for component ``i`` (read from the topmost layer holding it) and the
    layers its directory continues in: from the top, a whiteout hides the layers below, a
    non-directory hides them too (below a directory it ends the stack there), and a
    directory goes on into the directories below it unless it is opaque."""
    hit: _Hit | None = None
    below: list[int] = []
    for layer in active:
        level = probe.level(layer)
        entry = level.inodes[i]
        if entry is None:
            continue
        if entry.whiteout:
            break
        if hit is None:
            hit = _Hit(layer, entry)
        if entry.kind is not Kind.DIR:  # below a directory: not merged, and the end of it
            break
        below.append(layer)
        if level.opaque[i]:
            break
    return hit, tuple(below)


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
        if hit.layer == UPPER_LAYER:
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
