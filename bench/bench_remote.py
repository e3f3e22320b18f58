"""Benchmark the remote cache (issue 8), all measured in one run on this machine.

Two machines (two MICROAGENT_HOMEs) and a real local registry standing in for Docker Hub
(python:3.13-slim stand-in) and for the team's cache repository:

1. machine A: cold ``create`` of examples/minimal-agent (empty store but for the guest kit:
   pull, setup VMs running the real ``pip install``, rootfs), then ``build --push``;
2. machine B (fresh store): ``create --cache-from`` of the same spec — no setup VM boots;
   target >= 30x faster than (1) (issue 15; 10x in issue 8);
3. a remote hit in-process on fresh stores, phase by phase: the layer path (fetch + verify +
   decompress + flatten, then the ext4 build) and the rootfs-image path ``create`` takes (fetch
   + verify + decompress the published ext4); effective throughput = bytes of layers / time,
   target >= 200 MB/s (issue 15);
4. a delta hit (``remotecache/delta.py``), in-process: a store that took the first setup step
   (its image flattened from the layers) takes the last setup step once derived from it (only
   the last step's layer fetched), once, in a copy of that store, through the published
   rootfs image (the layer and the image fetched), and once with the layer's disk stacked on
   the local image (what ``create`` does with layer disks on); bytes fetched and wall time.

Times in (1) and (2) are whole CLI processes. ``--base busybox`` swaps in the busybox stand-in
and trivial setup steps (no network in the guest) when PyPI is out of reach.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from microagent.compiler.refs import parse_image_ref  # noqa: E402
from microagent.ext4.debugfs import check_image  # noqa: E402
from microagent.oci.endpoints import RegistryConfig  # noqa: E402
from microagent.oci.registry import RegistryClient, RegistryRepository  # noqa: E402
from microagent.remotecache.restore import Restorer  # noqa: E402
from microagent.store.content import Store  # noqa: E402
from microagent.store.records import read_record, root_of  # noqa: E402
from testenv import standin  # noqa: E402
from testenv.registry import start_registry  # noqa: E402

MA = [sys.executable, "-m", "microagent.cli"]
BUSYBOX_SPEC = """name: bench-busybox
image: busybox:latest
setup:
  - mkdir -p /app /workspace
  - dd if=/dev/urandom of=/app/blob bs=1M count=16
files: [{src: agent.sh, dst: /app/agent.sh}]
entrypoint: sh /app/agent.sh
"""


def cli(env: dict[str, str], *args: str) -> tuple[float, dict[str, Any]]:
    began = time.perf_counter()
    done = subprocess.run(
        [*MA, "--json", *args], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"microagent {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, json.loads(done.stdout) if done.stdout.strip() else {}


def _project(tmp: Path, base: str) -> Path:
    if base == "python":
        project = tmp / "minimal-agent"
        shutil.copytree(ROOT / "examples" / "minimal-agent", project)
        return project / "microagent.yaml"
    project = tmp / "busybox-agent"
    project.mkdir()
    (project / "agent.sh").write_text("echo hello\n")
    (project / "microagent.yaml").write_text(BUSYBOX_SPEC)
    return project / "microagent.yaml"


def _env(tmp: Path, home: str, registry_url: str) -> dict[str, str]:
    env = dict(os.environ, MICROAGENT_HOME=str(tmp / home))
    env.update(
        MICROAGENT_REGISTRY_MIRRORS=f"docker.io={registry_url}",
        MICROAGENT_CONFIG=str(tmp / "none.yaml"),
        MICROAGENT_EXTRA_CA="host",
    )
    for name in ("MICROAGENT_CACHE_FROM", "MICROAGENT_CACHE_TO", "MICROAGENT_BACKEND"):
        env.pop(name, None)
    return env


def _uncompressed(store: Store, digests: list[str]) -> int:
    total = 0
    for digest in digests:
        with store.open_blob(digest) as fh:
            head = fh.read(4)
            fh.seek(0)
            if head == b"\x28\xb5\x2f\xfd":
                reader: Any = zstandard.ZstdDecompressor().stream_reader(fh)
            else:
                import gzip

                reader = gzip.GzipFile(fileobj=fh)
            while chunk := reader.read(1 << 20):
                total += len(chunk)
    return total


def _cpu() -> float:
    """CPU seconds of this process (every thread) and its finished children (e2fsck, mke2fs,
    debugfs): what a phase costs however busy the machine is."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def breakdown(tmp: Path, repo: str, key: str) -> dict[str, float]:
    """A remote hit in-process, each phase timed on its own (in ``create`` they overlap):
    the rootfs-image path (fetch + verify + decode the published ext4) first, then the layer
    path (fetch, then flatten + ext4), each into a fresh store, each after ``sync`` (so no
    phase waits for the previous one's writeback: e2fsck fsyncs the image it checks)."""
    parts = _image_phase(tmp / "d", repo, key)
    restorer = _restorer(tmp / "c", repo)
    os.sync()
    began = time.perf_counter()
    hit = restorer.probe(key)
    assert hit is not None, "the step must be published"
    restorer._chain(hit)
    lookup = time.perf_counter() - began
    began = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        for future in restorer._fetch_layers(pool, hit).values():
            future.result()
    fetch = time.perf_counter() - began
    os.sync()
    began, cpu = time.perf_counter(), _cpu()
    restorer._build_rootfs(hit.step.key, hit.step.layers, {})
    build, build_cpu = time.perf_counter() - began, _cpu() - cpu
    digests = [layer.digest for layer in hit.step.layers]
    return parts | {
        "lookup": lookup,
        "fetch": fetch,
        "flatten": build - restorer.stats.ext4_seconds,
        "ext4": restorer.stats.ext4_seconds,
        "compressed": float(sum(layer.size for layer in hit.step.layers)),
        "uncompressed": float(_uncompressed(restorer.store, digests)),
        "buildCpu": build_cpu,
    }


