"""Talk to OCI registries through oras-py, verifying every byte against its digest ourselves.

oras-py brings the HTTP session and the retry on 401; this module does the token dance itself
(anonymous, or with credentials from the Docker config), adds mirrors and plain-HTTP hosts,
size caps, digest checks on manifests and blobs, and its own :class:`RetryPolicy` instead of
oras' minutes of back-off: transient faults (429 and 5xx answers, a connection reset or closed
early, a read that stalls or trickles) are tried again after a short jittered pause, honouring
Retry-After up to a bound, within a deadline; a blob download that breaks resumes where it
broke (HTTP Range). Everything else fails at once, and every failure of the transport is
translated here into :class:`RegistryError` (nothing from requests or urllib3 escapes).
A mirror gets one try per request: the next endpoint is the retry. Every request has a
connect and a read timeout (``RetryPolicy.timeout``, the token service's included); the
numbers come from the user's settings (:meth:`RegistryClient.from_settings`), and each retry
is one line to ``notify``.

Credentials go to as few places as possible: they are looked up under the exact host being
talked to (Docker Hub's three names count as one), never under the image's registry when a
mirror serves it, and are sent only as Basic auth to a token service on that same host (for
Docker Hub also ``auth.docker.io``), over HTTPS unless the host is loopback or explicitly
listed as insecure. Anywhere else the token is asked for anonymously.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import urlsplit

from microagent.compiler.refs import ImageRef
from microagent.digests import sha256_digest
from microagent.errors import IntegrityError, NotFoundError, RegistryError
from microagent.oci import documents as oci
from microagent.oci._retry import (
    BROKEN_HINT,
    Notify,
    ResumingStream,
    RetryPolicy,
    Sleep,
    Transient,
    Watch,
    is_transient,
    retrying,
    short,
    silent,
    status_failure,
    transport_errors,
)
from microagent.oci.documents import Fetched
from microagent.oci.endpoints import DOCKER_HUB_HOST, Endpoint, RegistryConfig, is_loopback
from microagent.progress import Sent, reporting_position
from microagent.settings import Settings

PUSH_CHUNK = 64 << 20  # larger blobs are uploaded in PATCH chunks of this size
MAX_TOKEN_BYTES = 1 << 20  # a token service's JSON answer
READ_CHUNK = 64 << 10
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", DOCKER_HUB_HOST)
DOCKER_HUB_REALMS = ("auth.docker.io",)  # Hub's token service, the one foreign realm trusted
T = TypeVar("T")


def read_auths(files: Sequence[Path]) -> dict[str, str]:
    """``host -> base64(user:password)`` from Docker-style auth files (first file wins)."""
    auths: dict[str, str] = {}
    for name in files:
        try:
            raw = json.loads(name.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        entries = raw.get("auths") if isinstance(raw, dict) else None
        for host, entry in (entries if isinstance(entries, dict) else {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
                auths.setdefault(_auth_host(host), entry["auth"])
    return auths


def _auth_host(key: str) -> str:
    """The host an auth file entry names: ``https://index.docker.io/v1/`` -> index.docker.io."""
    return key.split("://", 1)[-1].split("/", 1)[0].lower()


def _credentials(host: str, auths: Mapping[str, str]) -> str | None:
    """The base64 ``user:password`` stored for exactly this host (Hub: any of its names)."""
    host = host.lower()
    aliases = DOCKER_HUB_ALIASES if host in DOCKER_HUB_ALIASES else (host,)
    for alias in (host, *aliases):
        if alias in auths:
            return auths[alias]
    return None


def _authority(scheme: str, netloc: str) -> tuple[str, int] | None:
    """``(host, port)`` of a URL's netloc, the port defaulted by scheme; None if odd."""
    default = {"https": 443, "http": 80}.get(scheme)
    if default is None or "@" in netloc:
        return None
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port or default
    except ValueError:
        return None
    return ((parts.hostname or "").lower(), port) if parts.hostname else None


