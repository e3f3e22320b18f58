"""Benchmark layer disks (issue 15 item 1): one read-only image per layer vs a flatten.

In one run, on the python:3.13-slim stand-in (an OCI layout; no registry, no network), a
large synthetic step layer on top of it and a trivial one (``mkdir -p /x``):

(a) a layer disk per layer with ``ext4.layerdisk`` (ext4, whiteouts in overlayfs form): time
    and size (apparent and allocated);
(b) EROFS from the same stage with ``mkfs.erofs`` (when installed): uncompressed and lz4hc.
    The stage needs the whiteouts as character devices 0/0 and the opaque xattrs as real
    ``trusted.overlay.opaque``: made here as root (see the printed probe for what a normal
    user can make);
(c) the flatten of the whole chain (``ext4.rootfs.build_rootfs``), as every step's rootfs is
    built when it is not derived: the baseline;
(d) ``cp`` out of a stack (``ext4.overlay.copy_out`` of a 1 MB file in the bottom layer, every
    layer holding ``/usr/lib``): 1, 4 and 16 lowers, median of 3, in-process.

Stages go to RAM (``/dev/shm``) for all three, as the flatten does when there is room.
Prints per-layer figures and the ratios; no pass/fail.

    .venv/bin/python bench/bench_layerdisk.py [--synthetic-mib 256] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from microagent.digests import Digest  # noqa: E402
from microagent.ext4.layerdisk import (  # noqa: E402
    OPAQUE_XATTR,
    allocated_bytes,
    build_layer_disk,
    unpack_layer,
)
from microagent.ext4.mkfs import make_state_disk  # noqa: E402
from microagent.ext4.overlay import copy_out  # noqa: E402
from microagent.ext4.rootfs import build_rootfs  # noqa: E402
from microagent.layers.apply import LayerSource, finish_stage  # noqa: E402
from microagent.store.content import Store  # noqa: E402
from testenv import standin  # noqa: E402

T = TypeVar("T")
RAM = Path("/dev/shm")
FIXED_UUID = "5d1b7c1e-0f5e-4c1a-9b1e-6d6963726f61"


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    began = time.perf_counter()
    out = fn()
    return time.perf_counter() - began, out


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    where = RAM if os.access(RAM, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the layers --------------------------------------------------------------------------------


def standin_layers() -> list[LayerSource]:
    """The stand-in's layers, bottom first, with their diff_ids from the image config."""
    layout = standin.build_python(None).layout

    def blob(digest: str) -> Path:
        return Path(layout) / "blobs" / digest.replace(":", "/")

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    diff_ids = config["rootfs"]["diff_ids"]
    return [
        LayerSource.from_path(blob(layer["digest"]), f"stand-in {i}", Digest.parse(diff_ids[i]))
        for i, layer in enumerate(manifest["layers"])
    ]


def synthetic_layer(path: Path, mib: int) -> LayerSource:
    """A large step: ``mib`` MiB in files of 1 KiB-256 KiB (half random, half text) over
    ~200 directories, with a few whiteouts and an opaque directory, as a plain tar."""
    rnd = os.urandom(1 << 20)
    text = (b"import os, sys  # a line of a python module\n" * 30000)[: 1 << 20]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        total, i = 0, 0
        for name in ("opt", "opt/site"):
            tf.addfile(_dir(name))
        while total < mib << 20:
            if i % 100 == 0:
                tf.addfile(_dir(f"opt/site/pkg{i // 100}"))
            size = 1024 << (i % 9)
            data = (rnd if i % 2 else text)[(i * 4099) % (1 << 19) :][:size]
            info = tarfile.TarInfo(f"opt/site/pkg{i // 100}/mod{i}.py")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
            total, i = total + len(data), i + 1
        for name in ("usr", "usr/share", "usr/share/doc"):
            tf.addfile(_dir(name))
        tf.addfile(_file("usr/share/doc/.wh..wh..opq"))
        tf.addfile(_dir("etc"))
        tf.addfile(_file("etc/.wh.motd"))
    data = path.read_bytes()
    return LayerSource.from_path(path, f"synthetic {mib} MiB", Digest.of_bytes(data))


