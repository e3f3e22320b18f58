"""A spec's ``disks`` and ``bundles`` on the fake backend: captured at create (checked, cached,
copied), attached at start in order, read-only to the VMM when ``ro``, mounted by MA_MOUNTS."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from microagent import Microagent, Settings
from microagent.compiler.overrides import Overrides
from microagent.errors import IntegrityError, InvalidInputError, SpecError, VMError
from microagent.ext4.images import archive_to_ext4
from microagent.layers.apply import Limits
from microagent.runtime.backend import Accel, BootConfig, Disk, NetworkConfig
from microagent.runtime.boot import MAX_EXTRA_DISKS, ExtraDisk, RunRequest, prepare
from microagent.runtime.configdisk import ExtraMount, NetworkMode, RunConfig
from microagent.runtime.fake import FakeBackend, FakeOutcome, check_mounts
from microagent.runtime.qemu import build_argv
from microagent.workspace.disks import boot_disks
from microagent.workspace.lifecycle import Runtime, run_request
from testenv import standin
from testenv.clitools import cli_json as cli

pytestmark = pytest.mark.tools("mke2fs", "e2fsck", "debugfs")
MICROVM_TRANSPORTS = 24  # QEMU 7.2 microvm: the 25th virtio device is refused (measured)

SPEC = """\
name: data
image: oci:layout:latest
entrypoint: 'true'
disks:
  - {name: ref, path: images/ref.ext4, mountpoint: /ref}
  - {name: scratch, path: images/scratch.ext4, mountpoint: /scratch, mode: rw}
bundles:
  - {name: corpus, path: corpus.tar.gz, mountpoint: /corpus}
  - {name: notes, path: notes.tar, mountpoint: /ref/notes, mode: rw}
