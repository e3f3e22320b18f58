"""Through the CLI: setup steps' root filesystems are derived from their parents' images, hold
the tree a flatten of their layer chain builds, and ``cache verify`` accepts them.

The fake backend boots nothing but writes each step's files into the real overlay upper of
the state disk (copying parents up from the rootfs as overlayfs does), so every step goes
through the real export, layer store and derive path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.compiler.keys import StepKind
from microagent.ext4.debugfs import check_image, run_debugfs
from microagent.ext4.rootfs import build_rootfs
from microagent.layers.apply import stored_layers
from microagent.store.content import Store
from microagent.store.records import all_records
from testenv.clitools import cli_json
from testenv.tree_kit import image_tree

pytestmark = pytest.mark.tools("mke2fs", "debugfs", "e2fsck")

WRITES = {
    "/etc/motd": "hello from a setup step\n",  # a new file in a directory of the image
    "/bin/true": "#!/bin/sh\n",  # replaces a busybox applet link of the image
    "/opt/app/deep/file.txt": "x" * 10000,  # directories the image does not have
}


def test_setup_steps_derive_their_rootfs(
    busybox_project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = busybox_project / "microagent.yaml"
    spec.write_text(
        "name: derive\nimage: oci:layout:latest\n"
        "setup:\n  - echo one\n  - echo two\n  - echo three\nentrypoint: sh\n"
    )
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"writes": WRITES}))
    monkeypatch.setenv("MICROAGENT_LAYER_DISKS", "0")  # each step gets an image of its own
    built = cli_json(capsys, "build", "-f", str(spec))
    assert built["ok"]
    store = Store(busybox_project.parent / "home" / "store")
    records = list(all_records(store))
    setup = [r for r in records if r.kind is StepKind.SETUP]
    assert len(setup) == 3
    (base,) = [r for r in records if r.kind is StepKind.BASE]
    assert base.rootfs is not None
    # derived, not flattened: each image is a copy of its parent's, UUID and all
    assert {_uuid(store.entry_path(r.rootfs or "")) for r in setup} == {
        _uuid(store.entry_path(base.rootfs))
    }
    for record in setup:
        assert record.rootfs is not None
        derived = store.entry_path(record.rootfs)
        check_image(derived, "derived rootfs")
        flat, _ = build_rootfs(
            store, "sha256:" + "f" * 64, stored_layers(store, record.layers),
            compressed_bytes=1 << 20, replace=True,
        )  # fmt: skip
        assert image_tree(derived) == image_tree(flat)
        assert "/etc/motd" in image_tree(derived)
    (store.root / "rootfs" / f"{'f' * 64}.ext4").unlink()
    verify = cli_json(capsys, "cache", "verify")
    assert verify["problems"] == []
    assert main(["--json", "cache", "verify"]) == 0


def _uuid(image: Path) -> str:
    text = run_debugfs(image, ["stats -h"]).outputs[0]
    found = re.search(r"^Filesystem UUID:\s*(\S+)", text, re.M)
    assert found is not None, text
    return found[1]
