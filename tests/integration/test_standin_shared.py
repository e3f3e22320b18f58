"""The system-wide stand-in cache (scripts/testenv/sharedcache.py): root fills it once, a normal
user copies from it and treats it as hostile input (digests, sizes, owners, modes, symlinks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.errors import BuildError
from testenv import sharedcache, standin
from testenv.oci import canonical_json
from testenv.registry import RegistryHandle

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "scripts" / "testenv" / "standin.py"
NOBODY = 65534
TRUSTED = {0, os.getuid()}
LIMITS = sharedcache.Limits()


@pytest.fixture
def shared(tmp_path: Path, busybox_layout: standin.BuiltImage) -> Path:
    """A shared cache holding the busybox stand-in, sealed as root's install step leaves it."""
    root = tmp_path / "shared"
    shutil.copytree(busybox_layout.layout, root / "layouts" / busybox_layout.recipe.cache_name)
    sharedcache.seal(root)
    return root


def entry_of(shared: Path, image: standin.BuiltImage) -> Path:
    return sharedcache.entry(shared, image.recipe.cache_name)


def copy(
    shared: Path,
    image: standin.BuiltImage,
    dest: Path | None,
    limits: sharedcache.Limits = LIMITS,
) -> str:
    return sharedcache.copy_verified(
        entry_of(shared, image),
        dest,
        tag=image.recipe.tag,
        key=image.recipe.key,
        trusted_uids=TRUSTED,
        limits=limits,
    )


def layer_path(shared: Path, image: standin.BuiltImage) -> Path:
    layers: list[dict[str, str]] = image.manifest()["layers"]  # type: ignore[assignment]
    return entry_of(shared, image) / "blobs" / "sha256" / layers[0]["digest"][7:]


def refused(
    shared: Path,
    image: standin.BuiltImage,
    tmp_path: Path,
    limits: sharedcache.Limits = LIMITS,
) -> str:
    with pytest.raises(BuildError) as info:
        copy(shared, image, tmp_path / "copy", limits)
    assert str(entry_of(shared, image)) in info.value.message
    assert "sudo bash scripts/bootstrap.sh" in (info.value.hint or "")
    return info.value.message


def test_a_verified_copy_is_the_same_image_and_pushes(
    shared: Path,
    busybox_layout: standin.BuiltImage,
    tmp_path: Path,
    registry: RegistryHandle,
) -> None:
    dest = tmp_path / "copy"
    digest = copy(shared, busybox_layout, dest)
    assert digest == busybox_layout.digest
    blobs = sorted(p.name for p in (dest / "blobs" / "sha256").iterdir())
    assert len(blobs) == 3  # manifest, config, one layer: nothing else is copied
    for name in blobs:
        original = busybox_layout.layout / "blobs" / "sha256" / name
        assert (dest / "blobs" / "sha256" / name).read_bytes() == original.read_bytes()
    copied = standin.BuiltImage(busybox_layout.recipe, dest, digest, cached=False, seconds=0)
    assert standin.push(copied, registry.host).digest == busybox_layout.digest