"""


@dataclass(frozen=True)
class Kit:
    kernel: Path
    initrd: Path


def make_ext4(path: Path, files: dict[str, bytes], size: str = "8M") -> Path:
    tree = path.parent / f".{path.name}-tree"
    tree.mkdir(parents=True)
    for name, data in files.items():
        (tree / name).write_bytes(data)
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(path), size],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(tree)
    return path


def make_tar(path: Path, members: dict[str, bytes], mode: Literal["w", "w:gz"] = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def project(tmp_path: Path, busybox_layout: standin.BuiltImage) -> Path:
    proj = tmp_path / "proj"
    (proj / "images").mkdir(parents=True)
    shutil.copytree(busybox_layout.layout, proj / "layout")
    make_ext4(proj / "images" / "ref.ext4", {"hello.txt": b"reference\n"})
    make_ext4(proj / "images" / "scratch.ext4", {"seed.txt": b"seed\n"})
    make_tar(proj / "corpus.tar.gz", {"docs/a.txt": b"a\n", "docs/b.txt": b"b\n"}, "w:gz")
    make_tar(proj / "notes.tar", {"todo.txt": b"write tests\n"})
    (proj / "microagent.yaml").write_text(SPEC)
    return proj


@pytest.fixture
def api(tmp_path: Path) -> Microagent:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    settings = Settings(
        home=tmp_path / "home",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd",
        backend="fake",
    )
    return Microagent(settings, injected_backend=FakeBackend(lambda _c: FakeOutcome()))


def runtime(api: Microagent, tmp_path: Path) -> Runtime:
    kit = Kit(tmp_path / "vmlinuz", tmp_path / "initrd")
    return Runtime(api.settings, lambda: kit)


def boot_request(api: Microagent, tmp_path: Path, name: str) -> RunRequest:
    ws = api.workspace(name)
    return run_request(runtime(api, tmp_path), ws, ws.record())


def test_create_captures_disks_and_bundles(api: Microagent, project: Path, tmp_path: Path) -> None:
    created = api.create(project / "microagent.yaml")
    ws = created.workspace
    disks = {d.name: d for d in ws.record().disks}
    assert [d.name for d in ws.record().disks] == ["ref", "scratch", "corpus", "notes"]
    # ro: shared in the store; rw: the workspace's own copy (never the user's file)
    assert disks["ref"].entry.startswith("disks/") and disks["corpus"].entry.startswith("bundles/")
    assert disks["scratch"].entry == "" == disks["notes"].entry
    assert ws.disk_copy("scratch").is_file() and ws.disk_copy("notes").is_file()
    assert not ws.disk_copy("ref").exists() and not ws.disk_copy("corpus").exists()
    source = project / "images" / "scratch.ext4"
    assert ws.disk_copy("scratch").read_bytes() == source.read_bytes()
    assert ws.disk_copy("scratch").stat().st_blocks < source.stat().st_blocks + 8  # sparse
    assert disks["corpus"].digest.startswith("sha256:") and disks["corpus"].kind == "bundle"

    paths = [d.path for d in boot_disks(api.store, ws, ws.record())]
    assert paths[0] == api.store.entry_path(disks["ref"].entry) / "disk.ext4"
    assert paths[1] == ws.disk_copy("scratch")
    assert json.loads((paths[2].parent / "manifest.json").read_text())["kind"] == "bundle"


def test_boot_attaches_in_order_ro_to_the_vmm_and_mounts_them(
    api: Microagent, project: Path, tmp_path: Path
) -> None:
    api.create(project / "microagent.yaml")
    request = boot_request(api, tmp_path, "data")
    (tmp_path / "vm").mkdir()
    config = prepare(request, Kit(tmp_path / "vmlinuz", tmp_path / "initrd"), tmp_path / "vm")
    assert [d.serial for d in config.disks] == [
        "rootfs", "state", "config", "disk-ref", "disk-scratch", "disk-corpus", "disk-notes",
    ]  # fmt: skip
    assert [d.readonly for d in config.disks[3:]] == [True, False, True, False]

    argv = build_argv("qemu-system-x86_64", config, Accel.TCG)
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives[3].startswith("id=vd3,") and drives[3].endswith(",readonly=on")
    assert "readonly" not in drives[4]

    with tarfile.open(config.disks[2].path) as tar:
        member = tar.extractfile("run.sh")
        assert member is not None
        run_sh = member.read().decode()
    # a parent mount comes before what is mounted inside it (/ref before /ref/notes)
    assert (
        "MA_MOUNTS='vdd /ref ro,noload ext4 vde /scratch rw ext4 vdf /corpus ro,noload ext4 "
        "vdg /ref/notes rw ext4'\n"
    ) in run_sh


def test_start_on_the_fake_backend_boots_with_the_disks(
    api: Microagent, project: Path, tmp_path: Path
) -> None:
    api.create(project / "microagent.yaml")
    report = api.start("data", wait=True, timeout=30)
    assert (report.state, report.exit_code) == ("stopped", 0)
    boot = json.loads(api.workspace("data").run.boot_path.read_text())
    assert [d["readonly"] for d in boot["disks"][3:]] == [True, False, True, False]


def test_a_bundle_is_built_once_per_archive_content(
    api: Microagent, project: Path, tmp_path: Path
) -> None:
    first = api.create(project / "microagent.yaml").workspace
    entry = first.record().disks[2].entry
    image = api.store.entry_path(entry) / "disk.ext4"
    inode = image.stat().st_ino
    second = api.create(project / "microagent.yaml", Overrides(name="data2")).workspace
    assert second.record().disks[2].entry == entry and image.stat().st_ino == inode
    assert len(list((api.store.root / "bundles").iterdir())) == 2  # corpus, notes
    # each workspace writes its own rw copies
    assert first.disk_copy("scratch") != second.disk_copy("scratch")

    make_tar(project / "corpus.tar.gz", {"docs/a.txt": b"changed\n"}, "w:gz")
    third = api.create(project / "microagent.yaml", Overrides(name="data3")).workspace
    assert third.record().disks[2].entry != entry


def test_cache_prune_keeps_what_a_workspace_boots_from(
    api: Microagent, project: Path, tmp_path: Path
) -> None:
    ws = api.create(project / "microagent.yaml").workspace
    api.cache_prune(everything=True)
    for disk in boot_disks(api.store, ws, ws.record()):
        assert disk.path.is_file()
    api.delete(["data"])
    api.cache_prune(everything=True)
    assert not any((api.store.root / "bundles").iterdir())


@pytest.mark.parametrize(
    ("member", "reason"),
    [("../escape.txt", "'..' component"), ("docs/../../escape.txt", "'..' component")],
)
def test_an_unsafe_archive_is_refused_where_it_is_declared(
    *,
    fake_backend: None,
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    member: str,
    reason: str,
) -> None:
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    make_tar(project / "notes.tar", {"ok.txt": b"fine\n", member: b"bad\n"})
    out = cli(capsys, "create", "-f", str(project / "microagent.yaml"), code=2)
    error = out["error"]
    assert error["kind"] == "invalid_spec" and error["location"]["line"] == 9
    assert error["diagnostics"][0]["path"] == "bundles[1].path"
    assert reason in error["message"] and member in error["message"]
    assert not (tmp_path / "home" / "workspaces" / "data").exists()
    assert len(list((tmp_path / "home" / "store" / "bundles").iterdir())) == 1  # corpus only
    assert not (tmp_path / "escape.txt").exists() and not list(tmp_path.rglob("escape.txt"))


@pytest.mark.parametrize(
    ("link", "then", "reason"),
    [
        ((tarfile.LNKTYPE, "../../etc/passwd"), None, "'..' component"),
        ((tarfile.SYMTYPE, "/etc"), "etc-link/passwd", "parent /etc-link is a symlink"),
    ],
)
def test_links_leading_out_of_an_archive_are_refused(
    api: Microagent,
    project: Path,
    link: tuple[bytes, str],
    then: str | None,
    reason: str,
) -> None:
    with tarfile.open(project / "notes.tar", "w") as tar:
        info = tarfile.TarInfo("etc-link")
        info.type, info.linkname = link
        tar.addfile(info)
        if then is not None:
            data = tarfile.TarInfo(then)
            data.size = 4
            tar.addfile(data, io.BytesIO(b"evil"))
    with pytest.raises(SpecError) as raised:
        api.create(project / "microagent.yaml")
    assert reason in raised.value.message and "bundles[1].path" in raised.value.message


def test_a_device_node_in_an_archive_is_refused(api: Microagent, project: Path) -> None:
    with tarfile.open(project / "notes.tar", "w") as tar:
        info = tarfile.TarInfo("dev/sda")
        info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
        tar.addfile(info)
    with pytest.raises(SpecError) as raised:
        api.create(project / "microagent.yaml")
    assert "bundles[1].path" in raised.value.message and "dev/sda" in raised.value.message


def test_an_image_with_file_system_errors_is_refused(api: Microagent, project: Path) -> None:
    broken = project / "images" / "scratch.ext4"
    broken.write_bytes(b"\0" * 1080 + b"\x53\xef" + b"\xff" * 4000)  # a magic, nothing else
    with pytest.raises(SpecError) as raised:
        api.create(project / "microagent.yaml")
    diag = raised.value.diagnostics[0]
    assert (diag.path, diag.location and diag.location.line) == ("disks[1].path", 6)
    assert "e2fsck" in diag.message and "refusing" in diag.message
    assert not (api.settings.home / "workspaces" / "data").exists()


def test_too_many_disks_are_refused_at_create(api: Microagent, project: Path) -> None:
    lines = [
        f"  - {{name: d{i}, path: images/ref.ext4, mountpoint: /d{i}}}"
        for i in range(MAX_EXTRA_DISKS + 1)
    ]
    spec = project / "many.yaml"
    spec.write_text("name: many\nimage: oci:layout:latest\ndisks:\n" + "\n".join(lines) + "\n")
    with pytest.raises(SpecError) as raised:
        api.create(spec)
    diag = raised.value.diagnostics[0]
    assert diag.path == f"disks[{MAX_EXTRA_DISKS}].path"
    assert f"at most {MAX_EXTRA_DISKS}" in diag.message


def test_the_fake_guest_mounts_only_attached_disks_as_the_vmm_allows(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"")
    system = tuple(Disk(image, readonly=True) for _ in range(3))
    config = BootConfig(kernel=image, initrd=image, disks=system, state_dir=tmp_path)
    run = RunConfig(command=("true",), mounts=(ExtraMount("vdd", "/data"),))
    with pytest.raises(VMError, match="cannot mount /dev/vdd"):
        check_mounts(config, run)
    config = dataclasses.replace(config, disks=(*system, Disk(image, readonly=True)))
    with pytest.raises(VMError, match="read-only, mounted rw"):
        check_mounts(config, run)
    check_mounts(
        config, RunConfig(command=("true",), mounts=(ExtraMount("vdd", "/d", readonly=True),))
    )


def test_a_request_with_too_many_disks_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"")
    disks = tuple(ExtraDisk(image, f"/d{i}") for i in range(MAX_EXTRA_DISKS + 1))
    with pytest.raises(InvalidInputError, match=f"at most {MAX_EXTRA_DISKS}"):
        RunRequest(rootfs=image, command=("true",), disks=disks).extra_disks()
    missing = RunRequest(rootfs=image, command=("true",), disks=(ExtraDisk(tmp_path / "x", "/x"),))
    with pytest.raises(InvalidInputError, match="does not exist"):
        missing.extra_disks()


def test_the_most_disks_fit_the_microvm_transports(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs.ext4"
    make_ext4(rootfs, {"x": b"x"})
    disks = tuple(ExtraDisk(rootfs, f"/d{i}") for i in range(MAX_EXTRA_DISKS))
    request = RunRequest(
        rootfs=rootfs,
        command=("true",),
        network=NetworkConfig(NetworkMode.USER),
        disks=disks,
        state_size_mib=16,
    )
    (tmp_path / "k").write_bytes(b"k")
    config = prepare(request, Kit(tmp_path / "k", tmp_path / "k"), tmp_path)
    argv = build_argv("qemu-system-x86_64", config, Accel.TCG)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    transports = [d for d in devices if d.startswith("virtio-") and "-device" in d.split(",")[0]]
    assert len(transports) <= MICROVM_TRANSPORTS
    assert request.mounts()[-1].device == "vds"


def test_a_bundle_is_bounded_and_reproducible(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "big.tar", {"a.bin": b"x" * 5000, "b.txt": b"b\n"})
    with pytest.raises(IntegrityError, match="exceeds 4096 bytes") as raised:
        archive_to_ext4(
            archive, tmp_path / "x.ext4", key="k", name="big", limits=Limits(max_bytes=4096)
        )
    assert raised.value.message.startswith("bundle big: big.tar: entry 'a.bin'")
    one = archive_to_ext4(archive, tmp_path / "one.ext4", key="k", name="big")
    two = archive_to_ext4(archive, tmp_path / "two.ext4", key="k", name="big")
    assert (
        one.archive_sha256 == two.archive_sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    )
    assert (tmp_path / "one.ext4").read_bytes() == (tmp_path / "two.ext4").read_bytes()
