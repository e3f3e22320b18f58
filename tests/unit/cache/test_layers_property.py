"""Property: whatever sequence of entries a layer holds, nothing is written outside the stage."""

from __future__ import annotations

import io
import os
import stat
import tempfile
from pathlib import Path

from cache_tarkit import E, chardev, dir_, fifo, file, hard, snapshot, sym, tar_bytes
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from microagent.errors import IntegrityError
from microagent.layers.apply import LayerSource, flatten
from microagent.layers.stagemeta import StageMetadata

ABS = "@ABS@"  # the sentinel's absolute path
# Weighted towards names that apply, so sequences get far enough to interact.
GOOD = ["a", "b", "lnk", "x y"]
COMPONENTS = [*GOOD * 6, ".", "", ".wh.a", ".wh.lnk", ".wh..wh..opq", ".."]
PREFIXES = [*[""] * 8, "/", "./", "../", f"{ABS}/"]
TARGETS = ["..", "../..", "../sentinel", ABS, f"{ABS}/secret", "/", "a", "b", "a/b", "lnk/a"]

names = st.builds(
    lambda pre, parts: pre + "/".join(parts),
    st.sampled_from(PREFIXES),
    st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4),
)
targets = st.sampled_from(TARGETS) | names
entries = st.one_of(
    st.builds(file, names),
    st.builds(dir_, names),
    st.builds(file, names),
    st.builds(dir_, names),
    st.builds(sym, names, targets),
    st.builds(hard, names, targets),
    st.builds(fifo, names),
    st.builds(chardev, names),
)
layer_lists = st.lists(st.lists(entries, max_size=6), min_size=1, max_size=3)


def _resolve(e: E, sentinel: Path) -> E:
    fixed = {k: getattr(e, k).replace(ABS, str(sentinel)) for k in ("name", "target")}
    return E(**{**e.__dict__, **fixed})


def _stage_matches_metadata(stage: Path, meta: StageMetadata) -> None:
    on_disk = {"/"}
    for dirpath, dirnames, files in os.walk(stage):
        for name in [*dirnames, *files]:
            path = Path(dirpath, name)
            assert not name.startswith(".wh."), path
            mode = path.lstat().st_mode
            assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)), path
            on_disk.add("/" + str(path.relative_to(stage)))
    recorded = {p for p, m in meta if not m.kind.is_device}
    assert on_disk == recorded


@settings(
    max_examples=int(os.environ.get("LAYER_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(layer_lists)
def test_no_layer_writes_outside_the_stage(layers: list[list[E]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stage, sentinel = root / "stage", root / "sentinel"
        (sentinel / "a").mkdir(parents=True)
        (sentinel / "secret").write_text("keep")
        before = snapshot(root, exclude=[stage])
        blobs = [tar_bytes([_resolve(e, sentinel) for e in ents]) for ents in layers]
        sources = [LayerSource(str(i), lambda d=d: io.BytesIO(d)) for i, d in enumerate(blobs)]
        try:
            meta = flatten(stage, sources)
            event("applied")
        except IntegrityError:
            meta = None
            event("refused")
        assert snapshot(root, exclude=[stage]) == before
        if meta is not None:
            _stage_matches_metadata(stage, meta)