@dataclass(frozen=True)
class CredentialScope:
    """Where one endpoint's Basic credentials may be sent: its token service, if that is on
    the endpoint's own host (Docker Hub: also auth.docker.io) and, unless ``plain_http`` is
    allowed (an explicitly insecure or a loopback host), reached over HTTPS."""

    endpoint: Endpoint
    plain_http: bool = False

    @classmethod
    def of(cls, endpoint: Endpoint, insecure: frozenset[str]) -> CredentialScope:
        plain = endpoint.host.lower() in {h.lower() for h in insecure}
        return cls(endpoint, plain_http=plain or is_loopback(endpoint.host))

    def allows(self, realm: str) -> bool:
        """May Basic credentials be sent to the token service at ``realm``?"""
        try:
            parts = urlsplit(realm)
        except ValueError:
            return False
        if parts.scheme != "https" and not (parts.scheme == "http" and self.plain_http):
            return False
        return _authority(parts.scheme, parts.netloc) in self._hosts()

    def _hosts(self) -> set[tuple[str, int] | None]:
        hosts = {_authority(self.endpoint.scheme, self.endpoint.host)}
        if self.endpoint.host.lower() in DOCKER_HUB_ALIASES:
            hosts |= {(realm, 443) for realm in DOCKER_HUB_REALMS}
        return hosts


class _Session:
    """One oras Registry per endpoint, with timeouts, our retries instead of oras' slow ones
    (one try on a mirror: the next endpoint is the retry), and our own token dance (see
    :class:`CredentialScope`)."""

    def __init__(
        self,
        endpoint: Endpoint,
        auths: Mapping[str, str],
        scope: CredentialScope,
        policy: RetryPolicy,
        sleep: Sleep,
        *,
        notify: Notify = silent,
    ) -> None:
        # deferred: oras and requests take ~0.1 s to import; only registry traffic needs them
        import oras.auth
        import oras.provider
        import requests

        session = self

        class Quick(oras.provider.Registry):  # type: ignore[misc]
            do_request = oras.provider.Registry.do_request.__wrapped__

        class Guarded(oras.auth.TokenAuth):  # type: ignore[misc]
            def authenticate_request(
                self, original: requests.Response, headers: dict[str, str], refresh: bool = False
            ) -> tuple[dict[str, str], bool]:
                return session.authenticate(self, original, headers, refresh)

        self.scope = scope
        self.policy = replace(policy, attempts=1) if endpoint.mirror else policy
        self.sleep = sleep
        self.notify = notify
        self.host = endpoint.host
        self.basic = _credentials(endpoint.host, auths)
        self.withheld: str | None = None  # a token service credentials were kept from
        self.registry = Quick(hostname=endpoint.host, insecure=endpoint.insecure)
        self.registry.auth = Guarded()
        self.registry.auth.session = self.registry.session
        original = self.registry.session.request

        def request(*args: Any, **kwargs: Any) -> requests.Response:
            kwargs.setdefault("timeout", policy.timeout)
            response: requests.Response = original(*args, **kwargs)
            return response

        self.registry.session.request = request

    def authenticate(
        self, auth: Any, original: Any, headers: dict[str, str], refresh: bool
    ) -> tuple[dict[str, str], bool]:
        """oras' hook on a 401/403: get a bearer token and retry with it (a new token when
        the one held was refused, e.g. scoped to another repository)."""
        headers = dict(headers or {})
        sent = original.request.headers.get("Authorization") if original.request else None
        if refresh or (auth.token is not None and sent == f"Bearer {auth.token}"):
            auth.token = None
        if auth.token is None:
            challenge = _bearer_challenge(original.headers.get("WWW-Authenticate", ""))
            auth.token = self._token(challenge) if challenge else None
        if auth.token is None:
            return headers, False
        headers["Authorization"] = f"Bearer {auth.token}"
        return headers, True

    def _token(self, challenge: Mapping[str, str]) -> str | None:
        """A token from the challenge's realm: with credentials only where the scope allows."""
        realm = challenge.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            return None
        basic = self.basic if self.basic and self.scope.allows(realm) else None
        if self.basic and basic is None:
            self.withheld = _redacted(realm)
        headers = {"Accept": "application/json"}
        if basic:
            headers["Authorization"] = f"Basic {basic}"
        params = {k: challenge[k] for k in ("service", "scope") if challenge.get(k)}
        response = self.registry.session.get(
            realm, headers=headers, params=params, stream=True, allow_redirects=basic is None
        )
        try:
            if response.status_code != 200:
                return None
            data = self.body(response, MAX_TOKEN_BYTES, "the token service's answer")
        finally:
            response.close()
        return _token_of(data)

    def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        *,
        data: bytes | None = None,
        stream: bool = False,
    ) -> Any:
        """One request, tried again while it fails transiently (429, 5xx, a reset): the
        response to the last try, or RegistryError."""
        return self.retry(lambda: self.once(method, url, headers, data=data, stream=stream))

    def retry(self, fn: Callable[[], T]) -> T:
        """``fn()`` under this endpoint's policy, each retry told to the user."""
        return retrying(fn, self.policy, self.sleep, notify=self.notify, host=self.host)

    def once(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        *,
        data: bytes | BinaryIO | None = None,
        stream: bool = False,
    ) -> Any:
        """One try through oras (auth, token): the response, :class:`Transient` for a fault
        worth another try, RegistryError for others; never logs credentials."""
        where = _redacted(url)
        try:
            response = self.registry.do_request(
                url, method, data=data, headers=dict(headers), stream=stream
            )
        except transport_errors() as exc:
            if is_transient(exc):
                raise Transient(f"{method} {where}: {short(exc)}", cause=short(exc)) from exc
            base = url.split("/v2/", maxsplit=1)[0]
            raise RegistryError(
                f"cannot reach {base}: {short(exc)}",
                hint="check the registry address and the network (a plain-HTTP registry must "
                "be listed in MICROAGENT_INSECURE_REGISTRIES)",
            ) from exc
        except ValueError as exc:  # oras: "Cannot respond to request for authentication."
            note = f"; {self.note()}" if self.note() else ""
            raise RegistryError(
                f"authentication failed for {where}: {exc}{note}",
                hint="check the credentials for this registry (`docker login`; they are read "
                "from the Docker config)",
            ) from exc
        transient = status_failure(response, f"{method} {where}")
        if transient is not None:
            response.close()
            raise transient
        return response

    def body(self, response: Any, limit: int, what: str) -> bytes:
        """A small body (a manifest, a token), capped; transport failures translated."""
        return read_capped(response, limit, what, Watch(self.policy))

    def note(self) -> str:
        """Why credentials were not used, for an access-denied message ('' if they were)."""
        if self.withheld is None:
            return ""
        return (
            f"credentials were not sent to the token service {self.withheld}: it is not on "
            "the registry's own host, or not HTTPS (list the registry as insecure to allow "
            "plain HTTP)"
        )


