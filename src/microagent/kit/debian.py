"""Debian packages without dpkg: read a mirror's index, download verified .debs, unpack them.

Only what the guest kit needs, trusted the way apt trusts a mirror: the suite's ``InRelease``
must carry a good signature from a key in the Debian archive keyring (checked by ``gpgv``)
and name this suite; the ``Packages.xz`` index of one component/architecture must have the
size and SHA256 that signed file lists; every .deb the size and SHA256 the index lists. The
transport (HTTPS by default, plain HTTP or file:// when asked) is not trusted at all. Plus a
pure-Python reader for the ``ar`` container and its ``data.tar.{xz,zst,gz}`` member.

Every download of the guest kit goes through :func:`fetch`, which rides out a flaky mirror or
network (:class:`Retry`): a refused or reset connection, a timeout, an HTTP 429 or 5xx answer,
a body cut short of its Content-Length is tried again after a pause (4 tries in all by
default, 0.5 s doubling, jittered; a short Retry-After is honoured), each retry said in one
line. Anything else fails at once: another HTTP status (404...), a name that does not
resolve, TLS errors, and above all wrong content (a size or digest that does not match what
the signed index says is an integrity failure, never retried). A retry starts the file anew;
what the broken try got is thrown away, and the new bytes are verified as the first would
have been.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import lzma
import platform
import socket
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

from microagent.backoff import RETRY_STATUSES, next_pause, parse_retry_after, retry_note
from microagent.digests import Digest
from microagent.errors import BuildError, IntegrityError
from microagent.progress import Meter, Say, TaskKind
from microagent.runner import find_tool, run
from microagent.store.content import Store

DEFAULT_MIRROR = "https://deb.debian.org/debian"
DEFAULT_SUITE = "bookworm"
DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
HTTP_TIMEOUT = 60.0
GPGV_TIMEOUT = 60.0
MAX_RELEASE_BYTES = 16 << 20  # Debian's InRelease is ~150 KB
_SIGNED_BEGIN = b"-----BEGIN PGP SIGNED MESSAGE-----"
_SIGNATURE_END = b"-----END PGP SIGNATURE-----"

_ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60
READ_CHUNK = 1 << 16
MIRROR_HINT = (
    "check the network or set $MICROAGENT_DEBIAN_MIRROR (or --mirror) to a reachable mirror"
)
T = TypeVar("T")


def debian_arch(machine: str | None = None) -> str:
    """The Debian architecture name for a machine type (default: this host)."""
    name = (machine or platform.machine()).lower()
    try:
        return _ARCHES[name]
    except KeyError:
        raise BuildError(f"no Debian guest kit for architecture {name!r}") from None


@dataclass(frozen=True)
class Mirror:
    """One Debian archive: base URL, suite, component, and the keys its suite is signed by."""

    url: str = DEFAULT_MIRROR
    suite: str = DEFAULT_SUITE
    component: str = "main"
    keyring: Path = DEFAULT_KEYRING

    @classmethod
    def of(
        cls, url: str | None = None, suite: str | None = None, keyring: Path | None = None
    ) -> Mirror:
        """The given URL, suite and keyring (a flag, else the settings), else Debian's."""
        return cls(
            url=(url or DEFAULT_MIRROR).rstrip("/"),
            suite=suite or DEFAULT_SUITE,
            keyring=keyring or DEFAULT_KEYRING,
        )

    def release_url(self) -> str:
        """URL of the suite's signed ``InRelease`` file."""
        return f"{self.url}/dists/{self.suite}/InRelease"

    def index_path(self, arch: str) -> str:
        """The xz-compressed package index for ``arch``, as ``InRelease`` names it."""
        return f"{self.component}/binary-{arch}/Packages.xz"

    def index_url(self, arch: str) -> str:
        """URL of the xz-compressed package index for ``arch``."""
        return f"{self.url}/dists/{self.suite}/{self.index_path(arch)}"

    def file_url(self, filename: str) -> str:
        """URL of a pool file named by an index's ``Filename`` field."""
        return f"{self.url}/{filename.lstrip('/')}"


@dataclass(frozen=True)
class DebPackage:
    """One binary package as the index describes it."""

    name: str
    version: str
    architecture: str
    filename: str
    size: int
    sha256: str
    depends: tuple[str, ...] = ()

    @property
    def digest(self) -> Digest:
        return Digest("sha256", self.sha256)


