"""Guest kit: recipe/key, the rendered init, building from a file:// mirror, overrides."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_kit import KERNEL_VERSION, MODULE_DEPS, make_ko, make_mirror, mirror_of, sign_mirror

from microagent.errors import BuildError, InvalidInputError, ToolError
from microagent.kit import debian, guestkit, kmod
from microagent.kit.guestkit import MODULE_ROOTS
from microagent.runner import find_tool, run
from microagent.runtime import control
from microagent.settings import Settings
from microagent.store.content import Store
from testenv.prereq import tool_missing

GROUPS = {
    "mmio": ["virtio_ring", "virtio", "virtio_mmio"],
    "pci": ["virtio_ring", "virtio", "virtio_pci"],
    "disk": ["virtio_blk"],
    "late": ["virtio_console", "overlay"],
    "net": ["failover", "net_failover", "virtio_net"],
}


def busybox() -> str:
    try:
        return find_tool("busybox")
    except ToolError as exc:
        tool_missing("busybox runs the init script's functions", exc)


@pytest.fixture
def mirror(tmp_path: Path) -> debian.Mirror:
    return mirror_of(make_mirror(tmp_path / "mirror", busybox=b"BUSYBOX"))


def cpio_names(initrd: Path) -> dict[str, bytes]:
    """name -> data of a newc archive (enough of a reader for our own output)."""
    data = initrd.read_bytes()
    if data.startswith(b"\x1f\x8b"):
        data = gzip.decompress(data)
    out, pos = {}, 0
    while True:
        fields = [int(data[pos + 6 + i * 8 : pos + 14 + i * 8], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110 : name_end - 1].decode()
        body = (name_end + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = data[body : body + size]
        pos = (body + size + 3) & ~3


def test_module_groups_share_transport_dependencies() -> None:
    infos = {n: kmod.ModuleInfo(n, d) for n, d in MODULE_DEPS.items()}
    groups = guestkit.module_groups(infos)
    assert groups["mmio"] == ["virtio_ring", "virtio", "virtio_mmio"]
    assert groups["pci"] == [
        "virtio_ring",
        "virtio",
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "virtio_pci",
    ]
    assert groups["disk"] == ["virtio_blk"]
    assert groups["late"] == ["virtio_console", "overlay"]
    assert groups["net"] == ["failover", "net_failover", "virtio_net"]


def test_render_init_lists_modules_and_markers() -> None:
    text = guestkit.render_init(GROUPS)
    assert text.startswith("#!/bin/sh\n")
    assert "insmod_all virtio_ring virtio virtio_mmio" in text
    assert "insmod_all failover net_failover virtio_net" in text
    assert control.BEGIN_MARKER in text and control.PORT_NAME in text
    assert "{{" not in text and "<%" not in text


def test_init_is_valid_busybox_sh(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_text(guestkit.render_init(GROUPS))
    run([busybox(), "sh", "-n", str(script)])


@pytest.mark.parametrize(
    "text",
    ["plain", 'q"uote \\ back', "tab\there\r\nwin", "\x1b[31mred\x1b[0m\x01", "multi\nline\n", ""],
)
def test_json_awk_escapes_for_json(tmp_path: Path, text: str) -> None:
    awk = Path(guestkit.__file__).parent / "templates/json.awk"
    src = tmp_path / "in"
    src.write_bytes(text.encode())
    body = run([busybox(), "awk", "-f", str(awk), str(src)]).stdout
    if text.endswith("\n"):
        body += "\\n"  # the init adds the final newline itself (awk cannot see it)
    assert json.loads(f'"{body}"') == text


def _sha256_canonical(value: object) -> str:
    """sha256 of canonical JSON, computed here rather than by the code under test."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def test_recipe_digest_is_the_same_in_another_process() -> None:
    """Stable across interpreters (another hash seed): nothing in the recipe depends on
    set or dict order or on the process."""
    code = "from microagent.kit import guestkit; print(guestkit.recipe_digest())"
    other = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert other == guestkit.recipe_digest() == _sha256_canonical(guestkit.recipe())
    assert len(bytes.fromhex(other)) == 32