def _bearer_challenge(header: str) -> dict[str, str]:
    """The parameters of a ``Bearer`` challenge (empty for any other scheme)."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return {}
    return {k.lower(): v for k, v in re.findall(r'([A-Za-z]+)="([^"]*)"', rest)}


def _token_of(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    return token if isinstance(token, str) and token else None


def read_capped(response: Any, limit: int, what: str, watch: Watch) -> bytes:
    """A streamed response's body, refused (IntegrityError) once it exceeds ``limit`` bytes;
    a broken or stalled transfer is :class:`Transient`."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise IntegrityError(f"{what} is larger than {_size(limit)} ({declared} bytes announced)")
    body = bytearray()
    while chunk := watch.read(response.raw, READ_CHUNK, True, f"reading {what}"):
        body += chunk
        if len(body) > limit:
            raise IntegrityError(f"{what} is larger than {_size(limit)}")
    return bytes(body)


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"


def _redacted(url: str) -> str:
    """A URL fit for messages: no query (upload state tokens), no userinfo."""
    scheme, sep, rest = url.partition("://")
    rest = rest.split("?", 1)[0]
    rest = rest.rsplit("@", 1)[-1] if "@" in rest.split("/", 1)[0] else rest
    return f"{scheme}{sep}{rest}"


def _status_error(response: Any, what: str, note: str = "") -> RegistryError | NotFoundError:
    code = response.status_code
    if code == 404:
        return NotFoundError(f"{what}: not found")
    if code in (401, 403):
        return RegistryError(
            f"{what}: access denied (HTTP {code})" + (f"; {note}" if note else ""),
            hint="log in with `docker login` (credentials are read from the Docker config)",
        )
    return RegistryError(f"{what}: HTTP {code} {response.reason}", hint=REFUSED_HINT)


