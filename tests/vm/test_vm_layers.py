"""Read-only layer disks stacked over the rootfs in a real guest (issue 15 item 1).

Three layer images (bottom, middle, top) in overlayfs form are built here with mke2fs -d and
debugfs -w (a whiteout is a character device 0/0, an opaque directory has
trusted.overlay.opaque=y), then the busybox rootfs boots with the stack: once through
RunRequest.layers (reading the state disk's upper afterwards), once through
`microagent run --rootfs ... --layer ...`, and once with a layer that is not a file system.
Then the product's own: setup steps whose roots are stacks of the layer disks their exported
uppers became, and a workspace booting and copying through that stack.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import RunVM

from microagent import Microagent, Settings
from microagent.cli import main
from microagent.ext4.debugfs import check_guest_image, quote, run_debugfs
from microagent.ext4.mkfs import make_state_disk
from microagent.kit.guestkit import GuestKit
from microagent.runner import run
from testenv import standin

pytestmark = pytest.mark.vm

# bottom -> top; the rootfs below them has /etc/group ("root:x:0:"), /etc/passwd and the CA
# bundle with ORIGINAL-GUEST-BUNDLE.
LAYERS: dict[str, dict[str, str]] = {
    "bottom": {
        "app/config": "bottom",
        "app/only-bottom": "bottom",
        "opt/dir/a": "bottom-a",
        "opt/dir/b": "bottom-b",
        "etc/group": "bottom-group",
    },
    "middle": {"app/config": "middle", "app/mid": "middle"},
    "top": {"app/config": "top", "etc/group": "top-group", "opt/dir/c": "top-c"},
}
WHITEOUTS = ("/app/only-bottom", "/etc/passwd")  # in the top layer: a layer's and the rootfs'
OPAQUE = "/opt/dir"  # in the top layer: hides a and b

PROBE = r"""
echo "config=$(cat /app/config) mid=$(cat /app/mid) group=$(cat /etc/group)"
for p in /app/only-bottom /etc/passwd; do
  if [ -e "$p" ]; then echo "seen $p"; else echo "hidden $p"; fi
