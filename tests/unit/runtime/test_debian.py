"""Debian index parsing, verified downloads from a file:// mirror, and .deb unpacking."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_kit import archive_key, make_deb, make_mirror, mirror_of

from microagent.errors import BuildError, IntegrityError
from microagent.kit import debian
from microagent.settings import Settings
from microagent.store.content import Store


def test_parse_depends_drops_versions_and_alternatives() -> None:
    field = "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120) | linux-initramfs-tool, a:any"
    assert debian.parse_depends(field) == ("kmod", "linux-base", "initramfs-tools", "a")


def test_parse_packages_first_stanza_wins_and_continuations() -> None:
    text = (
        "Package: a\nVersion: 1\nArchitecture: amd64\nFilename: pool/a1.deb\nSize: 3\n"
        "SHA256: " + "AB" * 32 + "\nDescription: x\n more\n\n"
        "Package: a\nVersion: 2\nFilename: pool/a2.deb\nSHA256: " + "cd" * 32 + "\n\n"
        "Package: nofile\nVersion: 1\n"
    )
    found = debian.parse_packages(text)
    assert list(found) == ["a"]
    assert found["a"].version == "1"
    assert found["a"].sha256 == "ab" * 32
    assert found["a"].size == 3


def test_mirror_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROAGENT_DEBIAN_MIRROR", "http://mirror.example/debian/")
    monkeypatch.setenv("MICROAGENT_DEBIAN_KEYRING", "/keys/mine.gpg")
    monkeypatch.delenv("MICROAGENT_DEBIAN_SUITE", raising=False)
    settings = Settings.from_environ()
    mirror = debian.Mirror.of(
        settings.debian_mirror, settings.debian_suite, settings.debian_keyring
    )
    assert mirror.index_url("amd64") == (
        "http://mirror.example/debian/dists/bookworm/main/binary-amd64/Packages.xz"
    )
    assert mirror.release_url() == "http://mirror.example/debian/dists/bookworm/InRelease"
    assert mirror.keyring == Path("/keys/mine.gpg")
    assert debian.Mirror.of("http://x", "trixie").file_url("/pool/p.deb") == "http://x/pool/p.deb"


def test_defaults_are_https_and_debians_keyring() -> None:
    mirror = debian.Mirror.of()
    assert mirror.url == "https://deb.debian.org/debian"
    assert mirror.keyring == Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def test_parse_release_reads_only_sha256_entries() -> None:
    text = (
        "Suite: stable\nCodename: bookworm\nMD5Sum:\n " + "0" * 32 + " 1 main/x\n"
        "SHA256:\n " + "AB" * 32 + " 12 main/binary-amd64/Packages.xz\n"
        " " + "cd" * 32 + " nope main/odd\n"
    )
    release = debian.parse_release(text)
    assert (release.suite, release.codename) == ("stable", "bookworm")
    assert list(release.files) == ["main/binary-amd64/Packages.xz"]
    assert release.files["main/binary-amd64/Packages.xz"].sha256 == "ab" * 32
    assert release.files["main/binary-amd64/Packages.xz"].size == 12


def test_missing_keyring_is_a_clear_error(tmp_path: Path) -> None:
    root = make_mirror(tmp_path / "m")
    mirror = debian.Mirror(url=root.as_uri(), keyring=tmp_path / "none.gpg")
    with pytest.raises(BuildError, match=r"keyring .*none.gpg does not exist") as raised:
        debian.fetch_index(mirror, "amd64")
    assert "MICROAGENT_DEBIAN_KEYRING" in raised.value.hint


def test_suite_must_match_the_signed_release(tmp_path: Path) -> None:
    root = make_mirror(tmp_path / "m")
    (root / "dists/trixie").symlink_to(root / "dists/bookworm")
    mirror = debian.Mirror(url=root.as_uri(), suite="trixie", keyring=archive_key().keyring)
    with pytest.raises(IntegrityError, match=r"signed for suite 'stable' \('bookworm'\)"):
        debian.fetch_index(mirror, "amd64")


def test_debian_arch() -> None:
    assert debian.debian_arch("x86_64") == "amd64"
    assert debian.debian_arch("aarch64") == "arm64"
    with pytest.raises(BuildError):
        debian.debian_arch("sparc")


@pytest.mark.parametrize("compression", ["xz", "zst", "gz", ""])
def test_iter_data_unpacks_each_compression(tmp_path: Path, compression: str) -> None:
    deb = tmp_path / "p.deb"
    deb.write_bytes(make_deb({"./bin/busybox": b"B" * 1001, "./etc/odd": b"o"}, compression))
    got = {info.name: fh.read() for info, fh in debian.iter_data(deb) if fh is not None}
    assert got == {"./bin/busybox": b"B" * 1001, "./etc/odd": b"o"}


def test_ar_members_lists_the_three_parts(tmp_path: Path) -> None:
    deb = tmp_path / "p.deb"
    deb.write_bytes(make_deb({"./x": b"odd-length"}))
    with deb.open("rb") as fh:
        names = [m.name for m in debian.ar_members(fh)]
    assert names == ["debian-binary", "control.tar.gz", "data.tar.xz"]


def test_not_a_deb(tmp_path: Path) -> None:
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"PK\x03\x04 not ar")
    with pytest.raises(BuildError, match="ar magic"):
        list(debian.iter_data(bad))


def test_fetch_index_and_verified_download(tmp_path: Path) -> None:
    mirror = mirror_of(make_mirror(tmp_path / "m"))
    index = debian.fetch_index(mirror, "amd64")
    assert set(index) == {
        "linux-image-cloud-amd64",
        "linux-image-6.1.0-99-cloud-amd64",
        "busybox-static",
    }
    store = Store(tmp_path / "store")
    path = debian.download(store, mirror, index["busybox-static"])
    assert path == store.blob_path(index["busybox-static"].digest)
    assert path.read_bytes() == (tmp_path / "m/pool/main/busybox.deb").read_bytes()


def test_download_rejects_wrong_digest(tmp_path: Path) -> None:
    mirror = mirror_of(make_mirror(tmp_path / "m"))
    index = debian.fetch_index(mirror, "amd64")
    (tmp_path / "m/pool/main/busybox.deb").write_bytes(b"tampered")
    with pytest.raises(IntegrityError):
        debian.download(Store(tmp_path / "store"), mirror, index["busybox-static"])
    assert not Store(tmp_path / "store").has_blob(index["busybox-static"].digest)


def test_unreachable_mirror_is_a_build_error(tmp_path: Path) -> None:
    mirror = debian.Mirror(url=(tmp_path / "nothing").as_uri())
    with pytest.raises(BuildError, match="cannot download") as raised:
        debian.fetch_index(mirror, "amd64")
    assert "MICROAGENT_DEBIAN_MIRROR" in raised.value.hint


def test_require_names_the_mirror(tmp_path: Path) -> None:
    mirror = debian.Mirror(url="http://m.example")
    with pytest.raises(BuildError, match=r"'nope' is not in http://m.example bookworm/main"):
        debian.require({}, "nope", mirror)
