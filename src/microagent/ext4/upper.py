"""Read an overlay upper dir straight out of an unmounted ext4 image, and export it as a layer.

No mount, no FUSE: ``debugfs`` does the reading. The tree is listed level by level with
batched ``ls -p`` scripts (one debugfs run per directory depth), every inode is ``stat``ed
once in one more batch (type, mode with setuid/setgid/sticky, owner, mtime, device numbers,
xattrs such as the opaque marker), and file contents stream through a pipe from one last
debugfs run straight into the tar — nothing is unpacked on the host. Whiteouts (character
devices 0/0) become ``.wh.<name>`` entries, opaque directories a ``.wh..wh..opq`` entry, and
the tar is written by the same normaliser as ``layers.tarwrite``.

The image is the guest's (a setup step's upper): it is checked by ``e2fsck`` first (see
``debugfs.check_guest_image``), directories are listed by inode, and symlink targets are
bounded to one block.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
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
from microagent.ext4.debugfs import (
    DirEntry,
    Inode,
    InodeStream,
    check_guest_image,
    link_targets,
    overlay_xattr,
    parse_ls,
    parse_stat,
    parse_xattrs,
    quote,
    run_debugfs,
)
from microagent.layers.stagemeta import Kind
from microagent.layers.tarwrite import ExportedLayer, UpperEntry, export_entries


def export_upper_image(
    state_image: Path, out_tar: Path, *, upper: str = "/upper", mtime: int | None = None
) -> ExportedLayer:
    """Write the overlay upper dir ``upper`` of an ext4 image as an OCI layer tar.

    Owners, modes (setuid/setgid/sticky too), mtimes, symlinks, hard links and device
    nodes are kept; whiteouts and opaque dirs become ``.wh.`` entries. The same image
    contents give the same bytes; ``mtime`` (e.g. ``$SOURCE_DATE_EPOCH``) replaces every
    entry's time. A pending journal is replayed first (so the image is modified then); an
    image with file system errors is refused.
    """
    root = _clean_abs(upper)
    if not state_image.is_file():
        raise NotFoundError(f"disk image {state_image} does not exist")
    check_guest_image(state_image, "setup step disk")
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
        targets = self._link_targets(listing, inodes)
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

    def _link_targets(
        self, listing: Listing, inodes: dict[int, tuple[Inode, dict[str, str]]]
    ) -> dict[int, str]:
        """Targets of every symlink (at most one block each)."""
        links = {
            e.ino: inodes[e.ino][0] for kids in listing.values() for e in kids.values()
            if e.kind is Kind.SYMLINK
        }  # fmt: skip
        return link_targets(self.image, [links[ino] for ino in sorted(links)])

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
