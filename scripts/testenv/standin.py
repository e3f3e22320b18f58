"""Build, cache and push the stand-in base images used by tests and the demo.

* ``python`` — stands in for Docker Hub's ``python:3.13-slim``: Debian trixie
  ``debootstrap --variant=minbase`` with python3 (3.13), pip, venv and ca-certificates; the
  EXTERNALLY-MANAGED marker removed (``pip install`` works as in the real image); ``python`` and
  ``pip`` on PATH in /usr/local/bin; docs, man pages, message catalogs and apt caches trimmed.
  Pushed as ``HOST:PORT/library/python:3.13-slim``. **Building it needs root**: debootstrap
  chroots and creates device nodes. Takes ~40 s of debootstrap the first time, then comes from
  the cache. Root's install step (``scripts/bootstrap.sh`` → ``share``) builds it into the
  system-wide cache ``/var/cache/microagent-standin`` (:mod:`testenv.sharedcache`); a normal
  user's ``build`` copies it from there into the user's own cache, verified, and never writes
  there.
* ``busybox`` — a tiny image from the host's static ``/bin/busybox`` (package busybox-static):
  /bin/busybox plus applet symlinks, /etc/passwd with root, /tmp 1777. Byte-for-byte
  reproducible. Pushed as ``HOST:PORT/library/busybox:latest``. Needs no root.

Each result is an OCI image layout cached under ``$MICROAGENT_TESTENV_CACHE`` (default
``~/.cache/microagent-testenv``) at ``layouts/<name>-<key>``, where ``key`` is the sha256 of the
recipe's inputs. Builds happen in ``tmp/`` under a per-key flock and are published by an atomic
rename, so concurrent builders do the work once and a crash leaves only garbage in ``tmp/``.

CLI::

    python scripts/testenv/standin.py build [--which python|busybox|all] [--push HOST:PORT]
        [--layout-out DIR] [--cache DIR] [--mirror URL] [--shared DIR]
    python scripts/testenv/standin.py share [--shared DIR] [--mirror URL]   # as root
    python scripts/testenv/standin.py prune [--cache DIR]    # drop layouts of older recipes
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: make siblings + src importable
    _parents = Path(__file__).resolve().parents
    sys.path[1:1] = [str(_parents[1]), str(_parents[2] / "src")]

from microagent.errors import BuildError, MicroagentError, ToolError
from microagent.runner import run
from testenv import sharedcache
from testenv.oci import ImageConfig, LayoutWriter, canonical_json, host_arch

# Bump when anything about how an image is built changes: it re-keys every cached layout.
RECIPE_VERSION = 1
# Bump when the trimming list below changes.
TRIM_VERSION = 2

CACHE_ENV = "MICROAGENT_TESTENV_CACHE"
MIRROR_ENV = "MICROAGENT_TESTENV_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT = 1800.0
SKOPEO_TIMEOUT = 600.0
IMAGE_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
METADATA = "microagent-testenv.json"
EMPTY_DIRS = ("dev", "proc", "sys")
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

PYTHON_SUITE = "trixie"
PYTHON_INCLUDE = ("python3", "python3-pip", "python3-venv", "ca-certificates")
PYTHON_LINKS = {"usr/local/bin/python": "/usr/bin/python3", "usr/local/bin/pip": "/usr/bin/pip3"}
TRIM_GLOBS = (
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/archives/partial/*",
    "var/cache/apt/*.bin",
    "var/lib/apt/lists/*_*",
    "var/lib/apt/lists/partial/*",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/log/*.log",
    "var/log/apt/*",
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/lintian/*",
    "usr/share/locale/*",
    "usr/lib/python3*/EXTERNALLY-MANAGED",
    # Host files debootstrap copies in; a real image carries neither (the runtime provides them).
    "etc/hostname",
    "etc/resolv.conf",
)

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "[", "cat", "chmod", "cp", "echo", "env", "false", "find", "grep", "gzip", "head", "id",
    "kill", "ln", "ls", "mkdir", "mount", "mv", "printf", "ps", "pwd", "readlink", "rm", "sed",
    "sh", "sleep", "stat", "sync", "tail", "tar", "test", "touch", "true", "umount", "uname",
    "wc",
)  # fmt: skip
FIXED_MTIME = 0
FIXED_CREATED = "1970-01-01T00:00:00Z"

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Recipe:
    """What to build: a name, where it is pushed, and the inputs its cache key hashes."""

    name: str
    repository: str
    tag: str
    inputs: Mapping[str, object]

    @property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(dict(self.inputs))).hexdigest()

    @property
    def cache_name(self) -> str:
        return f"{self.name}-{self.key[:32]}"


@dataclass(frozen=True)
class BuiltImage:
    """An OCI layout holding one tagged image, from the cache or just built."""

    recipe: Recipe
    layout: Path
    digest: str
    cached: bool
    seconds: float
    how: str = "built"  # or "copied" (from the system-wide cache); "cache hit" when cached

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.layout}:{self.recipe.tag}"

    def blob(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.blob(self.digest).read_bytes())
        return data

    def size(self) -> int:
        """Bytes of all blobs (compressed layers, config, manifest)."""
        return sum(p.stat().st_size for p in (self.layout / "blobs" / "sha256").iterdir())


@dataclass(frozen=True)
class PushedImage:
    """An image in a registry: ``ref`` is ``HOST/REPOSITORY:TAG``, ``digest`` its manifest's."""

    host: str
    repository: str
    tag: str
    digest: str
    layout: Path

    @property
    def ref(self) -> str:
        return f"{self.host}/{self.repository}:{self.tag}"

    @property
    def ref_by_digest(self) -> str:
        return f"{self.host}/{self.repository}@{self.digest}"