def trivial_layer(path: Path) -> LayerSource:
    """What ``mkdir -p /x`` exports: one directory."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_dir("x"))
    return LayerSource.from_path(path, "trivial", Digest.of_bytes(path.read_bytes()))


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
    return info


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = 0o644, 1_700_000_000
    return info


# -- (a) ext4, (b) EROFS, (c) the flatten -------------------------------------------------------


def ext4_disk(source: LayerSource, out_dir: Path) -> dict[str, Any]:
    with scratch("ma-bench-ld-") as work:
        secs, disk = timed(lambda: build_layer_disk(source, out_dir / "layer.ext4", work=work))
    row = {"seconds": secs, "bytes": disk.size_bytes, "allocated": allocated_bytes(disk.path)}
    row |= {"entries": disk.entries, "whiteouts": disk.whiteouts, "opaque": disk.opaque_dirs}
    disk.path.unlink()
    return row


def erofs_disks(source: LayerSource, out_dir: Path) -> dict[str, Any]:
    """Unpack once, make the overlayfs markers real in the stage, then ``mkfs.erofs`` it
    uncompressed and with lz4hc: the unpack's time is added to each."""
    with scratch("ma-bench-erofs-") as work:
        stage = work / "stage"
        stage.mkdir()
        unpack_s, layer = timed(lambda: unpack_layer(source, stage))
        mark_s, _ = timed(lambda: _materialise(stage, layer))
        out: dict[str, Any] = {"unpack": unpack_s + mark_s}
        for label, extra in (("plain", []), ("lz4hc", ["-zlz4hc"])):
            image = out_dir / f"layer-{label}.erofs"
            argv = ["mkfs.erofs", "--quiet", f"-U{FIXED_UUID}", *extra, str(image), str(stage)]
            secs, _ = timed(partial(subprocess.run, argv, check=True))
            out[label] = {"seconds": unpack_s + mark_s + secs, "mkfs": secs}
            out[label] |= {"bytes": image.stat().st_size, "allocated": allocated_bytes(image)}
            image.unlink()
    return out


def _materialise(stage: Path, layer: Any) -> None:
    """Whiteouts as char 0/0, recorded devices as nodes, opaque xattrs (needs root for the
    devices and trusted.*; a whiteout alone works unprivileged from Linux 5.8)."""
    for path, m in layer.meta:
        if not m.kind.is_device:
            continue
        node = stage / path.lstrip("/")
        os.mknod(node, stat.S_IFCHR | m.mode, os.makedev(m.major, m.minor))
        os.chown(node, m.uid, m.gid)
        os.utime(node, (m.mtime, m.mtime))
    for path in layer.opaque:
        os.setxattr(stage / path.lstrip("/"), OPAQUE_XATTR, b"y")
    finish_stage(stage, layer.meta)  # the nodes changed their directories' mtimes


def flatten(layers: list[LayerSource], tmp: Path, key: str) -> dict[str, Any]:
    store = Store(tmp / "store")
    size = sum(s.open().seek(0, os.SEEK_END) for s in layers)
    secs, (path, timings) = timed(
        lambda: build_rootfs(store, "sha256:" + key * 64, layers, compressed_bytes=size)
    )
    row = {"seconds": secs, "flatten": timings.flatten_seconds, "ext4": timings.ext4_seconds}
    row |= {"bytes": path.stat().st_size, "allocated": allocated_bytes(path)}
    shutil.rmtree(store.root)
    return row


def cp_through_stacks(tmp: Path, depths: tuple[int, ...] = (1, 4, 16)) -> dict[str, float]:
    """Median seconds of ``copy_out`` of a bottom-layer file through stacks of layer disks."""
    disks = []
    for i in range(max(depths)):
        path = tmp / f"cp{i}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            for name in ("usr", "usr/lib", f"usr/lib/p{i}"):
                tf.addfile(_dir(name))
            data = os.urandom(1 << 20) if i == 0 else b"x"
            info = _file("usr/lib/target.bin" if i == 0 else f"usr/lib/p{i}/f")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        source = LayerSource.from_path(path, f"cp {i}", Digest.of_bytes(path.read_bytes()))
        disks.append(build_layer_disk(source, tmp / f"cp{i}.ext4").path)
    state = make_state_disk(tmp / "cp-state.ext4", 16)
    out: dict[str, float] = {}
    for depth in depths:
        stack = disks[:depth][::-1]  # top first; the bottom (index 0) holds the file
        runs = []
        for _ in range(3):
            target = tmp / "cp-out.bin"
            secs, _ = timed(partial(copy_out, state, stack, "/usr/lib/target.bin", target))
            runs.append(secs)
            target.unlink()
        out[str(depth)] = statistics.median(runs)
    return out


# -- the run -----------------------------------------------------------------------------------


def unprivileged_probe() -> str:
    """What a normal user can put in an EROFS stage on this kernel."""
    with scratch("ma-bench-probe-") as where:
        where.chmod(0o777)
        code = (
            "import os, stat\n"
            "p = os.sys.argv[1]\n"
            "os.mknod(p + '/wh', stat.S_IFCHR | 0o600, os.makedev(0, 0)); r = ['whiteout ok']\n"
            "for n in ('trusted.overlay.opaque', 'user.overlay.opaque'):\n"
            "    try: os.setxattr(p, n, b'y'); r.append(n + ' ok')\n"
            "    except OSError as e: r.append(f'{n}: {e.strerror}')\n"
            "print(', '.join(r))\n"
        )
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        argv += ["/usr/bin/python3", "-c", code, str(where)]
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            return "not probed (needs root to drop to nobody)"
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (done.stdout or done.stderr).strip().splitlines()[-1]


