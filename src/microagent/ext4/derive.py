"""A setup step's root filesystem from its parent's image plus the step's own layer.

Flattening every layer again and running ``mke2fs`` over the whole tree makes a step cost the
size of the image; this costs the size of the step's change instead. The parent's image (a
rootfs this store built) is copied sparsely (``copy_file_range`` over its data extents: a
reflink where the host file system has them), grown with ``resize2fs`` when the change needs
more room, and the layer is applied to the copy with one ``debugfs -w`` script, by the same
rules as ``layers.apply``: an entry replaces what was there (a directory stays and takes the
new owner and mode), ``.wh.<name>`` deletes a lower entry, ``.wh..wh..opq`` empties its
directory of lower entries, hard links share an inode, and every entry gets the owner, mode
and times (mtime, atime, ctime, crtime) the flattened image would give it. The result holds
the same tree as the flattened image (tests compare both); only block placement differs.

The layer's content is unpacked first by the hardened extractor (``layers.apply``) into a
small stage, so every check a flatten makes is made here too. Layers of the shape the setup
exporter writes (unique names, every parent an earlier directory entry, an opaque marker
right after its directory, hard links to earlier entries of the same layer, no entry below
a whiteout) are derived; anything else raises :class:`NotDerivable` and the caller
flattens, which gives the canonical result (or the canonical refusal).
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from microagent.errors import BuildError, IntegrityError, MicroagentError
from microagent.ext4.debugfs import (
    MAX_COMMAND,
    DirEntry,
    Inode,
    parse_ls,
    parse_stat,
    quote,
    run_debugfs,
)
from microagent.ext4.mkfs import BLOCK, FIXED_TIME
from microagent.fsutil import no_space, says_no_space
from microagent.layers.apply import OPAQUE, WHITEOUT, LayerSource, Limits, apply_layer
from microagent.layers.stagemeta import Kind, PathMeta, StageMetadata
from microagent.runner import run

__all__ = ["MAX_CHANGE_FRACTION", "Derived", "NotDerivable", "apply_change", "plan_change"]

# A change larger than the parent's used blocks is flattened instead. Both ways cost time in
# proportion to what they write: the flatten to the whole image plus the change, this to the
# change (about 1.5x a flatten's cost per byte: Python unpacks it, debugfs sets each inode's
# owner, mode and times one command at a time). Measured here (docs/performance.md) deriving
# still won at a change of 55% of the image (130 MB onto 235 MB: 20 s vs 36 s); past the
# image's own size the two come close, and a fresh mke2fs packs the tree tight again.
MAX_CHANGE_FRACTION = 1.0
HEADROOM_BLOCKS = (64 << 20) // BLOCK  # added when the image must grow
RESERVE_BLOCKS = (16 << 20) // BLOCK  # kept free beyond the estimate
MAX_DEPTH = 256
ENV = {"E2FSPROGS_FAKE_TIME": str(FIXED_TIME), "SOURCE_DATE_EPOCH": str(FIXED_TIME)}


class NotDerivable(Exception):
    """Why this step's rootfs is flattened instead of derived (the message says)."""


# -- the layer's members, in order -----------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One tar member: an entry, a whiteout (``.wh.NAME``) or an opaque marker."""

    path: str  # absolute, normalised; for a whiteout the path it deletes
    op: str  # "entry", "link", "whiteout", "opaque"
    kind: Kind | None = None
    target: str = ""  # symlink target, or a hard link's target path
    size: int = 0


def read_members(layer_tar: Path) -> list[Member]:
    """The members of an uncompressed layer tar, in order (headers only)."""
    out: list[Member] = []
    with tarfile.open(layer_tar, "r:", errors="surrogateescape") as tf:
        for info in tf:
            out.append(_member(info))
    return out


def _parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.split("/") if p not in ("", "."))


def _abs(parts: Sequence[str]) -> str:
    return "/" + "/".join(parts)


def _member(info: tarfile.TarInfo) -> Member:
    parts = _parts(info.name)
    if parts and parts[-1] == OPAQUE:
        return Member(_abs(parts[:-1]), "opaque")
    if parts and parts[-1].startswith(WHITEOUT):
        name = parts[-1][len(WHITEOUT) :]
        if name.startswith(WHITEOUT) or name in ("", ".", ".."):
            raise NotDerivable(f"{info.name}: a whiteout flatten treats specially")
        return Member(_abs((*parts[:-1], name)), "whiteout")
    if info.islnk():
        return Member(_abs(parts), "link", Kind.FILE, _abs(_parts(info.linkname)))
    kind = _KINDS.get(info.type)
    if kind is None:
        raise NotDerivable(f"{info.name}: tar type {info.type!r}")
    return Member(_abs(parts), "entry", kind, info.linkname, info.size)


