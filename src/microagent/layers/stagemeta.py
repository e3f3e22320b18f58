"""Per-path ownership and mode records of a flattened stage.

The stage directory on the host cannot always carry the truth: an unprivileged user cannot
chown, and device nodes are never created on the host. So every path's intended type, mode
(including setuid/setgid/sticky), owner and mtime is recorded here, and
``ext4.debugfs.fix_ownership_script`` turns the record into ``debugfs`` commands that make an
ext4 image built with ``mke2fs -d STAGE`` match it.
"""

from __future__ import annotations

import enum
import json
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from microagent.frozen import Frozen


class Kind(enum.Enum):
    """File types a layer may contain, with their ``st_mode`` type bits."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    FIFO = "fifo"
    CHAR = "char"
    BLOCK = "block"

    @property
    def type_bits(self) -> int:
        return _TYPE_BITS[self]

    @property
    def is_device(self) -> bool:
        return self in (Kind.CHAR, Kind.BLOCK)


_TYPE_BITS = {
    Kind.FILE: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.CHAR: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
}


@dataclass(frozen=True, eq=False, repr=False)
class PathMeta(Frozen):
    """What one path in the image should be: type, permission bits, owner, mtime."""

    kind: Kind
    mode: int  # permission and special bits only (0o7777)
    uid: int
    gid: int
    mtime: int
    major: int = 0
    minor: int = 0

    @property
    def st_mode(self) -> int:
        """Type bits plus permission bits, as ``stat`` and debugfs' ``sif mode`` see them."""
        return self.kind.type_bits | self.mode

    def to_json(self, path: str) -> dict[str, object]:
        out = asdict(self)
        out["kind"] = self.kind.value
        return {"path": path, **out}


ROOT_META = PathMeta(Kind.DIR, 0o755, 0, 0, 0)


class StageMetadata:
    """Intended metadata of every path in a stage, keyed by absolute path (``/usr/bin``)."""

    def __init__(self) -> None:
        self._paths: dict[str, PathMeta] = {"/": ROOT_META}
        self._kids: dict[str, set[str]] = {}  # directory path -> recorded child paths

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, path: object) -> bool:
        return path in self._paths

    def __iter__(self) -> Iterator[tuple[str, PathMeta]]:
        """All (path, meta) pairs, sorted by path (parents before children)."""
        return iter(sorted(self._paths.items()))

    def get(self, path: str) -> PathMeta | None:
        return self._paths.get(path)

    def set(self, path: str, meta: PathMeta) -> None:
        if path not in self._paths:
            self._kids.setdefault(_parent(path), set()).add(path)
        self._paths[path] = meta

    def discard(self, path: str) -> None:
        """Forget one path (not its children)."""
        if path != "/" and self._paths.pop(path, None) is not None:
            siblings = self._kids.get(_parent(path))
            if siblings is not None:
                siblings.discard(path)

    def remove_tree(self, path: str, keep: Callable[[str], bool] | None = None) -> None:
        """Forget ``path`` and everything below it, except paths ``keep`` vouches for."""
        self.remove_children(path, keep)
        if keep is None or not keep(path):
            self.discard(path)

    def remove_children(self, path: str, keep: Callable[[str], bool] | None = None) -> None:
        """Forget everything below directory ``path`` except what ``keep`` vouches for."""
        for child in list(self._kids.get(path, ())):
            self.remove_tree(child, keep)
        if not self._kids.get(path, True):
            del self._kids[path]

    def write_jsonl(self, path: Path) -> None:
        """Save as JSON lines (one object per path) — keep it outside the stage."""
        with path.open("w", encoding="utf-8", errors="surrogateescape") as fh:
            for p, meta in self:
                fh.write(json.dumps(meta.to_json(p), sort_keys=True) + "\n")

    @classmethod
    def read_jsonl(cls, path: Path) -> StageMetadata:
        """Load what :meth:`write_jsonl` saved."""
        out = cls()
        with path.open(encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                rec = json.loads(line)
                p = rec.pop("path")
                rec["kind"] = Kind(rec["kind"])
                out.set(p, PathMeta(**rec))
        return out


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"
