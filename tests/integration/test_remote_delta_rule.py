"""The pieces of a delta hit (``remotecache/delta.py``) without a registry: which local
ancestor a chain reaches, the size rule, and the checks on a layer's bytes before a derive."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import zstandard

from microagent.compiler.keys import StepKind
from microagent.errors import IntegrityError
from microagent.remotecache.delta import (
    DELTA_FRACTION,
    Delta,
    TooLarge,
    check_names,
    decompress_layer,
    find_delta,
    worth_it,
)
from microagent.remotecache.records import PublishedStep
from microagent.store.content import Store
from microagent.store.records import LayerRef, PackedImage, StepRecord, rootfs_entry, write_record

ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def _key(n: int) -> str:
    return "sha256:" + f"{n:x}" * 64


def _layer(n: int, size: int = 100) -> LayerRef:
    return LayerRef(ZSTD, _key(0xA0 + n)[:71], size, _key(0xB0 + n)[:71])


def _published(n: int, layers: tuple[LayerRef, ...], image: int | None = None) -> PublishedStep:
    packed = None if image is None else PackedImage(_key(9), image, _key(8), image * 4, 2)
    return PublishedStep(_key(n), StepKind.SETUP, _key(n - 1), {}, _key(7), layers, None, None,
                         packed)  # fmt: skip


def _record(store: Store, n: int, layers: tuple[LayerRef, ...], *, image: bool) -> None:
    write_record(store, StepRecord(StepKind.SETUP, _key(n), _key(n - 1), {}, layers,
                                   rootfs=rootfs_entry(_key(n))))  # fmt: skip
    if image:
        store.build_once(rootfs_entry(_key(n)), lambda tmp: tmp.write_bytes(b"ext4"))


def test_the_chain_walks_up_to_the_first_local_step_with_an_image(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    base, two, three, four = (_layer(1),), _layer(2), _layer(3), _layer(4)
    _record(store, 1, base, image=True)
    _record(store, 2, (*base, two), image=False)  # an earlier hit's intermediate record
    chain = [_published(3, (*base, two, three)), _published(4, (*base, two, three, four))]
    delta = find_delta(store, chain)
    assert delta is not None
    assert (delta.ancestor, [k for k, _ in delta.steps]) == (_key(1), [_key(2), _key(3), _key(4)])
    assert delta.image == store.entry_path(rootfs_entry(_key(1)))

    other = [_published(3, (*base, _layer(5), three)), chain[1]]  # not the local parent's layers
    assert find_delta(store, [other[0], _published(4, (*base, _layer(5), three, four))]) is None


def test_no_delta_without_a_local_image_or_from_a_base_step(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    _record(store, 1, (_layer(1),), image=False)
    assert find_delta(store, [_published(2, (_layer(1), _layer(2)))]) is None
    base = PublishedStep(_key(1), StepKind.BASE, None, {}, _key(7), (_layer(1),))
    assert find_delta(store, [base, _published(2, (_layer(1), _layer(2)))]) is None


def test_the_rule_is_half_of_the_image_blob_else_of_every_layer() -> None:
    hit = _published(3, (_layer(1, 1000), _layer(2, 200), _layer(3, 300)), image=1000)
    small = Delta(_key(2), Path("x"), ((_key(3), _layer(3, 300)),))
    large = Delta(_key(1), Path("x"), ((_key(2), _layer(2, 300)), (_key(3), _layer(3, 300))))
    assert worth_it(small, hit, images=True) and not worth_it(large, hit, images=True)
    assert DELTA_FRACTION * (1000 + 200 + 300) == 750
    assert worth_it(large, hit, images=False), "600 of 1500 layer bytes"
    no_image = _published(3, hit.layers)
    assert worth_it(large, no_image, images=True)


def _tar(*infos: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info in infos:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return buf.getvalue()


def _file(name: str, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _blob(tmp_path: Path, plain: bytes, diff_id: str | None = None) -> tuple[Path, LayerRef]:
    blob = zstandard.ZstdCompressor().compress(plain)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    diff = diff_id or "sha256:" + hashlib.sha256(plain).hexdigest()
    return path, LayerRef(ZSTD, digest, len(blob), diff)


def test_a_layer_is_decompressed_checked_and_bounded(tmp_path: Path) -> None:
    plain = _tar(_file("etc/a", 3000))
    blob, layer = _blob(tmp_path, plain)
    decompress_layer(blob, layer, tmp_path / "out.tar", limit=len(plain))
    assert (tmp_path / "out.tar").read_bytes() == plain
    with pytest.raises(TooLarge):
        decompress_layer(blob, layer, tmp_path / "out.tar", limit=len(plain) - 1)
    blob, wrong = _blob(tmp_path, plain, diff_id="sha256:" + "0" * 64)
    with pytest.raises(IntegrityError, match="diff_id"):
        decompress_layer(blob, wrong, tmp_path / "out.tar", limit=1 << 20)
    blob.write_bytes(blob.read_bytes()[:-5])  # zstd gives what it decoded: the diff_id says
    with pytest.raises(IntegrityError, match="diff_id"):
        decompress_layer(blob, layer, tmp_path / "out.tar", limit=1 << 20)
    blob.write_bytes(b"\x28\xb5\x2f\xfd" + b"\xff" * 64)  # zstd magic, then garbage
    with pytest.raises(IntegrityError, match="corrupt or truncated"):
        decompress_layer(blob, layer, tmp_path / "out.tar", limit=1 << 20)


def test_names_escaping_the_root_are_refused(tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(_tar(_file("etc/ok"), _file("etc/../../x")))
    with pytest.raises(IntegrityError, match=r"'\.\.' component"):
        check_names(tar)
    link = _file("etc/link")
    link.type, link.linkname = tarfile.LNKTYPE, "../etc/passwd"
    tar.write_bytes(_tar(link))
    with pytest.raises(IntegrityError, match=r"'\.\.' component"):
        check_names(tar)
    symlink = _file("etc/sym")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, "../../anything"  # resolved in the guest
    tar.write_bytes(_tar(_file("etc/ok"), symlink))
    check_names(tar)
    tar.write_bytes(b"not a tar" * 100)
    with pytest.raises(IntegrityError, match="corrupt"):
        check_names(tar)
