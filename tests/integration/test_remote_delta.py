"""Delta hits (``remotecache/delta.py``) through a real local OCI registry: machine A builds a
spec of two setup steps and pushes it; machine B built the first step itself, so A's second
step is a remote hit B derives from its own image of the first step plus the second step's
layer — no rootfs image downloaded, the same tree as a flatten, ``cache verify`` clean.

A hostile or odd second layer, republished by a pusher under the same step tag with a record
naming it: a diff_id that does not match, or a path escape, is refused and nothing is recorded;
a layer the derive does not take (not of the exporter's shape) falls back to the image.
Fake VM backend (setup steps leave a marker file, see ``testenv.fakeguest``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import zstandard

from microagent.compiler.refs import parse_image_ref
from microagent.ext4.rootfs import build_rootfs
from microagent.layers.apply import stored_layers
from microagent.oci.endpoints import RegistryConfig
from microagent.oci.registry import RegistryClient
from microagent.remotecache.records import STEP_ANNOTATION, step_tag
from microagent.store.content import Store
from microagent.store.records import read_record
from testenv.clitools import TwoHomes
from testenv.fakeguest import rootfs_image, setup_markers
from testenv.faultproxy import FaultProxy
from testenv.registry import RegistryHandle
from testenv.tree_kit import image_tree

pytestmark = pytest.mark.integration

SETUP = ["mkdir -p /workspace", "echo two > /workspace/two"]
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"


class Homes(TwoHomes):
    def write_spec(self, setup: list[str]) -> None:
        (self.project / "microagent.yaml").write_text(
            f"name: ws\nimage: oci:layout:latest\nsetup: {json.dumps(setup)}\nentrypoint: echo hi\n"
        )


@pytest.fixture
def homes(
    busybox_project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Homes:
    monkeypatch.delenv("MICROAGENT_CACHE_FROM", raising=False)
    monkeypatch.delenv("MICROAGENT_CACHE_ROOTFS", raising=False)
    monkeypatch.setenv("MICROAGENT_LAYER_DISKS", "0")  # derives (stacked delta hits: unit/remote)
    return Homes(tmp_path / "a", tmp_path / "b", busybox_project, monkeypatch, capsys)


def _repo(registry: RegistryHandle, request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[-60:]
    return f"{registry.host}/team/{name}"


def _publish_and_take_first_step_on_b(homes: Homes, repo: str) -> tuple[str, str]:
    """A pushes both steps; B takes the first one (yesterday's chain) as a remote hit, so its
    image is there. The two setup keys."""
    homes.write_spec(SETUP)
    built = homes.cli(homes.a, "build", "-f", homes.spec, "--push", repo)
    keys = [s["key"] for s in built["steps"] if s["kind"] == "setup"]
    homes.write_spec(SETUP[:1])
    first = homes.cli(homes.b, "build", "-f", homes.spec, "--cache-from", repo)
    assert (first["setupBoots"], first["rootfsKey"]) == (0, keys[0])
    homes.write_spec(SETUP)
    return keys[0], keys[1]


def _blob_gets(proxy: FaultProxy) -> list[str]:
    """Digests of the blobs downloaded through ``proxy`` (GET .../blobs/sha256:...)."""
    return ["sha256:" + s.path.split("/blobs/sha256:")[1][:64]
            for s in proxy.seen("/blobs/sha256:", "GET")]  # fmt: skip


def _flattened_tree(home: Path, key: str, tmp_path: Path) -> dict[str, tuple[object, ...]]:
    """The tree a flatten of ``key``'s layer chain (as ``home`` recorded it) gives."""
    store = Store(home / "store")
    record = read_record(store, key)
    assert record is not None
    reference = Store(tmp_path / "reference")
    for layer in record.layers:
        reference.put_blob_file(store.blob_path(layer.digest), layer.digest)
    path, _ = build_rootfs(
        reference, key, stored_layers(reference, record.layers), compressed_bytes=1 << 20
    )
    return image_tree(path)


def test_delta_hit_fetches_only_the_missing_layer_and_derives(
    homes: Homes,
    registry: RegistryHandle,
    fault_proxy: FaultProxy,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    repo = _repo(registry, request)
    first, second = _publish_and_take_first_step_on_b(homes, repo)
    published = read_record(Store(homes.a / "store"), second)
    assert published is not None and published.packed is not None
    layer = published.layers[-1]
    assert layer.size <= published.packed.blob_size / 2, "the rule holds"

    via = repo.replace(registry.host, fault_proxy.host)  # to see every request B makes
    created = homes.cli(homes.b, "create", "-f", homes.spec, "--cache-from", via)
    remote = created["remote"]
    assert (created["setupBoots"], created["rootfsKey"]) == (0, second)
    assert remote["steps"] == [{"key": second, "kind": "setup", "where": via}]
    assert [(d["key"], d["from"], d["layers"]) for d in remote["derived"]] == [(second, first, 1)]
    assert remote["rootfsImages"] == 0 and remote["warnings"] == []
    assert (remote["blobsFetched"], remote["bytesFetched"]) == (1, layer.size)
    assert _blob_gets(fault_proxy) == [layer.digest], "only the second step's layer"

    image = rootfs_image(homes.b, second)
    assert setup_markers(image) == sorted(SETUP)
    assert image_tree(image) == _flattened_tree(homes.b, second, tmp_path)
    hexes = {p.name.removesuffix(".ext4") for p in (homes.b / "store" / "rootfs").glob("*.ext4")}
    assert hexes == {first[7:], second[7:]}, "no intermediate image left"
    record = read_record(Store(homes.b / "store"), second)
    assert record is not None and record.packed is None and record.source == via

    verified = homes.cli(homes.b, "cache", "verify")
    assert verified["problems"] == [], verified
    homes.cli(homes.b, "start", "ws")
    assert homes.wait_stopped(homes.b, "ws", timeout=30) == "stopped"


def _tar(members: list[tuple[str, bytes, bytes]]) -> bytes:
    """An uncompressed tar of (name, type, content) members, fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, content in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, 0o755 if kind == tarfile.DIRTYPE else 0o644, 0
            info.size = len(content) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(content) if info.size else None)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _republish_second_layer(
    repo: str, key: str, plain: bytes, *, diff_id: str, tmp_path: Path
) -> None:
    """What a pusher can do: the step's manifest again, its record naming another last layer
    (the key is of the inputs, which stay; the rootfs image stays named too)."""
    client = RegistryClient(RegistryConfig())
    ref = parse_image_ref(repo)
    blob = zstandard.ZstdCompressor().compress(plain)
    path = tmp_path / "hostile.tar.zst"
    path.write_bytes(blob)
    client.push_blob(ref, _sha(blob), len(blob), path)
    doc = json.loads(client.manifest(ref, step_tag(key)).data)
    record = json.loads(doc["annotations"][STEP_ANNOTATION])
    record["layers"][-1] = {"mediaType": ZSTD_LAYER, "digest": _sha(blob), "size": len(blob),
                            "diffId": diff_id}  # fmt: skip
    doc["layers"][-1] = {"mediaType": ZSTD_LAYER, "digest": _sha(blob), "size": len(blob)}
    doc["annotations"][STEP_ANNOTATION] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    client.push_manifest(ref, step_tag(key), data, doc["mediaType"])


def _nothing_recorded(home: Path, key: str) -> None:
    hexd = key.removeprefix("sha256:")
    assert not (home / "store" / "keys" / f"{hexd}.json").exists()
    assert not (home / "store" / "rootfs" / f"{hexd}.ext4").exists()


ESCAPE = [
    ("a", tarfile.DIRTYPE, b""),
    ("a/..", tarfile.DIRTYPE, b""),  # names the derive's shape check takes as directories
    ("a/../..", tarfile.DIRTYPE, b""),
    ("a/../../escaped", tarfile.REGTYPE, b"out\n"),
]


@pytest.mark.parametrize("case", ["diff-id", "escape"])
def test_a_hostile_layer_in_the_delta_path_is_refused(
    case: str,
    homes: Homes,
    registry: RegistryHandle,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    repo = _repo(registry, request)
    _first, second = _publish_and_take_first_step_on_b(homes, repo)
    honest = _tar([("etc", tarfile.DIRTYPE, b""), ("etc/added", tarfile.REGTYPE, b"x\n")])
    plain = honest if case == "diff-id" else _tar(ESCAPE)
    diff_id = _sha(b"something else") if case == "diff-id" else _sha(plain)
    _republish_second_layer(repo, second, plain, diff_id=diff_id, tmp_path=tmp_path)

    failed = homes.cli(homes.b, "create", "-f", homes.spec, "--cache-from", repo, code=1)
    error = failed["error"]
    assert error["kind"] == "integrity" and repo in error["message"], error
    want = "diff_id" if case == "diff-id" else "'..' component"
    assert want in error["message"], error
    _nothing_recorded(homes.b, second)
    assert not (homes.b / "workspaces" / "ws").exists()
    assert not list(tmp_path.rglob("escaped"))
    verified = homes.cli(homes.b, "cache", "verify")
    assert verified["problems"] == [], verified


def test_a_layer_the_derive_does_not_take_falls_back_to_the_image(
    homes: Homes, registry: RegistryHandle, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    repo = _repo(registry, request)
    first, second = _publish_and_take_first_step_on_b(homes, repo)
    odd = _tar([("etc/added", tarfile.REGTYPE, b"x\n")])  # no entry for its directory first
    _republish_second_layer(repo, second, odd, diff_id=_sha(odd), tmp_path=tmp_path)

    created = homes.cli(homes.b, "create", "-f", homes.spec, "--cache-from", repo)
    remote = created["remote"]
    assert (created["setupBoots"], remote["rootfsImages"], remote["derived"]) == (0, 1, [])
    assert remote["warnings"] == [], "not derivable is no warning"
    assert setup_markers(rootfs_image(homes.b, second)) == sorted(SETUP)
    assert {p.name for p in (homes.b / "store" / "rootfs").glob("*.ext4")} == {
        f"{first[7:]}.ext4",
        f"{second[7:]}.ext4",
    }
    verified = homes.cli(homes.b, "cache", "verify")
    assert verified["problems"] == [], verified


def test_a_hit_on_other_layers_of_a_parent_built_here_is_a_miss_not_an_error(
    homes: Homes, registry: RegistryHandle, request: pytest.FixtureRequest
) -> None:
    """Setup steps are not byte-reproducible: B's own build of the first step has other
    layers than A's. A's second step then neither derives from B's image (another tree) nor
    fails the create: it is built here, with a warning, and B's records stay consistent."""
    repo = _repo(registry, request)
    homes.write_spec(SETUP)
    built = homes.cli(homes.a, "build", "-f", homes.spec, "--push", repo)
    first, second = (s["key"] for s in built["steps"] if s["kind"] == "setup")
    homes.write_spec(SETUP[:1])
    homes.monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"writes": {"/etc/b-only": "b\n"}}))
    assert homes.cli(homes.b, "build", "-f", homes.spec)["rootfsKey"] == first
    homes.monkeypatch.delenv("MICROAGENT_FAKE")
    homes.write_spec(SETUP)

    created = homes.cli(homes.b, "create", "-f", homes.spec, "--cache-from", repo)
    assert (created["setupBoots"], created["rootfsKey"]) == (1, second)
    assert created["remote"]["steps"] == [] and created["remote"]["derived"] == []
    assert any("built on other layers" in w for w in created["remote"]["warnings"])
    store = Store(homes.b / "store")
    mine, theirs = read_record(store, first), read_record(Store(homes.a / "store"), first)
    assert mine is not None and theirs is not None and mine.layers != theirs.layers
    record = read_record(store, second)
    assert record is not None and record.source is None and record.layers[:-1] == mine.layers
    assert homes.cli(homes.b, "cache", "verify")["problems"] == []