def parse_depends(field: str) -> tuple[str, ...]:
    """Package names from a ``Depends`` field (versions dropped, first of each alternative)."""
    names = []
    for clause in field.split(","):
        first = clause.split("|")[0].strip()
        name = first.split("(")[0].split(":")[0].strip()
        if name:
            names.append(name)
    return tuple(names)


def _stanza_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def parse_packages(text: str) -> dict[str, DebPackage]:
    """Parse a ``Packages`` index; the first stanza of each package name wins."""
    found: dict[str, DebPackage] = {}
    for stanza in text.split("\n\n"):
        fields = _stanza_fields(stanza)
        name = fields.get("Package")
        if not name or name in found or "Filename" not in fields or "SHA256" not in fields:
            continue
        found[name] = DebPackage(
            name=name,
            version=fields.get("Version", ""),
            architecture=fields.get("Architecture", ""),
            filename=fields["Filename"],
            size=int(fields.get("Size", "0") or 0),
            sha256=fields["SHA256"].lower(),
            depends=parse_depends(fields.get("Depends", "")),
        )
    return found


@dataclass(frozen=True)
class Retry:
    """How kit downloads ride out transient faults: ``attempts`` tries of one file (the first
    included); after a failed try a pause of ``backoff`` seconds, doubling after each, at
    most ``max_pause``, jittered down to half. A Retry-After of at most ``max_pause`` is
    waited for as asked; a longer one ends the download at once."""

    attempts: int = 4
    backoff: float = 0.5
    max_pause: float = 8.0
    sleep: Callable[[float], None] = time.sleep

    def pause(self, tries: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait after ``tries`` failed tries before the next one; None: give up
        (see :func:`~microagent.backoff.next_pause`)."""
        return next_pause(
            tries,
            attempts=self.attempts,
            backoff=self.backoff,
            max_pause=self.max_pause,
            retry_after=retry_after,
        )


RETRY = Retry()


class _Transient(Exception):
    """A failure of the transport worth another try (never leaves this module)."""

    def __init__(self, cause: str, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.retry_after = retry_after


def _is_transient(reason: object) -> bool:
    """A refused, reset or early-closed connection, a timeout, a temporary DNS failure;
    not a name that does not resolve, TLS errors, a missing file:// path, a bad URL."""
    if isinstance(reason, ssl.SSLError):
        return isinstance(reason, ssl.SSLEOFError)  # (a connection closed mid-handshake)
    if isinstance(reason, socket.gaierror):
        return reason.errno == socket.EAI_AGAIN
    return isinstance(reason, ConnectionError | TimeoutError | http.client.HTTPException)


def _short(exc: object) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:160]


def _open_url(url: str) -> BinaryIO:
    try:
        return cast(BinaryIO, urllib.request.urlopen(url, timeout=HTTP_TIMEOUT))
    except urllib.error.HTTPError as exc:
        status = f"HTTP {exc.code} {exc.reason}"
        exc.close()
        if exc.code in RETRY_STATUSES:
            raise _Transient(status, parse_retry_after(exc.headers.get("Retry-After"))) from exc
        raise BuildError(f"cannot download {url}: {status}", hint=MIRROR_HINT) from exc
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        if _is_transient(reason):
            raise _Transient(_short(reason)) from exc
        raise BuildError(f"cannot download {url}: {reason}", hint=MIRROR_HINT) from exc


class _Body:
    """A response body whose transport failures are :class:`_Transient`, and so is an end
    before its Content-Length (urllib returns such a body short without a word)."""

    def __init__(self, response: BinaryIO) -> None:
        self._response = response
        headers = getattr(response, "headers", None)
        length = str(headers.get("Content-Length") or "") if headers is not None else ""
        self._left = int(length) if length.isdigit() else None

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._response.read(size)
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(_short(exc)) from exc
        if self._left is not None:
            self._left -= len(data)
            if self._left > 0 and (not data or size < 0) and size != 0:
                raise _Transient(f"the connection closed {self._left} bytes early")
        return data


