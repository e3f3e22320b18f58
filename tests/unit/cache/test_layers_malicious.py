"""Malicious layers: each is refused (or handled safely) and nothing lands outside the stage.

Every case runs with a sentinel directory beside the stage (and, for absolute symlinks, the
sentinel's absolute path as the target) so that any write that escaped would show up as a
change in the snapshot of everything around the stage.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cache_tarkit import (
    E,
    blockdev,
    chardev,
    dir_,
    file,
    gzip_bytes,
    hard,
    opaque,
    sha256,
    snapshot,
    sym,
    tar_bytes,
    whiteout,
)

from microagent.digests import Digest
from microagent.errors import IntegrityError
from microagent.layers.apply import LayerSource, Limits, flatten
from microagent.layers.stagemeta import StageMetadata

SENTINEL = "@SENTINEL@"  # replaced by the absolute path of the sentinel directory


@dataclass(frozen=True)
class Case:
    layers: tuple[tuple[E, ...], ...]
    refuse: str | None  # regex the IntegrityError must match; None = must succeed safely
    limits: Limits = field(default_factory=Limits)
    check: Callable[[Path, StageMetadata], None] | None = None
    fmt: int = tarfile.PAX_FORMAT


def one(*entries: E, refuse: str | None, **kw: object) -> Case:
    return Case((entries,), refuse, **kw)  # type: ignore[arg-type]


def _no_device_on_host(stage: Path, meta: StageMetadata) -> None:
    m = meta.get("/dev/sda")
    assert m is not None and m.kind.is_device
    assert not (stage / "dev" / "sda").exists()
    assert (stage / "dev").is_dir()


def _inside(rel: str) -> Callable[[Path, StageMetadata], None]:
    def check(stage: Path, meta: StageMetadata) -> None:
        target = stage / rel.replace(SENTINEL, str(stage.parent / "sentinel")).lstrip("/")
        assert target.is_file() and not target.is_symlink()
        assert target.read_bytes() == b"data"

    return check


def _symlink_replaced(stage: Path, meta: StageMetadata) -> None:
    assert (stage / "f").is_file() and not (stage / "f").is_symlink()
    assert meta.get("/f") is not None


CASES: dict[str, Case] = {
    "dotdot-escape": one(file("../sentinel/pwned"), refuse=r"'\.\.' component"),
    "dotdot-nested": one(dir_("a"), file("a/../../sentinel/pwned"), refuse=r"'\.\.'"),
    "dotdot-dir": one(dir_("../sentinel/newdir"), refuse=r"'\.\.'"),
    "dotdot-symlink-name": one(sym("../sentinel/lnk", "/"), refuse=r"'\.\.'"),
    "absolute-name-is-rooted-in-stage": one(
        file(f"{SENTINEL}/pwned"), refuse=None, check=_inside(f"{SENTINEL}/pwned")
    ),
    "dot-slash-and-double-slash": one(file(".//./x//y"), refuse=None, check=_inside("x/y")),
    "symlink-then-write-through-it": one(
        sym("lnk", "../sentinel"), file("lnk/pwned"), refuse="parent /lnk is a symlink"
    ),
    "absolute-symlink-dir-then-write": one(
        sym("etc", SENTINEL), file("etc/pwned"), refuse="parent /etc is a symlink"
    ),
    "absolute-symlink-to-host-root": one(
        sym("r", "/"), file(f"r{SENTINEL}/pwned"), refuse="parent /r is a symlink"
    ),
    "symlink-to-dotdot-then-write": one(
        sym("up", ".."), file("up/sentinel/pwned"), refuse="is a symlink"
    ),
    "symlink-planted-in-earlier-layer": Case(
        ((sym("lib", SENTINEL),), (file("lib/pwned"),)), refuse="parent /lib is a symlink"
    ),
    "relative-symlink-planted-deep-in-earlier-layer": Case(
        ((dir_("a"), sym("a/b", "../../sentinel")), (file("a/b/c/pwned"),)),
        refuse="parent /a/b is a symlink",
    ),
    "dir-replaced-by-symlink-then-write": one(
        dir_("d"), file("d/ok"), sym("d", SENTINEL), file("d/pwned"), refuse="parent /d"
    ),
    "symlink-replaced-by-file-is-safe": one(
        sym("f", f"{SENTINEL}/secret"),
        file("f"),
        refuse=None,
        check=_symlink_replaced,
    ),
    "hardlink-to-host-etc-passwd": one(hard("pw", "/etc/passwd"), refuse="does not exist"),
    "hardlink-dotdot": one(hard("pw", "../sentinel/secret"), refuse=r"'\.\.'"),
    "hardlink-through-symlink": one(
        sym("s", SENTINEL), hard("pw", "s/secret"), refuse="parent /s is a symlink"
    ),
    "hardlink-through-earlier-layer-symlink": Case(
        ((sym("s", "../sentinel"),), (hard("pw", "./s/secret"),)), refuse="is a symlink"
    ),
    "hardlink-to-directory": one(dir_("d"), hard("h", "d"), refuse="hard link to a directory"),
    "hardlink-to-itself": one(hard("h", "h"), refuse="circular"),
    "hardlink-to-own-child": one(dir_("h"), file("h/x"), hard("h", "h/x"), refuse="circular"),
    # `.wh..` whites out ".", not ".."; `.wh...` (a whiteout of "..") is in test_guards_layers
    "whiteout-of-dot": one(dir_("a"), file("a/.wh.."), refuse="invalid name"),
    "whiteout-escaping-parent": one(file("../sentinel/.wh.secret", b""), refuse=r"'\.\.'"),
    "whiteout-through-symlink": one(
        sym("s", SENTINEL), whiteout("s/secret"), refuse="parent /s is a symlink"
    ),
    "opaque-in-symlinked-dir": one(sym("s", SENTINEL), opaque("s"), refuse="is a symlink"),
    "opaque-via-earlier-layer-symlink": Case(
        ((sym("s", "../sentinel"),), (opaque("s"),)), refuse="is a symlink"
    ),
    "whiteout-name-as-directory": one(file(".wh.x/y"), refuse="whiteout name used as a dir"),
    "char-device-recorded-not-created": one(
        chardev("dev/sda", 8, 0), refuse=None, check=_no_device_on_host
    ),
    "char-device-refused-when-disallowed": one(
        chardev("dev/sda", 8, 0), refuse="device nodes", limits=Limits(allow_devices=False)
    ),
    "block-device-refused-when-disallowed": one(
        blockdev("dev/sda"), refuse="device nodes", limits=Limits(allow_devices=False)
    ),
    "very-deep-path": one(file("a/" * 200 + "f"), refuse="deeper than 128"),
    "path-too-long": one(
        file("x" * 200 + "/" + "y" * 200 + "/z"),
        refuse="longer than 300",
        limits=Limits(max_path_bytes=300),
    ),
    "component-too-long": one(file("n" * 256), refuse="longer than 255"),
    "nul-in-pax-name": one(E("a", pax=(("path", "x\x00y"),)), refuse="NUL"),
    "nul-in-symlink-target": one(
        E("l", "symlink", target="a", pax=(("linkpath", "/\x00x"),)), refuse="symlink target"
    ),
    "newline-in-name": one(file("a\nb"), refuse="control character"),
    "too-many-entries": one(
        *(file(f"f{i}") for i in range(11)), refuse="more than 10", limits=Limits(max_entries=10)
    ),
    "too-many-bytes": one(
        file("big", b"x" * 2000), refuse="exceeds 1000 bytes", limits=Limits(max_bytes=1000)
    ),
    "file-under-a-file": one(file("f"), file("f/g"), refuse="parent /f is not a directory"),
    "negative-uid": one(file("u", uid=-1), refuse="uid -1", fmt=tarfile.GNU_FORMAT),
    "root-replaced-by-symlink": one(sym("./", SENTINEL), refuse="root can only be"),
}


def _resolve(entry: E, sentinel: Path) -> E:
    values = {k: getattr(entry, k) for k in ("name", "target")}
    fixed = {k: v.replace(SENTINEL, str(sentinel)) for k, v in values.items()}
    return E(**{**entry.__dict__, **fixed})


@pytest.fixture
def arena(tmp_path: Path) -> tuple[Path, Path]:
    """A stage and, beside it, a sentinel directory with content to protect."""
    stage, sentinel = tmp_path / "stage", tmp_path / "sentinel"
    stage.mkdir()
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "secret").write_text("do not touch")
    (sentinel / "sub" / "x").write_text("nested")
    return stage, sentinel


@pytest.mark.parametrize("name", sorted(CASES))
def test_malicious_layer(name: str, arena: tuple[Path, Path]) -> None:
    case = CASES[name]
    stage, sentinel = arena
    before = snapshot(stage.parent, exclude=[stage])
    layers = [
        LayerSource(f"#{i}", _opener(tar_bytes([_resolve(e, sentinel) for e in ents], case.fmt)))
        for i, ents in enumerate(case.layers)
    ]
    if case.refuse is None:
        meta = flatten(stage, layers, limits=case.limits)
        assert case.check is not None
        case.check(stage, meta)
    else:
        with pytest.raises(IntegrityError, match=case.refuse) as info:
            flatten(stage, layers, limits=case.limits)
        assert f"layer #{len(case.layers) - 1}: entry " in str(info.value)
    assert snapshot(stage.parent, exclude=[stage]) == before
    _assert_stage_is_clean(stage)


def _assert_stage_is_clean(stage: Path) -> None:
    for dirpath, dirnames, files in os.walk(stage):
        for name in [*dirnames, *files]:
            assert not name.startswith(".wh."), f"whiteout leaked into the stage: {name}"
            st = os.lstat(os.path.join(dirpath, name))
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode))


def _opener(data: bytes) -> Callable[[], object]:
    import io

    return lambda: io.BytesIO(data)


def test_corpus_is_large_enough() -> None:
    assert sum(c.refuse is not None for c in CASES.values()) >= 20


# -- broken streams ----------------------------------------------------------------------------


def _flatten_bytes(stage: Path, data: bytes, diff_id: Digest | None = None) -> StageMetadata:
    return flatten(stage, [LayerSource("L", _opener(data), diff_id)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d[: len(d) // 2],  # truncated tar
        lambda d: gzip_bytes(d)[:-20],  # truncated gzip
        lambda d: b"\x1f\x8b" + os.urandom(200),  # gzip magic, garbage
        lambda d: b"\x28\xb5\x2f\xfd" + os.urandom(200),  # zstd magic, garbage
        lambda d: b"",  # empty
        lambda d: b"x" * 1024,  # not a tar
    ],
)
def test_corrupt_streams_are_integrity_errors(
    mangle: Callable[[bytes], bytes], tmp_path: Path
) -> None:
    data = tar_bytes([file("a", b"x" * 5000), file("b", b"y" * 5000)])
    with pytest.raises(IntegrityError, match="layer L: corrupt or truncated"):
        _flatten_bytes(tmp_path / "stage", mangle(data))


def test_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    data = tar_bytes([file("a")])
    _flatten_bytes(tmp_path / "ok", data, Digest.parse(sha256(data)))
    _flatten_bytes(tmp_path / "gz", gzip_bytes(data), Digest.parse(sha256(data)))
    with pytest.raises(IntegrityError, match="diff_id"):
        _flatten_bytes(tmp_path / "bad", data, Digest.of_bytes(b"other"))
    with pytest.raises(IntegrityError, match="diff_id"):
        _flatten_bytes(tmp_path / "trailer", data + b"junk", Digest.parse(sha256(data)))
