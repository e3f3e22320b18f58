"""Read an ext4 image's whole tree with debugfs, to compare two images entry by entry."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from microagent.ext4.debugfs import (
    InodeStream,
    link_targets,
    parse_ls,
    parse_stat,
    run_debugfs,
)
from microagent.layers.stagemeta import Kind


def image_tree(image: Path) -> dict[str, tuple[object, ...]]:
    """Every path below / (lost+found aside): type, mode, owner, times, size, content sha256,
    symlink target, device numbers and the first name of its hard link group."""
    rows: dict[str, tuple[object, ...]] = {}
    names: dict[int, str] = {}
    level = [("", 2)]
    inodes = {}
    while level:
        done = run_debugfs(image, [f"ls -p <{ino}>" for _, ino in level])
        nxt = []
        for (path, _), text in zip(level, done.outputs, strict=True):
            for name, ent in sorted(parse_ls(text, path or "/").items()):
                child = f"{path}/{name}"
                if child == "/lost+found":
                    continue
                names.setdefault(ent.ino, child)
                inodes[child] = ent.ino
                if ent.kind is Kind.DIR:
                    nxt.append((child, ent.ino))
        level = nxt
    order = sorted(set(inodes.values()) | {2})
    stats = run_debugfs(image, [f"stat <{ino}>" for ino in order])
    by_ino = {ino: parse_stat(text) for ino, text in zip(order, stats.outputs, strict=True)}
    links = link_targets(image, [i for i in by_ino.values() if i and i.kind is Kind.SYMLINK])
    files = sorted(i for i, n in by_ino.items() if n and n.kind is Kind.FILE and n.size)
    sums = {}
    with InodeStream(image, files) as stream:
        for ino in files:
            node = by_ino[ino]
            assert node is not None
            sums[ino] = hashlib.sha256(stream.read_exact(node.size, str(ino))).hexdigest()
    times = {ino: _times(text) for ino, text in zip(order, stats.outputs, strict=True)}
    for path, ino in {"/": 2, **inodes}.items():
        node = by_ino[ino]
        assert node is not None
        rows[path] = (
            node.kind,
            node.mode,
            node.uid,
            node.gid,
            times[ino],
            node.size,
            sums.get(ino),
            links.get(ino),
            node.dev(),
            names.get(ino, path),
            _links_count(stats.outputs[order.index(ino)]),
        )
    return rows


def _times(text: str) -> tuple[str, ...]:
    return tuple(
        ln.split("--")[0].strip()
        for ln in text.splitlines()
        if ln.strip().startswith(("ctime:", "atime:", "mtime:", "crtime:"))
    )


def _links_count(text: str) -> str:
    found = re.search(r"Links: (\d+)", text)
    assert found is not None, text
    return f"Links: {found[1]}"