def _image_phase(home: Path, repo: str, key: str) -> dict[str, float]:
    imaged = _restorer(home, repo)
    image_hit = imaged.probe(key)
    assert image_hit is not None
    os.sync()
    began, cpu = time.perf_counter(), _cpu()
    assert imaged._unpack_image(image_hit), "a rootfs image must be published"
    image, image_cpu = time.perf_counter() - began, _cpu() - cpu
    rootfs = imaged.store.entry_path(f"rootfs/{key[7:]}.ext4")
    fsck = time.perf_counter()
    check_image(rootfs, "rootfs image")
    fsck = time.perf_counter() - fsck
    image_info = image_hit.step.rootfs_image
    assert image_info is not None
    return {
        "image": image,
        "imageCpu": image_cpu,
        "imageCompressed": float(imaged.stats.bytes),
        "imageSize": float(rootfs.stat().st_size),
        "imageAllocated": float(rootfs.stat().st_blocks * 512),
        "imageFormat": float(getattr(image_info, "format", 1)),
        "imageDownload": _download_only(image_hit.source, image_info.blob),
        "imageFsck": fsck,
    }


def delta_hit(tmp: Path, repo: str, keys: list[str]) -> dict[str, float]:
    """The last setup step as a delta hit vs. a full image hit, on stores that hold the step
    before it (``keys``: the setup step keys, in order)."""
    parent, last = keys[-2], keys[-1]
    first = _restorer(tmp / "delta", repo)
    hit = first.probe(parent)
    assert hit is not None, "the parent step must be published"
    first.restore(hit)  # the parent's image, flattened (no image is published for it)
    os.sync()
    for copy in ("full", "stacked"):
        subprocess.run(["cp", "-a", "--sparse=always", str(tmp / "delta"), str(tmp / copy)],
                       check=True)  # fmt: skip
    out: dict[str, float] = {}
    for name, derive, layered in (
        ("delta", True, False), ("full", False, False), ("stacked", True, True)
    ):  # fmt: skip
        restorer = Restorer(
            Store(tmp / name / "store"),
            [RegistryRepository(RegistryClient(RegistryConfig()), parse_image_ref(repo))],
            derive=derive,
            layered=layered,
        )
        os.sync()
        began, cpu = time.perf_counter(), _cpu()
        found = restorer.probe(last)
        assert found is not None
        restorer.restore(found)
        out[f"{name}Seconds"] = time.perf_counter() - began
        out[f"{name}Cpu"] = _cpu() - cpu
        out[f"{name}Bytes"] = float(restorer.stats.bytes)
        out[f"{name}Blobs"] = float(restorer.stats.blobs)
        out[f"{name}Derived"] = float(len(restorer.stats.derived))
        out[f"{name}Images"] = float(restorer.stats.images)
        record = read_record(restorer.store, last)
        root = root_of(restorer.store, record) if record is not None else None
        assert root is not None, f"{name}: the hit's root is not whole"
        made = root.layers[-1:] if layered else (root.image,)  # what this hit wrote
        assert made, f"{name}: the hit was not stacked"
        for image in made:
            check_image(image, "the hit's root")
        out[f"{name}Allocated"] = float(sum(image.stat().st_blocks * 512 for image in made))
    found = _restorer(tmp / "delta", repo).probe(last)
    assert found is not None and found.step.rootfs_image is not None
    out["layer"] = float(found.step.layers[-1].size)
    out["imageBlob"] = float(found.step.rootfs_image.blob_size)
    return out


