"""A guest's disk must not steer the host's e2fsprogs.

A root process in the guest can write its state disk raw and leave the file system marked
clean. ``microagent cp NAME:/path DST`` and the export of a setup step's upper then read that
disk with debugfs, which reads its script with an 8 KiB line buffer: a line of 8192 bytes or
more is cut, and the rest runs as a command of its own (``dump`` and ``rdump`` write host
files). These tests plant such disks and drive the public interface (the CLI, or the
module's public functions where the CLI needs a VM); nothing may escape to the host.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from microagent import runner
from microagent.cli import main
from microagent.errors import BuildError, IntegrityError
from microagent.ext4 import debugfs as debugfs_module
from microagent.ext4 import overlay
from microagent.ext4.debugfs import run_debugfs
from microagent.ext4.mkfs import make_state_disk
from microagent.ext4.overlay import copy_in, copy_out, exists
from microagent.ext4.rootfs import build_rootfs
from microagent.ext4.upper import export_upper_image
from microagent.layers.apply import LayerSource
from microagent.store.content import Store

CUT = 8191  # debugfs' fgets() buffer holds 8191 characters of a line
OLD_PREFIX = 'stat "/upper/'  # how the old code began the line for a path below /upper


# -- set-up ----------------------------------------------------------------------------------


@pytest.fixture
def home(busybox_project: Path, tmp_path: Path) -> Path:
    """A workspace ``ws`` made through the CLI with the fake backend (no VM)."""
    spec = busybox_project / "microagent.yaml"
    spec.write_text(
        "name: ws\nimage: oci:layout:latest\nsetup: [mkdir -p /workspace]\n"
        "entrypoint: cat /etc/hostname\n"
    )
    cli("create", "-f", str(spec))
    return tmp_path / "home"


def cli(*args: str, code: int | None = 0) -> dict[str, Any]:
    """``microagent --json ARGS`` in process: its JSON answer, after checking the exit code
    (``code=None``: any)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        got = main(["--json", *args])
    assert code is None or got == code, out.getvalue()
    text = out.getvalue()
    return dict(json.loads(text)) if text.strip() else {}


def state_disk(home: Path) -> Path:
    return home / "workspaces" / "ws" / "state.ext4"


def guest_writes(image: Path, commands: Sequence[str], files: Mapping[str, bytes] = {}) -> None:
    """What a root process in the guest can do to its raw disk: any debugfs -w change (the
    file system stays marked clean)."""
    work = image.parent / "guest-files"
    work.mkdir(exist_ok=True)
    for name, data in files.items():
        (work / name).write_bytes(data)
    script = "".join(c + "\n" for c in commands).encode()
    subprocess.run(
        ["debugfs", "-w", "-f", "-", str(image)], input=script, cwd=work, check=True,
        capture_output=True,
    )  # fmt: skip
    shutil.rmtree(work)
    stats = subprocess.run(["dumpe2fs", "-h", str(image)], check=True, capture_output=True,
                           text=True)  # fmt: skip
    assert re.search(r"^Filesystem state:\s+clean$", stats.stdout, re.M), "left marked clean"


def smuggling_target(command: str) -> str:
    """A symlink target that makes the old walk write ``stat "/upper/<target>"`` with
    ``command`` exactly in the second 8191-byte piece of the line (run on its own)."""
    piece = command + " " * (CUT - len(command))
    head = ("a" * 199 + "/") * 60
    head = head[: CUT - len(OLD_PREFIX) - 1] + "/"
    assert len(OLD_PREFIX) + len(head) == CUT
    return "/" + head + piece + "/tail"


def crafted_symlink(name: str, target: str) -> list[str]:
    """A "slow" symlink inode of any length: a regular file whose type bits are changed
    (debugfs' own ``symlink`` refuses targets longer than a block, a raw write does not)."""
    return [f"write target {name}", f"sif {name} mode 0120777"]


# -- cp out: command smuggling -------------------------------------------------------------