# --- recipes ----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$MICROAGENT_TESTENV_CACHE`` or ``~/.cache/microagent-testenv``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "microagent-testenv"


def python_recipe() -> Recipe:
    """The python:3.13-slim stand-in. The mirror is not an input: any mirror, same packages."""
    inputs = {
        "recipe": RECIPE_VERSION,
        "trim": [TRIM_VERSION, *TRIM_GLOBS],
        "arch": host_arch(),
        "debootstrap": ["--variant=minbase", PYTHON_SUITE, *PYTHON_INCLUDE],
        "links": PYTHON_LINKS,
        "config": [IMAGE_PATH, "LANG=C.UTF-8", "python3"],
    }
    return Recipe("python", "library/python", "3.13-slim", inputs)


def busybox_recipe(busybox: Path, applets: Sequence[str]) -> Recipe:
    """The busybox stand-in, keyed by the host binary's sha256 and the applets linked."""
    inputs = {
        "recipe": RECIPE_VERSION,
        "arch": host_arch(),
        "busybox": _sha256_file(busybox),
        "applets": list(applets),
        "config": [IMAGE_PATH, "sh"],
    }
    return Recipe("busybox", "library/busybox", "latest", inputs)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def available_applets(busybox: Path = BUSYBOX) -> tuple[str, ...]:
    """The wanted applets that ``busybox`` actually has."""
    listed = set(run([busybox, "--list"], timeout=30).stdout.split())
    return tuple(a for a in BUSYBOX_APPLETS if a in listed)


# --- cache ------------------------------------------------------------------------------------


def cached_layout(recipe: Recipe, cache: Path | None = None) -> Path | None:
    """The cached layout for ``recipe``, or None if it has not been built."""
    layout = (cache or default_cache_dir()) / "layouts" / recipe.cache_name
    return layout if (layout / "index.json").is_file() else None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _layout_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_bytes())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return str(entry["digest"])
    raise BuildError(f"{layout}/index.json names no image tagged {tag!r}")


# Fills the layout dir; returns how when it did not build it (e.g. "copied"), else None.
Builder = Callable[[Path, Path, Log], str | None]


def ensure_image(recipe: Recipe, build: Builder, cache: Path | None, log: Log) -> BuiltImage:
    """Return the cached layout for ``recipe``, building it (once, under a lock) if missing.

    ``build(work_dir, layout_dir, log)`` fills ``layout_dir``; it is published by rename.
    """
    cache = cache or default_cache_dir()
    began = time.monotonic()
    with _locked(cache / "locks" / f"{recipe.cache_name}.lock"):
        found = cached_layout(recipe, cache)
        if found is not None:
            return _built(recipe, found, cached=True, began=began)
        final = cache / "layouts" / recipe.cache_name
        for stale in (cache / "tmp").glob(f"{recipe.cache_name}.*"):
            remove_tree(stale)  # an earlier build that crashed; we hold the lock
        work = cache / "tmp" / f"{recipe.cache_name}.{os.getpid()}"
        work.mkdir(parents=True)
        try:
            how = build(work, work / "layout", log) or "built"
            _write_metadata(recipe, work / "layout", time.monotonic() - began)
            final.parent.mkdir(parents=True, exist_ok=True)
            (work / "layout").rename(final)
        finally:
            remove_tree(work)
    return _built(recipe, final, cached=False, began=began, how=how)


