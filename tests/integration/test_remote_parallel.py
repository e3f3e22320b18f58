"""The parallel restore of a remote hit through a real registry and a fault proxy: layers are
downloaded by a pool while the flatten decodes each in a thread of its own (the next one
ahead), and a setup step's rootfs image is downloaded, decoded and written by three threads.
A layer or image that arrives damaged while the others are still in flight is an integrity
error that stores nothing of the hit; the same command without the fault then restores it.
(Fake VM backend: a setup step leaves a marker file holding its command in its layer.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from microagent.store.content import Store
from microagent.store.records import read_record, rootfs_entry
from testenv.fakeguest import rootfs_image, setup_markers
from testenv.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

SETUP = [
    "mkdir -p /workspace",
    "echo one > /workspace/one",
    "echo two > /workspace/two",
    "echo three > /workspace/three",
]


def _cli(
    capsys: pytest.CaptureFixture[str], home: Path, *args: str, code: int = 0
) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MICROAGENT_HOME", str(home))
        capsys.readouterr()
        got = main(["--json", *args])
    out = capsys.readouterr()
    assert got == code, out.out + out.err
    result: dict[str, Any] = json.loads(out.out)
    return result


@pytest.fixture
def pushed(
    busybox_project: Path,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> tuple[str, str, list[dict[str, Any]]]:
    """Machine A built and pushed the spec: ``(spec, repository via the proxy, layers)``."""
    spec = busybox_project / "microagent.yaml"
    spec.write_text(
        "name: ws\nimage: oci:layout:latest\n"
        f"setup: {json.dumps(SETUP)}\nentrypoint: cat /etc/hostname\n"
    )
    repo = f"{fault_proxy.host}/team/parallel"
    built = _cli(capsys, tmp_path / "a", "build", "-f", str(spec), "--push", repo)
    record = read_record(Store(tmp_path / "a" / "store"), built["rootfsKey"])
    assert record is not None and len(record.layers) == 1 + len(SETUP)
    layers = [{"digest": layer.digest, "size": layer.size} for layer in record.layers]
    return str(spec), repo, layers


def _nothing_of_the_hit(home: Path, key: str) -> None:
    store = Store(home / "store")
    assert read_record(store, key) is None
    assert not store.has_entry(rootfs_entry(key))
    assert not (home / "workspaces" / "ws").exists()
    leftovers = [p for p in (home / "store").rglob("*") if p.name.startswith(".tmp")]
    assert leftovers == [], "no half-written file stays"


@pytest.fixture
def layer_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """No rootfs images: a hit flattens its layers (decoded in threads, the next ahead)."""
    monkeypatch.setenv("MICROAGENT_CACHE_ROOTFS", "0")


@pytest.mark.usefixtures("layer_path")
@pytest.mark.parametrize("which", [1, -1], ids=["early-layer", "last-layer"])
def test_a_layer_damaged_in_flight_stores_nothing_and_a_clean_retry_restores_it(
    pushed: tuple[str, str, list[dict[str, Any]]],
    fault_proxy: FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    which: int,
) -> None:
    spec, repo, layers = pushed
    damaged = layers[which]["digest"]
    fault_proxy.inject(Fault.corrupt(at=layers[which]["size"] // 2), f"/blobs/{damaged}",
                       times=None)  # fmt: skip
    home = tmp_path / "b"
    failed = _cli(capsys, home, "create", "-f", spec, "--cache-from", repo, code=1)
    assert failed["error"]["kind"] == "integrity", failed
    assert damaged[:19] in failed["error"]["message"] and repo in failed["error"]["message"]
    key = _cli(capsys, tmp_path / "a", "plan", "-f", spec)["steps"][len(SETUP)]["key"]
    _nothing_of_the_hit(home, key)

    fault_proxy.clear()
    created = _cli(capsys, home, "create", "-f", spec, "--cache-from", repo)
    assert (created["setupBoots"], created["rootfsKey"]) == (0, key)
    assert created["remote"]["rootfsImages"] == 0
    assert setup_markers(rootfs_image(home, key)) == sorted(SETUP)


def test_a_rootfs_image_damaged_in_flight_stores_nothing(
    pushed: tuple[str, str, list[dict[str, Any]]],
    fault_proxy: FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec, repo, _layers = pushed
    key = _cli(capsys, tmp_path / "a", "plan", "-f", spec)["steps"][len(SETUP)]["key"]
    record = read_record(Store(tmp_path / "a" / "store"), key)
    assert record is not None and record.packed is not None
    blob = record.packed.blob
    fault_proxy.inject(Fault.corrupt(at=record.packed.blob_size // 2), f"/blobs/{blob}",
                       times=None)  # fmt: skip
    home = tmp_path / "b"
    failed = _cli(capsys, home, "create", "-f", spec, "--cache-from", repo, code=1)
    assert failed["error"]["kind"] == "integrity", failed
    assert "rootfs image" in failed["error"]["message"]
    _nothing_of_the_hit(home, key)

    fault_proxy.clear()
    created = _cli(capsys, home, "create", "-f", spec, "--cache-from", repo)
    assert (created["setupBoots"], created["remote"]["rootfsImages"]) == (0, 1)
    assert setup_markers(rootfs_image(home, key)) == sorted(SETUP)