def _download_only(source: Any, blob: str) -> float:
    """Seconds to read the image blob from the registry and drop it (no hash, no decode)."""
    began = time.perf_counter()
    with source.blob(blob) as stream:
        while stream.read(1 << 20):
            pass
    return time.perf_counter() - began


def _restorer(home: Path, repo: str) -> Restorer:
    client = RegistryClient(RegistryConfig())
    return Restorer(Store(home / "store"), [RegistryRepository(client, parse_image_ref(repo))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", choices=["python", "busybox"], default="python")
    args = parser.parse_args()
    image = standin.build_python(None) if args.base == "python" else standin.build_busybox(None)
    with tempfile.TemporaryDirectory() as tmp_text, start_registry(Path(tmp_text) / "r") as reg:
        tmp = Path(tmp_text)
        standin.push(image, reg.host)
        spec = str(_project(tmp, args.base))
        repo = f"{reg.host}/team/agent-cache"
        env_a, env_b = _env(tmp, "a", reg.url), _env(tmp, "b", reg.url)
        kit_s, _ = cli(env_a, "kernel", "install")
        cold_s, cold = cli(env_a, "create", "-f", spec)
        push_s, pushed = cli(env_a, "build", "-f", spec, "--push", repo)
        os.sync()  # B's hit does not wait for the writeback of A's builds
        hit_s, hit = cli(env_b, "create", "-f", spec, "--cache-from", repo)
        local_s, _ = cli(env_b, "create", "-f", spec, "--name", "again")
        assert hit["setupBoots"] == 0 and hit["rootfsKey"] == cold["rootfsKey"], hit
        parts = breakdown(tmp, repo, cold["rootfsKey"])
        keys = [str(s["key"]) for s in pushed["steps"] if s["kind"] == "setup"]
        delta = delta_hit(tmp, repo, keys) if len(keys) >= 2 else None
    _report(
        args.base,
        kit_s,
        cold=(cold_s, cold),
        pushed=(push_s, pushed),
        hit=(hit_s, hit),
        local_s=local_s,
        parts=parts,
    )
    if delta is not None:
        _report_delta(delta)


def _report_delta(d: dict[str, float]) -> None:
    print(
        f"delta hit of the last setup step (its layer {d['layer'] / 1e3:.1f} kB, its image's "
        f"blob {d['imageBlob'] / 1e6:.1f} MB), on a store holding the step before it:"
    )
    for name, label in (
        ("delta", "derived from the local parent"),
        ("full", "rootfs image"),
        ("stacked", "layer disk on the local parent"),
    ):
        print(
            f"   {label:32s} {d[name + 'Seconds']:6.2f} s  ({d[name + 'Cpu']:.2f} s CPU)  "
            f"{d[name + 'Blobs']:.0f} blobs, {d[name + 'Bytes'] / 1e6:8.3f} MB fetched  "
            f"(derived {d[name + 'Derived']:.0f}, images {d[name + 'Images']:.0f}; "
            f"{d[name + 'Allocated'] / 1e6:.0f} MB allocated)"
        )


def _report(
    base: str,
    kit_s: float,
    *,
    cold: tuple[float, dict[str, Any]],
    pushed: tuple[float, dict[str, Any]],
    hit: tuple[float, dict[str, Any]],
    local_s: float,
    parts: dict[str, float],
) -> None:
    remote = hit[1]["remote"]
    published = pushed[1]["published"][0]
    moved = parts["fetch"] + parts["flatten"]
    print(f"base image: {base} stand-in; spec setup steps run for real in QEMU on machine A")
    print(f"guest kit install on A (once, untimed)  {kit_s:7.2f} s")
    print(
        f"A: cold create                          {cold[0]:7.2f} s  "
        f"({cold[1]['setupBoots']} setup boots)"
    )
    print(
        f"A: build --push                         {pushed[0]:7.2f} s  "
        f"({published['blobsUploaded']} blobs, {published['bytesUploaded'] / 1e6:.1f} MB sent)"
    )
    print(
        f"B: create --cache-from (fresh store)    {hit[0]:7.2f} s  "
        f"({hit[1]['setupBoots']} setup boots, {remote['bytesFetched'] / 1e6:.1f} MB fetched)"
    )
    print(f"   speed-up vs cold create              {cold[0] / hit[0]:7.1f}x  target 30x")
    print(
        f"   of which restore                     {remote['seconds']:7.2f} s "
        f"(rootfs images used: {remote['rootfsImages']}); the rest: CLI start, resolve, plan, "
        "workspace record and state disk"
    )
    layer_mb, plain_mb = parts["compressed"] / 1e6, parts["uncompressed"] / 1e6
    print(
        f"   effective throughput of the restore  {layer_mb / remote['seconds']:7.0f} MB/s "
        f"(layer bytes {layer_mb:.1f} MB / restore time; uncompressed layer bytes "
        f"{plain_mb:.1f} MB: {plain_mb / remote['seconds']:.0f} MB/s); of the whole process "
        f"{layer_mb / hit[0]:.0f} MB/s ({plain_mb / hit[0]:.0f} MB/s uncompressed)"
    )
    print(f"B: create again (local hit)             {local_s:7.2f} s")
    print("remote hit, in-process, phases timed separately:")
    print(f"   lookup (step tag + chain, verified)  {parts['lookup'] * 1000:7.0f} ms")
    mb = parts["compressed"] / 1e6
    print(
        f"   layer path: fetch + verify {mb:6.1f} MB      {parts['fetch']:7.2f} s  "
        f"{mb / parts['fetch']:7.0f} MB/s"
    )
    print(
        f"               decompress + flatten {parts['uncompressed'] / 1e6:6.1f} MB "
        f"{parts['flatten']:7.2f} s  {parts['uncompressed'] / 1e6 / parts['flatten']:7.0f} MB/s"
    )
    print(f"               ext4 image (mke2fs -d + debugfs) {parts['ext4']:7.2f} s")
    print(f"               CPU time of flatten + ext4       {parts['buildCpu']:7.2f} s")
    print(
        f"   effective layer throughput (compressed bytes / fetch+verify+decompress+flatten) "
        f"{mb / moved:7.0f} MB/s  (uncompressed {parts['uncompressed'] / 1e6 / moved:.0f} MB/s)"
    )
    image_mb = parts["imageCompressed"] / 1e6
    print(
        f"   rootfs-image path (what create uses): fetch + verify + decompress "
        f"{image_mb:.1f} MB (format {parts['imageFormat']:.0f}) -> "
        f"{parts['imageSize'] / 1e6:.0f} MB ext4 "
        f"({parts['imageAllocated'] / 1e6:.0f} MB allocated) in {parts['image']:.2f} s "
        f"({parts['imageCpu']:.2f} s CPU, all threads + e2fsck)"
    )
    print(
        f"      the blob's download alone {parts['imageDownload']:.2f} s; e2fsck -fn alone "
        f"{parts['imageFsck']:.2f} s (in the path it also waits for the image's writeback)"
    )
    print(
        f"   effective throughput of the hit (layer bytes / image time) "
        f"{mb / parts['image']:7.0f} MB/s  target 200 MB/s; uncompressed layer bytes "
        f"{parts['uncompressed'] / 1e6 / parts['image']:.0f} MB/s; "
        f"image bytes {image_mb / parts['image']:.0f} MB/s"
    )


if __name__ == "__main__":
    main()