def _built(
    recipe: Recipe, layout: Path, *, cached: bool, began: float, how: str = "built"
) -> BuiltImage:
    digest = _layout_digest(layout, recipe.tag)
    return BuiltImage(recipe, layout, digest, cached, time.monotonic() - began, how)


def _write_metadata(recipe: Recipe, layout: Path, seconds: float) -> None:
    meta = {
        "name": recipe.name,
        "key": recipe.key,
        "inputs": recipe.inputs,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "buildSeconds": round(seconds, 2),
    }
    (layout / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve())
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            mounts.append(point)
    return sorted(mounts, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Delete a build tree, first unmounting anything debootstrap left mounted inside it."""
    if not path.exists():
        return
    for point in _mounts_below(path):
        run(["umount", "--lazy", point], timeout=60)
    if _mounts_below(path):
        raise BuildError(f"refusing to delete {path}: it still has mounts inside")
    shutil.rmtree(path)


def prune(cache: Path | None = None) -> list[Path]:
    """Delete cached layouts (and locks) whose key is not one of the current recipes'."""
    cache = cache or default_cache_dir()
    current = {python_recipe().cache_name}
    if BUSYBOX.is_file():
        current.add(busybox_recipe(BUSYBOX, available_applets(BUSYBOX)).cache_name)
    removed = []
    for layout in sorted((cache / "layouts").glob("*")):
        if layout.name in current:
            continue
        with _locked(cache / "locks" / f"{layout.name}.lock"):
            remove_tree(layout)
        (cache / "locks" / f"{layout.name}.lock").unlink(missing_ok=True)
        removed.append(layout)
    return removed


# --- python stand-in --------------------------------------------------------------------------


def build_python(
    cache: Path | None = None,
    mirror: str | None = None,
    log: Log = _stderr,
    shared: Path | None = sharedcache.SHARED_CACHE,
) -> BuiltImage:
    """The python:3.13-slim stand-in layout (cached). When ``cache`` lacks it, it is copied
    (verified) from the system-wide cache ``shared``, else built, which needs root and the
    mirror."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    recipe = python_recipe()

    def build(work: Path, layout: Path, log: Log) -> str | None:
        if shared is not None and sharedcache.present(shared, recipe.cache_name):
            source = sharedcache.entry(shared, recipe.cache_name)
            copy = partial(
                sharedcache.copy_verified, source, layout, tag=recipe.tag, key=recipe.key
            )
            _timed(log, f"copy from {source}, verified", copy)
            return "copied"
        if os.geteuid() != 0:
            raise _not_shared(recipe, shared)
        rootfs = work / "rootfs"
        _timed(log, "debootstrap", lambda: _debootstrap(rootfs, mirror))
        _timed(log, "customise + trim", lambda: _customise_python(rootfs))
        _timed(log, "pack", lambda: _pack(rootfs, layout, recipe.tag, python_config()))
        return None

    return ensure_image(recipe, build, cache, log)


def _not_shared(recipe: Recipe, shared: Path | None) -> BuildError:
    where = sharedcache.entry(shared or sharedcache.SHARED_CACHE, recipe.cache_name)
    bootstrap = Path(__file__).resolve().parents[1] / "bootstrap.sh"
    return BuildError(
        f"the {recipe.name} stand-in is not in the system-wide cache ({where}), and building it"
        " here needs root (debootstrap)",
        hint=f"run once as root: sudo bash {bootstrap}"
        " (installs the host packages and builds the stand-in there, readable by every user)",
    )


def shared_available(recipe: Recipe, shared: Path = sharedcache.SHARED_CACHE) -> bool:
    """Whether the system-wide cache has an entry for ``recipe`` (checked when it is copied)."""
    return sharedcache.present(shared, recipe.cache_name)


def share_python(
    shared: Path = sharedcache.SHARED_CACHE, mirror: str | None = None, log: Log = _stderr
) -> BuiltImage:
    """Build (or reuse) the python stand-in in the system-wide cache, root-owned and readable by
    every user; an entry that fails the readers' checks is rebuilt; older recipes are pruned."""
    if os.geteuid() != 0:
        raise BuildError(
            f"share writes the system-wide cache {shared}: run it as root",
            hint="a normal user's `build` copies from there; only root's install step writes it",
        )
    old_umask = os.umask(0o022)
    try:
        shared.mkdir(parents=True, exist_ok=True)
        image = build_python(shared, mirror, log, shared=None)
        try:
            sharedcache.copy_verified(
                image.layout, None, tag=image.recipe.tag, key=image.recipe.key
            )
        except BuildError as exc:
            log(f"  {exc.message}: rebuilding")
            with _locked(shared / "locks" / f"{image.recipe.cache_name}.lock"):
                remove_tree(image.layout)
            image = build_python(shared, mirror, log, shared=None)
        prune(shared)
        sharedcache.seal(shared)
    finally:
        os.umask(old_umask)
    return image


def python_config() -> ImageConfig:
    return ImageConfig(
        env=(IMAGE_PATH, "LANG=C.UTF-8"),
        cmd=("python3",),
        created=FIXED_CREATED,
        created_by=f"microagent testenv python stand-in recipe {RECIPE_VERSION}",
    )


def _timed(log: Log, what: str, step: Callable[[], object]) -> None:
    began = time.monotonic()
    step()
    log(f"  {what}: {time.monotonic() - began:.1f}s")


def _debootstrap(rootfs: Path, mirror: str) -> None:
    if os.geteuid() != 0:
        raise BuildError(
            "building the python stand-in needs root (debootstrap chroots and makes device nodes)",
            hint=f"run it as root once; later runs reuse the cached layout (${CACHE_ENV})",
        )
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PYTHON_INCLUDE)}",
        PYTHON_SUITE,
        str(rootfs),
        mirror,
    ]
    proxies = {name: os.environ[name] for name in PROXY_VARS if name in os.environ}
    try:
        run(argv, env=proxies, timeout=DEBOOTSTRAP_TIMEOUT)
    except ToolError as exc:
        log = rootfs / "debootstrap" / "debootstrap.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        raise BuildError(
            exc.message + ("\ndebootstrap.log:\n" + "\n".join(tail) if tail else ""),
            hint=f"is {mirror} reachable? set ${MIRROR_ENV} or --mirror to use another mirror",
        ) from exc


