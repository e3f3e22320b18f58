"""Publish and restore through the in-memory transport: the same code paths as a registry or a
layout, with a repository a test can inspect and tamper with."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from microagent.build.base import pull_base
from microagent.errors import IntegrityError
from microagent.oci.transport import MemoryRepository
from microagent.remotecache.publish import prepare, publish
from microagent.remotecache.records import parse_step_manifest, step_tag
from microagent.remotecache.restore import Hit, Restorer
from microagent.store.content import Store
from microagent.store.records import read_record, rootfs_ready
from testenv import standin


@pytest.fixture
def published(
    tmp_path: Path, busybox_layout: standin.BuiltImage
) -> tuple[MemoryRepository, str, Path]:
    layout = tmp_path / "layout"
    shutil.copytree(busybox_layout.layout, layout)
    store = Store(tmp_path / "a")
    base = pull_base(store, f"oci:{layout}:latest")
    repo = MemoryRepository()
    report = publish(prepare(store, base.key), repo)
    assert report.uploaded == len(repo.blobs) and repo.closed == 1
    return repo, base.key, base.rootfs


def _hit(repo: MemoryRepository, key: str) -> Hit:
    found = repo.find_manifest(step_tag(key))
    assert found is not None
    return Hit(repo, parse_step_manifest(found.data, key))


def test_a_base_step_round_trips_byte_for_byte(
    tmp_path: Path, published: tuple[MemoryRepository, str, Path]
) -> None:
    repo, key, original = published
    store = Store(tmp_path / "b")
    Restorer(store, [repo]).restore(_hit(repo, key))
    record = rootfs_ready(store, key)
    assert record is not None and record.source == "memory:"
    assert record.rootfs is not None
    assert store.entry_path(record.rootfs).read_bytes() == original.read_bytes()


def test_a_tampered_blob_is_refused_and_nothing_is_recorded(
    tmp_path: Path, published: tuple[MemoryRepository, str, Path]
) -> None:
    repo, key, _ = published
    hit = _hit(repo, key)
    layer = hit.step.layers[0].digest
    data = repo.blobs[layer]
    repo.blobs[layer] = bytes([data[0] ^ 0xFF]) + data[1:]
    store = Store(tmp_path / "b")
    with pytest.raises(IntegrityError, match="corrupt"):
        Restorer(store, [repo]).restore(hit)
    assert read_record(store, key) is None and not store.has_blob(layer)


def test_a_miss_in_memory_is_a_miss(published: tuple[MemoryRepository, str, Path]) -> None:
    repo, _, _ = published
    assert repo.find_manifest(step_tag("sha256:" + "0" * 64)) is None
