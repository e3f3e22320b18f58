"""Setup steps whose root is a stack (layer disks over an ancestor's image, no image of their
own) and the remote cache: publishing flattens the last one into an image so remote hits take
it, a pruned layer disk is rebuilt from its blob without a VM (a missing bottom image: the
chain is flattened and the record names it), and a delta hit stacks its layer disks on the
nearest local root, or (too deep) derives only from an ancestor whose root is one image.
Fake backend (``setupBoots`` counts the VMs a create booted); each setup step leaves a marker
the restored images are checked for."""

from __future__ import annotations

from pathlib import Path

import pytest
from stacked_kit import SETUP, cli, setup_records, stacked_project, write_spec

from microagent.compiler.keys import StepKind
from microagent.remotecache import restore
from microagent.remotecache.delta import find_delta
from microagent.remotecache.records import PublishedStep, rootfs_tag
from microagent.store.content import Store
from microagent.store.records import (
    MAX_STACK,
    LayerRef,
    RootStack,
    StepRecord,
    all_records,
    layer_disk_entry,
    rootfs_entry,
    write_record,
)
from testenv.fakeguest import root_images, rootfs_image, setup_markers
from testenv.registry import RegistryHandle

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")


@pytest.fixture
def project(busybox_project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return stacked_project(busybox_project, monkeypatch)


def built_stacked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], project: Path, home: Path
) -> list[StepRecord]:
    """Build the project in ``home``; its setup records, each a stack with no image."""
    built = cli(monkeypatch, capsys, home, "build", "-f", str(project / "microagent.yaml"))
    assert built["setupBoots"] == len(SETUP)
    records = setup_records(home, [s["key"] for s in built["steps"] if s["kind"] == "setup"])
    assert [(r.rootfs, r.stack is not None) for r in records] == [(None, True)] * len(SETUP)
    assert records[-1].stack is not None and len(records[-1].stack.layers) == len(SETUP)
    return records


# -- publishing ---------------------------------------------------------------------------------


def test_a_stacked_step_is_published_with_its_image_and_a_fresh_store_takes_it(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    spec, cache, a = str(project / "microagent.yaml"), tmp_path / "cache", tmp_path / "a"
    last = built_stacked(monkeypatch, capsys, project, a)[-1]
    exported = cli(monkeypatch, capsys, a, "cache", "export", "-f", spec, str(cache))
    assert rootfs_tag(last.key) in exported["tags"]
    (packed,) = setup_records(a, [last.key])
    assert packed.rootfs == rootfs_entry(last.key) and packed.packed is not None
    assert packed.stack == last.stack, "the stack is kept beside the image"
    assert rootfs_image(a, last.key).is_file()

    created = cli(monkeypatch, capsys, tmp_path / "b", "create", "-f", spec, "--cache-from",
                  f"oci:{cache}")  # fmt: skip
    remote = created["remote"]
    assert (created["setupBoots"], created["rootfsKey"]) == (0, last.key)
    assert (remote["rootfsImages"], remote["ext4Seconds"], remote["warnings"]) == (1, 0, [])
    image = rootfs_image(tmp_path / "b", last.key)
    assert image.read_bytes() == rootfs_image(a, last.key).read_bytes(), "the image, not a flatten"
    assert setup_markers(image) == sorted(SETUP)


def test_a_stacked_build_pushed_to_a_registry_carries_its_image(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], registry: RegistryHandle,
) -> None:  # fmt: skip
    """``build --cache-to`` publishes right after the build: the stacked last step goes out
    with its image, and another machine's create takes it."""
    spec, repo = str(project / "microagent.yaml"), f"{registry.host}/team/stacked"
    built = cli(monkeypatch, capsys, tmp_path / "a", "build", "-f", spec, "--cache-to", repo)
    assert built["setupBoots"] == len(SETUP)
    (record,) = setup_records(tmp_path / "a", [built["rootfsKey"]])
    assert record.stack is not None and record.packed is not None
    created = cli(monkeypatch, capsys, tmp_path / "b", "create", "-f", spec, "--cache-from", repo)
    assert (created["setupBoots"], created["remote"]["rootfsImages"]) == (0, 1)
    assert setup_markers(rootfs_image(tmp_path / "b", built["rootfsKey"])) == sorted(SETUP)


