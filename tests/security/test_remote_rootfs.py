"""A setup step's packed rootfs image from a remote cache is tied to its verified step record.

The image stands in for flattening the step's verified layers, so a remote hit boots it and
the host's debugfs reads it (``microagent cp``). It used to be trusted on the word of its own
``rootfs-<hex>`` artifact: digest and size from the same manifest, the decoded digest never
checked, the size unbounded, never checked by e2fsck, and passed on by ``--cache-to`` /
``cache export``. Each test tampers with a cache the way someone with push access could and
checks that nothing of it is used or stored. The cache is the in-memory transport (same
code paths as a registry) or a layout folder through the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from microagent.cli import main
from microagent.errors import IntegrityError
from microagent.ext4.packed import MEDIA_TYPES, pack, pack_v1
from microagent.oci.transport import MemoryRepository
from microagent.remotecache.publish import prepare, publish
from microagent.remotecache.records import (
    ROOTFS_ANNOTATION,
    STEP_ANNOTATION,
    image_size_limit,
    parse_step_manifest,
    rootfs_tag,
    step_tag,
)
from microagent.remotecache.restore import Hit, Restorer
from microagent.store.content import Store
from microagent.store.records import PackedImage, read_record, rootfs_entry
from testenv.tree_kit import image_tree


def cli(*args: str, code: int = 0) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        got = main(["--json", *args])
    assert got == code, out.getvalue()
    return dict(json.loads(out.getvalue()))


@pytest.fixture
def spec(busybox_project: Path) -> Path:
    (busybox_project / "microagent.yaml").write_text(
        "name: ws\nimage: oci:layout:latest\nsetup: [mkdir -p /w]\nentrypoint: cat /etc/hostname\n"
    )
    return busybox_project / "microagent.yaml"


@dataclass(frozen=True)
class Published:
    repo: MemoryRepository
    key: str  # the setup step whose rootfs image is published
    rootfs: Path  # the image the honest publisher built


@pytest.fixture
def published(
    spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Published:  # fmt: skip
    """Machine A builds the spec (fake backend, no VM) and publishes it to a repository."""
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "a"))
    key = str(cli("build", "-f", str(spec))["rootfsKey"])
    store = Store(tmp_path / "a" / "store")
    repo = MemoryRepository()
    publish(prepare(store, key), repo)
    return Published(repo, key, store.entry_path(rootfs_entry(key)))


def published_step(repo: MemoryRepository, key: str) -> Any:
    found = repo.find_manifest(step_tag(key))
    assert found is not None
    return parse_step_manifest(found.data, key)


def restore(pub: Published, root: Path) -> tuple[Store, Restorer]:
    """Machine B takes the remote hit."""
    store = Store(root)
    restorer = Restorer(store, [pub.repo])
    restorer.restore(Hit(pub.repo, published_step(pub.repo, pub.key)))
    return store, restorer


# -- tampering as a pusher could -------------------------------------------------------------


def packed(image: Path) -> tuple[bytes, PackedImage]:
    out = io.BytesIO()
    info = pack(image, out)
    return out.getvalue(), info


def put_artifact(repo: MemoryRepository, key: str, blob: bytes, info: PackedImage) -> None:
    """Point the rootfs artifact of ``info``'s format at ``blob``, described by ``info``
    (blob, media type and annotation)."""
    found = repo.find_manifest(rootfs_tag(key))
    assert found is not None
    doc = json.loads(found.data)
    repo.blobs[info.blob] = blob
    media_type = MEDIA_TYPES.get(info.format, "application/x-future")
    doc["layers"][0].update(digest=info.blob, size=info.blob_size, mediaType=media_type)
    note = {"key": key, "digest": info.digest, "size": info.size}
    doc["annotations"][ROOTFS_ANNOTATION] = json.dumps(note)
    tag = rootfs_tag(key, info.format)
    repo.put_manifest(tag, json.dumps(doc).encode(), found.media_type)


def put_record_image(repo: MemoryRepository, key: str, info: PackedImage | None) -> None:
    """Rewrite the step record's ``rootfsImage`` (None: a record from before it existed)."""
    found = repo.find_manifest(step_tag(key))
    assert found is not None
    doc = json.loads(found.data)
    record = json.loads(doc["annotations"][STEP_ANNOTATION])
    record.pop("rootfsImage", None)
    if info is not None:
        record["rootfsImage"] = info.to_json()
    doc["annotations"][STEP_ANNOTATION] = json.dumps(record)
    repo.put_manifest(step_tag(key), json.dumps(doc).encode(), found.media_type)


