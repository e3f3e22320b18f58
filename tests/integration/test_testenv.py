"""The test infrastructure itself: local registry, stand-in images, their cache."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from microagent.errors import BuildError, ToolError
from microagent.runner import run
from testenv import standin
from testenv.oci import MEDIA_CONFIG, MEDIA_LAYER, MEDIA_MANIFEST
from testenv.prereq import require_root
from testenv.registry import RegistryHandle, free_port, probe, start_registry

pytestmark = pytest.mark.integration

REGISTRY_CLI = Path(__file__).resolve().parents[2] / "scripts" / "testenv" / "registry.py"
IMAGE_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def http_get(url: str, accept: str = "") -> tuple[bytes, Message]:
    import urllib.request

    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200, url
        return resp.read(), resp.headers


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_members(image: standin.BuiltImage) -> dict[str, tarfile.TarInfo]:
    layers: list[dict[str, Any]] = image.manifest()["layers"]  # type: ignore[assignment]
    assert len(layers) == 1
    with tarfile.open(image.blob(layers[0]["digest"]), "r:gz") as tar:
        return {member.name: member for member in tar.getmembers()}


def image_config(image: standin.BuiltImage) -> dict[str, Any]:
    manifest: dict[str, Any] = image.manifest()
    config: dict[str, Any] = json.loads(image.blob(manifest["config"]["digest"]).read_bytes())
    return config


# --- registry ---------------------------------------------------------------------------------


def test_registry_answers_v2(registry: RegistryHandle) -> None:
    body, headers = http_get(f"{registry.url}/v2/")
    assert json.loads(body) == {}
    assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert registry.host == f"127.0.0.1:{registry.port}"


def test_registry_serves_pushed_manifest_and_verified_blobs(
    registry: RegistryHandle, busybox_image: standin.PushedImage
) -> None:
    base = f"{registry.url}/v2/{busybox_image.repository}"
    body, headers = http_get(f"{base}/manifests/{busybox_image.tag}", accept=MEDIA_MANIFEST)
    assert headers["Content-Type"] == MEDIA_MANIFEST
    assert headers["Docker-Content-Digest"] == busybox_image.digest == sha256(body)
    manifest = json.loads(body)
    assert manifest["mediaType"] == MEDIA_MANIFEST
    assert manifest["config"]["mediaType"] == MEDIA_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [MEDIA_LAYER]
    config_bytes, _ = http_get(f"{base}/blobs/{manifest['config']['digest']}")
    assert sha256(config_bytes) == manifest["config"]["digest"]
    diff_ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
    for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        blob, _ = http_get(f"{base}/blobs/{layer['digest']}")
        assert len(blob) == layer["size"]
        assert sha256(blob) == layer["digest"]
        assert sha256(gzip.decompress(blob)) == diff_id


def test_registry_cli_start_is_idempotent_and_stop_stops(tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "reg.pid"
    start = [sys.executable, str(REGISTRY_CLI), "start", "--data", str(tmp_path / "data")]
    start += ["--port", str(port), "--pidfile", str(pidfile)]
    stop = [sys.executable, str(REGISTRY_CLI), "stop", "--pidfile", str(pidfile)]
    try:
        first = subprocess.run(start, capture_output=True, text=True, timeout=60, check=True)
        assert f"registry listening on http://127.0.0.1:{port}" in first.stdout
        assert probe(f"127.0.0.1:{port}")
        again = subprocess.run(start, capture_output=True, text=True, timeout=60, check=True)
        assert "already answers" in again.stdout
        assert pidfile.read_text().strip() == first.stdout.split("pid ")[1].split(",")[0]
    finally:
        subprocess.run(stop, capture_output=True, text=True, timeout=60, check=True)
    assert not pidfile.exists()
    assert not probe(f"127.0.0.1:{port}")


def test_start_registry_on_a_taken_port_says_why(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ToolError, match="address already in use"):
            start_registry(tmp_path, port)


# --- busybox stand-in -------------------------------------------------------------------------


def test_busybox_rootfs_has_sh_and_basics(busybox_layout: standin.BuiltImage) -> None:
    members = layer_members(busybox_layout)
    assert members["bin/sh"].issym()
    assert members["bin/sh"].linkname == "busybox"
    busybox = members["bin/busybox"]
    assert busybox.isreg()
    assert busybox.mode & 0o777 == 0o755
    assert busybox.size == standin.BUSYBOX.stat().st_size
    assert members["tmp"].isdir()
    assert members["tmp"].mode & 0o7777 == 0o1777
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert not any(name.startswith("dev/") for name in members)
    assert image_config(busybox_layout)["config"] == {"Env": [IMAGE_PATH], "Cmd": ["sh"]}


def test_busybox_passwd_has_root(busybox_layout: standin.BuiltImage) -> None:
    layer = busybox_layout.manifest()["layers"][0]  # type: ignore[index]
    with tarfile.open(busybox_layout.blob(layer["digest"]), "r:gz") as tar:
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None
        assert passwd.read().decode().startswith("root:x:0:0:")


def test_busybox_build_is_reproducible_and_cached(
    tmp_path: Path, busybox_layout: standin.BuiltImage
) -> None:
    first = standin.build_busybox(tmp_path / "a", log=lambda _: None)
    other = standin.build_busybox(tmp_path / "b", log=lambda _: None)
    assert not first.cached
    assert first.digest == other.digest == busybox_layout.digest
    again = standin.build_busybox(tmp_path / "a", log=lambda _: None)
    assert again.cached, "the second build is a cache hit"
    assert again.digest == first.digest


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            pool.map(lambda _: standin.build_busybox(tmp_path, log=lambda _: None), range(4))
        )
    assert sorted(r.cached for r in results) == [False, True, True, True]
    assert len({r.digest for r in results}) == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def test_failed_build_publishes_nothing_and_stale_work_is_removed(tmp_path: Path) -> None:
    recipe = standin.Recipe("broken", "library/broken", "latest", {"case": 1})
    stale = tmp_path / "tmp" / f"{recipe.cache_name}.999999"
    stale.mkdir(parents=True)

    def explode(work: Path, layout: Path, log: standin.Log) -> None:
        layout.mkdir()
        (layout / "index.json").write_text("{}")
        raise BuildError("boom")

    with pytest.raises(BuildError, match="boom"):
        standin.ensure_image(recipe, explode, tmp_path, lambda _: None)
    assert standin.cached_layout(recipe, tmp_path) is None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_prune_drops_only_layouts_of_other_recipes(tmp_path: Path) -> None:
    current = standin.build_busybox(tmp_path, log=lambda _: None)
    old = tmp_path / "layouts" / "python-0123456789abcdef0123456789abcdef"
    (old / "blobs" / "sha256").mkdir(parents=True)
    assert standin.prune(tmp_path) == [old]
    assert not old.exists()
    assert standin.cached_layout(current.recipe, tmp_path) == current.layout


# --- python stand-in --------------------------------------------------------------------------


def test_python_layout_has_python_pip_and_certs(python_layout: standin.BuiltImage) -> None:
    members = layer_members(python_layout)
    assert members["usr/bin/python3"].linkname == "python3.13"
    assert members["usr/bin/python3.13"].isreg()
    assert members["usr/local/bin/python"].linkname == "/usr/bin/python3"
    assert members["usr/local/bin/pip"].linkname == "/usr/bin/pip3"
    assert members["usr/bin/pip3"].isreg()
    assert "usr/lib/python3/dist-packages/pip/__init__.py" in members
    assert "usr/lib/python3.13/venv/__init__.py" in members
    assert members["etc/ssl/certs/ca-certificates.crt"].size > 10_000
    assert not [n for n in members if n.endswith("EXTERNALLY-MANAGED")]
    assert not [n for n in members if n.startswith(("usr/share/doc/", "usr/share/man/"))]
    leftovers = ("var/lib/apt/lists/", "var/cache/apt/archives/", "usr/share/locale/", "dev/")
    assert not [m.name for m in members.values() if m.isfile() and m.name.startswith(leftovers)]
    assert not [n for n in members if n.startswith(("dev/", "proc/", "sys/"))]
    assert "etc/resolv.conf" not in members
    assert not [m.name for m in members.values() if m.ischr() or m.isblk()]
    assert image_config(python_layout)["config"] == {
        "Env": [IMAGE_PATH, "LANG=C.UTF-8"],
        "Cmd": ["python3"],
    }


def test_python_runs_and_pip_installs(python_layout: standin.BuiltImage, tmp_path: Path) -> None:
    require_root("the stand-in's python runs in a chroot")
    root = tmp_path / "root"
    root.mkdir()
    layer = python_layout.manifest()["layers"][0]  # type: ignore[index]
    run(["tar", "-xzf", python_layout.blob(layer["digest"]), "-C", root, "--numeric-owner"])
    _write_wheel(root / "tmp" / "tinypkg-0.1-py3-none-any.whl")
    script = (
        "python --version && pip --version"
        " && pip install --no-index --root-user-action=ignore /tmp/tinypkg-0.1-py3-none-any.whl"
        " && python -c 'import tinypkg, ssl; print(tinypkg.VALUE)'"
    )
    env = {"PATH": IMAGE_PATH.removeprefix("PATH="), "LANG": "C.UTF-8"}
    done = run(["chroot", root, "/bin/sh", "-c", script], env=env, timeout=120)
    assert done.stdout.startswith("Python 3.13.")
    assert "pip " in done.stdout
    assert "Successfully installed tinypkg-0.1" in done.stdout
    assert done.stdout.rstrip().endswith("42")


def _write_wheel(path: Path) -> None:
    """A minimal pure-Python wheel, so pip can install something without network."""
    files = {
        "tinypkg/__init__.py": b"VALUE = 42\n",
        "tinypkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
        "tinypkg-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for name, data in files.items()
    ]
    record.append("tinypkg-0.1.dist-info/RECORD,,")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("tinypkg-0.1.dist-info/RECORD", "\n".join(record) + "\n")
    path.write_bytes(buffer.getvalue())


def test_python_second_build_is_a_fast_cache_hit(
    python_layout: standin.BuiltImage, testenv_cache: Path
) -> None:
    began = time.monotonic()
    again = standin.build_python(testenv_cache, log=lambda _: None)
    assert again.cached
    assert again.digest == python_layout.digest
    assert again.layout == python_layout.layout
    # A rebuild takes ~45 s (debootstrap); the bound only has to tell a hit from one, with
    # room for a loaded CI machine.
    assert time.monotonic() - began < 20


def test_python_image_pushed_with_layout_digest(
    registry: RegistryHandle, python_image: standin.PushedImage
) -> None:
    assert python_image.ref == f"{registry.host}/library/python:3.13-slim"
    url = f"{registry.url}/v2/library/python/manifests/3.13-slim"
    body, headers = http_get(url, accept=MEDIA_MANIFEST)
    assert sha256(body) == headers["Docker-Content-Digest"] == python_image.digest
    config_digest = json.loads(body)["config"]["digest"]
    config, _ = http_get(f"{registry.url}/v2/library/python/blobs/{config_digest}")
    assert json.loads(config)["config"]["Cmd"] == ["python3"]