def test_without_packed_images_a_stacked_step_is_published_as_layers_only(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    spec, cache, a = str(project / "microagent.yaml"), tmp_path / "cache", tmp_path / "a"
    last = built_stacked(monkeypatch, capsys, project, a)[-1]
    monkeypatch.setenv("MICROAGENT_CACHE_ROOTFS", "0")
    exported = cli(monkeypatch, capsys, a, "cache", "export", "-f", spec, str(cache))
    assert not [t for t in exported["tags"] if t.startswith("rootfs-")]
    (record,) = setup_records(a, [last.key])
    assert (record.rootfs, record.packed) == (None, None), "nothing flattened"
    created = cli(monkeypatch, capsys, tmp_path / "b", "create", "-f", spec, "--cache-from",
                  f"oci:{cache}")  # fmt: skip
    assert (created["setupBoots"], created["remote"]["rootfsImages"]) == (0, 0)
    assert setup_markers(rootfs_image(tmp_path / "b", last.key)) == sorted(SETUP)


# -- rebuilt locally ----------------------------------------------------------------------------


def test_a_pruned_layer_disk_is_rebuilt_from_its_blob_without_a_vm(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    home = tmp_path / "a"
    last = built_stacked(monkeypatch, capsys, project, home)[-1]
    assert last.stack is not None
    store = Store(home / "store")
    top, middle = last.stack.layers[-1], last.stack.layers[-2]
    before = store.entry_path(top).read_bytes()
    assert store.remove(top) and store.remove(middle)
    created = cli(monkeypatch, capsys, home, "create", "-f", str(project / "microagent.yaml"))
    assert (created["setupBoots"], created["rootfsKey"]) == (0, last.key)
    assert store.entry_path(top).read_bytes() == before, "the same disk, from the layer's blob"
    assert store.has_entry(middle)
    (record,) = setup_records(home, [last.key])
    assert (record.rootfs, record.stack) == (None, last.stack), "still a stack"
    assert not store.has_entry(rootfs_entry(last.key)), "nothing flattened"


@pytest.mark.parametrize("base_record", ["kept", "gone"])
def test_a_stack_whose_bottom_image_is_gone_gets_it_back_else_is_flattened_and_named(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], base_record: str,
) -> None:  # fmt: skip
    """The bottom image is the base's: with the base's record it is flattened again at the
    same path and the stack stays as it was (a workspace may boot from those paths); without
    it the whole chain becomes one image, named in the step's record."""
    home = tmp_path / "a"
    last = built_stacked(monkeypatch, capsys, project, home)[-1]
    assert last.stack is not None
    store = Store(home / "store")
    assert store.remove(last.stack.image) and store.remove(last.stack.layers[-1])
    if base_record == "gone":
        (base,) = [r for r in all_records(store) if r.kind is StepKind.BASE]
        assert base.rootfs == last.stack.image
        store.key_path(base.key).unlink()
    created = cli(monkeypatch, capsys, home, "create", "-f", str(project / "microagent.yaml"))
    assert (created["setupBoots"], created["rootfsKey"]) == (0, last.key)
    (record,) = setup_records(home, [last.key])
    if base_record == "kept":
        assert (record.rootfs, record.stack) == (None, last.stack)
        assert all(store.has_entry(name) for name in last.stack.entries)
        assert not store.has_entry(rootfs_entry(last.key))
        assert setup_markers(root_images(home, last.key)) == sorted(SETUP)
    else:
        assert (record.rootfs, record.stack) == (rootfs_entry(last.key), last.stack)
        assert setup_markers(rootfs_image(home, last.key)) == sorted(SETUP)
    again = cli(monkeypatch, capsys, home, "create", "-f", str(project / "microagent.yaml"),
                "--name", "ws2")  # fmt: skip
    assert again["setupBoots"] == 0


# -- delta hits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("room", [MAX_STACK, 2], ids=["stacked", "too-deep"])
def test_a_delta_hit_over_a_local_stack_stacks_on_it_else_derives_from_the_base_image(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], room: int,
) -> None:  # fmt: skip
    """The machine published all three steps, its second one also as an image (published on
    its own first) that was pruned since, and lost the third step: the hit's chain reaches the
    second step, whose root is now its stack. The hit's layer disk is stacked on it; when that
    is deeper than a stack may be (``room``), the delta goes from the base's image."""
    monkeypatch.setattr(restore, "MAX_STACK", room)
    home, cache = tmp_path / "a", tmp_path / "cache"
    records = built_stacked(monkeypatch, capsys, project, home)
    second, third = records[1], records[2]
    cli(monkeypatch, capsys, home, "cache", "export", "-f", write_spec(project, SETUP[:2]),
        str(cache))  # fmt: skip
    spec = write_spec(project, SETUP)
    cli(monkeypatch, capsys, home, "cache", "export", "-f", spec, str(cache))
    store = Store(home / "store")
    (named,) = setup_records(home, [second.key])
    assert named.rootfs == rootfs_entry(second.key) and store.remove(named.rootfs)
    assert store.remove(rootfs_entry(third.key))
    store.key_path(third.key).unlink()
    assert second.stack is not None
    (base,) = setup_records(home, [str(records[0].parent)])
    assert base.kind is StepKind.BASE and base.rootfs == second.stack.image

    created = cli(monkeypatch, capsys, home, "create", "-f", spec, "--cache-from", f"oci:{cache}")
    remote = created["remote"]
    assert (created["setupBoots"], created["rootfsKey"]) == (0, third.key)
    assert remote["warnings"] == []
    assert not store.has_entry(rootfs_entry(second.key)), "intermediate images are temporary"
    if room == MAX_STACK:
        assert [(d["key"], d["from"], d["layers"]) for d in remote["stacked"]] == [
            (third.key, second.key, 1)
        ]
        (hit,) = setup_records(home, [third.key])
        assert (hit.rootfs, hit.stack) == (None, third.stack), "the disks it was built with"
        assert setup_markers(root_images(home, third.key)) == sorted(SETUP)
        return
    assert [(d["key"], d["from"], d["layers"]) for d in remote["derived"]] == [
        (third.key, base.key, 3)
    ]
    assert remote["stacked"] == []
    assert setup_markers(rootfs_image(home, third.key)) == sorted(SETUP)


ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def _key(n: int) -> str:
    return "sha256:" + f"{n:x}" * 64


