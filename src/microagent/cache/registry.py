"""Talk to OCI registries through oras-py, verifying every byte against its digest ourselves.

oras-py brings the HTTP session and the token dance (anonymous or with credentials from the
Docker config); this module adds mirrors and plain-HTTP hosts, short timeouts with one quick
retry instead of oras' minutes of back-off, and digest checks on manifests and blobs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from microagent.cache import oci
from microagent.cache.regconfig import Endpoint, RegistryConfig, load_registry_config
from microagent.compiler.image import ImageRef, host_platform
from microagent.compiler.lock import LockEntry, ResolvedImage
from microagent.errors import IntegrityError, NotFoundError, RegistryError

TIMEOUT = (5.0, 60.0)  # connect, read


@dataclass(frozen=True)
class Fetched:
    """A manifest or index exactly as the registry sent it, with its verified digest."""

    data: bytes
    digest: str
    media_type: str
    endpoint: Endpoint

    def document(self) -> Mapping[str, Any]:
        return oci.load_document(self.data, f"manifest {self.digest}")


def _docker_auths() -> dict[str, str]:
    """``host -> base64(user:password)`` from $REGISTRY_AUTH_FILE and the Docker config."""
    files = [os.environ.get("REGISTRY_AUTH_FILE", "")]
    docker_dir = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    files.append(str(Path(docker_dir) / "config.json"))
    auths: dict[str, str] = {}
    for name in filter(None, files):
        try:
            raw = json.loads(Path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for host, entry in (raw.get("auths") or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
                auths.setdefault(host.removeprefix("https://").split("/")[0], entry["auth"])
    return auths


def _credentials(host: str, auths: Mapping[str, str]) -> tuple[str, str] | None:
    aliases = [host] + (["index.docker.io", "docker.io"] if "docker.io" in host else [])
    for alias in aliases:
        if alias in auths:
            user, _, password = base64.b64decode(auths[alias]).decode().partition(":")
            return user, password
    return None


class _Session:
    """One oras Registry per endpoint, with timeouts and without oras' slow retries."""

    def __init__(self, endpoint: Endpoint, auths: Mapping[str, str]) -> None:
        import oras.provider
        import requests

        class Quick(oras.provider.Registry):  # type: ignore[misc]
            do_request = oras.provider.Registry.do_request.__wrapped__

        self.registry = Quick(hostname=endpoint.host, insecure=endpoint.insecure)
        creds = _credentials(endpoint.host, auths)
        if creds:
            self.registry.auth.set_basic_auth(*creds)
        original = self.registry.session.request

        def request(*args: Any, **kwargs: Any) -> requests.Response:
            kwargs.setdefault("timeout", TIMEOUT)
            response: requests.Response = original(*args, **kwargs)
            return response

        self.registry.session.request = request

    def get(self, url: str, headers: dict[str, str], stream: bool = False) -> Any:
        import requests

        try:
            return self.registry.do_request(url, "GET", headers=dict(headers), stream=stream)
        except requests.RequestException as exc:
            base = url.split("/v2/", maxsplit=1)[0]
            raise RegistryError(f"cannot reach {base}: {_short(exc)}") from exc
        except ValueError as exc:  # oras: "Cannot respond to request for authentication."
            raise RegistryError(f"authentication failed for {url}: {exc}") from exc


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in (
        "Connection refused",
        "Name or service not known",
        "timed out",
        "No route to host",
        "Temporary failure in name resolution",
    ):
        if marker in text:
            return marker.lower()
    return text.splitlines()[0][:160]


def _status_error(response: Any, what: str) -> RegistryError | NotFoundError:
    code = response.status_code
    if code == 404:
        return NotFoundError(f"{what}: not found")
    if code in (401, 403):
        return RegistryError(
            f"{what}: access denied (HTTP {code})",
            hint="log in with `docker login` (credentials are read from the Docker config)",
        )
    return RegistryError(f"{what}: HTTP {code} {response.reason}")


