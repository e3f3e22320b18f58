"""The files layer: deterministic, normalised, and refusing files changed since planning."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import zstandard

from microagent.compiler import files as files_mod
from microagent.compiler.spec import FileEntry
from microagent.errors import BuildError
from microagent.layers.fileslayer import write_files_layer


def _tree(tmp_path: Path) -> files_mod.FileTree:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("print('hi')\n")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "link").symlink_to("run.sh")
    entries = (FileEntry(src=src, dst="/app", mode=None),)
    return files_mod.collect(entries)


def _members(data: bytes) -> list[tarfile.TarInfo]:
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        return tf.getmembers()


def test_layer_is_deterministic_and_normalised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    tree = _tree(tmp_path)
    first, second = io.BytesIO(), io.BytesIO()
    layer = write_files_layer(tree, first)
    assert write_files_layer(tree, second) == layer
    assert first.getvalue() == second.getvalue()
    assert layer.size == len(first.getvalue())
    members = {m.name: m for m in _members(first.getvalue())}
    assert sorted(members) == ["app", "app/link", "app/pkg", "app/pkg/mod.py", "app/run.sh"]
    assert members["app/run.sh"].mode == 0o755 and members["app/pkg/mod.py"].mode == 0o644
    assert members["app/link"].issym() and members["app/link"].linkname == "run.sh"
    assert {(m.uid, m.gid, m.mtime, m.uname) for m in members.values()} == {(0, 0, 0, "")}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert write_files_layer(tree, io.BytesIO()).digest != layer.digest


def test_a_file_changed_since_planning_is_refused(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    (tmp_path / "src" / "pkg" / "mod.py").write_text("print('HI')\n")
    with pytest.raises(BuildError, match="changed while the files layer was written"):
        write_files_layer(tree, io.BytesIO())
    (tmp_path / "src" / "pkg" / "mod.py").write_text("short")
    with pytest.raises(BuildError):
        write_files_layer(tree, io.BytesIO())