def test_two_missing_steps_are_derived_in_order_through_a_temporary_image(
    homes: Homes, registry: RegistryHandle, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    repo = _repo(registry, request)
    three = [*SETUP, "echo three > /workspace/two"]  # overwrites the second step's file
    homes.write_spec(three)
    built = homes.cli(homes.a, "build", "-f", homes.spec, "--push", repo)
    first, second, third = (s["key"] for s in built["steps"] if s["kind"] == "setup")
    homes.write_spec(SETUP[:1])
    homes.cli(homes.b, "build", "-f", homes.spec, "--cache-from", repo)
    homes.write_spec(three)

    created = homes.cli(homes.b, "create", "-f", homes.spec, "--cache-from", repo)
    remote = created["remote"]
    assert (created["setupBoots"], remote["rootfsImages"], remote["blobsFetched"]) == (0, 0, 2)
    assert [(d["key"], d["from"], d["layers"]) for d in remote["derived"]] == [(third, first, 2)]
    image = rootfs_image(homes.b, third)
    assert image_tree(image) == _flattened_tree(homes.b, third, tmp_path)
    assert setup_markers(image) == sorted(three)
    store = Store(homes.b / "store")
    assert not store.entry_path(f"rootfs/{second[7:]}.ext4").exists(), "temporary"
    middle = read_record(store, second)
    assert middle is not None and middle.source == repo, "recorded without its image"
    assert homes.cli(homes.b, "cache", "verify")["problems"] == []
