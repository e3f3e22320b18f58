"""Through the CLI: a setup step's root is its parent's root with the step's own layer disk
stacked on it, and every reader of a workspace's root follows the stack.

The fake backend boots nothing but writes each step's files into the real overlay upper of
the state disk, copying parents up from whichever disk of the stack holds them as overlayfs
does, so every step goes through the real export, layer store and layer-disk build.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from microagent.compiler.keys import SetupInputs, StepKind
from microagent.ext4 import overlay
from microagent.ext4.debugfs import check_image
from microagent.ext4.mkfs import make_state_disk
from microagent.runtime.fake import setup_marker
from microagent.store.content import Store
from microagent.store.records import (
    MAX_STACK,
    StepRecord,
    all_records,
    layer_disk_entry,
    read_record,
    root_of,
    rootfs_entry,
)
from microagent.workspace.records import Workspace
from testenv.clitools import cli_json

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")

WRITES = {"/etc/motd": "hello from a setup step\n", "/opt/app/deep/file.txt": "x" * 10000}


def _spec(project: Path, steps: int, extra: str = "") -> Path:
    lines = "".join(f"  - echo step{i}\n" for i in range(1, steps + 1))
    spec = project / "microagent.yaml"
    spec.write_text(
        f"name: layered\nimage: oci:layout:latest\nsetup:\n{lines}entrypoint: sh\n{extra}"
    )
    return spec


def _workspace(project: Path, name: str) -> Workspace:
    return Workspace(project.parent / "home" / "workspaces" / name)


def _setup_records(store: Store, built: dict[str, object]) -> list[StepRecord]:
    """The setup steps' records in the plan's order."""
    steps = built["steps"]
    assert isinstance(steps, list)
    keys = [s["key"] for s in steps if s["kind"] == "setup"]
    records = [read_record(store, key) for key in keys]
    assert all(r is not None for r in records)
    return [r for r in records if r is not None]


def _marks(store: Store, records: list[StepRecord]) -> list[str]:
    """Where each step's fake boot left its mark (see docs/cli.md, MICROAGENT_FAKE)."""
    return [setup_marker(SetupInputs.of(r.inputs).argv)[0] for r in records]


@pytest.fixture
def store(busybox_project: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"writes": WRITES}))
    return Store(busybox_project.parent / "home" / "store")