def _customise_python(rootfs: Path) -> None:
    for pattern in TRIM_GLOBS:
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for name, target in PYTHON_LINKS.items():
        link = rootfs / name
        if not (rootfs / target.lstrip("/")).exists():
            raise BuildError(f"stand-in rootfs has no {target} to link {name} to")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)


def _pack(
    rootfs: Path,
    layout: Path,
    tag: str,
    config: ImageConfig,
    *,
    mtime: int | None = None,
    owner: tuple[int, int] | None = None,
) -> None:
    writer = LayoutWriter(layout)
    layer = writer.add_tree(rootfs, mtime=mtime, owner=owner, empty_dirs=EMPTY_DIRS)
    writer.add_image(tag, [layer], config)


# --- busybox stand-in -------------------------------------------------------------------------


def build_busybox(
    cache: Path | None = None, busybox: Path = BUSYBOX, log: Log = _stderr
) -> BuiltImage:
    """The tiny busybox stand-in layout (cached; reproducible; no root needed)."""
    applets = available_applets(busybox)
    recipe = busybox_recipe(busybox, applets)

    def build(work: Path, layout: Path, log: Log) -> None:
        rootfs = work / "rootfs"
        _busybox_tree(rootfs, busybox, applets)
        config = ImageConfig(
            env=(IMAGE_PATH,),
            cmd=("sh",),
            created=FIXED_CREATED,
            created_by=f"microagent testenv busybox stand-in recipe {RECIPE_VERSION}",
        )
        pack = partial(_pack, rootfs, layout, recipe.tag, config, mtime=FIXED_MTIME, owner=(0, 0))
        _timed(log, "pack", pack)

    return ensure_image(recipe, build, cache, log)


def _busybox_tree(rootfs: Path, busybox: Path, applets: Sequence[str]) -> None:
    for name, mode in (
        ("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555), ("root", 0o700),
        ("sys", 0o555), ("tmp", 0o1777), ("usr", 0o755), ("usr/bin", 0o755),
    ):  # fmt: skip
        (rootfs / name).mkdir(parents=True, exist_ok=True)
        (rootfs / name).chmod(mode)
    shutil.copyfile(busybox, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "busybox").chmod(0o755)
    for applet in applets:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "usr" / "bin" / "env").symlink_to("/bin/busybox")
    for name, text in (
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
    ):
        (rootfs / name).write_text(text)
        (rootfs / name).chmod(0o644)