done
echo "opaque=$(ls /opt/dir | tr '\n' ' ')"
echo "rootfs=$(grep -c ORIGINAL-GUEST-BUNDLE /etc/ssl/certs/ca-certificates.crt)"
echo "lowers=$(sed -n 's|^overlay / overlay .*lowerdir=\([^,]*\),.*|\1|p' /proc/mounts)"
echo written >/app/config && echo new >/opt/dir/new && rm /etc/group && echo "writes=ok"
"""
EXPECTED = [
    "config=top mid=middle group=top-group",
    "hidden /app/only-bottom",
    "hidden /etc/passwd",
    "opaque=c ",
    "rootfs=1",
    "lowers=/layers/vdf:/layers/vde:/layers/vdd:/lower",
    "writes=ok",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_layer(folder: Path, name: str, files: dict[str, str], top: bool) -> Path:
    tree = folder / f"{name}.tree"
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text + "\n")
    if top:
        for path in WHITEOUTS:
            (tree / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    image = folder / f"{name}.ext4"
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), "8M"])
    if top:
        commands = []  # debugfs' mknod takes a name in the current directory, not a path
        for path in WHITEOUTS:
            parent, _, name = path.rpartition("/")
            commands += [f"cd {quote(parent)}", f"mknod {quote(name)} c 0 0", "cd /"]
        commands.append(f"ea_set {quote(OPAQUE)} trusted.overlay.opaque y")
        script = run_debugfs(image, commands, write=True)
        assert script.unexpected() == [], script.errors
        check = run_debugfs(image, [f"stat {quote(WHITEOUTS[0])}", f"ea_list {quote(OPAQUE)}"])
        assert "Type: character special" in check.outputs[0], check.outputs
        assert "trusted.overlay.opaque" in check.outputs[1], check.outputs
    return image


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    folder = tmp_path_factory.mktemp("layers")
    return tuple(
        make_layer(folder, name, files, top=name == "top") for name, files in LAYERS.items()
    )


def test_a_stack_of_layers_is_the_guests_root(
    run_vm: RunVM, layers: tuple[Path, ...], tmp_path: Path, no_leftovers: None
) -> None:
    before = [sha256(p) for p in layers]
    state = make_state_disk(tmp_path / "state.ext4", 64, journal=False)
    result = run_vm("sh", "-c", PROBE, layers=layers, state_disk=state)
    assert result.error is None, (result.error, result.stderr)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == EXPECTED, result.stdout
    assert [sha256(p) for p in layers] == before  # read-only to the VMM, mounted ro
    check_guest_image(state, "state disk")
    upper = run_debugfs(
        state, ["cat /upper/app/config", "cat /upper/opt/dir/new", "stat /upper/etc/group"]
    )
    assert [o.strip() for o in upper.outputs[:2]] == ["written", "new"], upper.outputs
    assert "Type: character special" in upper.outputs[2]  # the guest's rm: a whiteout


def test_run_layer_flags_boot_the_stack(
    rootfs: Path,
    layers: tuple[Path, ...],
    runtime_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MICROAGENT_HOME", str(runtime_home))
    before = [sha256(p) for p in (rootfs, *layers)]
    flags = [w for p in layers for w in ("--layer", str(p))]
    argv = ["run", "--rootfs", str(rootfs), *flags, "--network", "isolated"]
    code = main([*argv, "--", "sh", "-c", PROBE])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.splitlines() == EXPECTED, out.out
    assert [sha256(p) for p in (rootfs, *layers)] == before


def test_a_layer_that_cannot_be_mounted_fails_clearly(
    run_vm: RunVM, layers: tuple[Path, ...], tmp_path: Path, no_leftovers: None
) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (1 << 20))
    result = run_vm("true", layers=(layers[0], junk))
    assert result.exit_code == 127
    assert result.error is not None
    assert "cannot mount layer 2 (/dev/vde, a read-only ext4 image)" in result.error


STEPS = (
    "mkdir -p /app/dir && echo one >/app/one && echo a >/app/dir/a && echo b >/app/dir/b",
    "cat /app/one >/app/two && rm /app/dir/a /etc/passwd",  # whiteouts: a layer's, the base's
)
REPORT = r"""
echo "one=$(cat /app/one) two=$(cat /app/two) dir=$(ls /app/dir | tr '\n' ' ')"
if [ -e /etc/passwd ]; then echo "seen /etc/passwd"; else echo "hidden /etc/passwd"; fi
echo "lowers=$(sed -n 's|^overlay / overlay .*lowerdir=\([^,]*\),.*|\1|p' /proc/mounts)"
"""


def test_setup_steps_stack_their_layer_disks(
    kit: GuestKit, busybox_layout: standin.BuiltImage, tmp_path: Path, no_leftovers: None
) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    shutil.copytree(busybox_layout.layout, project / "layout")
    steps = "".join(f"  - {step!r}\n" for step in STEPS)
    entry = "".join(f"  {line}\n" for line in REPORT.strip().splitlines())
    (project / "microagent.yaml").write_text(
        "name: stacked\nimage: oci:layout:latest\nprofile: tiny\n"
        f"network: {{mode: isolated}}\nsetup:\n{steps}entrypoint: |\n{entry}"
    )
    api = Microagent(Settings(home=tmp_path / "home", kernel=kit.kernel, initrd=kit.initrd))
    made = api.create(project / "microagent.yaml")
    assert made.boots == 2
    layers = made.rootfs.root.layers
    assert len(layers) == 2 and made.rootfs.path.name.endswith(".ext4")
    before = [sha256(p) for p in (made.rootfs.path, *layers)]
    report = api.start("stacked", wait=True, timeout=300)
    result = api.result("stacked")
    assert report.exit_code == 0, result
    assert result["stdout"].splitlines() == [
        "one=one two=one dir=b ",
        "hidden /etc/passwd",
        "lowers=/layers/vde:/layers/vdd:/lower",  # the step's own layer disk on top
    ], result
    assert [sha256(p) for p in (made.rootfs.path, *layers)] == before
    out = tmp_path / "two"
    api.cp("stacked:/app/two", str(out))
    assert out.read_text() == "one\n"
    api.delete(["stacked"])
