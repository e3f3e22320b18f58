"""Image references: parsing, docker.io normalisation, digests and platforms (pure)."""

from __future__ import annotations

import os
import platform as _platform
import re
from dataclasses import dataclass
from pathlib import Path

from microagent.digests import check_digest
from microagent.errors import InvalidInputError
from microagent.frozen import Frozen

DEFAULT_REGISTRY = "docker.io"
# Whole-string patterns: always used with fullmatch (``$`` would accept a trailing newline).
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST_RE = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9a-fA-F:]+\](?::[0-9]{1,5})?")
# An image layout's org.opencontainers.image.ref.name component (the OCI spec's grammar).
_LAYOUT_TAG_RE = re.compile(r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "x64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def host_platform() -> str:
    """``linux/<arch>`` of this machine in OCI spelling (amd64, arm64)."""
    machine = _platform.machine().lower()
    return f"linux/{_ARCH.get(machine, machine)}"


@dataclass(frozen=True, eq=False, repr=False)
class ImageRef(Frozen):
    """A registry image: ``registry/repository[:tag][@digest]``, normalised."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def with_digest(self, digest: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, self.tag, digest)

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def pinned(self, digest: str) -> str:
        """The reference as resolved: name, tag and the digest it pointed at."""
        return str(self.with_digest(digest))


@dataclass(frozen=True, eq=False, repr=False)
class LayoutRef(Frozen):
    """An OCI image layout folder on disk (``oci:PATH[:TAG]``), for air-gapped use."""

    path: Path
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str | None:
        """The digest or tag to look up; None: the layout's only image."""
        return self.digest or self.tag

    def pinned(self, digest: str) -> str:
        """The reference as resolved (a layout folder names itself; the digest is recorded
        separately)."""
        return str(self)

    def __str__(self) -> str:
        text = f"oci:{_folder_text(str(self.path))}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _folder_text(path: str) -> str:
    """A layout path as ``oci:`` text: a trailing slash keeps a last component with a colon
    (``a:b``) a folder name rather than ``a`` with the tag ``b``."""
    return path + "/" if ":" in path.rpartition("/")[2] else path


def _split_digest(text: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    rest, digest = text.rsplit("@", 1)
    return rest, check_digest(digest)


def _split_tag(text: str) -> tuple[str, str | None]:
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        return text[:colon], text[colon + 1 :]
    return text, None


def _split_registry(name: str) -> tuple[str, str]:
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return DEFAULT_REGISTRY, name


def _invalid(text: str, why: str) -> InvalidInputError:
    return InvalidInputError(
        f"invalid image reference {text!r}: {why}",
        hint="e.g. python:3.13-slim, ghcr.io/org/image:tag, name@sha256:<64 hex>, oci:./layout",
    )


def _check_tag(text: str, tag: str | None, pattern: re.Pattern[str] = _TAG_RE) -> None:
    if tag is not None and not pattern.fullmatch(tag):
        raise _invalid(text, f"bad tag {tag!r}")


def parse_image_ref(text: str) -> ImageRef:
    """Parse and normalise a registry reference (``python`` -> ``docker.io/library/python``)."""
    if text != text.strip():
        raise _invalid(text, "leading or trailing whitespace")
    rest, digest = _split_digest(text)
    name, tag = _split_tag(rest)
    registry, repository = _split_registry(name)
    if registry in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        registry = DEFAULT_REGISTRY
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _HOST_RE.fullmatch(registry):
        raise _invalid(text, f"bad registry host {registry!r}")
    for part in repository.split("/"):
        if not _COMPONENT_RE.fullmatch(part):
            raise _invalid(
                text, f"bad repository component {part!r} (lowercase letters, digits, . _ -)"
            )
    _check_tag(text, tag)
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry, repository, tag, digest)


def _layout_parts(text: str) -> tuple[str, str | None, str | None]:
    """``oci:PATH[:TAG][@DIGEST]`` -> (PATH, TAG, DIGEST), checked but not yet a Path."""
    body, digest = _split_digest(text.removeprefix("oci:"))
    path_text, tag = body, None
    colon = body.rfind(":")
    if colon > body.rfind("/"):
        path_text, tag = body[:colon], body[colon + 1 :]
    if not path_text:
        raise _invalid(text, "missing layout path after 'oci:'")
    if "\x00" in path_text or "\n" in path_text:
        raise _invalid(text, "the layout path contains a NUL or newline character")
    _check_tag(text, tag or None, _LAYOUT_TAG_RE)
    return path_text, tag or None, digest


def parse_layout_ref(text: str, base: Path) -> LayoutRef:
    """Parse ``oci:PATH[:TAG]`` or ``oci:PATH@sha256:...``; PATH is relative to ``base``.

    The path is made absolute and normalised lexically (``a/./b/../c`` -> ``a/c``)."""
    path_text, tag, digest = _layout_parts(text)
    try:
        path = Path(path_text).expanduser()
    except RuntimeError as exc:  # ~user of a user that does not exist
        raise _invalid(text, str(exc)) from exc
    return LayoutRef(Path(os.path.normpath(base / path)), tag, digest)


def portable_ref(text: str) -> str:
    """A reference as a file meant for git (and every message about a spec) shows it.

    An ``oci:`` layout keeps the path as written, normalised lexically (``oci:./a/../b/`` ->
    ``oci:b``): relative (to the spec's folder) when written relative, so the lock file and
    plans read the same on every checkout. Registry references are returned unchanged."""
    if not text.startswith("oci:"):
        return text
    path_text, tag, digest = _layout_parts(text)
    out = f"oci:{_folder_text(os.path.normpath(path_text))}"
    if tag:
        out += f":{tag}"
    if digest:
        out += f"@{digest}"
    return out


def parse_any_ref(text: str, base: Path) -> ImageRef | LayoutRef:
    """A registry reference or, with the ``oci:`` prefix, a local layout."""
    if text.startswith("oci:"):
        return parse_layout_ref(text, base)
    return parse_image_ref(text)