def hostile_image(pub: Published, tmp_path: Path, commands: list[str]) -> Path:
    """The honest image changed by ``debugfs -w`` commands (run in a folder with ``data``)."""
    work = tmp_path / "evil"
    work.mkdir()
    (work / "data").write_bytes(b"/" + b"t" * 20000)
    image = work / "rootfs.ext4"
    shutil.copyfile(pub.rootfs, image)
    script = "".join(c + "\n" for c in commands).encode()
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=script, cwd=work,
                   check=True, capture_output=True)  # fmt: skip
    return image


def nothing_stored(store: Store, key: str) -> None:
    assert read_record(store, key) is None
    assert not store.has_entry(rootfs_entry(key))


def is_honest(store: Store, pub: Published) -> None:
    """B's rootfs holds the tree flattening the verified layers gives: A's tree (A derived its
    image from the parent's, so the bytes need not be the same; every file, owner, mode, time
    and content is)."""
    assert image_tree(store.entry_path(rootfs_entry(pub.key))) == image_tree(pub.rootfs)


# -- the tests -------------------------------------------------------------------------------


def test_the_step_record_names_the_image_published_with_it(published: Published) -> None:
    found = published.repo.find_manifest(rootfs_tag(published.key))
    assert found is not None
    layer = json.loads(found.data)["layers"][0]
    named = published_step(published.repo, published.key).rootfs_image
    assert named is not None and (named.blob, named.blob_size) == (layer["digest"], layer["size"])
    assert named.size == published.rootfs.stat().st_size


def test_a_swapped_rootfs_artifact_is_not_used(published: Published, tmp_path: Path) -> None:
    evil = hostile_image(published, tmp_path, ["write data /planted-by-the-pusher"])
    put_artifact(published.repo, published.key, *packed(evil))  # self-consistent artifact
    store, restorer = restore(published, tmp_path / "b")
    assert restorer.stats.images == 0
    assert any("differs from the image the step record names" in w for w in restorer.warnings)
    is_honest(store, published)


def test_the_decoded_image_must_match_the_digest_it_claims(
    published: Published, tmp_path: Path
) -> None:
    blob, info = packed(published.rootfs)
    lie = dataclasses.replace(info, digest="sha256:" + hashlib.sha256(b"other").hexdigest())
    put_artifact(published.repo, published.key, blob, lie)
    put_record_image(published.repo, published.key, lie)
    with pytest.raises(IntegrityError, match="the decoded rootfs image hashes to") as err:
        restore(published, tmp_path / "b")
    assert "is corrupt" in err.value.message
    nothing_stored(Store(tmp_path / "b"), published.key)


def test_an_image_e2fsck_refuses_never_enters_the_store(
    published: Published, tmp_path: Path
) -> None:
    """A consistent record and artifact for a crafted file system: a symlink inode with a
    20 KB target (what ``cp`` would later feed to debugfs)."""
    evil = hostile_image(published, tmp_path, ["write data /evil", "sif /evil mode 0120777"])
    blob, info = packed(evil)
    put_artifact(published.repo, published.key, blob, info)
    put_record_image(published.repo, published.key, info)
    with pytest.raises(IntegrityError, match=r"e2fsck -fn") as err:
        restore(published, tmp_path / "b")
    assert "Symlink /evil" in err.value.message
    nothing_stored(Store(tmp_path / "b"), published.key)