def fetch(
    url: str,
    consume: Callable[[BinaryIO], T],
    *,
    retry: Retry = RETRY,
    say: Say | None = None,
) -> T:
    """``consume(body)`` of a fresh GET of ``url``, tried again while the transport fails
    transiently (see :class:`Retry`); each retry is told to ``say`` first, in one line.
    Whatever ``consume`` raises itself (an integrity failure) ends it at once."""
    tries = 0
    while True:
        tries += 1
        try:
            with _open_url(url) as response:
                return consume(cast(BinaryIO, _Body(response)))
        except _Transient as exc:
            pause = retry.pause(tries, exc.retry_after)
            if pause is None:
                raise _gave_up(url, exc, tries, retry) from exc
            if say is not None:
                after = retry_note(pause, tries, retry.attempts)
                say(f"download of {url} failed: {exc.cause}; {after}")
            retry.sleep(pause)


def _gave_up(url: str, exc: _Transient, tries: int, retry: Retry) -> BuildError:
    if exc.retry_after is not None and exc.retry_after > retry.max_pause:
        return BuildError(
            f"cannot download {url}: {exc.cause}; the mirror asks to retry after "
            f"{exc.retry_after:g} s",
            hint=f"try again later (microagent waits at most {retry.max_pause:g} s), or "
            "set $MICROAGENT_DEBIAN_MIRROR (or --mirror) to another mirror",
        )
    tried = f" (gave up after {tries} tries)" if tries > 1 else ""
    return BuildError(f"cannot download {url}: {exc.cause}{tried}", hint=MIRROR_HINT)