class RegistryClient:
    """Fetch manifests and blobs of one image name across its mirrors and registry.

    ``retry`` says how transient faults are ridden out; ``sleep`` is how the pauses between
    tries are taken (tests pass one that records them); ``notify`` gets one line per retry
    (the CLI prints it on stderr).
    """

    def __init__(
        self,
        config: RegistryConfig | None = None,
        auths: Mapping[str, str] | None = None,
        *,
        retry: RetryPolicy | None = None,
        sleep: Sleep = time.sleep,
        notify: Notify = silent,
    ) -> None:
        self.config = config or RegistryConfig()
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._notify = notify
        self._auths = dict(auths or {})
        self._sessions: dict[Endpoint, _Session] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, notify: Notify = silent) -> RegistryClient:
        """Mirrors, plain-HTTP hosts, credentials, retries and timeouts as the settings say."""
        return cls(
            RegistryConfig.from_settings(settings),
            read_auths(settings.auth_files),
            retry=RetryPolicy.of(settings),
            notify=notify,
        )

    def _session(self, endpoint: Endpoint) -> _Session:
        if endpoint not in self._sessions:
            scope = CredentialScope.of(endpoint, self.config.insecure)
            session = _Session(
                endpoint, self._auths, scope, self.retry, self._sleep, notify=self._notify
            )
            self._sessions[endpoint] = session
        return self._sessions[endpoint]

    def manifest(self, ref: ImageRef, reference: str) -> Fetched:
        """The manifest or index named by a tag or digest, digest-verified."""
        problems: list[str] = []
        hint = (
            "check the image name and tag, the network, or the mirrors in the registry "
            "config (MICROAGENT_REGISTRY_MIRRORS)"
        )
        endpoints = self.config.endpoints(ref.registry)
        for i, endpoint in enumerate(endpoints):
            try:
                found = self._get_manifest(endpoint, ref, reference)
            except (RegistryError, NotFoundError) as exc:
                problems.append(f"{endpoint}: {exc.message}")
                hint = exc.hint or hint  # the registry's own failure says best what to do
                self._fall_back(endpoints, i, exc.message)
                continue
            if found is not None:
                return found
            problems.append(f"{endpoint}: manifest {ref.repository}:{reference}: not found")
        raise RegistryError(f"cannot fetch {ref}: " + "; ".join(problems), hint=hint)

    def find_manifest(self, ref: ImageRef, reference: str) -> Fetched | None:
        """Like :meth:`manifest`, but None when the registry itself says 404 (a cache miss;
        a mirror only copies it, so its failure does not matter then)."""
        problems: list[str] = []
        endpoints = self.config.endpoints(ref.registry)
        for i, endpoint in enumerate(endpoints):
            try:
                found = self._get_manifest(endpoint, ref, reference)
            except RegistryError as exc:
                problems.append(f"{endpoint}: {exc.message}")
                self._fall_back(endpoints, i, exc.message)
                continue
            if found is not None:
                return found
            if not endpoint.mirror:
                return None
        if problems:
            raise RegistryError(
                f"cannot look up {ref.name}:{reference}: " + "; ".join(problems),
                hint=BROKEN_HINT,
            )
        return None

    def _fall_back(self, endpoints: Sequence[Endpoint], failed: int, message: str) -> None:
        """Tell the user that ``endpoints[failed]`` (a mirror: one try) failed and the next
        one is tried: a mirror's retry."""
        if failed + 1 < len(endpoints):
            where = endpoints[failed]
            self._notify(f"registry {where.host}: {message}; trying {endpoints[failed + 1]}")

    def _get_manifest(self, endpoint: Endpoint, ref: ImageRef, reference: str) -> Fetched | None:
        """One GET: the verified manifest, None on 404, RegistryError otherwise."""
        url = endpoint.url(ref.repository, "manifests", reference)
        session = self._session(endpoint)
        what = f"manifest {ref.repository}:{reference}"

        def fetch() -> tuple[bytes, Mapping[str, str]] | None:
            response = session.once("GET", url, {"Accept": oci.ACCEPT}, stream=True)
            try:
                if response.status_code == 404:
                    return None
                if response.status_code != 200:
                    raise _status_error(response, what, session.note())
                limit = oci.MAX_DOCUMENT_BYTES
                return session.body(response, limit, f"{what} from {endpoint}"), response.headers
            finally:
                response.close()

        found = session.retry(fetch)
        return None if found is None else _verified(found[0], reference, found[1], endpoint)

    @contextmanager
    def blob(self, ref: ImageRef, digest: str) -> Iterator[BinaryIO]:
        """A raw (undecoded) stream of a blob; the caller verifies while consuming."""
        problems: list[str] = []
        hint = ""
        endpoints = self.config.endpoints(ref.registry)
        for i, endpoint in enumerate(endpoints):
            url = endpoint.url(ref.repository, "blobs", digest)
            session = self._session(endpoint)
            try:
                response = session.request("GET", url, {}, stream=True)
            except RegistryError as exc:
                problems.append(f"{endpoint}: {exc.message}")
                hint = exc.hint or hint
                self._fall_back(endpoints, i, exc.message)
                continue
            if response.status_code != 200:
                error = _status_error(response, "blob", session.note())
                problems.append(f"{endpoint}: {error.message}")
                hint = error.hint or hint
                response.close()
                self._fall_back(endpoints, i, error.message)
                continue
            what = f"blob {digest[:19]}… of {ref.name} from {endpoint}"
            stream = ResumingStream(
                response,
                _Resume(session, url, what),
                self.retry,
                self._sleep,
                what,
                notify=self._notify,
                host=endpoint.host,
            )
            try:
                yield cast(BinaryIO, stream)
            finally:
                stream.close()
            return
        raise RegistryError(
            f"cannot fetch blob {digest} of {ref.name}: " + "; ".join(problems),
            hint=hint or MISSING_BLOB_HINT,
        )

    # -- push (to the registry itself, never to a mirror) ----------------------------------

    def _origin(self, ref: ImageRef) -> tuple[Endpoint, _Session]:
        endpoint = self.config.endpoints(ref.registry)[-1]
        return endpoint, self._session(endpoint)

    def blob_exists(self, ref: ImageRef, digest: str) -> bool:
        """One HEAD: does the repository already hold this blob?"""
        endpoint, session = self._origin(ref)
        response = session.request("HEAD", endpoint.url(ref.repository, "blobs", digest), {})
        if response.status_code in (200, 404):
            return bool(response.status_code == 200)
        raise _status_error(response, f"blob {digest[:19]} of {ref.name}", session.note())

    def push_blob(
        self,
        ref: ImageRef,
        digest: str,
        size: int,
        path: Path,
        *,
        chunk_size: int = PUSH_CHUNK,
        sent: Sent | None = None,
    ) -> bool:
        """Upload a verified local blob unless the repository has it; True when uploaded.

        Blobs up to ``chunk_size`` go in one PUT (streamed from the file); larger ones in
        PATCH chunks of ``chunk_size`` and a closing PUT. ``sent`` is told how far the file
        has been read for sending (from 0 again when a retry starts over).
        """
        if self.blob_exists(ref, digest):
            return False
        endpoint, session = self._origin(ref)
        what = f"uploading blob {digest[:19]} to {ref.name}"
        start = endpoint.url(ref.repository, "blobs", "uploads/")

        def upload() -> None:  # a transient fault anywhere starts a new upload session
            location = _location(
                session.once("POST", start, {"Content-Length": "0"}), endpoint, what
            )
            with path.open("rb") as raw:
                fh = reporting_position(raw, sent)
                if size > chunk_size:
                    location = _patch_chunks(
                        session, endpoint, location, fh, size=chunk_size, what=what
                    )
                    body: BinaryIO | bytes = b""
                else:
                    body = fh
                headers = {"Content-Type": "application/octet-stream"}
                headers["Content-Length"] = str(0 if size > chunk_size else size)
                done = session.once("PUT", _with_digest(location, digest), headers, data=body)
            if done.status_code not in (201, 204):
                raise _push_error(done, what)
            _check_digest_header(done.headers, digest, what)

        session.retry(upload)
        return True

    def push_manifest(self, ref: ImageRef, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under a tag (or its digest); returns the digest the registry kept."""
        endpoint, session = self._origin(ref)
        digest = sha256_digest(data)
        what = f"pushing manifest {ref.name}:{reference}"
        url = endpoint.url(ref.repository, "manifests", reference)
        response = session.request("PUT", url, {"Content-Type": media_type}, data=data)
        if response.status_code not in (200, 201):
            raise _push_error(response, what)
        _check_digest_header(response.headers, digest, what)
        return digest


@dataclass(frozen=True)
class _Resume:
    """Asks again for the rest of a blob whose download broke at ``offset``."""

    session: _Session
    url: str
    what: str

    def __call__(self, offset: int) -> tuple[Any | None, int]:
        """The new response and how many of its bytes to drop: a 206 answer to our Range
        request starts at ``offset``; a registry that ignores Range sends it all again;
        416 says nothing follows ``offset`` (None)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self.session.once("GET", self.url, headers, stream=True)
        code, ranged = response.status_code, response.headers.get("Content-Range", "")
        if code == 206 and offset and ranged.startswith(f"bytes {offset}-"):
            return response, 0
        if code == 200:
            return response, offset
        response.close()
        if code == 416 and offset:
            return None, 0
        raise _status_error(
            response, f"{self.what}: resuming at byte {offset}", self.session.note()
        )


def _location(response: Any, endpoint: Endpoint, what: str) -> str:
    if response.status_code != 202:
        raise _push_error(response, what)
    location = str(response.headers.get("Location", ""))
    if not location:
        raise RegistryError(f"{what}: the registry gave no upload location", hint=REFUSED_HINT)
    if location.startswith("/"):
        location = f"{endpoint.scheme}://{endpoint.host}{location}"
    return location


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + f"digest={digest}"


def _patch_chunks(
    session: _Session, endpoint: Endpoint, location: str, fh: BinaryIO, *, size: int, what: str
) -> str:
    """PATCH ``fh`` in chunks of ``size``. Each goes as a stream, which urllib3 sends 16 KiB
    at a time, each piece within the (connect) timeout; as one bytes object it would be one
    sendall() that must finish within that timeout (5 s for 64 MiB: a slow uplink's every
    chunk timed out)."""
    offset = 0
    while chunk := fh.read(size):
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(chunk)),
            "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
        }
        response = session.once("PATCH", location, headers, data=io.BytesIO(chunk))
        location = _location(response, endpoint, what)
        offset += len(chunk)
    return location


