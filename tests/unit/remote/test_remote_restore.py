"""Restoring from a layout cache with the fake backend: broken chains, pruned root
filesystems, and layout folders that are extended rather than overwritten. The fake guest
writes a marker per setup step (and any ``writes``), so the layers restored and flattened here
carry real content, checked at the end of each path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from microagent.errors import InvalidInputError
from testenv.fakeguest import read_file, rootfs_image, setup_markers, step_layer_files

SETUP = ["mkdir -p /w", "touch /w/x"]


@pytest.fixture
def project(busybox_project: Path) -> Path:
    proj = busybox_project
    (proj / "note.txt").write_text("hello\n")
    (proj / "microagent.yaml").write_text(
        f"name: ws\nimage: oci:layout:latest\nsetup: {json.dumps(SETUP)}\n"
        "files: [{src: note.txt, dst: /app/note.txt}]\nentrypoint: cat /app/note.txt\n"
    )
    return proj


def cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    home: Path,
    *args: str,
    code: int = 0,
) -> dict[str, Any]:
    monkeypatch.setenv("MICROAGENT_HOME", str(home))
    capsys.readouterr()
    got = main(["--json", *args])
    out = capsys.readouterr().out
    assert got == code, out
    return json.loads(out)


def _drop_tag(layout: Path, key: str) -> None:
    index = json.loads((layout / "index.json").read_text())
    tag = "step-" + key.removeprefix("sha256:")
    kept = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] != tag
    ]
    assert len(kept) == len(index["manifests"]) - 1
    index["manifests"] = kept
    (layout / "index.json").write_text(json.dumps(index))


def test_a_published_step_without_its_parent_is_a_miss(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec, cache = str(project / "microagent.yaml"), tmp_path / "cache"
    exported = cli(monkeypatch, capsys, tmp_path / "a", "cache", "export", "-f", spec, str(cache))
    plan = cli(monkeypatch, capsys, tmp_path / "a", "plan", "-f", spec)
    keys = [s["key"] for s in plan["steps"]]
    assert all(s["cached"] for s in plan["steps"]), "build records files and config steps too"
    assert len(exported["tags"]) == 7  # 5 steps, the rootfs image, latest
    _drop_tag(cache, keys[1])
    created = cli(
        monkeypatch, capsys, tmp_path / "b", "create", "-f", spec, "--cache-from", f"oci:{cache}"
    )
    assert "not its parent" in created["remote"]["warnings"][0]
    assert [s["kind"] for s in created["remote"]["steps"]] == ["base"]
    assert created["setupBoots"] == 2


def test_pruned_rootfs_is_rebuilt_from_stored_layers_without_a_vm(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec, cache, home = str(project / "microagent.yaml"), tmp_path / "cache", tmp_path / "b"
    cli(monkeypatch, capsys, tmp_path / "a", "cache", "export", "-f", spec, str(cache))
    first = cli(monkeypatch, capsys, home, "create", "-f", spec, "--cache-from", f"oci:{cache}")
    assert first["setupBoots"] == 0
    keys = json.loads((home / "store" / "keys" / (first["rootfsKey"][7:] + ".json")).read_text())
    assert keys["source"] == f"oci:{cache}"
    intermediate = first["steps"][1]["key"][7:]
    assert (home / "store" / "keys" / f"{intermediate}.json").is_file()
    assert not (home / "store" / "rootfs" / f"{intermediate}.ext4").exists()
    (home / "store" / "rootfs" / (first["rootfsKey"][7:] + ".ext4")).unlink()
    again = cli(monkeypatch, capsys, home, "create", "-f", spec, "--name", "ws2")
    assert (again["setupBoots"], again["rootfsKey"]) == (0, first["rootfsKey"])
    assert setup_markers(rootfs_image(home, again["rootfsKey"])) == sorted(SETUP)


def test_layout_folders_are_extended_and_foreign_folders_refused(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec, cache = str(project / "microagent.yaml"), tmp_path / "cache"
    cli(monkeypatch, capsys, tmp_path / "a", "cache", "export", "-f", spec, str(cache))
    cli(
        monkeypatch,
        capsys,
        tmp_path / "a",
        "cache",
        "export",
        "-f",
        spec,
        "--tag",
        "v2",
        str(cache),
    )
    index = json.loads((cache / "index.json").read_text())
    names = {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}
    assert {"latest", "v2"} <= names and len(names) == 8
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    failed = cli(
        monkeypatch, capsys, tmp_path / "a", "cache", "export", "-f", spec, str(foreign), code=2
    )
    assert "not an OCI image layout" in failed["error"]["message"]
    assert InvalidInputError.kind == failed["error"]["kind"]
    empty = cli(
        monkeypatch, capsys, tmp_path / "a", "cache", "import", str(project / "layout"), code=2
    )
    assert "no published steps" in empty["error"]["message"]


def test_plan_text_marks_remote_hits_and_other_platforms_need_hits(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from microagent import api
    from microagent.build.pipeline import _require_buildable
    from microagent.compiler.plan import compile_plan
    from microagent.errors import BuildError
    from microagent.oci.registry import RegistryClient
    from microagent.oci.resolve import resolve_image
    from microagent.store.content import Store

    spec, cache = str(project / "microagent.yaml"), tmp_path / "cache"
    cli(monkeypatch, capsys, tmp_path / "a", "cache", "export", "-f", spec, str(cache))
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "b"))
    capsys.readouterr()
    assert main(["plan", "-f", spec, "--cache-from", f"oci:{cache}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["STEP", "KEY", "STATUS", "WHAT", "WHY"]
    assert lines[-1] == "5 steps: 5 in a remote cache"
    lines = lines[3:-1]
    assert [line.split()[2] for line in lines] == ["REMOTE"] * 5
    assert all(line.endswith(f"oci:{cache}") for line in lines)

    loaded = api.load(spec)
    plan = compile_plan(loaded, resolve_image(loaded, RegistryClient))
    store = Store(tmp_path / "b" / "store")
    with pytest.raises(BuildError, match="cannot run on this"):
        _require_buildable(store, plan, "linux/riscv64")
    _require_buildable(store, plan, plan.image.platform)


def test_a_missing_rootfs_image_blob_falls_back_to_flattening(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec, cache = str(project / "microagent.yaml"), tmp_path / "cache"
    cli(monkeypatch, capsys, tmp_path / "a", "cache", "export", "-f", spec, str(cache))
    index = json.loads((cache / "index.json").read_text())
    rootfs = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"].startswith("rootfs-")
    )
    manifest = json.loads((cache / "blobs" / "sha256" / rootfs["digest"][7:]).read_text())
    (cache / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]).unlink()
    created = cli(
        monkeypatch, capsys, tmp_path / "b", "create", "-f", spec, "--cache-from", f"oci:{cache}"
    )
    assert (created["setupBoots"], created["remote"]["rootfsImages"]) == (0, 0)
    assert "flattening" in created["remote"]["warnings"][0]
    assert setup_markers(rootfs_image(tmp_path / "b", created["rootfsKey"])) == sorted(SETUP)


def test_setup_layers_carry_what_the_steps_wrote_through_export_restore_and_flatten(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each setup step's layer holds what its command wrote; a restore that takes the built
    image and one that flattens the restored layers give the same files, and a workspace
    made from them reads them back through its overlay."""
    spec, cache = str(project / "microagent.yaml"), tmp_path / "cache"
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"writes": {"/w/data.txt": "payload\n"}}))
    cli(monkeypatch, capsys, tmp_path / "a", "cache", "export", "-f", spec, str(cache))
    plan = cli(monkeypatch, capsys, tmp_path / "a", "plan", "-f", spec)
    setup_keys = [s["key"] for s in plan["steps"] if s["kind"] == "setup"]
    for key, command in zip(setup_keys, SETUP, strict=True):
        files = step_layer_files(tmp_path / "a", key)
        markers = [name for name in files if name.startswith("etc/microagent-fake-setup/")]
        assert len(markers) == 1 and files[markers[0]].decode().endswith(f"'{command}'\n")
        assert files["w/data.txt"] == b"payload\n"
        assert set(files) == {markers[0], "w/data.txt"}, "a layer holds its own step's writes"

    monkeypatch.delenv("MICROAGENT_FAKE")
    taken = cli(monkeypatch, capsys, tmp_path / "b", "create", "-f", spec, "--cache-from",
                f"oci:{cache}")  # fmt: skip
    monkeypatch.setenv("MICROAGENT_CACHE_ROOTFS", "0")
    flattened = cli(monkeypatch, capsys, tmp_path / "c", "create", "-f", spec, "--cache-from",
                    f"oci:{cache}")  # fmt: skip
    assert (taken["remote"]["rootfsImages"], flattened["remote"]["rootfsImages"]) == (1, 0)
    assert taken["setupBoots"] == flattened["setupBoots"] == 0
    for home in (tmp_path / "b", tmp_path / "c"):
        image = rootfs_image(home, taken["rootfsKey"])
        assert setup_markers(image) == sorted(SETUP)
        assert read_file(image, "/w/data.txt") == b"payload\n"
    copied = tmp_path / "data.txt"
    cli(monkeypatch, capsys, tmp_path / "c", "cp", "ws:/w/data.txt", str(copied))
    assert copied.read_bytes() == b"payload\n"
