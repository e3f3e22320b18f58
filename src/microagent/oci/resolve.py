"""Pinning a spec's image to a digest: the spec itself, ``microagent.lock``, or the source."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from microagent.compiler.lock import ResolvedImage, lock_path_for, read_lock
from microagent.compiler.refs import LayoutRef, host_platform, parse_any_ref
from microagent.compiler.spec import Spec
from microagent.errors import InvalidInputError

if TYPE_CHECKING:
    from microagent.oci.registry import RegistryClient


def resolve_image(
    spec: Spec,
    client: Callable[[], RegistryClient],
    platform: str | None = None,
    *,
    offline: bool = False,
) -> ResolvedImage:
    """Pin the spec's image: a digest in the spec, else ``microagent.lock``, else the source.

    ``client`` is called only when a registry must be asked. With ``offline`` an unpinned
    registry tag is an error instead of a registry round trip; a local layout (``oci:``) is
    read from disk, lock or not.
    """
    target = platform or host_platform()
    ref = parse_any_ref(spec.image, spec.base_dir)
    if ref.digest:
        return ResolvedImage(str(ref), ref.digest, target)
    lock = read_lock(lock_path_for(spec.source))
    pinned = lock.lookup(spec.image, target) if lock else None
    if pinned is not None:
        return pinned
    # deferred: a pinned image (the common case) needs no registry code at all
    from microagent.oci.transport import open_repository, resolve

    if isinstance(ref, LayoutRef):  # on disk: no network, offline or not
        from microagent.oci.layout import Layout  # deferred: as above

        return resolve(Layout(ref.path), ref, target)
    if offline:
        raise InvalidInputError(
            f"image {spec.image!r} is a tag with no pinned digest",
            hint="pin it as NAME@sha256:<digest> or run `microagent lock --file SPEC`",
        )
    return resolve(open_repository(ref, client()), ref, target)