_KINDS = {
    tarfile.REGTYPE: Kind.FILE,
    tarfile.AREGTYPE: Kind.FILE,
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.FIFOTYPE: Kind.FIFO,
    tarfile.CHRTYPE: Kind.CHAR,
    tarfile.BLKTYPE: Kind.BLOCK,
}


def check_shape(members: Sequence[Member]) -> None:
    """Refuse (NotDerivable) a layer whose result could depend on member order."""
    dirs: set[str] = {"/"}
    names: set[str] = set()
    deleted: list[str] = []
    last_dir = ""
    for m in members:
        parent = m.path.rsplit("/", 1)[0] or "/"
        if m.op == "opaque":
            if m.path != last_dir:
                raise NotDerivable(f"{m.path}: opaque marker not right after its directory")
            continue
        last_dir = m.path if m.kind is Kind.DIR else ""
        if m.path == "/" or parent not in dirs:
            raise NotDerivable(f"{m.path}: its parent is not an earlier directory entry")
        if m.path in names:
            raise NotDerivable(f"{m.path}: named twice")
        names.add(m.path)
        if m.op == "whiteout":
            deleted.append(m.path)
        elif m.op == "link" and (m.target not in names or m.target in dirs):
            raise NotDerivable(f"{m.path}: hard link to {m.target}, not an earlier file")
        elif m.kind is Kind.DIR:
            dirs.add(m.path)
    for gone in deleted:
        if any(n.startswith(gone + "/") for n in names):
            raise NotDerivable(f"{gone}: deleted and written in one layer")


# -- what the parent image holds -------------------------------------------------------------


@dataclass(frozen=True)
class ImageStats:
    block_count: int
    free_blocks: int
    free_inodes: int
    blocks_per_group: int
    inodes_per_group: int

    @property
    def used_bytes(self) -> int:
        return (self.block_count - self.free_blocks) * BLOCK


def image_stats(image: Path) -> ImageStats:
    done = run_debugfs(image, ["stats -h"])
    text = done.outputs[0] if done.outputs else ""

    def field_(name: str) -> int:
        m = re.search(rf"^{name}:\s*(\d+)", text, re.M)
        if m is None:
            raise NotDerivable(f"{image}: debugfs stats has no {name!r}")
        return int(m[1])

    return ImageStats(
        field_("Block count"),
        field_("Free blocks"),
        field_("Free inodes"),
        field_("Blocks per group"),
        field_("Inodes per group"),
    )


def _command(line: str) -> str:
    if len(line.encode("utf-8", "surrogateescape")) >= MAX_COMMAND:
        raise NotDerivable("a path too long for one debugfs command")
    return line


def probe(image: Path, paths: Sequence[str]) -> dict[str, Inode]:
    """What the image holds at each path (no entry: missing), by ``stat``."""
    cmds = [_command(f"stat {quote(p, raw_bytes=True)}") for p in paths]
    done = run_debugfs(image, cmds)
    out: dict[str, Inode] = {}
    for path, text in zip(paths, done.outputs, strict=True):
        inode = parse_stat(text)
        if inode is not None:
            out[path] = inode
    return out


def list_trees(image: Path, roots: dict[str, int]) -> dict[str, list[tuple[str, Kind | None]]]:
    """Everything below each directory root (path -> inode) as (path, kind), parents first,
    listed level by level with batched ``ls -p``."""
    out: dict[str, list[tuple[str, Kind | None]]] = {root: [] for root in roots}
    level = [(root, root, ino) for root, ino in roots.items()]
    for _depth in range(MAX_DEPTH):
        if not level:
            return out
        done = run_debugfs(image, [f"ls -p <{ino}>" for _, _, ino in level])
        if done.errors:
            raise NotDerivable(f"debugfs could not list {image}: {done.errors[0]}")
        nxt = []
        for (root, path, _), text in zip(level, done.outputs, strict=True):
            for name, ent in sorted(_listing(text, path).items()):
                child = path.rstrip("/") + "/" + name
                out[root].append((child, ent.kind))
                if ent.kind is Kind.DIR:
                    nxt.append((root, child, ent.ino))
        level = nxt
    raise NotDerivable(f"{image}: a tree deeper than {MAX_DEPTH} to delete")


def _listing(text: str, path: str) -> dict[str, DirEntry]:
    try:
        return parse_ls(text, path)
    except IntegrityError as exc:  # a name debugfs cannot print plainly: mke2fs -d can
        raise NotDerivable(exc.message) from exc


# -- planning the debugfs script ---------------------------------------------------------------


_NEW_MODES = {Kind.DIR: 0o755, Kind.SYMLINK: 0o777}  # what debugfs' mkdir and symlink give


