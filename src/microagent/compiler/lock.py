"""``microagent.lock``: the image digests a team pins, and the resolver interface.

The lock sits beside the spec and records, for each image reference written in the spec, the
digest the tag pointed at and the manifest digest per platform::

    {
      "lockVersion": 1,
      "images": {
        "python:3.13-slim": {
          "reference": "docker.io/library/python:3.13-slim",
          "digest": "sha256:...",
          "platforms": {"linux/amd64": "sha256:...", "linux/arm64": "sha256:..."}
        }
      }
    }

``digest`` is what the tag resolved to (an index or a single manifest). Build keys use it
together with the platform, so a pinned ``name@digest`` and a locked tag give the same key.

The lock is meant for git: a local layout (``oci:PATH``) is recorded as the spec wrote it,
normalised (``oci:./layouts/../bb/`` -> ``oci:bb``) and relative to the spec's folder, never
as this machine's absolute path. Locks written before that (an absolute ``reference`` and an
un-normalised key) still load, and ``microagent lock`` rewrites them in the new form.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from microagent.compiler.refs import ImageRef, LayoutRef, parse_layout_ref, portable_ref
from microagent.digests import is_digest
from microagent.errors import InvalidInputError
from microagent.frozen import Frozen
from microagent.fsutil import write_json_atomic

LOCK_NAME = "microagent.lock"
LOCK_VERSION = 1


@dataclass(frozen=True, eq=False, repr=False)
class ResolvedImage(Frozen):
    """An image pinned to a digest for one platform."""

    reference: str
    digest: str
    platform: str
    platform_digest: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "platform": self.platform,
            "platformDigest": self.platform_digest,
        }


class ImageResolver(Protocol):
    """Turns a tag into a digest (a registry, a layout folder, or a lock file)."""

    def resolve(self, ref: ImageRef | LayoutRef, platform: str) -> ResolvedImage: ...


@dataclass(frozen=True, eq=False, repr=False)
class LockEntry(Frozen):
    reference: str
    digest: str
    platforms: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "platforms": dict(sorted(self.platforms.items())),
        }


def lock_key(image: str) -> str:
    """The lock's key for an image as a spec writes it (a layout path normalised)."""
    return portable_ref(image)


@dataclass(frozen=True, eq=False, repr=False)
class LockFile(Frozen):
    """The parsed lock: image text as written in the spec (see :func:`lock_key`) -> entry.

    ``outdated``: read from a lock in the old form (absolute layout paths); writing it again
    gives the portable form."""

    path: Path
    images: Mapping[str, LockEntry] = field(default_factory=dict)
    outdated: bool = field(default=False, compare=False)

    def lookup(self, image: str, platform: str) -> ResolvedImage | None:
        """The pinned image; a layout's reference is absolute (this machine's path to it)."""
        entry = self.images.get(lock_key(image))
        if entry is None:
            return None
        reference = entry.reference
        if reference.startswith("oci:"):
            reference = str(parse_layout_ref(reference, self.path.parent))
        return ResolvedImage(reference, entry.digest, platform, entry.platforms.get(platform))

    def with_entry(self, image: str, entry: LockEntry) -> LockFile:
        images = dict(self.images)
        images[lock_key(image)] = entry
        return LockFile(self.path, images)

    def to_json(self) -> dict[str, object]:
        images = {k: v.to_json() for k, v in sorted(self.images.items())}
        return {"lockVersion": LOCK_VERSION, "images": images}


def lock_path_for(spec_source: Path) -> Path:
    return spec_source.parent / LOCK_NAME


def _bad_lock(path: Path, why: str) -> InvalidInputError:
    return InvalidInputError(
        f"{path}: invalid lock file: {why}",
        hint="regenerate it with `microagent lock --update --file SPEC`",
    )


def _entry(path: Path, image: str, raw: object) -> LockEntry:
    if not isinstance(raw, dict):
        raise _bad_lock(path, f"entry for {image!r} is not an object")
    digest = raw.get("digest")
    platforms = raw.get("platforms", {})
    if not is_digest(digest):
        raise _bad_lock(path, f"entry for {image!r} has no valid digest")
    if not isinstance(platforms, dict) or not all(is_digest(v) for v in platforms.values()):
        raise _bad_lock(path, f"platforms of {image!r} must map platform to digest")
    reference = raw.get("reference", image)
    if not isinstance(reference, str):
        raise _bad_lock(path, f"the reference of {image!r} must be a string")
    if image.startswith("oci:"):  # a layout names itself: the key, as the spec wrote it
        reference = image
    return LockEntry(reference, digest, dict(platforms))


def read_lock(path: Path) -> LockFile | None:
    """The lock at ``path``, ``None`` when there is none; bad content is an error.

    Layout keys and references come back portable (see :func:`lock_key`) even from a lock
    written with absolute paths."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad_lock(path, str(exc)) from exc
    if not isinstance(raw, dict) or raw.get("lockVersion") != LOCK_VERSION:
        raise _bad_lock(path, f"expected lockVersion {LOCK_VERSION}")
    images = raw.get("images", {})
    if not isinstance(images, dict):
        raise _bad_lock(path, "`images` must be an object")
    entries: dict[str, LockEntry] = {}
    for text, value in images.items():
        try:
            key = lock_key(str(text))
        except InvalidInputError as exc:
            raise _bad_lock(path, exc.message) from exc
        entries[key] = _entry(path, key, value)
    lock = LockFile(path, entries)
    return LockFile(path, entries, outdated=lock.to_json() != raw)


def write_lock(lock: LockFile) -> None:
    """Write the lock atomically (temp file + rename), pretty and stable for diffs."""
    write_json_atomic(lock.path, lock.to_json())