def test_recipe_digest_follows_templates_and_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    before = guestkit.recipe_digest()
    real = guestkit._template_text
    monkeypatch.setattr(
        guestkit, "_template_text", lambda n: real(n) + ("\n" if n == "json.awk" else "")
    )
    assert guestkit.recipe_digest() != before
    monkeypatch.setattr(guestkit, "_template_text", real)
    assert guestkit.recipe_digest() == before
    monkeypatch.setattr(guestkit, "STREAM_CAP", guestkit.STREAM_CAP + 1)
    assert guestkit.recipe_digest() != before


def test_kit_key_is_the_packages_digests_and_the_recipe() -> None:
    a = debian.DebPackage("k", "1", "amd64", "k.deb", 1, "a" * 64)
    b = debian.DebPackage("b", "1", "amd64", "b.deb", 1, "b" * 64)
    c = debian.DebPackage("k", "2", "amd64", "k2.deb", 1, "c" * 64)
    renamed = debian.DebPackage("k-other", "9", "amd64", "elsewhere.deb", 7, "a" * 64)
    assert guestkit.kit_key("amd64", a, b) == _sha256_canonical(
        {
            "arch": "amd64",
            "kernelDeb": "a" * 64,
            "busyboxDeb": "b" * 64,
            "recipe": guestkit.recipe_digest(),
        }
    )
    assert guestkit.kit_key("amd64", a, b) != guestkit.kit_key("amd64", c, b)
    assert guestkit.kit_key("amd64", a, b) != guestkit.kit_key("arm64", a, b)
    assert guestkit.kit_key("amd64", a, b) != guestkit.kit_key("amd64", b, a)
    assert guestkit.kit_key("amd64", a, b) == guestkit.kit_key("amd64", renamed, b)


def test_install_builds_a_kit_once(tmp_path: Path, mirror: debian.Mirror) -> None:
    store = Store(tmp_path / "store")
    said: list[str] = []
    kit = guestkit.install_kit(store, mirror, arch="amd64", progress=said.append)
    assert kit.kernel.read_bytes() == b"KERNEL-IMAGE-" + KERNEL_VERSION.encode()
    assert kit.kernel_version == KERNEL_VERSION
    files = cpio_names(kit.initrd)
    assert files["bin/busybox"] == b"BUSYBOX"
    assert files["init"].startswith(b"#!/bin/sh")
    expected = {f"lib/modules/{n}.ko" for n in MODULE_DEPS if n != "unrelated"}
    assert {n for n in files if n.startswith("lib/modules/")} - {"lib/modules"} == expected
    assert files["lib/modules/virtio_net.ko"] == make_ko("virtio_net", MODULE_DEPS["virtio_net"])
    assert "dev/console" in files and "lib/microagent/json.awk" in files
    assert any("downloading" in s for s in said)
    manifest = json.loads((kit.kernel.parent / "kit.json").read_text())
    assert manifest["modules"]["net"] == GROUPS["net"]
    again = guestkit.install_kit(store, mirror, arch="amd64", progress=said.append)
    assert again.key == kit.key and again.initrd.stat().st_mtime_ns == kit.initrd.stat().st_mtime_ns


def test_find_list_and_ensure(tmp_path: Path, mirror: debian.Mirror) -> None:
    store = Store(tmp_path / "store")
    assert guestkit.find_kit(store, "amd64") is None
    kit = guestkit.install_kit(store, mirror, arch="amd64")
    assert guestkit.find_kit(store, "amd64") == kit
    assert guestkit.find_kit(store, "arm64") is None
    assert [k.key for k in guestkit.list_kits(store)] == [kit.key]
    assert guestkit.ensure_kit(store, arch="amd64").key == kit.key
    assert kit.to_json()["current"] is True


