"""The threaded pipelines of a remote hit: a rootfs image is downloaded, decoded and written
by three threads, a layer is decoded in a thread of its own while the tar walk applies the
one before it. An error in any thread reaches the caller as itself, nothing hangs, and no
thread outlives the call."""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from microagent.digests import Digest
from microagent.errors import IntegrityError, RegistryError
from microagent.ext4.packed import pack, unpack
from microagent.layers.apply import LayerSource, flatten

SMALL_MIB = 8


def _image(tmp_path: Path, mib: int, data_mib: int) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "random").write_bytes(os.urandom(data_mib << 20))
    image = tmp_path / "rootfs.ext4"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), f"{mib}M"],
        check=True,
        capture_output=True,
    )
    return image


@pytest.fixture
def small_dir(tmp_path: Path) -> Iterator[Path]:
    """A ``SMALL_MIB`` tmpfs, unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_MIB}m", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


@pytest.mark.root("mounting a small tmpfs")
@pytest.mark.tools("mount", "umount", "mke2fs")
def test_a_full_disk_while_the_writer_thread_writes_is_raised(
    tmp_path: Path, small_dir: Path
) -> None:
    image = _image(tmp_path, 64, 20)  # 20 MiB of data cannot fit in 8 MiB
    blob = io.BytesIO()
    packed = pack(image, blob)
    before = _threads()
    with pytest.raises(OSError) as caught:
        unpack(io.BytesIO(blob.getvalue()), small_dir / "out.ext4", packed)
    assert caught.value.errno == errno.ENOSPC
    assert _threads() <= before, "no pipeline thread outlives unpack"


def test_a_large_sparse_image_round_trips_exactly(tmp_path: Path) -> None:
    """More than a few hand-overs between the threads, data runs and holes mixed."""
    image = _image(tmp_path, 96, 24)
    blob = io.BytesIO()
    packed = pack(image, blob)
    out = tmp_path / "out.ext4"
    unpack(io.BytesIO(blob.getvalue()), out, packed)
    assert out.read_bytes() == image.read_bytes()
    assert out.stat().st_blocks * 512 < 40 << 20, "zero runs stay holes"


class _Broken(io.RawIOBase):
    """A download that breaks after ``good`` bytes, as a transport error would."""

    def __init__(self, data: bytes, good: int) -> None:
        self.data, self.good, self.offset = data, good, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.offset >= self.good:
            raise RegistryError("the connection broke")
        size = len(self.data) if size is None or size < 0 else size
        chunk = self.data[self.offset : min(self.offset + size, self.good)]
        self.offset += len(chunk)
        return chunk


def test_a_download_that_breaks_midway_is_raised_and_leaves_no_thread(tmp_path: Path) -> None:
    image = _image(tmp_path, 64, 12)
    blob = io.BytesIO()
    packed = pack(image, blob)
    before = _threads()
    broken = _Broken(blob.getvalue(), len(blob.getvalue()) // 2)
    with pytest.raises(RegistryError):
        unpack(broken, tmp_path / "out.ext4", packed)  # type: ignore[arg-type]
    assert _threads() <= before


def test_a_blob_longer_than_its_record_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    blob = io.BytesIO()
    packed = pack(_image(tmp_path, 16, 1), blob)
    short = dataclasses.replace(packed, blob_size=100)
    with pytest.raises(IntegrityError, match="larger than the expected 100 bytes"):
        unpack(io.BytesIO(blob.getvalue()), tmp_path / "out.ext4", short)


# -- layers: decoded in a thread, the next one ahead --------------------------------------


def _layer(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _source(name: str, data: bytes, plain: bytes | None = None) -> LayerSource:
    diff_id = Digest.of_bytes(plain if plain is not None else data)
    return LayerSource(name, lambda: io.BytesIO(data), diff_id)


def test_many_layers_flatten_in_order_with_lookahead(tmp_path: Path) -> None:
    big = os.urandom(3 << 20)  # several decoded chunks per layer
    layers = []
    for i in range(6):
        plain = _layer({"shared": f"layer {i}".encode(), f"own{i}": big[i:]})
        layers.append(_source(f"#{i}", _zstd(plain), plain))
    before = _threads()
    flatten(tmp_path / "stage", layers)
    assert (tmp_path / "stage" / "shared").read_bytes() == b"layer 5", "the last layer wins"
    assert (tmp_path / "stage" / "own3").read_bytes() == big[3:]
    assert _threads() <= before


def test_a_bad_layer_stops_the_flatten_and_the_decoders_ahead_of_it(tmp_path: Path) -> None:
    good = _layer({"a": os.urandom(4 << 20)})
    layers = [
        _source("#0", good),
        LayerSource("#1", lambda: io.BytesIO(good), Digest.of_bytes(b"something else")),
        _source("#2", _zstd(good), good),
        _source("#3", _zstd(good), good),
    ]
    before = _threads()
    with pytest.raises(IntegrityError, match=r"layer #1: uncompressed content is sha256:"):
        flatten(tmp_path / "stage", layers)
    assert _threads() <= before


def test_a_layer_whose_download_failed_raises_that_error(tmp_path: Path) -> None:
    def failed() -> io.BytesIO:
        raise RegistryError("downloading layer 1 failed: reset by peer")

    layers = [_source("#0", _layer({"a": b"x"})), LayerSource("#1", failed)]
    with pytest.raises(RegistryError, match="reset by peer"):
        flatten(tmp_path / "stage", layers)


def test_a_truncated_zstd_layer_is_an_integrity_error(tmp_path: Path) -> None:
    data = _zstd(_layer({"a": os.urandom(1 << 20)}))[:-1000]
    with pytest.raises(IntegrityError, match="layer #0: corrupt or truncated layer"):
        flatten(tmp_path / "stage", [LayerSource("#0", lambda: io.BytesIO(data))])


def test_bytes_after_the_frame_are_refused_every_time(tmp_path: Path) -> None:
    """Whether the download thread is ahead of the decoder or behind it when the frame ends,
    bytes after it are refused, even when the record's digest covers them."""
    image = _image(tmp_path, 16, 1)
    blob = io.BytesIO()
    packed = pack(image, blob)
    data = blob.getvalue() + b"\0" * (3 << 20)  # several download chunks after the frame
    whole = dataclasses.replace(packed, blob=str(Digest.of_bytes(data)), blob_size=len(data))
    for attempt in range(3):
        with pytest.raises(IntegrityError):
            unpack(io.BytesIO(data), tmp_path / f"out{attempt}.ext4", whole)