# --- push / export ----------------------------------------------------------------------------


def push(image: BuiltImage, host: str) -> PushedImage:
    """Push the layout's image to ``HOST/REPOSITORY:TAG`` over plain HTTP, digest preserved."""
    dest = f"docker://{host}/{image.recipe.repository}:{image.recipe.tag}"
    _skopeo_copy(image, dest, "--dest-tls-verify=false")
    return PushedImage(host, image.recipe.repository, image.recipe.tag, image.digest, image.layout)


def export_layout(image: BuiltImage, dest: Path) -> None:
    """Copy the image into the OCI layout ``dest`` (created or added to) under its tag."""
    if ":" in str(dest):
        raise BuildError(f"layout path {dest} must not contain ':'")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _skopeo_copy(image, f"oci:{dest}:{image.recipe.tag}")


def _skopeo_copy(image: BuiltImage, dest: str, *flags: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        digestfile = Path(tmp) / "digest"
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests"]
        argv += [*flags, "--digestfile", str(digestfile), image.oci_ref, dest]
        run(argv, timeout=SKOPEO_TIMEOUT)
        pushed = digestfile.read_text().strip()
    if pushed != image.digest:
        raise BuildError(f"skopeo wrote {dest} as {pushed}, expected {image.digest}")


# --- CLI --------------------------------------------------------------------------------------


def _describe(image: BuiltImage) -> str:
    how = "cache hit" if image.cached else image.how
    mib = image.size() / (1 << 20)
    return f"{how} in {image.seconds:.2f}s: {image.oci_ref} {image.digest} ({mib:.1f} MiB)"


def _build_one(which: str, args: argparse.Namespace) -> None:
    cache = Path(args.cache) if args.cache else None
    _stderr(f"{which}: building or reusing the stand-in")
    if which == "python":
        image = build_python(cache, args.mirror, shared=Path(args.shared))
    else:
        image = build_busybox(cache)
    print(f"{which}: {_describe(image)}", flush=True)
    if args.push:
        began = time.monotonic()
        pushed = push(image, args.push)
        print(f"{which}: pushed {pushed.ref} ({pushed.digest}) in {time.monotonic() - began:.2f}s")
    if args.layout_out:
        export_layout(image, Path(args.layout_out).resolve())
        print(f"{which}: exported to oci:{Path(args.layout_out).resolve()}:{image.recipe.tag}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Stand-in base images for microagent tests.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or reuse) stand-ins; optionally push/export")
    build.add_argument("--which", choices=("python", "busybox", "all"), default="all")
    build.add_argument("--push", metavar="HOST:PORT", help="push to this plain-HTTP registry")
    build.add_argument("--layout-out", metavar="DIR", help="also copy into this OCI layout")
    build.add_argument("--cache", metavar="DIR", help=f"cache dir (default ${CACHE_ENV})")
    build.add_argument(
        "--mirror", help=f"Debian mirror (default ${MIRROR_ENV} or {DEFAULT_MIRROR})"
    )
    build.add_argument(
        "--shared",
        metavar="DIR",
        default=str(sharedcache.SHARED_CACHE),
        help="system-wide cache to copy the python stand-in from (default %(default)s)",
    )
    build.set_defaults(func=_cmd_build)
    share = sub.add_parser("share", help="as root: build the python stand-in for every user")
    share.add_argument("--shared", metavar="DIR", default=str(sharedcache.SHARED_CACHE))
    share.add_argument("--mirror", help=f"Debian mirror (default ${MIRROR_ENV})")
    share.set_defaults(func=_cmd_share)
    prune_cmd = sub.add_parser("prune", help="delete cached layouts of older recipes")
    prune_cmd.add_argument("--cache", metavar="DIR", help=f"cache dir (default ${CACHE_ENV})")
    prune_cmd.set_defaults(func=_cmd_prune)
    return parser


def _cmd_build(args: argparse.Namespace) -> None:
    for name in ("busybox", "python") if args.which == "all" else (args.which,):
        _build_one(name, args)


def _cmd_share(args: argparse.Namespace) -> None:
    image = share_python(Path(args.shared), args.mirror)
    print(f"python: shared, {_describe(image)}", flush=True)


def _cmd_prune(args: argparse.Namespace) -> None:
    for path in prune(Path(args.cache) if args.cache else None):
        print(f"removed {path}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except MicroagentError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