@dataclass
class _Planner:
    """Follows what the image holds while the layer is applied, and writes the commands."""

    lower: dict[str, Inode]  # the parent image at every path the layer names
    meta: StageMetadata  # the layer's entries, as the extractor recorded them
    state: dict[str, Kind | None] = field(default_factory=dict)  # changed paths: kind now
    fresh: set[str] = field(default_factory=set)  # dirs holding nothing of the parent's
    removals: dict[str, int] = field(default_factory=dict)  # lower dirs to empty: inode
    ops: list[tuple[str, str]] = field(default_factory=list)  # ("cmd", line) / ("tree", dir)
    links: dict[str, int] = field(default_factory=dict)  # hard link target -> extra names
    new_blocks: int = 0
    new_inodes: int = 0

    def lower_kind(self, path: str) -> Kind | None:
        parts = _parts(path)
        for i in range(1, len(parts)):
            above = self.lower.get(_abs(parts[:i]))
            if above is None or above.kind is not Kind.DIR:
                return None
        found = self.lower.get(path)
        return found.kind if found is not None else None

    def current(self, path: str) -> Kind | None:
        if path in self.state:
            return self.state[path]
        parts = _parts(path)
        for i in range(len(parts) - 1, 0, -1):
            above = _abs(parts[:i])
            if above in self.fresh:
                return None
            if above in self.state:
                if self.state[above] is not Kind.DIR:
                    return None
                break
        return self.lower_kind(path)

    def cmd(self, line: str) -> None:
        self.ops.append(("cmd", _command(line)))

    def remove(self, path: str, kind: Kind | None) -> None:
        """Delete what is at ``path`` now (always something of the parent's)."""
        q = quote(path, raw_bytes=True)
        if kind is Kind.DIR:
            self.removals[path] = self.lower[path].ino
            self.ops.append(("tree", path))
            self.cmd(f"rmdir {q}")
        else:
            self.cmd(f"rm {q}")
        self.state[path] = None

    def apply(self, m: Member) -> None:
        if m.op == "whiteout":
            kind = self.current(m.path)
            if kind is not None:
                self.remove(m.path, kind)
            return
        if m.op == "opaque":
            if m.path not in self.fresh and self.lower_kind(m.path) is Kind.DIR:
                self.removals[m.path] = self.lower[m.path].ino
                self.ops.append(("tree", m.path))
            self.fresh.add(m.path)
            return
        self.entry(m)

    def entry(self, m: Member) -> None:
        q = quote(m.path, raw_bytes=True)
        now = self.current(m.path)
        created = not (m.kind is Kind.DIR and now is Kind.DIR)
        if created:
            if now is not None:
                self.remove(m.path, now)
            self.create(m, q)
        else:
            self.state[m.path] = Kind.DIR
        meta = self.meta.get(m.path)
        if meta is None:
            raise NotDerivable(f"{m.path}: the extractor recorded nothing for it")
        if m.op != "link":
            self.set_meta(q, meta, created=created)

    def create(self, m: Member, q: str) -> None:
        assert m.kind is not None
        self.state[m.path] = m.kind
        if m.op == "link":
            self.cmd(f"ln {quote(m.target, raw_bytes=True)} {q}")
            self.links[m.target] = self.links.get(m.target, 0) + 1
            return
        self.new_inodes += 1
        self.new_blocks += 1 if m.kind is not Kind.FILE else max(1, -(-m.size // BLOCK))
        if m.kind is Kind.DIR:
            self.fresh.add(m.path)
            self.cmd(f"mkdir {q}")
        elif m.kind is Kind.FILE:
            self.cmd(f"write {quote(m.path.lstrip('/'), raw_bytes=True)} {q}")
        elif m.kind is Kind.SYMLINK:
            self.cmd(f"symlink {q} {quote(m.target, raw_bytes=True)}")
        else:
            self.mknod(m)

    def mknod(self, m: Member) -> None:
        meta = self.meta.get(m.path)
        assert meta is not None
        parent, _, name = m.path.rpartition("/")
        how = {Kind.FIFO: "p", Kind.CHAR: "c", Kind.BLOCK: "b"}[meta.kind]
        dev = f" {meta.major} {meta.minor}" if meta.kind.is_device else ""
        self.cmd(f"cd {quote(parent or '/', raw_bytes=True)}")
        self.cmd(f"mknod {quote(name, raw_bytes=True)} {how}{dev}")
        self.cmd("cd /")

    def set_meta(self, q: str, meta: PathMeta, *, created: bool) -> None:
        """Owner, mode and times; an inode debugfs just made is root-owned already, and has
        mode 0755 (a directory) or 0777 (a symlink), so those commands are left out."""
        if not created or meta.uid:
            self.cmd(f"sif {q} uid {meta.uid}")
        if not created or meta.gid:
            self.cmd(f"sif {q} gid {meta.gid}")
        if not created or meta.mode != _NEW_MODES.get(meta.kind):
            self.cmd(f"sif {q} mode 0{meta.st_mode:o}")
        for name in ("mtime", "atime", "ctime", "crtime"):
            self.cmd(f"sif {q} {name} @{meta.mtime}")

    def link_counts(self) -> None:
        for target, extra in sorted(self.links.items()):
            self.cmd(f"sif {quote(target, raw_bytes=True)} links_count {1 + extra}")

    def script(self, trees: dict[str, list[tuple[str, Kind | None]]]) -> list[str]:
        """The commands, with each emptied tree's deletions in place (children first)."""
        lines: list[str] = []
        for what, text in self.ops:
            if what == "cmd":
                lines.append(text)
                continue
            for path, kind in reversed(trees[text]):
                verb = "rmdir" if kind is Kind.DIR else "rm"
                lines.append(_command(f"{verb} {quote(path, raw_bytes=True)}"))
        return lines


@dataclass(frozen=True)
class Change:
    """What applying a layer to a parent image takes: the script and the room it needs."""

    script: tuple[str, ...]
    new_blocks: int
    new_inodes: int


def plan_change(parent: Path, members: Sequence[Member], meta: StageMetadata) -> Change:
    """The debugfs script that turns ``parent`` (read only here) into parent + layer."""
    check_shape(members)
    named = sorted({m.path for m in members if m.op != "opaque"} | {"/"})
    planner = _Planner(probe(parent, named), meta)
    for m in members:
        planner.apply(m)
    planner.link_counts()
    trees = list_trees(parent, planner.removals) if planner.removals else {}
    return Change(tuple(planner.script(trees)), planner.new_blocks, planner.new_inodes)


# -- copying, growing, writing -----------------------------------------------------------------


def copy_image(src: Path, dst: Path) -> None:
    """Copy ``src`` to the new file ``dst`` extent by extent: holes stay holes, and the
    kernel copies (or shares, on a file system with reflinks) the data."""
    with src.open("rb") as fin, dst.open("xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        for start, end in _data_extents(fin.fileno(), size):
            offset = start
            while offset < end:
                done = os.copy_file_range(fin.fileno(), fout.fileno(), end - offset, offset, offset)
                if done == 0:
                    raise BuildError(f"{src} shrank while it was copied")
                offset += done
        fout.truncate(size)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def grow_for(image: Path, stats: ImageStats, change: Change) -> bool:
    """Grow ``image`` (``resize2fs``) when the change may not fit; True if it grew."""
    short_blocks = change.new_blocks + RESERVE_BLOCKS - stats.free_blocks
    short_inodes = change.new_inodes + 64 - stats.free_inodes
    if short_blocks <= 0 and short_inodes <= 0:
        return False
    groups = -(-max(short_inodes, 0) // stats.inodes_per_group)
    extra = max(short_blocks + HEADROOM_BLOCKS, groups * stats.blocks_per_group)
    blocks = -(-(stats.block_count + extra) // 4096) * 4096  # 16 MiB steps
    os.truncate(image, blocks * BLOCK)  # a hole: resize2fs writes what it needs
    try:
        run(["resize2fs", "-f", str(image), str(blocks)], env=ENV, timeout=600)
    except MicroagentError as exc:
        if says_no_space(exc.message):
            raise no_space(image.parent, (blocks - stats.block_count) * BLOCK) from exc
        raise
    return True


@dataclass(frozen=True)
class Derived:
    """What deriving did: the commands run and whether the image grew."""

    commands: int
    grew: bool


def unpack_layer(layer_tar: Path, stage: Path, name: str) -> StageMetadata:
    """The layer's entries into an empty stage by the hardened extractor: the content to
    write, the metadata it records, and every refusal a flatten would make."""
    stage.mkdir(parents=True, exist_ok=True)
    meta = StageMetadata()
    source = LayerSource.from_path(layer_tar, name)
    with source.open() as fh:
        apply_layer(stage, fh, layer_name=name, meta=meta, limits=Limits())
    return meta


def apply_change(image: Path, change: Change, stage: Path) -> Derived:
    """Apply ``change`` to ``image`` (a private copy of the parent), growing it first when
    the change may not fit; BuildError if debugfs failed."""
    grew = grow_for(image, image_stats(image), change)
    done = run_debugfs(image, list(change.script), write=True, cwd=stage, env=ENV, split=False)
    if any(says_no_space(e) or "Could not allocate" in e for e in done.errors):
        raise no_space(image.parent)
    if done.errors:
        raise BuildError(
            "applying the step's layer to the parent image failed:\n" + "\n".join(done.errors[:5])
        )
    return Derived(len(change.script), grew)