def _push_error(response: Any, what: str) -> RegistryError | NotFoundError:
    code = response.status_code
    detail = ""
    try:
        errors = response.json().get("errors") or []
        detail = "; ".join(str(e.get("message", e.get("code", ""))) for e in errors)
    except (ValueError, AttributeError):
        pass
    if code in (401, 403):
        return RegistryError(
            f"{what}: access denied (HTTP {code})",
            hint="pushing needs write access: `docker login` for the registry "
            "(credentials are read from the Docker config, never printed)",
        )
    suffix = f": {detail}" if detail else ""
    return RegistryError(
        f"{what}: HTTP {code} {response.reason}{suffix}",
        hint="the registry refused the upload: check that you may push to this repository "
        "and that its name is one the registry accepts",
    )


def _check_digest_header(headers: Mapping[str, str], digest: str, what: str) -> None:
    claimed = headers.get("Docker-Content-Digest")
    if claimed and claimed != digest:
        raise IntegrityError(
            f"{what}: the registry stored {claimed}, expected {digest}", hint=WRONG_CONTENT_HINT
        )


MISSING_BLOB_HINT = (
    "the registry lacks a blob its manifest names: the image was pushed incompletely or its "
    "blobs were removed; push it again"
)
REFUSED_HINT = (
    "the registry refused the request (only 429 and 5xx answers are retried); check the "
    "image reference, and the registry's own log"
)
WRONG_CONTENT_HINT = (
    "the registry, or a mirror or proxy in between, sent content that does not match its "
    "digest; nothing was stored. Running the command again is safe; if it keeps failing, the "
    "image in the registry is damaged"
)