def _layer(n: int) -> LayerRef:
    return LayerRef(ZSTD, _key(0xA0 + n)[:71], 100, _key(0xB0 + n)[:71])


def _entry(store: Store, name: str) -> None:
    def build(tmp: Path) -> None:
        tmp.write_bytes(b"ext4")

    store.build_once(name, build)


def test_find_delta_takes_only_an_ancestor_whose_root_is_one_image(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    layers = tuple(_layer(n) for n in range(1, 5))
    disks = tuple(layer_disk_entry(layer.diff_id) for layer in layers)
    write_record(store, StepRecord(StepKind.SETUP, _key(1), _key(0), {}, layers[:1],
                                   rootfs=rootfs_entry(_key(1))))  # fmt: skip
    for n in (2, 3):  # stacks over step 1's image; step 3 also names an image it lacks
        stack = RootStack(rootfs_entry(_key(1)), disks[1:n])
        rootfs = rootfs_entry(_key(3)) if n == 3 else None
        write_record(store, StepRecord(StepKind.SETUP, _key(n), _key(n - 1), {}, layers[:n],
                                       rootfs=rootfs, stack=stack))  # fmt: skip
    for name in (rootfs_entry(_key(1)), *disks[1:3]):
        _entry(store, name)
    hit = PublishedStep(_key(4), StepKind.SETUP, _key(3), {}, _key(7), layers, None, None, None)
    delta = find_delta(store, [hit])
    assert delta is not None
    assert (delta.ancestor, [k for k, _ in delta.steps]) == (_key(1), [_key(2), _key(3), _key(4)])
    assert delta.image == store.entry_path(rootfs_entry(_key(1)))
    over = find_delta(store, [hit], stacked=True)  # the nearest whole root: step 3's stack
    assert over is not None and (over.ancestor, over.stack_depth) == (_key(3), 3)
    assert over.below == RootStack(rootfs_entry(_key(1)), disks[1:3])
    assert over.stacks([disks[3]]) == ((_key(4), RootStack(rootfs_entry(_key(1)), disks[1:])),)

    _entry(store, rootfs_entry(_key(3)))  # step 3's image is there now: the nearest
    delta = find_delta(store, [hit])
    assert delta is not None and (delta.ancestor, len(delta.steps)) == (_key(3), 1)
    assert delta.image == store.entry_path(rootfs_entry(_key(3)))
    over = find_delta(store, [hit], stacked=True)  # its image is preferred to its stack
    assert over is not None and over.below == RootStack(rootfs_entry(_key(3)), ())
