"""Reading back what the fake backend's guest wrote (see ``microagent.runtime.fake``).

Every setup step the fake guest "runs" leaves a marker, ``/etc/microagent-fake-setup/<hash>``,
holding the step's command; an outcome's ``writes`` land beside it. These helpers read them from
a root filesystem image (debugfs, no mount) and from a stored layer blob, so tests can follow a
setup step's content through build, push, restore and flatten.
"""

from __future__ import annotations

import io
import shlex
import tarfile
from collections.abc import Sequence
from pathlib import Path

import zstandard

from microagent.compiler.files import EXT_MAGIC, EXT_MAGIC_OFFSET
from microagent.ext4.debugfs import parse_ls, quote, run_debugfs
from microagent.runtime.fake import SETUP_MARKER_DIR
from microagent.store.content import Store
from microagent.store.records import read_record, root_of, rootfs_entry


def read_file(image: Path, path: str) -> bytes | None:
    """The bytes of ``path`` in an ext4 image, or None when it has no such file."""
    done = run_debugfs(image, [f"stat {quote(path)}", f"cat {quote(path)}"])
    if "Inode:" not in done.outputs[0]:
        return None
    return done.outputs[1].encode("utf-8", "surrogateescape")


def setup_markers(image: Path | Sequence[Path]) -> list[str]:
    """The commands (``run`` strings) of the setup steps whose marker ``image`` holds, sorted;
    for a stack of images (see :func:`root_images`) the markers of them all (setup steps only
    add markers)."""
    if not isinstance(image, Path):
        return sorted({mark for one in image for mark in setup_markers(one)})
    done = run_debugfs(image, [f"ls -p {quote(SETUP_MARKER_DIR)}"])
    if done.errors:
        return []
    names = sorted(parse_ls(done.outputs[0], SETUP_MARKER_DIR))
    texts = [read_file(image, f"{SETUP_MARKER_DIR}/{name}") or b"" for name in names]
    return sorted(shlex.split(text.decode())[-1] for text in texts)


def layer_files(store: Store, digest: str) -> dict[str, bytes]:
    """A stored (zstd) layer's regular files: path -> content."""
    with store.blob_path(digest).open("rb") as fh:
        data = zstandard.ZstdDecompressor().stream_reader(fh).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def step_layer_files(home: Path, key: str) -> dict[str, bytes]:
    """The files of the layer a step added (the last of its record's chain) in ``home``."""
    store = Store(home / "store")
    record = read_record(store, key)
    assert record is not None and record.layers, f"no layers recorded for {key}"
    return layer_files(store, record.layers[-1].digest)


def root_images(home: Path, key: str) -> list[Path]:
    """The images ``home``'s store holds (or would hold) the root of step ``key`` in: its layer
    disks top first and the image below them, or its one image (which may be missing)."""
    store = Store(home / "store")
    record = read_record(store, key)
    found = root_of(store, record) if record is not None else None
    if found is not None:
        return list(found.top_first)
    names = record.root_entries if record is not None else ()
    return [store.entry_path(name) for name in names or (rootfs_entry(key),)]


def rootfs_image(home: Path, key: str) -> Path:
    """Where ``home``'s store keeps the root filesystem image of ``key``."""
    return Store(home / "store").entry_path(rootfs_entry(key))


def ext4_like(path: Path) -> Path:
    """The smallest file that passes the CLI's ext4 check (a superblock magic, 4 KiB): a
    rootfs, layer or disk for the fake backend, which boots nothing."""
    data = bytearray(4096)
    data[EXT_MAGIC_OFFSET : EXT_MAGIC_OFFSET + len(EXT_MAGIC)] = EXT_MAGIC
    path.write_bytes(bytes(data))
    return path
