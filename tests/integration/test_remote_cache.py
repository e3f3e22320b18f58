"""Remote build cache through a real local OCI registry: two machines (two MICROAGENT_HOMEs),
the fake VM backend (a setup step "runs" instantly, counts a boot, and leaves a marker file
holding its command in its layer, so what was pushed, restored and flattened is checked by
content)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.build.base import pull_base
from microagent.compiler.refs import parse_image_ref
from microagent.errors import RegistryError
from microagent.oci.endpoints import RegistryConfig
from microagent.oci.registry import RegistryClient
from microagent.remotecache.records import rootfs_tag, step_tag
from microagent.runner import run as run_tool
from microagent.store.content import Store
from testenv.clitools import TwoHomes
from testenv.fakeguest import root_images, setup_markers, step_layer_files
from testenv.prereq import require_tools
from testenv.registry import RegistryHandle, start_registry

pytestmark = pytest.mark.integration

SECRET = "sk-remote-secret-7731"
SPEC_ENV_VALUE = "spec-only-value-5521"
SETUP = ["mkdir -p /workspace", "echo one > /workspace/one", "echo two > /workspace/two"]


class Machines(TwoHomes):
    """Two homes on one host, and the project both check out (its spec has a file, an env
    value and outputs besides the setup)."""

    def write_spec(self, setup: list[str]) -> None:
        (self.project / "microagent.yaml").write_text(
            "name: ws\n"
            "image: oci:layout:latest\n"
            f"setup: {json.dumps(setup)}\n"
            "files: [{src: note.txt, dst: /app/note.txt}]\n"
            f"env: {{LOG_LEVEL: {SPEC_ENV_VALUE}}}\n"
            "entrypoint: cat /app/note.txt\n"
            "outputs: [{name: result, path: /workspace/result.json}]\n"
        )


@pytest.fixture
def machines(
    busybox_project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Machines:
    project = busybox_project
    (project / "note.txt").write_text("hello\n")
    found = Machines(tmp_path / "a", tmp_path / "b", project, monkeypatch, capsys)
    found.write_spec(SETUP)
    return found


def _repo(registry: RegistryHandle, request: pytest.FixtureRequest) -> str:
    name = request.node.name.lower().replace("_", "-").strip("-")[:60]
    return f"{registry.host}/team/{name}"


def _blob_data(registry: RegistryHandle, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return next(registry.data_dir.rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data"))


def _client(registry: RegistryHandle) -> RegistryClient:
    return RegistryClient(RegistryConfig())


def test_machine_b_creates_from_machine_a_push_without_setup_boots(
    machines: Machines, registry: RegistryHandle, request: pytest.FixtureRequest
) -> None:
    repo = _repo(registry, request)
    built = machines.cli(machines.a, "build", "-f", machines.spec, "--push", f"{repo}:v1",
                         "-e", f"API_KEY={SECRET}")  # fmt: skip
    assert built["setupBoots"] == 3
    pushed = built["published"][0]
    assert pushed["tags"][-1] == "v1" and len(pushed["tags"]) == 8  # 6 steps, rootfs, image

    planned = machines.cli(machines.b, "plan", "-f", machines.spec, "--cache-from", repo,
                           "-e", "API_KEY=x")  # fmt: skip
    assert [s["where"] for s in planned["steps"]] == [repo] * 6
    assert all(s["cached"] for s in planned["steps"])

    created = machines.cli(machines.b, "create", "-f", machines.spec, "--cache-from", repo,
                           "-e", "API_KEY=another-value")  # fmt: skip
    assert created["setupBoots"] == 0 and created["stepsBuilt"] == 0
    assert created["rootfsKey"] == built["rootfsKey"]
    assert created["remote"]["steps"] == [
        {"key": built["rootfsKey"], "kind": "setup", "where": repo}
    ]
    assert created["remote"]["rootfsImages"] == 1, "the built image is taken, not re-flattened"
    store_b = machines.b / "store"
    base_key = built["steps"][0]["key"].removeprefix("sha256:")
    assert not (store_b / "rootfs" / f"{base_key}.ext4").exists(), "base rootfs is not needed"

    assert setup_markers(root_images(machines.b, created["rootfsKey"])) == sorted(SETUP)
    machines.cli(machines.b, "start", "ws")
    assert machines.wait_stopped(machines.b, "ws", timeout=20) == "stopped"

    again = machines.cli(machines.b, "create", "-f", machines.spec, "--name", "ws2")
    assert (again["setupBoots"], again["rootfsKey"]) == (0, built["rootfsKey"])
    local = machines.cli(machines.b, "plan", "-f", machines.spec)
    assert local["steps"][3]["where"] == "local"


def test_changed_setup_step_rebuilds_from_that_step_only(
    machines: Machines, registry: RegistryHandle, request: pytest.FixtureRequest
) -> None:
    repo = _repo(registry, request)
    machines.cli(machines.a, "build", "-f", machines.spec, "--push", repo)
    machines.write_spec([SETUP[0], "echo changed > /workspace/one", SETUP[2]])
    machines.monkeypatch.setenv("MICROAGENT_CACHE_ROOTFS", "0")  # the flatten path

    planned = machines.cli(machines.b, "plan", "-f", machines.spec, "--cache-from", repo)
    marks = [(s["kind"], s["cached"], s["where"]) for s in planned["steps"]]
    assert marks[:4] == [
        ("base", True, repo),
        ("setup", True, repo),
        ("setup", False, None),
        ("setup", False, None),
    ]
    created = machines.cli(machines.b, "create", "-f", machines.spec, "--cache-from", repo)
    assert (created["setupBoots"], created["stepsBuilt"], created["stepsCached"]) == (2, 2, 1)
    assert [s["kind"] for s in created["remote"]["steps"]] == ["setup"]
    assert created["remote"]["rootfsImages"] == 0
    assert created["remote"]["steps"][0]["key"] == planned["steps"][1]["key"]
    restored = step_layer_files(machines.b, planned["steps"][1]["key"])
    assert [v.decode() for v in restored.values()] == [f"/bin/sh -eu -c '{SETUP[0]}'\n"]
    changed = [SETUP[0], "echo changed > /workspace/one", SETUP[2]]
    assert setup_markers(root_images(machines.b, created["rootfsKey"])) == sorted(changed)


def test_push_is_idempotent_and_a_normal_oci_image(
    machines: Machines, registry: RegistryHandle, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    require_tools("skopeo")
    repo = _repo(registry, request)
    first = machines.cli(machines.a, "build", "-f", machines.spec, "--push", repo)
    again = machines.cli(machines.a, "build", "-f", machines.spec, "--push", repo)
    assert first["published"][0]["blobsUploaded"] > 0
    assert again["published"][0]["blobsUploaded"] == 0
    assert again["published"][0]["blobsSkipped"] == first["published"][0]["blobsUploaded"]

    raw = run_tool(["skopeo", "inspect", "--tls-verify=false", f"docker://{repo}:latest"])
    info = json.loads(raw.stdout)
    labels = info["Labels"]
    assert json.loads(labels["io.microagent.outputs"]) == [
        {"name": "result", "path": "/workspace/result.json"}
    ]
    assert labels["io.microagent.env-keys"] == "LOG_LEVEL"
    assert len(info["Layers"]) == 5  # busybox + 3 setup + files
    copy = tmp_path / "copy"
    run_tool(["skopeo", "copy", "--src-tls-verify=false", f"docker://{repo}:latest",
              f"oci:{copy}:x"])  # fmt: skip
    base = pull_base(Store(tmp_path / "c"), f"oci:{copy}:x")
    listing = run_tool(["debugfs", "-R", "ls /app", str(base.rootfs)]).stdout
    assert "note.txt" in listing, "the files layer is part of the image"
    assert setup_markers(base.rootfs) == sorted(SETUP), "and so are the setup layers"


def test_nothing_pushed_contains_env_values(
    machines: Machines, registry: RegistryHandle, request: pytest.FixtureRequest
) -> None:
    repo = _repo(registry, request)
    machines.cli(machines.a, "build", "-f", machines.spec, "--push", repo, "-e",
                 f"API_KEY={SECRET}", "--cache-to", f"{repo}-cache")  # fmt: skip
    machines.cli(machines.b, "create", "-f", machines.spec, "--cache-from", repo,
                 "--cache-to", f"{repo}-dev", "-e", f"API_KEY={SECRET}")  # fmt: skip
    image = _client(registry).manifest(parse_image_ref(repo), "latest")
    image_config = _blob_data(registry, json.loads(image.data)["config"]["digest"])
    assert f"LOG_LEVEL={SPEC_ENV_VALUE}".encode() in image_config.read_bytes(), "the image's Env"
    checked = 0
    for path in registry.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data, path
            if SPEC_ENV_VALUE.encode() in data:  # only in an image config's Env
                doc = json.loads(data)
                assert f"LOG_LEVEL={SPEC_ENV_VALUE}" in doc["config"].pop("Env"), path
                assert SPEC_ENV_VALUE not in json.dumps(doc), path
            checked += 1
    assert checked > 10
    planned = machines.cli(machines.b, "plan", "-f", machines.spec, "-e", "API_KEY=x")
    config_key = planned["steps"][-1]["key"]
    config = _client(registry).manifest(parse_image_ref(f"{repo}-dev"), step_tag(config_key))
    assert b"API_KEY" in config.data, "env names are published, values are not"


@pytest.fixture
def own_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryHandle]:
    """A registry of its own: tampering with shared blobs would break other tests."""
    require_tools("docker-registry")
    handle = start_registry(tmp_path_factory.mktemp("own-registry"))
    try:
        yield handle
    finally:
        handle.stop()


def _store_is_clean(home: Path, key: str) -> None:
    hexd = key.removeprefix("sha256:")
    assert not (home / "store" / "keys" / f"{hexd}.json").exists()
    assert not (home / "store" / "rootfs" / f"{hexd}.ext4").exists()
    assert not (home / "workspaces" / "ws").exists()


def test_tampered_layer_is_refused_and_nothing_is_stored(
    machines: Machines, own_registry: RegistryHandle
) -> None:
    repo = f"{own_registry.host}/team/tamper"
    built = machines.cli(machines.a, "build", "-f", machines.spec, "--push", repo)
    manifest = _client(own_registry).manifest(parse_image_ref(repo), step_tag(built["rootfsKey"]))
    layer = json.loads(manifest.data)["layers"][-1]
    data = _blob_data(own_registry, layer["digest"])
    original = data.read_bytes()
    data.write_bytes(original[:-8] + bytes(8 * [0x41]))

    failed = machines.cli(machines.b, "create", "-f", machines.spec, "--cache-from", repo, code=1)
    error = failed["error"]
    assert error["kind"] == "integrity"
    assert "corrupt" in error["message"] and repo in error["message"]
    assert "digest mismatch" in error["message"]
    _store_is_clean(machines.b, built["rootfsKey"])
    assert not list((machines.b / "store").glob(f"blobs/sha256/{layer['digest'][7:]}"))

    data.write_bytes(original)
    image = _client(own_registry).manifest(parse_image_ref(repo), rootfs_tag(built["rootfsKey"]))
    blob = _blob_data(own_registry, json.loads(image.data)["layers"][0]["digest"])
    packed = blob.read_bytes()
    blob.write_bytes(packed[:100] + bytes(a ^ 1 for a in packed[100:110]) + packed[110:])
    failed = machines.cli(machines.b, "create", "-f", machines.spec, "--cache-from", repo, code=1)
    assert failed["error"]["kind"] == "integrity"
    assert "rootfs image" in failed["error"]["message"] and repo in failed["error"]["message"]
    _store_is_clean(machines.b, built["rootfsKey"])


def test_tampered_or_relabelled_manifest_is_refused(
    machines: Machines, own_registry: RegistryHandle
) -> None:
    repo = f"{own_registry.host}/team/relabel"
    built = machines.cli(machines.a, "build", "-f", machines.spec, "--push", repo)
    client = _client(own_registry)
    image = parse_image_ref(repo)
    keys = [s["key"] for s in built["steps"]]
    # Poisoning by relabelling: step 1's (valid) manifest pushed under step 3's tag.
    first = client.manifest(image, step_tag(keys[1]))
    client.push_manifest(image, step_tag(keys[3]), first.data, first.media_type)
    failed = machines.cli(machines.b, "create", "-f", machines.spec, "--cache-from", repo, code=1)
    assert failed["error"]["kind"] == "integrity"
    assert "the record is for" in failed["error"]["message"]
    _store_is_clean(machines.b, keys[3])

    # Bytes changed in the registry's storage: the content no longer matches its digest.
    second = client.manifest(image, step_tag(keys[2]))
    path = _blob_data(own_registry, second.digest)
    content = path.read_bytes()
    assert b"echo one" in content
    path.write_bytes(content.replace(b"echo one", b"echo ONE"))
    machines.write_spec(SETUP[:2])
    failed = machines.cli(machines.b, "create", "-f", machines.spec, "--cache-from", repo, code=1)
    assert failed["error"]["kind"] == "integrity"
    assert "header says" in failed["error"]["message"]
    _store_is_clean(machines.b, keys[2])


def test_unreachable_cache_is_a_warning_and_builds_locally(machines: Machines) -> None:
    created = machines.cli(machines.b, "create", "-f", machines.spec,
                           "--cache-from", "127.0.0.1:9/none")  # fmt: skip
    assert created["setupBoots"] == 3
    assert "not usable" in created["remote"]["warnings"][0]


def test_export_import_round_trip_and_layout_as_base(machines: Machines, tmp_path: Path) -> None:
    carried = tmp_path / "usb" / "cache"
    exported = machines.cli(machines.a, "cache", "export", "-f", machines.spec, str(carried))
    assert "latest" in exported["tags"]
    imported = machines.cli(machines.b, "cache", "import", str(carried))
    assert len(imported["restored"]) == 5 and len(imported["skipped"]) == 1
    created = machines.cli(machines.b, "create", "-f", machines.spec)
    assert created["setupBoots"] == 0
    assert setup_markers(root_images(machines.b, created["rootfsKey"])) == sorted(SETUP)

    third = tmp_path / "c"
    via_layout = machines.cli(third, "create", "-f", machines.spec, "--cache-from",
                              f"oci:{carried}")  # fmt: skip
    assert (via_layout["setupBoots"], via_layout["rootfsKey"]) == (0, created["rootfsKey"])

    base = pull_base(Store(tmp_path / "d"), f"oci:{carried}:latest")
    assert "note.txt" in run_tool(["debugfs", "-R", "ls /app", str(base.rootfs)]).stdout
    key = created["rootfsKey"]
    again = machines.cli(machines.a, "cache", "export", key[7:19], str(tmp_path / "by-key"))
    assert again["tags"][-1] == "latest" and len(again["tags"]) == 6


def test_blob_push_chunked_monolithic_and_refused(registry: RegistryHandle, tmp_path: Path) -> None:
    client = _client(registry)
    image = parse_image_ref(f"{registry.host}/team/push-modes")
    data = os.urandom(3 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert client.push_blob(image, digest, len(data), path, chunk_size=1 << 20)
    assert client.blob_exists(image, digest)
    assert not client.push_blob(image, digest, len(data), path), "HEAD first, skip"
    with client.blob(image, digest) as stream:
        assert stream.read() == data
    small = tmp_path / "small"
    small.write_bytes(b"small blob")
    small_digest = "sha256:" + hashlib.sha256(b"small blob").hexdigest()
    assert client.push_blob(image, small_digest, 10, small)
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    with pytest.raises(RegistryError, match="HTTP 400"):
        client.push_blob(image, wrong, 10, small)
    assert not client.blob_exists(image, wrong)