def test_checking_without_a_destination_writes_nothing(
    shared: Path, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    assert copy(shared, busybox_layout, None) == busybox_layout.digest
    assert not (tmp_path / "copy").exists()


def test_a_tampered_layer_is_refused(
    shared: Path, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    layer = layer_path(shared, busybox_layout)
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    layer.write_bytes(bytes(data))
    assert "does not match its digest" in refused(shared, busybox_layout, tmp_path)


def test_a_blob_longer_than_its_descriptor_is_refused(
    shared: Path, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    with layer_path(shared, busybox_layout).open("ab") as handle:
        handle.write(b"\0" * 4096)
    assert "more than" in refused(shared, busybox_layout, tmp_path)


def test_an_image_over_the_size_bound_is_refused_before_copying(
    shared: Path, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    message = refused(shared, busybox_layout, tmp_path, limits=sharedcache.Limits(total_bytes=4096))
    assert "at most 4096" in message
    assert not list((tmp_path / "copy" / "blobs" / "sha256").glob("*"))[1:]  # at most the manifest


def test_an_oversized_or_deeply_nested_index_is_refused_before_parsing(
    shared: Path, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    index = entry_of(shared, busybox_layout) / "index.json"
    index.write_bytes(b" " * (64 * 1024 + 1))
    assert "more than 65536" in refused(shared, busybox_layout, tmp_path)
    index.write_bytes(b"[" * 30000 + b"]" * 30000)
    assert "not valid JSON" in refused(shared, busybox_layout, tmp_path / "again")


def test_an_entry_for_another_recipe_key_is_refused(
    shared: Path, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    meta = entry_of(shared, busybox_layout) / standin.METADATA
    data = json.loads(meta.read_bytes())
    meta.write_bytes(canonical_json({**data, "key": "0" * 64}))
    assert "expected" in refused(shared, busybox_layout, tmp_path)


def test_a_symlinked_blob_is_refused(
    shared: Path, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    layer = layer_path(shared, busybox_layout)
    elsewhere = tmp_path / "elsewhere"
    layer.rename(elsewhere)
    layer.symlink_to(elsewhere)
    assert "cannot open" in refused(shared, busybox_layout, tmp_path)


def test_a_symlinked_entry_directory_is_refused(
    shared: Path, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    entry = entry_of(shared, busybox_layout)
    moved = tmp_path / "moved"
    entry.rename(moved)
    entry.symlink_to(moved)
    assert "symlink" in refused(shared, busybox_layout, tmp_path)


def test_files_or_directories_others_may_write_are_refused(
    shared: Path, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    layer = layer_path(shared, busybox_layout)
    layer.chmod(0o664)
    assert "writable by others" in refused(shared, busybox_layout, tmp_path)
    layer.chmod(0o644)
    (shared / "layouts").chmod(0o777)
    assert "writable by others" in refused(shared, busybox_layout, tmp_path / "again")


def test_an_entry_owned_by_an_untrusted_uid_is_refused(
    shared: Path, busybox_layout: standin.BuiltImage, tmp_path: Path
) -> None:
    with pytest.raises(BuildError, match=r"belongs to uid \d+, not root"):
        sharedcache.copy_verified(
            entry_of(shared, busybox_layout),
            tmp_path / "copy",
            tag=busybox_layout.recipe.tag,
            key=busybox_layout.recipe.key,
            trusted_uids={NOBODY - 1},
        )


# --- the CLI a normal user's demo runs ----------------------------------------------------------


@pytest.fixture
def user_dirs() -> Iterator[tuple[Path, Path]]:
    """(a shared cache root owns, an own cache the unprivileged user owns), outside pytest's
    private tmp (mode 0700, root's)."""
    shared = Path(tempfile.mkdtemp(prefix="microagent-shared-"))
    own = Path(tempfile.mkdtemp(prefix="microagent-own-"))
    shared.chmod(0o755)
    if os.getuid() == 0:
        os.chown(own, NOBODY, NOBODY)
    try:
        yield shared, own
    finally:
        shutil.rmtree(shared)
        shutil.rmtree(own)


def standin_as_user(*args: str) -> subprocess.CompletedProcess[str]:
    """``standin.py ARGS`` as an unprivileged user (nobody when the tests run as root)."""
    drop = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
    argv = [*(drop if os.getuid() == 0 else []), sys.executable, str(STANDIN), *args]
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_a_normal_user_without_the_shared_entry_is_told_the_root_command(
    user_dirs: tuple[Path, Path],
) -> None:
    shared, own = user_dirs
    proc = standin_as_user(
        "build", "--which", "python", "--cache", str(own), "--shared", str(shared)
    )
    assert proc.returncode != 0
    recipe = standin.python_recipe()
    assert str(sharedcache.entry(shared, recipe.cache_name)) in proc.stderr
    assert f"sudo bash {REPO / 'scripts' / 'bootstrap.sh'}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert standin.cached_layout(recipe, own) is None


@pytest.mark.root("the shared cache must belong to root for a normal user to trust it")
def test_a_normal_user_copies_the_python_stand_in_from_the_shared_cache(
    user_dirs: tuple[Path, Path], python_layout: standin.BuiltImage
) -> None:
    shared, own = user_dirs
    shutil.copytree(
        python_layout.layout, sharedcache.entry(shared, python_layout.recipe.cache_name)
    )
    sharedcache.seal(shared)
    proc = standin_as_user(
        "build", "--which", "python", "--cache", str(own), "--shared", str(shared)
    )
    assert proc.returncode == 0, proc.stderr
    assert python_layout.digest in proc.stdout and "python: copied in" in proc.stdout
    copied = standin.cached_layout(python_layout.recipe, own)
    assert copied is not None and copied.stat().st_uid == NOBODY
    again = standin_as_user(
        "build", "--which", "python", "--cache", str(own), "--shared", str(shared)
    )
    assert "cache hit" in again.stdout and python_layout.digest in again.stdout
