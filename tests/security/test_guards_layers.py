"""A whiteout naming ``..`` is refused, never applied.

``.wh.<name>`` in a layer deletes ``<name>`` from the layers below; ``.wh...`` names ``..``.
Applied, a one-entry layer holding it deletes everything in the directory *above* the stage
(a whiteout removes whole directories), and ``a/.wh...`` the stage's own content. The layer
applier refuses both as an invalid whiteout name (``.wh..`` names ``.``, another case).
Pinned at the layer API with a sentinel beside the stage, and through the CLI with an image
whose layer holds the entry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from microagent.errors import IntegrityError
from microagent.layers.apply import LayerSource, flatten
from testenv.clitools import cli_json
from testenv.oci import MEDIA_LAYER, ImageConfig, Layer, LayoutWriter


def tar_of(*entries: tuple[str, bytes | None]) -> bytes:
    """A tar of regular files (``bytes``) and directories (``None``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path below ``root`` with its content (``None`` for a directory)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def arena(tmp_path: Path) -> tuple[Path, Path]:
    """``outer/stage`` and, beside the stage in ``outer``, files a layer must never reach."""
    outer = tmp_path / "outer"
    (outer / "sentinel").mkdir(parents=True)
    (outer / "sentinel" / "secret").write_bytes(b"do not touch")
    (outer / "keep.txt").write_bytes(b"beside the stage")
    return outer, outer / "stage"


def source(name: str, data: bytes) -> LayerSource:
    return LayerSource(name, lambda: io.BytesIO(data))


def apply(stage: Path, *layers: bytes) -> None:
    flatten(stage, [source(f"#{i}", data) for i, data in enumerate(layers)])


@pytest.mark.parametrize(
    "name", [".wh...", "./.wh...", "/.wh...", "a/.wh...", "a/b/.wh..."], ids=str
)
def test_a_whiteout_of_dotdot_is_refused(arena: tuple[Path, Path], name: str) -> None:
    outer, stage = arena
    lower = tar_of(("a", None), ("a/b", None), ("a/b/f", b"lower"), ("top", b"lower"))
    before = {k: v for k, v in tree(outer).items() if not k.startswith("stage")}
    with pytest.raises(IntegrityError) as caught:
        apply(stage, lower, tar_of((name, b"")))
    assert caught.value.message == f"layer #1: entry {name!r}: whiteout of an invalid name"
    assert {k: v for k, v in tree(outer).items() if not k.startswith("stage")} == before
    assert tree(stage) == {"a": None, "a/b": None, "a/b/f": b"lower", "top": b"lower"}


def test_a_one_entry_layer_whiting_out_dotdot_is_refused(arena: tuple[Path, Path]) -> None:
    outer, stage = arena
    with pytest.raises(IntegrityError, match=r"entry '\.wh\.\.\.': whiteout of an invalid name"):
        apply(stage, tar_of((".wh...", b"")))
    assert tree(outer) == {
        "keep.txt": b"beside the stage",
        "sentinel": None,
        "sentinel/secret": b"do not touch",
        "stage": None,
    }


def test_names_that_only_start_like_dotdot_are_ordinary_whiteouts(
    arena: tuple[Path, Path],
) -> None:
    """``.wh....`` whites out ``...``, a legal name: the guard is for ``..`` exactly."""
    _, stage = arena
    apply(stage, tar_of(("...", b"dots"), ("..x", b"x"), ("k", b"k")), tar_of((".wh....", b"")))
    assert tree(stage) == {"..x": b"x", "k": b"k"}


# -- through the CLI: an image whose layer holds the entry -----------------------------------


def whiteout_image(layout: Path) -> None:
    """An OCI layout ``layout:latest``: one ordinary layer, then one holding ``.wh...``."""
    writer = LayoutWriter(layout)
    layers = []
    for plain in (tar_of(("etc", None), ("etc/hostname", b"img\n")), tar_of((".wh...", b""))):
        packed = gzip.compress(plain, mtime=0)
        layers.append(
            Layer(
                writer.add_bytes(packed, MEDIA_LAYER), "sha256:" + hashlib.sha256(plain).hexdigest()
            )
        )
    writer.add_image("latest", layers, ImageConfig(cmd=["/bin/sh"]))


def test_build_refuses_an_image_with_a_dotdot_whiteout(
    fake_backend: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("MICROAGENT_HOME", str(home))
    project = tmp_path / "proj"
    project.mkdir()
    whiteout_image(project / "layout")
    spec = project / "microagent.yaml"
    spec.write_text("name: ws\nimage: oci:layout:latest\nentrypoint: 'true'\n")
    failed = cli_json(capsys, "build", "-f", str(spec), code=1)
    assert failed["error"]["kind"] == "integrity"
    assert "entry '.wh...': whiteout of an invalid name" in failed["error"]["message"]
    assert cli_json(capsys, "plan", "-f", str(spec))["steps"][0]["cached"] is False
