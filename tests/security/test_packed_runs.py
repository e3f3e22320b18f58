"""A packed rootfs image (format 2) from a cache registry may only describe the runs the packer
writes: aligned 64 KiB blocks (the short last block of the image aside).

Its bytes are the pusher's: it can publish a record and an artifact that agree with each other
for any blob. Before this check, the same image cut into tiny runs (a 10-byte zstd frame per
byte of data, every run in order and in bounds) was accepted: each run costs a thread hand-off,
a decoder, a hash and a ``pwrite`` whatever its length, so a blob within the size bounds made
the host spend far more than an honest one of the same size costs (measured: a 1.3 MB blob of
one-byte runs, 1.5 s of CPU and 2.8 s; honest blobs decode at ~45 MB/s of compressed bytes).
Each test drives the remote-cache restore (in-memory registry, the same code as a real one)
or ``unpack`` with a crafted blob whose record is consistent, so only the run checks can
refuse it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zstandard

from microagent.cli import main
from microagent.digests import SPARSE_BLOCK, Digest, SparseDigest
from microagent.errors import IntegrityError
from microagent.ext4.packed import CHUNK_HEADER, HEADER, MAGIC, MEDIA_TYPES, pack, unpack
from microagent.oci.transport import MemoryRepository
from microagent.remotecache.publish import prepare, publish
from microagent.remotecache.records import (
    ROOTFS_ANNOTATION,
    STEP_ANNOTATION,
    parse_step_manifest,
    rootfs_tag,
    step_tag,
)
from microagent.remotecache.restore import Hit, Restorer
from microagent.store.content import Store
from microagent.store.records import PackedImage, read_record, rootfs_entry

Run = tuple[int, bytes]  # offset, decoded data


def cli(*args: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--json", *args]) == 0, out.getvalue()
    return dict(json.loads(out.getvalue()))


def runs_of(blob: bytes) -> tuple[int, list[Run]]:
    """The image size and decoded runs of a format 2 blob (the test's own reader)."""
    magic, version, size = HEADER.unpack_from(blob)
    assert (magic, version) == (MAGIC, 2)
    at, runs = HEADER.size, []
    while True:
        offset, length, framed = CHUNK_HEADER.unpack_from(blob, at)
        at += CHUNK_HEADER.size
        if length == 0:
            return size, runs
        runs.append((offset, zstandard.ZstdDecompressor().decompress(blob[at : at + framed])))
        at += framed


def repack(size: int, runs: list[Run], template: PackedImage) -> tuple[bytes, PackedImage]:
    """A blob of ``runs`` and the record a pusher would write for it (every digest right)."""
    cctx = zstandard.ZstdCompressor(write_content_size=True)
    parts, digest = [HEADER.pack(MAGIC, 2, size)], SparseDigest(size)
    for offset, data in runs:
        frame = cctx.compress(data)
        parts += [CHUNK_HEADER.pack(offset, len(data), len(frame)), frame]
        digest.add(offset, len(data), hashlib.sha256(data).digest())
    parts.append(CHUNK_HEADER.pack(size, 0, 0))
    blob = b"".join(parts)
    info = dataclasses.replace(
        template, blob=str(Digest.of_bytes(blob)), blob_size=len(blob), digest=digest.hexdigest()
    )
    return blob, info


def cut(runs: list[Run], piece: int) -> list[Run]:
    """The same bytes at the same places, in runs of ``piece`` bytes."""
    return [
        (offset + at, data[at : at + piece])
        for offset, data in runs
        for at in range(0, len(data), piece)
    ]


# -- through the restore path ------------------------------------------------------------------


@pytest.fixture
def repo_and_key(
    busybox_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[MemoryRepository, str]:
    """Machine A builds a one-step spec (fake backend) and publishes it with its image."""
    spec = busybox_project / "microagent.yaml"
    spec.write_text(
        "name: ws\nimage: oci:layout:latest\nsetup: [mkdir -p /w]\nentrypoint: cat /etc/hostname\n"
    )
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "a"))
    key = str(cli("build", "-f", str(spec))["rootfsKey"])
    repo = MemoryRepository()
    publish(prepare(Store(tmp_path / "a" / "store"), key), repo)
    return repo, key


def publish_image(repo: MemoryRepository, key: str, blob: bytes, info: PackedImage) -> None:
    """What a pusher can do: the rootfs artifact and the step record both name ``info``."""
    found = repo.find_manifest(rootfs_tag(key))
    assert found is not None
    doc = json.loads(found.data)
    repo.blobs[info.blob] = blob
    doc["layers"][0].update(digest=info.blob, size=info.blob_size, mediaType=MEDIA_TYPES[2])
    note = {"key": key, "digest": info.digest, "size": info.size}
    doc["annotations"][ROOTFS_ANNOTATION] = json.dumps(note)
    repo.put_manifest(rootfs_tag(key), json.dumps(doc).encode(), found.media_type)
    step = repo.find_manifest(step_tag(key))
    assert step is not None
    doc = json.loads(step.data)
    record = json.loads(doc["annotations"][STEP_ANNOTATION])
    record["rootfsImage"] = info.to_json()
    doc["annotations"][STEP_ANNOTATION] = json.dumps(record)
    repo.put_manifest(step_tag(key), json.dumps(doc).encode(), step.media_type)