def test_ensure_rebuilds_offline_from_cached_packages(
    tmp_path: Path, mirror: debian.Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "store")
    old = guestkit.install_kit(store, mirror, arch="amd64")
    monkeypatch.setattr(guestkit, "STREAM_CAP", guestkit.STREAM_CAP + 1)  # a new recipe
    monkeypatch.setattr(guestkit.debian, "fetch_index", _no_network)
    new = guestkit.ensure_kit(store, arch="amd64")
    assert new.key != old.key and new.kernel.read_bytes() == old.kernel.read_bytes()


def _no_network(*_args: object) -> object:
    raise AssertionError("the mirror must not be contacted")


def test_missing_kernel_package_is_clear(tmp_path: Path) -> None:
    root = make_mirror(tmp_path / "m")
    index = root / "dists/bookworm/main/binary-amd64/Packages.xz"
    import lzma

    text = lzma.decompress(index.read_bytes()).decode().replace("busybox-static", "busybox-x")
    index.write_bytes(lzma.compress(text.encode()))
    sign_mirror(root)
    with pytest.raises(BuildError, match="'busybox-static' is not in"):
        guestkit.install_kit(Store(tmp_path / "s"), mirror_of(root), arch="amd64")


def test_user_kernel_and_initrd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    kit = guestkit.resolve_kit(Store(tmp_path / "s"), kernel=kernel, initrd=initrd)
    assert (kit.kernel, kit.initrd, kit.source) == (kernel, initrd, "user")
    monkeypatch.setenv("MICROAGENT_KERNEL", str(kernel))
    monkeypatch.setenv("MICROAGENT_INITRD", str(initrd))
    assert guestkit.kit_for(Settings.from_environ(), Store(tmp_path / "s")).source == "user"


def test_user_kernel_alone_uses_the_store_initramfs(
    tmp_path: Path, mirror: debian.Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "store")
    stored = guestkit.install_kit(store, mirror, arch=debian.debian_arch())
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")
    kit = guestkit.resolve_kit(store, kernel=kernel)
    assert (kit.kernel, kit.initrd) == (kernel, stored.initrd)


def test_missing_user_kernel(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"kernel .* does not exist"):
        guestkit.resolve_kit(Store(tmp_path), kernel=tmp_path / "nope", initrd=tmp_path / "x")


def test_module_roots_cover_the_contract() -> None:
    flat = {m for roots in MODULE_ROOTS.values() for m in roots}
    assert flat == {
        "virtio_mmio",
        "virtio_pci",
        "virtio_blk",
        "virtio_console",
        "virtio_net",
        "overlay",
    }


def test_cpio_reader_helper_sanity(tmp_path: Path) -> None:
    from microagent.kit.initramfs import CpioEntry, write_initramfs

    path = tmp_path / "i.gz"
    write_initramfs(path, [CpioEntry.file("a", b"xyz")])
    assert cpio_names(path) == {"a": b"xyz"}


def test_prune_keeps_the_current_kit(
    tmp_path: Path, mirror: debian.Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "store")
    old = guestkit.install_kit(store, mirror, arch="amd64")
    monkeypatch.setattr(guestkit, "STREAM_CAP", guestkit.STREAM_CAP + 1)
    new = guestkit.install_kit(store, mirror, arch="amd64")
    assert [k.key for k in guestkit.prune_kits(store)] == [old.key]
    assert [k.key for k in guestkit.list_kits(store)] == [new.key]


@pytest.mark.parametrize("epoch", [0, 951782400, 1709251199, 1795624549, 4102444799])
def test_init_now_is_rfc3339_utc(epoch: int) -> None:
    import datetime

    text = guestkit.render_init(GROUPS)
    start = text.index("now() {")
    body = text[start : text.index("\n}\n", start) + 3]
    body = body.replace("read -r s </sys/class/rtc/rtc0/since_epoch 2>/dev/null", "s=$EPOCH")
    got = run([busybox(), "sh", "-c", body + 'now; echo "$NOW"'], env={"EPOCH": str(epoch)})
    want = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    assert got.stdout.strip() == want.strftime("%Y-%m-%dT%H:%M:%SZ")