def test_cp_out_cannot_smuggle_debugfs_commands_through_a_huge_symlink(
    home: Path, tmp_path: Path
) -> None:
    escape = tmp_path / "escape"
    escape.mkdir()
    target = smuggling_target(f"dump /upper/payload {escape}/pwned")
    guest_writes(
        state_disk(home),
        ["cd /upper", "write payload payload", *crafted_symlink("evil", target)],
        {"payload": b"guest bytes on the host\n", "target": target.encode()},
    )
    failed = cli("cp", "ws:/evil", str(tmp_path / "out"), code=1)
    assert list(escape.iterdir()) == [], "a smuggled debugfs command wrote a host file"
    assert failed["error"]["kind"] == "integrity"
    assert "e2fsck" in failed["error"]["message"]
    assert not (tmp_path / "out").exists()


def test_a_huge_symlink_is_refused_even_if_e2fsck_missed_it(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: with the file system check out of the way, the symlink bound and
    the debugfs line limit still hold."""
    monkeypatch.setattr(overlay, "check_image", lambda *_a, **_k: None)
    escape = tmp_path / "escape"
    escape.mkdir()
    target = smuggling_target(f"dump /upper/payload {escape}/pwned")
    guest_writes(
        state_disk(home),
        ["cd /upper", "write payload payload", *crafted_symlink("evil", target)],
        {"payload": b"guest bytes on the host\n", "target": target.encode()},
    )
    failed = cli("cp", "ws:/evil", str(tmp_path / "out"), code=1)
    assert list(escape.iterdir()) == []
    assert failed["error"]["kind"] == "integrity"
    assert "symlink inode" in failed["error"]["message"]


@pytest.fixture
def debugfs_lines(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every script line microagent hands to debugfs."""
    seen: list[int] = []
    real = runner.run

    def spy(argv: Sequence[str], **kwargs: Any) -> runner.Completed:
        data = kwargs.get("input")
        if argv and argv[0] == "debugfs" and isinstance(data, bytes):
            seen.extend(len(line) for line in data.split(b"\n"))
        return real(argv, **kwargs)

    monkeypatch.setattr(debugfs_module, "run", spy)
    return seen


def _chain(hops: int) -> list[str]:
    """Valid symlinks (e2fsck accepts them) that together lead to a path of ~4 KB per hop."""
    filler = "/".join(["f" * 250] * 15)  # 3764 bytes
    cmds = ["cd /upper"]
    for i in range(hops):
        nxt = f"/l{i + 1}/{filler}" if i + 1 < hops else f"/{filler}"
        cmds.append(f'symlink "l{i}" "{nxt}"')
    return cmds


@pytest.mark.parametrize(
    ("commands", "why"),
    [
        (_chain(4), "file name too long"),  # 4 hops: a 15 KB path, far past the 8191 cut
        (["cd /upper", f'symlink "wide" "/{"w" * 300}"'], "file name too long"),
    ],
    ids=["chain-of-long-links", "component-over-255"],
)
def test_valid_symlinks_cannot_make_a_long_debugfs_line(
    home: Path, tmp_path: Path, debugfs_lines: list[int], commands: list[str], why: str
) -> None:
    guest_writes(state_disk(home), commands)
    subprocess.run(["e2fsck", "-fn", str(state_disk(home))], check=True, capture_output=True)
    start = commands[1].split('"')[1]
    failed = cli("cp", f"ws:/{start}", str(tmp_path / "out"), code=2)
    assert failed["error"]["kind"] == "invalid_input"
    assert why in failed["error"]["message"]
    assert debugfs_lines and max(debugfs_lines) < 4096


def test_a_symlink_loop_is_a_clean_error(home: Path, tmp_path: Path) -> None:
    guest_writes(state_disk(home), ["cd /upper", 'symlink "a" "/b"', 'symlink "b" "/a"'])
    failed = cli("cp", "ws:/a", str(tmp_path / "out"), code=2)
    assert "too many levels of symbolic links" in failed["error"]["message"]


# -- cp out: a damaged disk marked clean ----------------------------------------------------


def test_a_dirty_state_disk_is_refused_with_a_clear_error(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("mine\n")
    cli("cp", str(src), "ws:/tmp/in.txt")
    cli("cp", "ws:/tmp/in.txt", str(tmp_path / "back.txt"))  # a healthy disk copies
    guest_writes(state_disk(home), ["sif /upper/tmp/in.txt links_count 7"])
    failed = cli("cp", "ws:/tmp/in.txt", str(tmp_path / "out.txt"), code=1)
    error = failed["error"]
    assert error["kind"] == "integrity"
    assert "has file system errors (e2fsck -fn exit code 4)" in error["message"]
    assert "ref count is 7" in error["message"]  # what e2fsck found
    assert "e2fsck -fy" in error["hint"]
    assert not (tmp_path / "out.txt").exists()


# -- the one debugfs runner ----------------------------------------------------------------


def test_the_debugfs_runner_refuses_a_line_debugfs_would_cut(tmp_path: Path) -> None:
    image = make_state_disk(tmp_path / "state.ext4", 16)
    escape = tmp_path / "escape"
    escape.mkdir()
    line = f'stat "/{"a" * (CUT - 7)}dump /upper {escape}/pwned"'
    with pytest.raises(IntegrityError, match="refusing a debugfs command") as err:
        run_debugfs(image, [line])
    assert str(image) in err.value.message
    with pytest.raises(IntegrityError, match="no line breaks"):
        run_debugfs(image, [f"stat /upper\nrdump /upper {escape}"])
    assert list(escape.iterdir()) == []


# -- export of a setup step's upper ---------------------------------------------------------


def test_export_refuses_a_crafted_setup_disk(tmp_path: Path) -> None:
    disk = make_state_disk(tmp_path / "upper.ext4", 16)
    target = "/" + "t" * 20000  # no real symlink is longer than a block
    guest_writes(disk, ["cd /upper", *crafted_symlink("evil", target)], {"target": target.encode()})
    out = tmp_path / "layer.tar"
    with pytest.raises(IntegrityError, match="e2fsck"):
        export_upper_image(disk, out)
    assert not out.exists()


# -- honest paths still work ---------------------------------------------------------------


def test_long_odd_paths_within_linux_limits_still_copy(tmp_path: Path) -> None:
    """Walking one directory at a time keeps deep paths of quote-heavy names working: by
    whole paths, their debugfs lines would pass the limit (every quote is doubled)."""
    names = ['"' * 200 + str(i) for i in range(14)] + ["<2>", "l\u2028s\x85"]  # not inode 2
    tree = tmp_path / "tree"
    deep = tree.joinpath("upper", *names)
    deep.mkdir(parents=True)
    (tree / "work").mkdir()
    (deep / "f").write_bytes(b"deep")
    state, rootfs = tmp_path / "state.ext4", tmp_path / "rootfs.ext4"
    for image, src in ((state, tree), (rootfs, tmp_path / "empty")):
        src.mkdir(exist_ok=True)
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(image), "32M"],
                       check=True, capture_output=True)  # fmt: skip
    guest = "/" + "/".join(names)
    assert len(guest.encode()) > 2800 and exists(state, rootfs, guest + "/f")
    copy_out(state, rootfs, guest + "/f", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"deep"
    (tmp_path / "new").write_bytes(b"new")
    copy_in(state, rootfs, tmp_path / "new", guest + "/new")
    copy_out(state, rootfs, guest + "/new", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == b"new"
    subprocess.run(["e2fsck", "-fn", str(state)], check=True, capture_output=True)


# -- a rootfs built from layers: names with Unicode line separators ------------------------


def _layer(path: Path, files: Mapping[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_layer_names_cannot_split_the_rootfs_build_script(tmp_path: Path) -> None:
    """A layer (a base image's, or one from a remote cache) may name a file with U+2028 or
    U+0085 in it: valid UTF-8, no control character. Splitting the debugfs script with
    ``str.splitlines`` turned such a name into commands of a ``debugfs -w`` run on the host."""
    escape = tmp_path / "escape"
    escape.mkdir()
    odd = f"a\u2028dump /f {escape}/pwned\u2028/b"  # the middle piece is a whole command
    layer = _layer(tmp_path / "layer.tar", {"f": b"from the layer\n", odd.lstrip("/"): b"b\n"})
    store = Store(tmp_path / "store")
    source = LayerSource.from_path(layer, "layer")
    built: list[Path] = []
    with contextlib.suppress(BuildError):  # debugfs complains only after running everything
        built.append(build_rootfs(store, "sha256:" + "ab" * 32, [source], compressed_bytes=1)[0])
    assert list(escape.iterdir()) == [], "a layer's file name ran a debugfs command"
    assert built, "an odd but valid name must not break the build"
    path = built[0]
    top = odd.split("/", maxsplit=1)[0]
    listing = subprocess.run(["debugfs", "-R", "ls -p /", str(path)], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
    assert f"/{top}/" in listing, "the odd name is kept in the image"