def _verified(data: bytes, reference: str, headers: Mapping[str, str], where: Endpoint) -> Fetched:
    digest = sha256_digest(data)
    claimed = headers.get("Docker-Content-Digest")
    if ":" in reference and reference != digest:  # a digest (tags have no colon), any kind
        raise IntegrityError(
            f"manifest from {where} does not match {reference} (got {digest})",
            hint=WRONG_CONTENT_HINT,
        )
    if claimed and claimed.startswith("sha256:") and claimed != digest:
        raise IntegrityError(
            f"manifest from {where}: header says {claimed}, content is {digest}",
            hint=WRONG_CONTENT_HINT,
        )
    return Fetched(data, digest, headers.get("Content-Type", "").split(";")[0], str(where))


class RegistryRepository:
    """One registry repository as a :class:`~microagent.oci.transport.Repository`: reads go
    through the mirrors, writes to the registry itself."""

    def __init__(self, client: RegistryClient, image: ImageRef) -> None:
        self.client = client
        self.image = ImageRef(image.registry, image.repository)
        self.where = image.name

    def manifest(self, reference: str | None) -> Fetched:
        return self.client.manifest(self.image, reference or "latest")

    def find_manifest(self, reference: str) -> Fetched | None:
        return self.client.find_manifest(self.image, reference)

    def blob(self, digest: str) -> AbstractContextManager[BinaryIO]:
        return self.client.blob(self.image, digest)

    def put_blob(self, digest: str, size: int, path: Path, sent: Sent | None = None) -> bool:
        return self.client.push_blob(self.image, digest, size, path, sent=sent)

    def put_manifest(self, tag: str, data: bytes, media_type: str) -> None:
        self.client.push_manifest(self.image, tag, data, media_type)

    def close(self) -> None:
        return None