class RegistryClient:
    """Fetch manifests and blobs of one image name across its mirrors and registry."""

    def __init__(self, config: RegistryConfig | None = None) -> None:
        self.config = config or load_registry_config()
        self._auths = _docker_auths()
        self._sessions: dict[Endpoint, _Session] = {}

    def _session(self, endpoint: Endpoint) -> _Session:
        if endpoint not in self._sessions:
            self._sessions[endpoint] = _Session(endpoint, self._auths)
        return self._sessions[endpoint]

    def _first(self, ref: ImageRef, attempt: Callable[[Endpoint], Fetched]) -> Fetched:
        problems: list[str] = []
        for endpoint in self.config.endpoints(ref.registry):
            try:
                return attempt(endpoint)
            except (RegistryError, NotFoundError) as exc:
                problems.append(f"{endpoint}: {exc.message}")
        raise RegistryError(
            f"cannot fetch {ref}: " + "; ".join(problems),
            hint="check the image name and tag, the network, or the mirrors in the "
            "registry config (MICROAGENT_REGISTRY_MIRRORS)",
        )

    def manifest(self, ref: ImageRef, reference: str) -> Fetched:
        """The manifest or index named by a tag or digest, digest-verified."""

        def attempt(endpoint: Endpoint) -> Fetched:
            url = endpoint.url(ref.repository, "manifests", reference)
            response = self._session(endpoint).get(url, {"Accept": oci.ACCEPT})
            if response.status_code != 200:
                raise _status_error(response, f"manifest {ref.repository}:{reference}")
            data = response.content
            return _verified(data, reference, response.headers, endpoint)

        return self._first(ref, attempt)

    def resolve(self, ref: ImageRef, platform: str) -> ResolvedImage:
        """Pin ``ref`` to the digest its tag points at, and to the platform's manifest."""
        top = self.manifest(ref, ref.reference)
        kind = oci.media_type_of(top.document(), top.media_type)
        platform_digest = top.digest
        if kind in oci.INDEX_TYPES:
            index = oci.parse_index(top.document(), kind)
            platform_digest = oci.select_platform(index, platform).digest
        return ResolvedImage(
            str(ref.with_digest(top.digest)), top.digest, platform, platform_digest
        )

    def lock_entry(self, ref: ImageRef) -> LockEntry:
        """What ``microagent.lock`` records for ``ref``: its digest and each platform's."""
        top = self.manifest(ref, ref.reference)
        kind = oci.media_type_of(top.document(), top.media_type)
        if kind in oci.INDEX_TYPES:
            index = oci.parse_index(top.document(), kind)
            platforms = {
                m.platform: m.digest
                for m in index.manifests
                if m.platform and not m.platform.startswith("unknown")
            }
        else:
            platforms = {host_platform(): top.digest}
        return LockEntry(str(ref), top.digest, platforms)

    @contextmanager
    def blob(self, ref: ImageRef, digest: str) -> Iterator[BinaryIO]:
        """A raw (undecoded) stream of a blob; the caller verifies while consuming."""
        problems: list[str] = []
        for endpoint in self.config.endpoints(ref.registry):
            url = endpoint.url(ref.repository, "blobs", digest)
            try:
                response = self._session(endpoint).get(url, {}, stream=True)
            except RegistryError as exc:
                problems.append(f"{endpoint}: {exc.message}")
                continue
            if response.status_code != 200:
                problems.append(f"{endpoint}: {_status_error(response, 'blob').message}")
                response.close()
                continue
            try:
                yield response.raw
            finally:
                response.close()
            return
        raise RegistryError(f"cannot fetch blob {digest} of {ref.name}: " + "; ".join(problems))


def _verified(data: bytes, reference: str, headers: Mapping[str, str], where: Endpoint) -> Fetched:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    claimed = headers.get("Docker-Content-Digest")
    if reference.startswith("sha256:") and reference != digest:
        raise IntegrityError(f"manifest from {where} does not match {reference} (got {digest})")
    if claimed and claimed.startswith("sha256:") and claimed != digest:
        raise IntegrityError(f"manifest from {where}: header says {claimed}, content is {digest}")
    return Fetched(data, digest, headers.get("Content-Type", "").split(";")[0], where)