def test_each_step_stacks_its_own_layer_disk(
    busybox_project: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    built = cli_json(capsys, "build", "-f", str(_spec(busybox_project, 3)))
    (base,) = [r for r in all_records(store) if r.kind is StepKind.BASE]
    setup = _setup_records(store, built)
    for depth, record in enumerate(setup, start=1):
        assert record.rootfs is None, "a stacked step has no image of its own"
        assert not store.has_entry(rootfs_entry(record.key))
        assert record.stack is not None
        assert record.stack.image == base.rootfs
        disks = [layer_disk_entry(layer.diff_id) for layer in record.layers[-depth:]]
        assert list(record.stack.layers) == disks
        for name in disks:
            check_image(store.entry_path(name), "layer disk")
    top = root_of(store, setup[-1])
    assert top is not None and len(top.layers) == 3
    empty = busybox_project / "empty.ext4"
    make_state_disk(empty, 64)
    # every step's boot saw the steps before it: their marks are all in the stacked root
    for mark in _marks(store, setup):
        assert overlay.exists(empty, top.top_first, mark)
    assert overlay.read_bytes(empty, top.top_first, "/etc/motd") == WRITES["/etc/motd"].encode()
    assert overlay.exists(empty, top.top_first, "/bin/busybox")  # from the base image


def test_a_workspace_boots_and_copies_through_the_stack(
    busybox_project: Path, store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    made = cli_json(capsys, "create", "-f", str(_spec(busybox_project, 2)))
    layers = made["rootfsLayers"]
    assert len(layers) == 2 and all(Path(p).is_file() for p in layers)
    out = tmp_path / "motd"
    cli_json(capsys, "cp", "layered:/etc/motd", str(out))
    assert out.read_text() == WRITES["/etc/motd"]
    src = tmp_path / "note.txt"
    src.write_text("from the host\n")
    cli_json(capsys, "cp", str(src), "layered:/opt/app/deep/note.txt")
    cli_json(capsys, "start", "layered")
    cli_json(capsys, "wait", "layered")
    booted = _workspace(busybox_project, "layered").run.read_boot().config.disks
    assert [(str(d.path), d.readonly) for d in booted[-2:]] == [(p, True) for p in layers]
    back = tmp_path / "back.txt"
    cli_json(capsys, "cp", "layered:/opt/app/deep/note.txt", str(back))
    assert back.read_text() == "from the host\n"
    # prune keeps what a workspace boots from; the layer disks stay usable afterwards
    cli_json(capsys, "cache", "prune", "--all", "-y")
    assert all(Path(p).is_file() for p in layers)
    cli_json(capsys, "start", "layered")
    cli_json(capsys, "wait", "layered")


def test_a_chain_deeper_than_the_stack_merges_into_one_image(
    busybox_project: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    built = cli_json(capsys, "build", "-f", str(_spec(busybox_project, MAX_STACK + 2)))
    setup = _setup_records(store, built)
    depths = [len(r.stack.layers) if r.stack else 0 for r in setup]
    assert depths == [*range(1, MAX_STACK + 1), 0, 1]
    merged = setup[MAX_STACK]
    assert merged.rootfs == rootfs_entry(merged.key) and store.has_entry(merged.rootfs)
    last = setup[-1].stack
    assert last is not None and last.image == merged.rootfs
    empty = busybox_project / "empty.ext4"
    make_state_disk(empty, 64)
    top = root_of(store, setup[-1])
    assert top is not None
    for mark in _marks(store, setup):
        assert overlay.exists(empty, top.top_first, mark)


def test_a_workspace_whose_disks_leave_no_room_gets_one_image(
    busybox_project: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    images = busybox_project / "images"
    images.mkdir()
    for i in range(15):  # 15 disks + 3 layer disks > 16: the root must be one image
        subprocess.run(["mke2fs", "-q", "-t", "ext4", str(images / f"d{i}.ext4"), "2M"], check=True)
    disks = "".join(
        f"  - {{name: d{i}, path: images/d{i}.ext4, mountpoint: /d{i}}}\n" for i in range(15)
    )
    made = cli_json(capsys, "create", "-f", str(_spec(busybox_project, 3, "disks:\n" + disks)))
    assert made["rootfsLayers"] == []
    record = read_record(store, made["rootfsKey"])
    assert record is not None and record.stack is not None  # the stack is kept beside
    assert record.rootfs == rootfs_entry(record.key)
    assert made["rootfs"] == str(store.entry_path(record.rootfs))
    cli_json(capsys, "start", "layered")
    cli_json(capsys, "wait", "layered")
    booted = _workspace(busybox_project, "layered").run.read_boot().config.disks
    assert len(booted) == 3 + 15 and not any(d.serial.startswith("layer-") for d in booted)


def test_image_rm_refuses_the_bottom_of_a_workspaces_stack(
    busybox_project: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    made = cli_json(capsys, "create", "-f", str(_spec(busybox_project, 1)))
    (base,) = [r for r in all_records(store) if r.kind is StepKind.BASE]
    assert base.rootfs is not None and made["rootfs"] == str(store.entry_path(base.rootfs))
    refused = cli_json(capsys, "image", "rm", "-y", base.key, code=None)
    assert refused["error"]["kind"] == "conflict", refused
    assert "of a workspace" in refused["error"]["message"]
    assert store.has_entry(base.rootfs)
    cli_json(capsys, "delete", "-y", "layered")
    assert cli_json(capsys, "image", "rm", "-y", base.key)["ok"]
    assert not store.has_entry(base.rootfs)


@pytest.mark.parametrize(
    "stack",
    [
        {"image": "rootfs/../../../etc/passwd", "layers": []},
        {"image": "IMAGE", "layers": ["layerdisks/../../x.ext4"]},
        {"image": "IMAGE", "layers": ["LAYER"] * (MAX_STACK + 1)},
        {"image": "IMAGE", "layers": "LAYER"},
    ],
    ids=["image-outside", "disk-outside", "too-deep", "not-a-list"],
)
def test_a_tampered_stack_is_a_miss_never_a_path(
    busybox_project: Path, store: Store, capsys: pytest.CaptureFixture[str], stack: dict[str, Any]
) -> None:
    spec = str(_spec(busybox_project, 1))
    (record,) = _setup_records(store, cli_json(capsys, "build", "-f", spec))
    assert record.stack is not None
    raw = json.loads(store.key_path(record.key).read_text())
    image, layer = record.stack.image, record.stack.layers[0]
    text = json.dumps(stack).replace("IMAGE", image).replace("LAYER", layer)
    raw["rootStack"] = json.loads(text)
    store.key_path(record.key).write_text(json.dumps(raw))
    assert read_record(store, record.key) is None  # refused when read: a miss
    again = cli_json(capsys, "build", "-f", spec)
    assert again["setupBoots"] == 1  # built again, from its parent
    rebuilt = read_record(store, record.key)
    assert rebuilt is not None and rebuilt.stack is not None
    assert rebuilt.stack.image == image and len(rebuilt.stack.layers) == 1
    assert root_of(store, rebuilt) is not None


@pytest.mark.parametrize("damaged", ["top layer disk", "bottom image"])
def test_a_root_image_repaired_away_comes_back_and_the_workspace_keeps_its_disk(
    damaged: str,
    busybox_project: Path,
    store: Store,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """``cache verify --repair`` removes a damaged image even when a workspace boots from it;
    ``start`` then says which and how to get it back without losing the workspace's disk, and
    ``build`` of the spec puts it back at the same path (from the cached layers, no VM)."""
    spec = str(_spec(busybox_project, 2))
    made = cli_json(capsys, "create", "-f", spec)
    src = tmp_path / "work.txt"
    src.write_text("the agent's work\n")
    cli_json(capsys, "cp", str(src), "layered:/tmp/work.txt")
    image = Path(made["rootfsLayers"][-1] if damaged == "top layer disk" else made["rootfs"])
    with image.open("r+b") as disk:  # its superblock overwritten
        disk.seek(1024)
        disk.write(b"\xff" * 1024)
    cli_json(capsys, "cache", "verify", "--repair", "-y", code=None)
    assert not image.exists()
    refused = cli_json(capsys, "start", "layered", code=None)["error"]
    assert refused["kind"] == "not_found" and str(image) in refused["message"]
    assert f"microagent build -f {spec}" in refused["hint"]
    rebuilt = cli_json(capsys, "build", "-f", spec)
    assert rebuilt["setupBoots"] == 0, "put back from the cached layers, not built again"
    assert image.is_file()
    cli_json(capsys, "start", "layered")
    cli_json(capsys, "wait", "layered")
    back = tmp_path / "back.txt"
    cli_json(capsys, "cp", "layered:/tmp/work.txt", str(back))
    assert back.read_text() == "the agent's work\n"
