"""Pulling base images into the store: registry and layout sources, caching, integrity."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from microagent.build.base import list_bases, pull_base, remove_base
from microagent.cli import main
from microagent.errors import IntegrityError, NotFoundError, RegistryError
from microagent.oci.endpoints import RegistryConfig
from microagent.oci.registry import RegistryClient
from microagent.runner import run
from microagent.store.content import Store
from testenv import standin
from testenv.registry import RegistryHandle

pytestmark = pytest.mark.integration


def _client(registry: RegistryHandle) -> RegistryClient:
    return RegistryClient(RegistryConfig(mirrors={"docker.io": (registry.url,)}))


def _debugfs(image: Path, command: str) -> str:
    return run(["debugfs", "-R", command, str(image)]).stdout


def test_pull_builds_a_bootable_looking_rootfs_then_hits_the_cache(
    registry: RegistryHandle, busybox_image: standin.PushedImage, tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    first = pull_base(store, "busybox", client=_client(registry))
    assert not first.cached and first.digest == busybox_image.digest
    listing = _debugfs(first.rootfs, "ls -l /bin")
    assert "busybox" in listing
    assert "sh" in _debugfs(first.rootfs, "ls /bin")
    tmp_stat = _debugfs(first.rootfs, "stat /tmp")
    assert "Mode:  01777" in tmp_stat
    second = pull_base(store, "busybox", client=_client(registry))
    assert second.cached and second.rootfs == first.rootfs
    assert [b.key for b in list_bases(store)] == [first.key]


def test_layout_source_gives_the_same_key(
    busybox_layout: standin.BuiltImage, registry: RegistryHandle,
    busybox_image: standin.PushedImage, tmp_path: Path,
) -> None:  # fmt: skip
    layout = tmp_path / "layout"
    shutil.copytree(busybox_layout.layout, layout)
    from_layout = pull_base(Store(tmp_path / "a"), "oci:layout:latest", base_dir=tmp_path)
    from_registry = pull_base(Store(tmp_path / "b"), "busybox", client=_client(registry))
    assert from_layout.key == from_registry.key
    sha = [hashlib.sha256(p.read_bytes()).hexdigest() for p in
           (from_layout.rootfs, from_registry.rootfs)]  # fmt: skip
    assert sha[0] == sha[1], "the same image must give a byte-identical rootfs"


def _blob_file(registry: RegistryHandle, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return next(registry.data_dir.rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data"))


def test_corrupt_layer_is_refused_and_leaves_nothing_valid(
    registry: RegistryHandle, busybox_image: standin.PushedImage, tmp_path: Path
) -> None:
    manifest = json.loads(_blob_file(registry, busybox_image.digest).read_bytes())
    layer = _blob_file(registry, manifest["layers"][0]["digest"])
    original = layer.read_bytes()
    store = Store(tmp_path / "store")
    try:
        layer.write_bytes(original[:-10] + b"X" * 10)
        with pytest.raises(IntegrityError):
            pull_base(store, "busybox", client=_client(registry))
        assert list_bases(store) == []
        assert (
            not list((store.root / "rootfs").glob("*.ext4"))
            if (store.root / "rootfs").exists()
            else True
        )
        assert not store.has_blob(manifest["layers"][0]["digest"])
    finally:
        layer.write_bytes(original)
    again = pull_base(store, "busybox", client=_client(registry))
    assert not again.cached and again.rootfs.exists()


def test_missing_image_and_platform_errors(
    registry: RegistryHandle, busybox_image: standin.PushedImage, tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(RegistryError, match="not found"):
        pull_base(store, "busybox:nope", client=_client(registry))
    with pytest.raises(NotFoundError, match="not an OCI image layout"):
        pull_base(store, "oci:missing", base_dir=tmp_path)


def test_image_cli_round_trip(
    registry: RegistryHandle, busybox_image: standin.PushedImage, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MICROAGENT_REGISTRY_MIRRORS", f"docker.io={registry.url}")
    assert main(["--json", "image", "pull", "busybox"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["cached"] is False
    assert main(["--json", "image", "ls"]) == 0
    assert [i["key"] for i in json.loads(capsys.readouterr().out)["images"]] == [pulled["key"]]
    assert main(["--json", "cache", "du"]) == 0
    assert json.loads(capsys.readouterr().out)["kinds"]["rootfs"] > 0
    assert main(["image", "rm", "-y", "busybox"]) == 0
    capsys.readouterr()
    assert main(["--json", "cache", "prune", "--all", "-y"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"]
    assert main(["--json", "cache", "ls"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == []


def test_remove_unknown_image(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        remove_base(Store(tmp_path), "nothing")