def restore(repo: MemoryRepository, key: str, root: Path) -> Restorer:
    found = repo.find_manifest(step_tag(key))
    assert found is not None
    restorer = Restorer(Store(root), [repo])
    restorer.restore(Hit(repo, parse_step_manifest(found.data, key)))
    return restorer


def honest_runs(repo: MemoryRepository, key: str) -> tuple[PackedImage, int, list[Run]]:
    found = repo.find_manifest(step_tag(key))
    assert found is not None
    info = parse_step_manifest(found.data, key).rootfs_image
    assert info is not None and info.format == 2
    return info, *runs_of(repo.blobs[info.blob])


def test_the_honest_image_cut_into_tiny_runs_is_refused_before_decoding(
    repo_and_key: tuple[MemoryRepository, str], tmp_path: Path
) -> None:
    repo, key = repo_and_key
    info, size, runs = honest_runs(repo, key)
    blob, tiny = repack(size, cut(runs, 512), info)
    assert tiny.blob_size < tiny.size, "within the record's bounds: only the runs are wrong"
    publish_image(repo, key, blob, tiny)
    with pytest.raises(IntegrityError, match="64 KiB blocks"):
        restore(repo, key, tmp_path / "b")
    store = Store(tmp_path / "b")
    assert read_record(store, key) is None and not store.has_entry(rootfs_entry(key))


def test_the_same_bytes_in_the_packers_runs_are_still_restored(
    repo_and_key: tuple[MemoryRepository, str], tmp_path: Path
) -> None:
    """The check refuses the shape, not the content: re-packed on 64 KiB blocks (runs cut
    where the packer may cut them) the image restores."""
    repo, key = repo_and_key
    info, size, runs = honest_runs(repo, key)
    blob, blocks = repack(size, cut(runs, SPARSE_BLOCK), info)
    publish_image(repo, key, blob, blocks)
    restorer = restore(repo, key, tmp_path / "b")
    assert (restorer.stats.images, restorer.warnings) == (1, [])


# -- unpack: each edge of the rule ------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, PackedImage, Path]:
    """An honest format 2 blob of a small real ext4 image whose size is not a multiple of
    64 KiB and whose last (free) block holds bytes: its last run is short."""
    folder = tmp_path_factory.mktemp("packed")
    tree = folder / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(bytes(range(256)) * 1000)
    path = folder / "rootfs.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", "-d", str(tree),
                    str(path), "8197k"], check=True, capture_output=True)  # fmt: skip
    with path.open("r+b") as fh:
        fh.seek(-100, os.SEEK_END)
        fh.write(b"z" * 100)
    assert path.stat().st_size % SPARSE_BLOCK
    out = io.BytesIO()
    info = pack(path, out)
    return out.getvalue(), info, path


@pytest.mark.parametrize(
    "shift",
    [
        pytest.param(
            lambda runs: [(runs[0][0] + 4096, runs[0][1]), *runs[1:]], id="offset-off-block"
        ),
        pytest.param(
            lambda runs: [(runs[0][0], runs[0][1][:-1]), *runs[1:]], id="short-run-inside"
        ),
        pytest.param(lambda runs: cut(runs, 4096), id="4k-runs"),
    ],
)
def test_unaligned_runs_are_refused(
    image: tuple[bytes, PackedImage, Path], tmp_path: Path, shift: Any
) -> None:
    blob, info, _path = image
    size, runs = runs_of(blob)
    crafted, record = repack(size, shift(runs), info)
    with pytest.raises(IntegrityError, match="64 KiB blocks"):
        unpack(io.BytesIO(crafted), tmp_path / "out.ext4", record)


def test_the_short_last_block_of_the_image_is_a_run_of_its_own(
    image: tuple[bytes, PackedImage, Path], tmp_path: Path
) -> None:
    """The one run that may be shorter than a block: the image's end (what pack writes)."""
    blob, info, path = image
    size, runs = runs_of(blob)
    last_offset, last = runs[-1]
    assert last_offset + len(last) == size and len(last) % SPARSE_BLOCK, "pack wrote a short end"
    unpack(io.BytesIO(blob), tmp_path / "out.ext4", info)
    assert (tmp_path / "out.ext4").read_bytes() == path.read_bytes()