def _read_at_most(body: BinaryIO, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``body`` (so the caller can tell it is too big)."""
    data = bytearray()
    while len(data) <= limit:
        chunk = body.read(min(READ_CHUNK, limit + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _download(url: str, limit: int, retry: Retry, say: Say | None) -> bytes:
    """At most ``limit + 1`` bytes of ``url`` (so the caller can tell it is too big)."""
    return fetch(url, lambda body: _read_at_most(body, limit), retry=retry, say=say)


# -- the signed InRelease ----------------------------------------------------------------------


@dataclass(frozen=True)
class IndexFile:
    """An index file as a signed ``InRelease`` lists it."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Release:
    """What a suite's verified ``InRelease`` says."""

    suite: str = ""
    codename: str = ""
    files: Mapping[str, IndexFile] = field(default_factory=dict)


def parse_release(text: str) -> Release:
    """Parse the (already verified) text of a ``Release`` file: names and SHA256 entries."""
    fields = _stanza_fields(text.split("\n\n", 1)[0])
    files = {}
    for line in fields.get("SHA256", "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            files[parts[2]] = IndexFile(parts[2], int(parts[1]), parts[0].lower())
    return Release(fields.get("Suite", ""), fields.get("Codename", ""), files)


def _gpg_status(stdout: str) -> dict[str, int]:
    """How often each ``[GNUPG:] KEYWORD`` status line occurs."""
    counts: dict[str, int] = {}
    for line in stdout.splitlines():
        if line.startswith("[GNUPG:] "):
            word = line.split()[1]
            counts[word] = counts.get(word, 0) + 1
    return counts


def _good_signature(status: Mapping[str, int]) -> bool:
    """apt's rule: at least one good, valid signature and no bad one; signatures by keys
    not in the keyring (NO_PUBKEY) or expired/revoked keys count for nothing. And exactly
    one signed text, read without error."""
    good = status.get("GOODSIG") and status.get("VALIDSIG")
    clean = not status.get("BADSIG") and not status.get("ERROR")
    return bool(good and clean and status.get("PLAINTEXT") == 1)


def _one_clearsigned_message(data: bytes) -> bool:
    """Nothing before the signed message, nothing after its signature, and only one
    (unsigned text around it, or a second message, is how forged fields get slipped in)."""
    body = data.strip()
    return (
        body.startswith(_SIGNED_BEGIN)
        and body.endswith(_SIGNATURE_END)
        and body.count(_SIGNED_BEGIN) == 1
        and body.count(_SIGNATURE_END) == 1
    )


def verify_signed(data: bytes, keyring: Path, what: str) -> bytes:
    """The signed text of a clearsigned file with a good signature by a key in ``keyring``.

    The file must be exactly one clearsigned message; only the text its signature covers
    comes back.
    """
    keyring = keyring.expanduser().resolve()
    if not keyring.is_file():
        raise BuildError(
            f"the Debian archive keyring {keyring} does not exist",
            hint="install debian-archive-keyring, or set $MICROAGENT_DEBIAN_KEYRING to the "
            "keyring that signs your mirror",
        )
    if _SIGNED_BEGIN not in data:
        raise _forged(f"{what} is not signed")
    if not _one_clearsigned_message(data):
        raise _forged(f"{what} is not one clearsigned message (extra text around it)")
    gpgv = find_tool("gpgv")
    with tempfile.TemporaryDirectory(prefix="microagent-gpgv-") as tmp:
        signed, text = Path(tmp) / "InRelease", Path(tmp) / "Release"
        signed.write_bytes(data)
        argv = [gpgv, "--homedir", tmp, "--status-fd", "1", "--keyring", str(keyring)]
        done = run([*argv, "--output", str(text), str(signed)], check=False, timeout=GPGV_TIMEOUT)
        if not _good_signature(_gpg_status(done.stdout)) or not text.is_file():
            raise _forged(f"{what} is not signed by a key in {keyring}")
        return text.read_bytes()


def _forged(message: str) -> IntegrityError:
    return IntegrityError(
        message,
        hint="the mirror (or something between) serves an unsigned or forged suite; use "
        "another mirror, or set $MICROAGENT_DEBIAN_KEYRING if your mirror is signed by your "
        "own key",
    )


def fetch_release(mirror: Mirror, *, retry: Retry = RETRY, say: Say | None = None) -> Release:
    """Download the suite's ``InRelease``, check its signature and that it names the suite
    (retries told to ``say``)."""
    url = mirror.release_url()
    data = _download(url, MAX_RELEASE_BYTES, retry, say)
    if len(data) > MAX_RELEASE_BYTES:
        raise IntegrityError(f"{url} is larger than {MAX_RELEASE_BYTES >> 20} MiB")
    release = parse_release(verify_signed(data, mirror.keyring, url).decode("utf-8", "replace"))
    if mirror.suite not in (release.suite, release.codename):
        raise IntegrityError(
            f"{url} is signed for suite {release.suite!r} ({release.codename!r}), "
            f"not {mirror.suite!r}"
        )
    return release


def _verified_index(
    mirror: Mirror, release: Release, arch: str, retry: Retry, say: Say | None
) -> bytes:
    """The index file's bytes, checked against the size and SHA256 the release lists."""
    url, path = mirror.index_url(arch), mirror.index_path(arch)
    entry = release.files.get(path)
    if entry is None:
        raise BuildError(
            f"{mirror.release_url()} lists no {path}",
            hint="choose a mirror/suite that carries this architecture",
        )
    data = _download(url, entry.size, retry, say)
    got = hashlib.sha256(data).hexdigest()
    if len(data) != entry.size or got != entry.sha256:
        raise IntegrityError(
            f"{url} does not match the signed InRelease (expected {entry.size} bytes, "
            f"sha256:{entry.sha256}; got {len(data)} bytes, sha256:{got})"
        )
    return data


def fetch_index(
    mirror: Mirror, arch: str, *, retry: Retry = RETRY, say: Say | None = None
) -> dict[str, DebPackage]:
    """The package index of ``mirror`` for ``arch``, verified through the signed InRelease
    (retries told to ``say``)."""
    release = fetch_release(mirror, retry=retry, say=say)
    data = _verified_index(mirror, release, arch, retry, say)
    try:
        text = lzma.decompress(data).decode("utf-8", "replace")
    except lzma.LZMAError as exc:
        raise BuildError(f"{mirror.index_url(arch)} is not a valid xz file: {exc}") from exc
    return parse_packages(text)


def require(index: Mapping[str, DebPackage], name: str, mirror: Mirror) -> DebPackage:
    """Look a package up in an index, with a clear error when it is missing."""
    try:
        return index[name]
    except KeyError:
        raise BuildError(
            f"package {name!r} is not in {mirror.url} {mirror.suite}/{mirror.component}",
            hint="choose a mirror/suite that carries it (--mirror, $MICROAGENT_DEBIAN_SUITE)",
        ) from None


def download(
    store: Store,
    mirror: Mirror,
    package: DebPackage,
    say: Callable[[str], None] | None = None,
    *,
    retry: Retry = RETRY,
) -> Path:
    """Fetch a .deb into the store (verified against the index's SHA256 and size); its
    bytes are reported to ``say`` as a ``PULL`` task (see :mod:`microagent.progress`), and so
    is each retry (a note of that task)."""
    if store.has_blob(package.digest):
        store.touch(f"blobs/sha256/{package.sha256}")
        return store.blob_path(package.digest)
    url = mirror.file_url(package.filename)
    meter = Meter(say, str(package.digest), TaskKind.PULL, package.name, package.size or None)

    def into_store(body: BinaryIO) -> None:
        meter.at(0)  # a retry starts the file anew
        try:
            store.put_blob_file(
                meter.reader(body), package.digest, expected_size=package.size or None
            )
        except IntegrityError as exc:
            raise IntegrityError(f"{url}: {exc.message}", hint=exc.hint) from exc
        except OSError as exc:  # (the network's own failures come as _Transient)
            raise BuildError(f"cannot store the download of {url}: {exc}") from exc

    fetch(url, into_store, retry=retry, say=meter.note if say is not None else None)
    meter.finish("")  # the caller said what it downloads
    return store.blob_path(package.digest)


# -- .deb = ar archive -------------------------------------------------------------------------


@dataclass(frozen=True)
class ArMember:
    """A member of an ar archive: name, data offset and size."""

    name: str
    offset: int
    size: int


def ar_members(fh: BinaryIO) -> list[ArMember]:
    """List the members of the ar archive open in ``fh`` (common and GNU name styles)."""
    fh.seek(0)
    if fh.read(len(_AR_MAGIC)) != _AR_MAGIC:
        raise BuildError("not a Debian package (missing ar magic)")
    members = []
    while header := fh.read(_AR_HEADER):
        if len(header) < _AR_HEADER or header[58:60] != b"`\n":
            raise BuildError("corrupt ar archive header in Debian package")
        name = header[:16].decode("ascii", "replace").rstrip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip() or 0)
        offset = fh.tell()
        members.append(ArMember(name, offset, size))
        fh.seek(offset + size + (size % 2))
    return members


class _Window(io.RawIOBase):
    """A read-only view of ``size`` bytes of ``fh`` starting at ``offset``."""

    def __init__(self, fh: BinaryIO, offset: int, size: int) -> None:
        self._fh = fh
        self._pos = offset
        self._end = offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        want = min(len(buffer), self._end - self._pos)
        if want <= 0:
            return 0
        self._fh.seek(self._pos)
        data = self._fh.read(want)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _data_member(fh: BinaryIO) -> ArMember:
    for member in ar_members(fh):
        if member.name.startswith("data.tar"):
            return member
    raise BuildError("Debian package has no data.tar member")


def _tar_stream(member: ArMember, raw: BinaryIO) -> tarfile.TarFile:
    suffix = member.name.removeprefix("data.tar")
    if suffix == ".zst":
        import zstandard  # deferred: only a guest kit build decompresses; keeps it off start-up

        reader = zstandard.ZstdDecompressor().stream_reader(raw)
        return tarfile.open(fileobj=reader, mode="r|")
    modes = {"": "r|", ".xz": "r|xz", ".gz": "r|gz", ".bz2": "r|bz2"}
    if suffix not in modes:
        raise BuildError(f"unsupported Debian data member {member.name!r}")
    opened = tarfile.open(fileobj=raw, mode=modes[suffix])  # type: ignore[call-overload]  # noqa: SIM115
    return cast(tarfile.TarFile, opened)


def iter_data(deb: Path) -> Iterator[tuple[tarfile.TarInfo, BinaryIO | None]]:
    """Stream the entries of a .deb's data archive: ``(info, file object or None)``.

    The file object is only valid until the next entry is requested.
    """
    import zstandard  # deferred: only a guest kit build decompresses; keeps it off start-up

    with deb.open("rb") as fh:
        member = _data_member(fh)
        raw = io.BufferedReader(_Window(fh, member.offset, member.size), 1 << 20)
        try:
            with _tar_stream(member, cast(BinaryIO, raw)) as tar:
                for info in tar:
                    yield info, cast("BinaryIO | None", tar.extractfile(info))
        except (tarfile.TarError, lzma.LZMAError, zstandard.ZstdError, EOFError, OSError) as exc:
            raise BuildError(f"cannot unpack {deb.name}: {exc}") from exc
