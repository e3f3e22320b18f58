"""Delta hits as layer disks: a remote hit whose chain reaches a step this store holds with
its root (one image or a stack) converts only the missing layers, each into its layer disk
(in parallel), and the hit's root is the local root with them stacked on it — no setup VM, no
flatten, no image of its own. A stack that would be too deep takes the hit as before (derived,
else the packed image or a flatten). Fake backend (``setupBoots`` counts the VMs a create
booted); each setup step leaves a marker the restored roots are checked for."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from stacked_kit import SETUP, cli, stacked_project, write_spec

from microagent.remotecache.records import step_tag
from microagent.store.content import Store
from microagent.store.records import (
    MAX_STACK,
    RootStack,
    StepRecord,
    layer_disk_entry,
    read_record,
    root_of,
    rootfs_entry,
)
from testenv.fakeguest import root_images, rootfs_image, setup_markers

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")


@pytest.fixture
def project(busybox_project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return stacked_project(busybox_project, monkeypatch)


def record(home: Path, key: str) -> StepRecord:
    found = read_record(Store(home / "store"), key)
    assert found is not None
    return found


def published(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], project: Path,
    tmp_path: Path, *, setup: list[str], local: int,
) -> list[str]:  # fmt: skip
    """Home ``a`` builds the first ``local`` steps of ``setup``, home ``b`` gets a copy of
    its store (``b`` built them: setup layers are not byte-reproducible, so a cache's steps
    are hits over ``b``'s only when they are its own bytes), then ``a`` builds the rest and
    exports ``setup`` to the layout ``tmp_path/cache``; the setup keys."""
    a, b = tmp_path / "a", tmp_path / "b"
    built = cli(monkeypatch, capsys, a, "build", "-f", write_spec(project, setup[:local]))
    assert built["setupBoots"] == local
    shutil.copytree(a / "store", b / "store")
    spec = write_spec(project, setup)
    built = cli(monkeypatch, capsys, a, "build", "-f", spec)
    assert built["setupBoots"] == len(setup) - local
    cli(monkeypatch, capsys, a, "cache", "export", "-f", spec, str(tmp_path / "cache"))
    return [s["key"] for s in built["steps"] if s["kind"] == "setup"]


def take(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], project: Path,
    home: Path, *, cache: Path, setup: list[str],
) -> dict[str, Any]:  # fmt: skip
    """``create`` of ``setup`` in ``home`` from the cache; no setup VM boots."""
    spec = write_spec(project, setup)
    created = cli(monkeypatch, capsys, home, "create", "-f", spec, "--name", f"ws{len(setup)}",
                  "--cache-from", f"oci:{cache}")  # fmt: skip
    assert created["setupBoots"] == 0
    assert created["remote"]["warnings"] == []
    return created


def verified_clean(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                   home: Path) -> None:  # fmt: skip
    assert cli(monkeypatch, capsys, home, "cache", "verify")["problems"] == []


def test_a_delta_hit_over_a_local_stack_stacks_the_missing_layers(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    cache, b = tmp_path / "cache", tmp_path / "b"
    keys = published(monkeypatch, capsys, project, tmp_path, setup=SETUP, local=1)
    first = record(b, keys[0])
    assert first.rootfs is None and first.stack is not None, "step 1 is a stack here"

    created = take(monkeypatch, capsys, project, b, cache=cache, setup=SETUP)
    remote = created["remote"]
    assert created["rootfsKey"] == keys[2]
    assert [(s["key"], s["from"], s["layers"]) for s in remote["stacked"]] == [
        (keys[2], keys[0], 2)
    ]
    assert (remote["derived"], remote["rootfsImages"]) == ([], 0), "no derive, no image"
    hit = record(b, keys[2])
    disks = tuple(layer_disk_entry(layer.diff_id) for layer in hit.layers[-2:])
    assert hit.rootfs is None and hit.source is not None
    assert hit.stack == RootStack(first.stack.image, (*first.stack.layers, *disks))
    store = Store(b / "store")
    assert not store.has_entry(rootfs_entry(keys[2])), "nothing flattened"
    assert not store.has_entry(rootfs_entry(keys[1]))
    middle = record(b, keys[1])
    assert middle.stack == RootStack(first.stack.image, (*first.stack.layers, disks[0]))
    assert setup_markers(root_images(b, keys[2])) == sorted(SETUP)
    verified_clean(monkeypatch, capsys, b)
    exported = cli(monkeypatch, capsys, b, "cache", "export", "-f", write_spec(project, SETUP),
                   str(tmp_path / "again"))  # fmt: skip
    assert step_tag(keys[2]) in exported["tags"]
    assert not [t for t in exported["tags"] if t.startswith("rootfs-")], "a restored step's"
    assert record(b, keys[2]).rootfs is None, "published as layers, not flattened"


def test_a_delta_hit_over_a_local_image_stacks_on_it(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The local ancestor's root is one image: here the base's, the only step ``b`` has."""
    cache, b = tmp_path / "cache", tmp_path / "b"
    keys = published(monkeypatch, capsys, project, tmp_path, setup=SETUP, local=0)
    base = record(b, str(record(tmp_path / "a", keys[0]).parent))
    assert base.rootfs is not None and base.stack is None

    created = take(monkeypatch, capsys, project, b, cache=cache, setup=SETUP)
    assert [(s["key"], s["from"], s["layers"]) for s in created["remote"]["stacked"]] == [
        (keys[2], base.key, 3)
    ]
    assert created["remote"]["rootfsImages"] == 0, "not the packed image"
    hit = record(b, keys[2])
    disks = tuple(layer_disk_entry(layer.diff_id) for layer in hit.layers[-3:])
    assert (hit.rootfs, hit.stack) == (None, RootStack(base.rootfs, disks))
    assert not any(rootfs_image(b, key).exists() for key in keys)
    assert setup_markers(root_images(b, keys[2])) == sorted(SETUP)
    verified_clean(monkeypatch, capsys, b)
    again = cli(monkeypatch, capsys, b, "create", "-f", write_spec(project, SETUP),
                "--name", "again")  # fmt: skip
    assert again["setupBoots"] == 0 and again["rootfsKey"] == keys[2], "a local hit now"


def test_a_stack_that_would_be_too_deep_takes_the_hit_as_before(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    long = [f"echo {i} > /w{i}" for i in range(MAX_STACK + 1)]
    cache, b = tmp_path / "cache", tmp_path / "b"
    local = MAX_STACK - 1
    keys = published(monkeypatch, capsys, project, tmp_path, setup=long, local=local)
    below = record(b, keys[local - 1]).stack
    assert below is not None and len(below.layers) == local

    created = take(monkeypatch, capsys, project, b, cache=cache, setup=long)
    remote = created["remote"]
    assert remote["stacked"] == [], f"{local} + 2 layer disks is too deep"
    assert (remote["rootfsImages"], remote["derived"]) == (1, []), "the packed image, as before"
    hit = record(b, keys[-1])
    assert hit.stack is None and hit.rootfs == rootfs_entry(keys[-1])
    assert root_of(Store(b / "store"), hit) is not None
    assert setup_markers(rootfs_image(b, keys[-1])) == sorted(long)
    verified_clean(monkeypatch, capsys, b)
