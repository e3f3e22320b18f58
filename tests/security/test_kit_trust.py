"""The guest kit (kernel + busybox: they see every secret) comes only from a signed suite.

A network attacker (or a hostile mirror) controls every byte the mirror serves. The kit is
built only when the suite's ``InRelease`` carries a good signature from the trusted keyring
and names the suite, ``Packages.xz`` has the size and SHA256 that signed file lists, and each
.deb the size and SHA256 of the index. Mirrors here are file:// trees signed with throwaway
keys: ``archive_key()`` is the trusted one, ``archive_key("attacker")`` is not.
"""

from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "runtime"))

from runtime_kit import archive_key, make_mirror, release_text, sign_mirror

from microagent.cli import main
from microagent.errors import IntegrityError
from microagent.kit import debian, guestkit
from microagent.kit.guestkit import GuestKit
from microagent.settings import Settings
from microagent.store.content import Store
from testenv.prereq import unavailable

HONEST = b"HONEST-BUSYBOX"
EVIL = b"EVIL-BUSYBOX-THAT-EXFILTRATES"
DISTS = "dists/bookworm"
INDEX = f"{DISTS}/main/binary-amd64/Packages.xz"


def _settings(tmp_path: Path, mirror: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        debian_mirror=mirror.as_uri(),
        debian_keyring=archive_key().keyring,
    )


def _kit(tmp_path: Path, mirror: Path) -> GuestKit:
    settings = _settings(tmp_path, mirror)
    return guestkit.kit_for(settings, Store(settings.store_dir))


def _refused(tmp_path: Path, mirror: Path, match: str) -> None:
    """The kit is refused with ``match``; nothing from the mirror is kept or built."""
    with pytest.raises(IntegrityError, match=match):
        _kit(tmp_path, mirror)
    store = Store(_settings(tmp_path, mirror).store_dir)
    assert guestkit.list_kits(store) == []
    evil_deb = (mirror / "pool/main/busybox.deb").read_bytes()
    assert not any(
        p.read_bytes() == evil_deb for p in (store.root / "blobs").rglob("*") if p.is_file()
    )


def _busybox_sha(kit: GuestKit) -> str:
    return str(kit.manifest["packages"]["busybox"]["sha256"])


@pytest.fixture
def honest(tmp_path: Path) -> Path:
    return make_mirror(tmp_path / "honest", busybox=HONEST)


@pytest.fixture
def evil(tmp_path: Path) -> Path:
    """A complete, self-consistent mirror serving a malicious busybox, signed by the attacker."""
    return sign_mirror(make_mirror(tmp_path / "evil", busybox=EVIL), archive_key("attacker"))


def _serve_evil_packages(honest: Path, evil: Path) -> None:
    """The attacker swaps the index and the pool but cannot re-sign InRelease."""
    shutil.copy(evil / INDEX, honest / INDEX)
    shutil.copytree(evil / "pool", honest / "pool", dirs_exist_ok=True)


def test_the_honest_signed_mirror_works(tmp_path: Path, honest: Path) -> None:
    kit = _kit(tmp_path, honest)
    assert kit.kernel.is_file() and kit.initrd.is_file()
    packages = debian.parse_packages(lzma.decompress((honest / INDEX).read_bytes()).decode())
    assert _busybox_sha(kit) == packages["busybox-static"].sha256


def test_unsigned_inrelease_is_refused(tmp_path: Path, evil: Path) -> None:
    (evil / DISTS / "InRelease").write_bytes(release_text(evil))
    _refused(tmp_path, evil, "InRelease is not signed$")


def test_inrelease_signed_by_another_key_is_refused(tmp_path: Path, evil: Path) -> None:
    _refused(tmp_path, evil, "InRelease is not signed by a key in")


def test_inrelease_edited_after_signing_is_refused(
    tmp_path: Path, honest: Path, evil: Path
) -> None:
    """The attacker rewrites the signed hash line to their own index: the signature breaks."""
    inrelease = honest / DISTS / "InRelease"
    honest_line = release_text(honest).decode().splitlines()[-1]
    evil_line = release_text(evil).decode().splitlines()[-1]
    inrelease.write_text(inrelease.read_text().replace(honest_line, evil_line))
    _serve_evil_packages(honest, evil)
    _refused(tmp_path, honest, "InRelease is not signed by a key in")


@pytest.mark.parametrize("where", ["before", "after", "signed by the attacker, before"])
def test_text_around_the_signed_message_is_refused(
    where: str, tmp_path: Path, honest: Path, evil: Path
) -> None:
    """Release fields slipped in next to the genuine signed block (apt's old InRelease bugs):
    unsigned, or in a second message signed by a key not in the keyring."""
    inrelease = honest / DISTS / "InRelease"
    forged = release_text(evil)
    if where.startswith("signed"):
        forged = archive_key("attacker").clearsign(forged)
    genuine = inrelease.read_bytes()
    inrelease.write_bytes(genuine + forged if where == "after" else forged + b"\n" + genuine)
    _serve_evil_packages(honest, evil)
    _refused(tmp_path, honest, "InRelease is not one clearsigned message")


def test_packages_index_not_matching_inrelease_is_refused(
    tmp_path: Path, honest: Path, evil: Path
) -> None:
    """A self-consistent swap of index + .debs (what the old code accepted)."""
    _serve_evil_packages(honest, evil)
    _refused(tmp_path, honest, r"Packages.xz does not match the signed InRelease")


def test_swapped_deb_is_refused(tmp_path: Path, honest: Path, evil: Path) -> None:
    shutil.copy(evil / "pool/main/busybox.deb", honest / "pool/main/busybox.deb")
    _refused(tmp_path, honest, r"busybox.deb: content")


def test_a_signed_release_of_another_suite_is_refused(tmp_path: Path, honest: Path) -> None:
    """Replaying a genuine, signed InRelease of another suite (e.g. an old release)."""
    inrelease = honest / DISTS / "InRelease"
    other = release_text(honest).replace(b"Codename: bookworm", b"Codename: buster")
    inrelease.write_bytes(archive_key().clearsign(other))
    _refused(tmp_path, honest, "signed for suite 'stable' \\('buster'\\), not 'bookworm'")


def test_offline_rebuild_from_verified_packages_needs_no_mirror(
    tmp_path: Path, honest: Path, evil: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packages verified when downloaded rebuild a kit for a new recipe, whatever the mirror
    serves now."""
    old = _kit(tmp_path, honest)
    shutil.rmtree(honest)
    shutil.copytree(evil, honest)
    monkeypatch.setattr(guestkit, "STREAM_CAP", guestkit.STREAM_CAP + 1)  # a new recipe
    new = _kit(tmp_path, honest)
    assert new.key != old.key and _busybox_sha(new) == _busybox_sha(old)


def test_cli_kernel_install_refuses_a_mirror_debian_did_not_sign(
    tmp_path: Path,
    evil: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``kernel install --mirror`` with the default keyring (Debian's) and a forged suite."""
    if not debian.DEFAULT_KEYRING.is_file():
        unavailable(
            f"{debian.DEFAULT_KEYRING} is missing; install it, e.g. "
            "`apt-get install debian-archive-keyring`"
        )
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MICROAGENT_DEBIAN_KEYRING", raising=False)
    assert main(["--json", "kernel", "install", "--mirror", evil.as_uri()]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert f"is not signed by a key in {debian.DEFAULT_KEYRING}" in error["message"]
    assert guestkit.list_kits(Store(tmp_path / "home" / "store")) == []