def mb(n: int) -> str:
    return f"{n / 1e6:8.2f} MB"


def layer_rows(name: str, ext4: dict[str, Any], erofs: dict[str, Any] | None) -> None:
    print(
        f"  {name:<22} ext4    {ext4['seconds']:6.2f} s {mb(ext4['bytes'])} apparent "
        f"{mb(ext4['allocated'])} on disk  ({ext4['entries']} entries, "
        f"{ext4['whiteouts']} whiteouts, {ext4['opaque']} opaque)"
    )
    if erofs is None:
        return
    for label in ("plain", "lz4hc"):
        r = erofs[label]
        print(
            f"  {'':<22} erofs {label:<5} {r['seconds']:5.2f} s {mb(r['bytes'])} "
            f"(mkfs.erofs {r['mkfs']:.2f} s after the shared unpack {erofs['unpack']:.2f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic-mib", type=int, default=256, help="size of the big step")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    erofs_ok = shutil.which("mkfs.erofs") is not None and os.geteuid() == 0
    figures: dict[str, Any] = {"kernel": platform.release(), "erofs": erofs_ok}
    with tempfile.TemporaryDirectory(prefix="ma-bench-layerdisk-") as tmp_text:
        tmp = Path(tmp_text)
        base = standin_layers()
        big = synthetic_layer(tmp / "big.tar", args.synthetic_mib)
        small = trivial_layer(tmp / "trivial.tar")
        named = [*((s.name, s) for s in base), ("big step", big), ("trivial step", small)]
        print(f"layer disks, kernel {platform.release()}, stages in {RAM}")
        figures["layers"] = {}
        for name, source in named:
            ext4 = ext4_disk(source, tmp)
            erofs = erofs_disks(source, tmp) if erofs_ok else None
            figures["layers"][name] = {"ext4": ext4, "erofs": erofs}
            layer_rows(name, ext4, erofs)
        chains = {"base": base, "base+big": [*base, big], "base+trivial": [*base, small]}
        figures["flatten"] = {}
        print("flatten of the whole chain (build_rootfs: the baseline)")
        for i, (name, chain) in enumerate(chains.items()):
            row = flatten(chain, tmp, "0123456789"[i])
            figures["flatten"][name] = row
            print(
                f"  {name:<22} {row['seconds']:6.2f} s (flatten {row['flatten']:.2f} s + ext4 "
                f"{row['ext4']:.2f} s) {mb(row['bytes'])} apparent {mb(row['allocated'])} on disk"
            )
        figures["cp"] = cp_through_stacks(tmp)
        print("cp out of a stack (copy_out of 1 MB from the bottom layer; median of 3)")
        for depth, secs in figures["cp"].items():
            print(f"  {depth:>2} lower(s)              {secs:6.3f} s")
    figures["unprivileged"] = unprivileged_probe()
    ratios(figures, [s.name for s in base])
    if args.json:
        print(json.dumps(figures, indent=2))


def ratios(figures: dict[str, Any], base: list[str]) -> None:
    layers, flat = figures["layers"], figures["flatten"]
    disks = sum(layers[n]["ext4"]["seconds"] for n in base)
    print("ratios (one run)")
    print(f"  base: layer disks / flatten            {disks / flat['base']['seconds']:6.2f}x time")
    for step, chain in (("big step", "base+big"), ("trivial step", "base+trivial")):
        t = layers[step]["ext4"]["seconds"] / flat[chain]["seconds"]
        print(f"  {step}: its layer disk / flatten of the chain  {t:6.3f}x time")
    base_alloc = sum(layers[n]["ext4"]["allocated"] for n in base)
    print(
        f"  base: layer disk / flattened image      "
        f"{base_alloc / flat['base']['allocated']:6.2f}x on disk"
    )
    if figures["erofs"]:
        for label in ("plain", "lz4hc"):
            for n in [*base, "big step"]:
                e, x = layers[n]["erofs"][label], layers[n]["ext4"]
                print(
                    f"  {n}: erofs {label} / ext4 layer disk  {e['seconds'] / x['seconds']:6.2f}x "
                    f"time  {e['bytes'] / x['allocated']:6.2f}x on disk"
                )
    else:
        print("  erofs: mkfs.erofs not installed (or not root): not measured")
    cp = figures["cp"]
    print(f"  cp: 4 lowers / 1 lower                  {cp['4'] / cp['1']:6.2f}x time")
    print(f"  cp: 16 lowers / 1 lower                 {cp['16'] / cp['1']:6.2f}x time")
    print(f"  unprivileged EROFS stage (as nobody):   {figures['unprivileged']}")


if __name__ == "__main__":
    main()
