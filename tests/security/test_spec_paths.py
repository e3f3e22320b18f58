"""Host paths a spec names stay inside the spec's folder: attacks through the public interface.

A spec travels with a repository, and what it names goes into the guest, into the files layer
``cache export`` / ``build --push`` publish, and (for setup scripts) into published step
records as text. So ``files``, ``setupFiles``, ``setup: [{file: ...}]``, ``disks`` and
``bundles`` refuse absolute paths, ``~`` and anything that resolves outside the folder (``..``,
or a symlink pointing out), with a located error and a hint; and a symlink inside a declared
folder is delivered as a symlink, its target never read on the host.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
import zstandard

from microagent.cli import main
from microagent.compiler.files import collect
from microagent.compiler.spec import FileEntry
from microagent.errors import InvalidInputError
from testenv import standin
from testenv.leaks import files_holding

SECRET = b"root:$6$top-secret-host-bytes-5150:19000:0:99999:7:::\n"
PINNED = "python:3.13-slim@sha256:" + "12" * 32
HINT = "hint: paths in a spec are relative to its folder and stay inside it"


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A folder outside the project holding what an attacker wants: a secret and a script."""
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "shadow").write_bytes(SECRET)
    (outside / "steal.sh").write_bytes(b"echo " + SECRET)
    (outside / "data.ext4").write_bytes(SECRET)
    return outside


@pytest.fixture
def proj(tmp_path: Path, host: Path) -> Path:
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "agent.py").write_text("print('hi')\n")
    (folder / "sub").mkdir()
    return folder


def write_spec(proj: Path, body: str) -> Path:
    spec = proj / "microagent.yaml"
    spec.write_text(f"name: demo\nimage: {PINNED}\n{body}")
    return spec


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


def assert_refused(capsys: pytest.CaptureFixture[str], spec: Path, where: str, why: str) -> None:
    """``validate`` and ``plan --offline`` both refuse, located, and leak nothing."""
    code, out, err = cli(capsys, "validate", "-f", str(spec))
    assert code == 2, out + err
    assert f"{spec}:{where}: {why}" in err, err
    assert HINT in err and "Traceback" not in err
    assert SECRET.decode() not in out + err
    code, out, _ = cli(capsys, "--json", "plan", "--offline", "-f", str(spec))
    assert code == 2
    error = json.loads(out)["error"]
    assert error["kind"] == "invalid_spec" and SECRET.decode() not in out


