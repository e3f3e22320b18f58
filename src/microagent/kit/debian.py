"""Debian packages without dpkg: read a mirror's index, download verified .debs, unpack them.

Only what the guest kit needs: plain HTTP(S) from one mirror, the ``Packages.xz`` index of one
suite/component/architecture, SHA256 checks against that index, and a pure-Python reader for
the ``ar`` container and its ``data.tar.{xz,zst,gz}`` member.
"""

from __future__ import annotations

import io
import lzma
import platform
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from microagent.digests import Digest
from microagent.errors import BuildError, IntegrityError
from microagent.store.content import Store

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SUITE = "bookworm"
HTTP_TIMEOUT = 60.0

_ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


def debian_arch(machine: str | None = None) -> str:
    """The Debian architecture name for a machine type (default: this host)."""
    name = (machine or platform.machine()).lower()
    try:
        return _ARCHES[name]
    except KeyError:
        raise BuildError(f"no Debian guest kit for architecture {name!r}") from None


@dataclass(frozen=True)
class Mirror:
    """One Debian archive: base URL, suite and component."""

    url: str = DEFAULT_MIRROR
    suite: str = DEFAULT_SUITE
    component: str = "main"

    @classmethod
    def of(cls, url: str | None = None, suite: str | None = None) -> Mirror:
        """The given URL and suite (a flag, else the settings), else Debian's defaults."""
        return cls(url=(url or DEFAULT_MIRROR).rstrip("/"), suite=suite or DEFAULT_SUITE)

    def index_url(self, arch: str) -> str:
        """URL of the xz-compressed package index for ``arch``."""
        return f"{self.url}/dists/{self.suite}/{self.component}/binary-{arch}/Packages.xz"

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


def _open_url(url: str) -> BinaryIO:
    try:
        return cast(BinaryIO, urllib.request.urlopen(url, timeout=HTTP_TIMEOUT))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise BuildError(
            f"cannot download {url}: {reason}",
            hint="check the network or set $MICROAGENT_DEBIAN_MIRROR (or --mirror) to a "
            "reachable mirror",
        ) from exc


def fetch_index(mirror: Mirror, arch: str) -> dict[str, DebPackage]:
    """Download and parse the package index of ``mirror`` for ``arch``."""
    url = mirror.index_url(arch)
    with _open_url(url) as resp:
        try:
            data = resp.read()
        except OSError as exc:
            raise BuildError(f"download of {url} failed: {exc}") from exc
    try:
        text = lzma.decompress(data).decode("utf-8", "replace")
    except lzma.LZMAError as exc:
        raise BuildError(f"{url} is not a valid xz file: {exc}") from exc
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


def download(store: Store, mirror: Mirror, package: DebPackage) -> Path:
    """Fetch a .deb into the store (verified against the index's SHA256 and size)."""
    if store.has_blob(package.digest):
        store.touch(f"blobs/sha256/{package.sha256}")
        return store.blob_path(package.digest)
    url = mirror.file_url(package.filename)
    with _open_url(url) as resp:
        try:
            store.put_blob_file(resp, package.digest, expected_size=package.size or None)
        except IntegrityError as exc:
            raise IntegrityError(f"{url}: {exc.message}", hint=exc.hint) from exc
        except OSError as exc:
            raise BuildError(f"download of {url} failed: {exc}") from exc
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
    with deb.open("rb") as fh:
        member = _data_member(fh)
        raw = io.BufferedReader(_Window(fh, member.offset, member.size), 1 << 20)
        try:
            with _tar_stream(member, cast(BinaryIO, raw)) as tar:
                for info in tar:
                    yield info, cast("BinaryIO | None", tar.extractfile(info))
        except (tarfile.TarError, lzma.LZMAError, zstandard.ZstdError, EOFError, OSError) as exc:
            raise BuildError(f"cannot unpack {deb.name}: {exc}") from exc