def test_a_declared_size_beyond_the_layers_is_not_unpacked(
    published: Published, tmp_path: Path
) -> None:
    """A decompression bomb (non-zero bytes: no holes) with consistent digests and sizes."""
    size = image_size_limit(published_step(published.repo, published.key).layers) + (16 << 20)
    blob, plain, chunk = io.BytesIO(), hashlib.sha256(), b"A" * (1 << 20)
    with zstandard.ZstdCompressor().stream_writer(blob, closefd=False) as zw:
        for _ in range(size // len(chunk)):
            zw.write(chunk)
            plain.update(chunk)
    data = blob.getvalue()
    bomb = PackedImage(
        "sha256:" + hashlib.sha256(data).hexdigest(), len(data), "sha256:" + plain.hexdigest(), size
    )
    put_artifact(published.repo, published.key, data, bomb)
    put_record_image(published.repo, published.key, bomb)
    store, restorer = restore(published, tmp_path / "b")
    assert restorer.stats.images == 0
    assert any("allowed for its layers" in w for w in restorer.warnings)
    is_honest(store, published)


def test_an_older_publishers_format_1_image_is_still_used(
    published: Published, tmp_path: Path
) -> None:
    """A cache pushed by a version that packed whole images (format 1, ``rootfs-<hex>``)."""
    out = io.BytesIO()
    info = pack_v1(published.rootfs, out)
    assert "format" not in info.to_json() and rootfs_tag(published.key, 1).startswith("rootfs-")
    put_artifact(published.repo, published.key, out.getvalue(), info)
    put_record_image(published.repo, published.key, info)
    store, restorer = restore(published, tmp_path / "b")
    assert (restorer.stats.images, restorer.warnings) == (1, [])
    assert store.entry_path(rootfs_entry(published.key)).read_bytes() == (
        published.rootfs.read_bytes()
    )


def test_an_image_format_this_version_cannot_read_is_flattened(
    published: Published, tmp_path: Path
) -> None:
    """A record from a newer publisher: never unpacked, the verified layers flattened."""
    blob, info = packed(published.rootfs)
    future = dataclasses.replace(info, format=3)
    put_artifact(published.repo, published.key, blob, future)
    put_record_image(published.repo, published.key, future)
    store, restorer = restore(published, tmp_path / "b")
    assert restorer.stats.images == 0
    assert any("has format 3, which this version cannot read" in w for w in restorer.warnings)
    is_honest(store, published)


def test_records_without_image_fields_fall_back_to_flattening(
    published: Published, tmp_path: Path
) -> None:
    put_record_image(published.repo, published.key, None)
    store, restorer = restore(published, tmp_path / "b")
    assert (restorer.stats.images, restorer.warnings) == (0, [])
    is_honest(store, published)


def test_a_downloaded_image_is_never_published_again(
    spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, again = tmp_path / "cache", tmp_path / "again"
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "a"))
    cli("cache", "export", "-f", str(spec), str(cache))
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "b"))
    created = cli("create", "-f", str(spec), "--cache-from", f"oci:{cache}")
    assert (created["setupBoots"], created["remote"]["rootfsImages"]) == (0, 1)
    exported = cli("cache", "export", "-f", str(spec), str(again))
    assert not [t for t in exported["tags"] if t.startswith("rootfs-")]
    index = json.loads((again / "index.json").read_text())
    for entry in index["manifests"]:
        manifest = (again / "blobs" / "sha256" / entry["digest"][7:]).read_bytes()
        assert b"rootfsImage" not in manifest
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "c"))
    third = cli("create", "-f", str(spec), "--cache-from", f"oci:{again}")
    assert (third["setupBoots"], third["remote"]["rootfsImages"]) == (0, 0)
    assert third["rootfsKey"] == created["rootfsKey"]