# -- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "why"),
    [
        ("../host/shadow", "files[0].src: '../host/shadow' leads outside the spec's folder"),
        ("sub/../../host/shadow", "files[0].src: 'sub/../../host/shadow' leads outside"),
        ("../../../../../../../../etc/passwd", "files[0].src: '../../../../../../../../etc"),
        ("~/shadow", "files[0].src: '~/shadow' is relative to a home folder"),
        ("HOST/shadow", "files[0].src: 'HOST/shadow' is an absolute path"),
    ],
)
def test_files_src_outside_the_spec_folder_is_refused(
    proj: Path,
    src: str,
    why: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = proj.parent / "host"
    monkeypatch.setenv("HOME", str(host))
    src = src.replace("HOST", str(host))
    why = why.replace("HOST", str(host))
    spec = write_spec(proj, f"files:\n  - {{src: '{src}', dst: /app/x}}\n")
    assert_refused(capsys, spec, "4:11", why)


@pytest.mark.parametrize("target", ["shadow", "."], ids=["file", "folder"])
def test_a_symlink_named_in_files_that_points_outside_is_refused(
    proj: Path, host: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (proj / "innocent").symlink_to(host / target)
    spec = write_spec(proj, "files:\n  - {src: innocent, dst: /app/x}\n")
    assert_refused(
        capsys, spec, "4:11", f"files[0].src: 'innocent' leads outside the spec's folder (to {host}"
    )


def test_a_symlink_inside_a_declared_folder_is_delivered_as_a_symlink(
    proj: Path, host: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pkg = proj / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text("x = 1\n")
    (pkg / "leak").symlink_to(host / "shadow")
    (pkg / "leakdir").symlink_to(host)
    (proj / "inner").symlink_to(pkg)  # a symlink that stays inside is fine
    spec = write_spec(
        proj, "files:\n  - {src: pkg, dst: /app/pkg}\n  - {src: inner/mod.py, dst: /app/m.py}\n"
    )
    code, out, err = cli(capsys, "--json", "plan", "--offline", "-f", str(spec))
    assert code == 0, out + err
    files = next(s for s in json.loads(out)["steps"] if s["kind"] == "files")
    entries = {e["path"]: e for e in files["inputs"]["entries"]}
    assert entries["/app/pkg/leak"] == {
        "path": "/app/pkg/leak",
        "type": "symlink",
        "mode": "0777",
        "target": str(host / "shadow"),
    }
    assert entries["/app/pkg/leakdir"]["type"] == "symlink"
    assert not [p for p in entries if p.startswith("/app/pkg/leakdir/")]
    assert entries["/app/m.py"]["type"] == "file"
    secret_sha = hashlib.sha256(SECRET).hexdigest()
    assert all(e.get("sha256") != secret_sha for e in entries.values())


# -- setup scripts -------------------------------------------------------------------------------


def test_setup_scripts_from_outside_are_refused_all_at_once(
    proj: Path, host: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (proj / "install.sh").symlink_to(host / "steal.sh")
    spec = write_spec(
        proj,
        "setup:\n  - {file: install.sh}\n  - {file: /etc/shadow}\n"
        "setupFiles:\n  - ../host/steal.sh\n",
    )
    assert_refused(capsys, spec, "4:12", "setup[0].file: 'install.sh' leads outside")
    _, _, err = cli(capsys, "validate", "-f", str(spec))
    assert f"{spec}:5:12: setup[1].file: '/etc/shadow' is an absolute path" in err
    assert f"{spec}:7:5: setupFiles[0]: '../host/steal.sh' leads outside" in err
    assert "3 errors" in err


# -- disks and bundles ---------------------------------------------------------------------------


def test_disk_and_bundle_paths_outside_the_spec_folder_are_refused(
    proj: Path, host: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(host / "data.ext4", host / "corpus.tar")
    (proj / "corpus.tar").symlink_to(host / "corpus.tar")
    spec = write_spec(
        proj,
        "disks: [{name: data, path: ../host/data.ext4, mountpoint: /data, mode: rw}]\n"
        "bundles: [{name: corpus, path: corpus.tar, mountpoint: /corpus}]\n",
    )
    assert_refused(capsys, spec, "3:28", "disks[0].path: '../host/data.ext4' leads outside")
    _, _, err = cli(capsys, "validate", "-f", str(spec))
    assert f"{spec}:4:32: bundles[0].path: 'corpus.tar' leads outside" in err


# -- defence in depth: the walk itself -----------------------------------------------------------


def test_collect_refuses_an_entry_that_leads_outside_its_root(proj: Path, host: Path) -> None:
    """A source swapped for a symlink after the spec was loaded is still refused."""
    (proj / "late").symlink_to(host / "shadow")
    with pytest.raises(InvalidInputError, match="leads outside the spec's folder"):
        collect((FileEntry(proj / "late", "/app/x"),), root=proj)
    assert collect((FileEntry(proj / "agent.py", "/app/a.py"),), root=proj).items


# -- what is published ---------------------------------------------------------------------------


def _layer_members(layout: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Every member of every zstd or tar layer blob in an image layout folder."""
    members = []
    for blob in (layout / "blobs" / "sha256").iterdir():
        data = blob.read_bytes()
        if data.startswith(b"\x28\xb5\x2f\xfd"):
            data = zstandard.ZstdDecompressor().stream_reader(BytesIO(data)).read()
        try:
            with tarfile.open(fileobj=BytesIO(data)) as tar:
                for member in tar:
                    body = tar.extractfile(member) if member.isfile() else None
                    members.append((member, body.read() if body else b""))
        except tarfile.TarError:
            continue
    return members


def test_exported_files_layer_and_store_never_hold_an_outside_file(
    fake_backend: None,
    proj: Path,
    busybox_layout: standin.BuiltImage,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tmp_path, host = proj.parent, proj.parent / "host"
    home = tmp_path / "home"
    monkeypatch.setenv("MICROAGENT_HOME", str(home))
    shutil.copytree(busybox_layout.layout, proj / "layout")
    (proj / "pkg").mkdir()
    (proj / "pkg" / "mod.py").write_text("x = 1\n")
    (proj / "pkg" / "leak").symlink_to(host / "shadow")
    spec = proj / "microagent.yaml"
    spec.write_text(
        "name: pub\nimage: oci:layout:latest\nsetup: [mkdir -p /w]\n"
        "files: [{src: pkg, dst: /app/pkg}]\nentrypoint: 'true'\n"
    )
    code, out, err = cli(capsys, "--json", "cache", "export", "-f", str(spec), str(tmp_path / "c"))
    assert code == 0, out + err
    members = _layer_members(tmp_path / "c")
    leak = [m for m, _ in members if m.name.endswith("app/pkg/leak")]
    assert leak and leak[0].issym() and leak[0].linkname == str(host / "shadow")
    assert [body for m, body in members if m.name.endswith("app/pkg/mod.py")] == [b"x = 1\n"]
    assert all(SECRET not in body for _, body in members)
    code, out, err = cli(capsys, "--json", "create", "-f", str(spec))
    assert code == 0, out + err
    assert files_holding(home, SECRET) == []
    assert files_holding(tmp_path / "c", SECRET) == []
