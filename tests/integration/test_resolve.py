"""Resolving tags to digests against a real local registry: mirrors, errors, layouts, lock."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.compiler.lock import ResolvedImage
from microagent.compiler.refs import ImageRef, LayoutRef, parse_image_ref
from microagent.errors import IntegrityError, NotFoundError, RegistryError
from microagent.oci.endpoints import RegistryConfig
from microagent.oci.registry import RegistryClient
from microagent.oci.transport import open_repository, resolve
from testenv import standin
from testenv.registry import RegistryHandle, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
PLATFORM = "linux/amd64"


def _resolve(client: RegistryClient, ref: ImageRef | LayoutRef) -> ResolvedImage:
    return resolve(open_repository(ref, client), ref, PLATFORM)


def _mirrored(registry: RegistryHandle) -> RegistryClient:
    return RegistryClient(RegistryConfig(mirrors={"docker.io": (registry.url,)}))


def test_docker_hub_name_resolves_through_the_mirror(
    registry: RegistryHandle, busybox_image: standin.PushedImage
) -> None:
    resolved = _resolve(_mirrored(registry), parse_image_ref("busybox"))
    assert resolved.digest == busybox_image.digest
    assert resolved.platform_digest == busybox_image.digest
    assert resolved.reference == f"docker.io/library/busybox:latest@{busybox_image.digest}"


def test_loopback_registry_is_plain_http(
    registry: RegistryHandle, busybox_image: standin.PushedImage
) -> None:
    resolved = _resolve(RegistryClient(RegistryConfig()), parse_image_ref(busybox_image.ref))
    assert resolved.digest == busybox_image.digest


def test_unknown_tag_is_a_clear_error(
    registry: RegistryHandle, busybox_image: standin.PushedImage
) -> None:
    with pytest.raises(RegistryError) as raised:
        _resolve(RegistryClient(), parse_image_ref(f"{registry.host}/library/busybox:nope"))
    assert "not found" in raised.value.message
    assert raised.value.hint


def test_unreachable_registry_fails_fast() -> None:
    began = time.monotonic()
    with pytest.raises(RegistryError, match="connection refused"):
        _resolve(RegistryClient(), parse_image_ref(f"127.0.0.1:{free_port()}/x/y:1"))
    assert time.monotonic() - began < 10


def _manifest_blob(registry: RegistryHandle, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    found = list(registry.data_dir.rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data"))
    assert found, "manifest blob not found in registry storage"
    return found[0]


def test_tampered_manifest_is_refused(
    registry: RegistryHandle, busybox_image: standin.PushedImage
) -> None:
    blob = _manifest_blob(registry, busybox_image.digest)
    original = blob.read_bytes()
    try:
        blob.write_bytes(original.replace(b'"schemaVersion":2', b'"schemaVersion": 2'))
        with pytest.raises(IntegrityError, match="content is sha256:"):
            _resolve(RegistryClient(), parse_image_ref(busybox_image.ref))
    finally:
        blob.write_bytes(original)


def test_layout_resolves_by_tag(busybox_layout: standin.BuiltImage, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(busybox_layout.layout, layout)
    resolved = _resolve(RegistryClient(), LayoutRef(layout, "latest"))
    assert resolved.digest == busybox_layout.digest
    with pytest.raises(NotFoundError) as raised:
        _resolve(RegistryClient(), LayoutRef(layout, "other"))
    assert raised.value.hint == "tags in it: latest"
    manifest = layout / "blobs" / "sha256" / busybox_layout.digest.removeprefix("sha256:")
    manifest.chmod(0o644)
    manifest.write_bytes(manifest.read_bytes() + b" ")
    with pytest.raises(IntegrityError, match="does not match"):
        _resolve(RegistryClient(), LayoutRef(layout, "latest"))


def test_lock_then_offline_plan(
    registry: RegistryHandle,
    busybox_image: standin.PushedImage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project = tmp_path / "agent"
    shutil.copytree(ROOT / "examples" / "minimal-agent", project)
    spec = project / "microagent.yaml"
    spec.write_text(spec.read_text().replace("python:3.13-slim", "busybox:latest"))
    monkeypatch.setenv("MICROAGENT_REGISTRY_MIRRORS", f"docker.io={registry.url}")
    monkeypatch.setenv("MICROAGENT_CONFIG", str(tmp_path / "none.yaml"))
    assert main(["lock", "-f", str(spec)]) == 0
    lock = json.loads((project / "microagent.lock").read_text())
    assert lock["images"]["busybox:latest"]["digest"] == busybox_image.digest
    monkeypatch.setenv("MICROAGENT_REGISTRY_MIRRORS", "docker.io=http://127.0.0.1:9")
    capsys.readouterr()
    assert main(["--json", "plan", "--offline", "-f", str(spec)]) == 0
    assert json.loads(capsys.readouterr().out)["image"]["digest"] == busybox_image.digest
