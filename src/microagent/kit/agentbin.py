"""The guest agent binary: ``kit/agent/ma-agent.c`` compiled once per source and compiler.

The agent (docs/agent-protocol.md) runs in the initramfs, outside the workspace's root, so it
may not depend on any library of the guest: it is linked statically against the host's C
library (Debian packages ``gcc libc6-dev``). The result is content-addressed like the kit
itself: the store entry ``kits/ma-agent-<key>``, where the key is the sha256 of a canonical
manifest of the source's sha256, the compiler's version line, the flags and the target
architecture. The store writes it under a temp name and renames it into place under a lock
(:meth:`Store.build_once`), so concurrent builds compile once and nobody sees half a file.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from microagent import runner
from microagent.digests import canonical_json
from microagent.errors import BuildError, ToolError
from microagent.kit import debian
from microagent.store.content import Store

PACKAGES = "gcc libc6-dev"
CFLAGS = ("-std=gnu11", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")
# Debian's cross compilers (gcc-<triplet> and libc6-dev-<arch>-cross) for a guest of another
# architecture than the host.
CROSS_TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}
COMPILE_TIMEOUT = 300

# Binaries compiled by this process, by key: a process that builds kits in several stores
# (the test suite) compiles each source once.
_compiled: dict[str, bytes] = {}

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


def source_bytes() -> bytes:
    """The agent's C source as shipped in the package."""
    return resources.files("microagent.kit").joinpath("agent", "ma-agent.c").read_bytes()


def source_digest() -> str:
    """sha256 of the source: part of the kit recipe, so a changed agent makes a new kit."""
    return hashlib.sha256(source_bytes()).hexdigest()


def find_compiler(arch: str) -> str:
    """``gcc`` for a guest of the host's architecture, else Debian's ``<triplet>-gcc``."""
    cross = arch != debian.debian_arch()
    if cross and arch not in CROSS_TRIPLETS:
        raise BuildError(f"cannot build the guest agent for architecture {arch!r}")
    name = f"{CROSS_TRIPLETS[arch]}-gcc" if cross else "gcc"
    packages = f"gcc-{CROSS_TRIPLETS[arch]} libc6-dev-{arch}-cross" if cross else PACKAGES
    try:
        return runner.find_tool(name)
    except ToolError as exc:
        raise ToolError(
            f"{exc.message}: it builds the guest agent (a static C program)",
            hint=f"install it, e.g. `apt-get install {packages}`",
        ) from exc


@functools.cache
def compiler_version(compiler: str) -> str:
    """The first line of ``<compiler> --version`` (probed once per process)."""
    lines = runner.run([compiler, "--version"], timeout=60).stdout.splitlines()
    return lines[0].strip() if lines else ""


def build_key(source: bytes, compiler: str, arch: str) -> str:
    """The content key of the binary made from ``source`` by compiler version ``compiler``."""
    manifest = {
        "source": hashlib.sha256(source).hexdigest(),
        "compiler": compiler,
        "flags": list(CFLAGS),
        "arch": arch,
    }
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def _compile(compiler: str, source: bytes, key: str, progress: Progress) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        if key not in _compiled:
            progress("compiling the guest agent")
            # The source goes in on stdin: exactly the bytes the key was computed from.
            argv = [compiler, *CFLAGS, "-x", "c", "-", "-o", str(tmp)]
            try:
                runner.run(argv, input=source, timeout=COMPILE_TIMEOUT)
            except ToolError as exc:
                raise BuildError(
                    f"cannot compile the guest agent (kit/agent/ma-agent.c): {exc.message}",
                    hint=f"a static build needs `{PACKAGES}`",
                ) from exc
            _compiled[key] = tmp.read_bytes()
        else:
            tmp.write_bytes(_compiled[key])
        tmp.chmod(0o755)

    return build


def agent_binary(store: Store, arch: str | None = None, *, progress: Progress = _quiet) -> Path:
    """The path of the agent binary for ``arch`` (default: this host's), compiled if needed."""
    arch = arch or debian.debian_arch()
    compiler = find_compiler(arch)
    source = source_bytes()
    key = build_key(source, compiler_version(compiler), arch)
    return store.build_once(f"kits/ma-agent-{key}", _compile(compiler, source, key, progress))
