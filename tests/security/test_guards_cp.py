"""``microagent cp`` against a state disk the guest wrote: the guards it must keep.

A root process in the guest owns its state disk: it can make any file setuid root, and plant
symlinks whose targets climb with ``..`` or that stand as the last component of the path the
user names. ``cp`` reads that disk on the host, so:

- a file copied out never keeps setuid, setgid or sticky bits on the host (nor more
  permission than the user's umask gives a new file);
- symlinks are followed as the guest's kernel would, inside the guest's root: ``..`` at the
  root stays at the root (never the state disk's own top folder, where ``/upper`` lives);
- a symlink as the last component is followed, both ways (the target is read or replaced;
  the link stays a link);
- ``NAME:/path`` is a workspace path only as written: a name without ``/`` and an absolute
  path; anything else is a host path (``./x:/y`` is a file named ``y`` in a folder ``x:``).

Workspaces are made through the CLI with the fake backend; the guest's writes are raw
``debugfs -w`` edits of the state disk, left marked clean.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from microagent.api import parse_remote_path
from testenv.clitools import cli_json

GUEST_SECRET = b"the guest's /secret\n"
DISK_TOP_SECRET = b"the state disk's top folder, outside the guest's root\n"


@pytest.fixture
def home(
    busybox_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[Path]:
    """A workspace ``ws`` made through the CLI (fake backend, no VM); the umask is 022."""
    spec = busybox_project / "microagent.yaml"
    spec.write_text("name: ws\nimage: oci:layout:latest\nentrypoint: 'true'\n")
    cli_json(capsys, "create", "-f", str(spec))
    old = os.umask(0o022)
    try:
        yield tmp_path / "home"
    finally:
        os.umask(old)


def state_disk(home: Path) -> Path:
    return home / "workspaces" / "ws" / "state.ext4"


def guest_writes(image: Path, commands: Sequence[str], files: Mapping[str, bytes] = {}) -> None:
    """What a root process in the guest can do to its raw disk (``debugfs -w`` commands;
    ``files`` are host files the commands may ``write`` in)."""
    work = image.parent / "guest-files"
    work.mkdir(exist_ok=True)
    for name, data in files.items():
        (work / name).write_bytes(data)
    script = "".join(c + "\n" for c in commands).encode()
    done = subprocess.run(
        ["debugfs", "-w", "-f", "-", str(image)],
        input=script,
        cwd=work,
        capture_output=True,
        check=False,
    )
    shutil.rmtree(work)
    problems = [
        line for line in done.stderr.decode().splitlines() if not line.startswith("debugfs 1.")
    ]
    assert done.returncode == 0 and not problems, problems


def inode_type(image: Path, path: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", f'stat "{path}"', str(image)], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"Type: (\S+)", out)
    return found[1] if found else "missing"


def cp(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> dict[str, Any]:
    return cli_json(capsys, "cp", *args, code=code)


# -- setuid, setgid, sticky ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guest_mode", "host_mode"),
    [
        (0o4755, 0o755),  # setuid root
        (0o2755, 0o755),  # setgid
        (0o6711, 0o711),  # both
        (0o7777, 0o755),  # everything: the umask still applies
        (0o1644, 0o644),  # sticky
        (0o4600, 0o600),
    ],
    ids=oct,
)
def test_copy_out_drops_setuid_setgid_and_sticky(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], guest_mode: int, host_mode: int
) -> None:
    guest_writes(
        state_disk(home),
        ["cd /upper", "write tool tool", f"sif tool mode 0{0o100000 | guest_mode:o}"],
        {"tool": b"#!/bin/sh\necho owned\n"},
    )
    assert cp(capsys, "ws:/tool", str(tmp_path / "tool"))["bytes"] == 21
    st = (tmp_path / "tool").stat()
    assert stat.S_IMODE(st.st_mode) == host_mode
    assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    assert (tmp_path / "tool").read_bytes() == b"#!/bin/sh\necho owned\n"


# -- symlinks: `..` stays inside the guest's root --------------------------------------------


@pytest.fixture
def planted(home: Path) -> Path:
    """``/secret`` in the guest, a different ``/secret`` at the state disk's top (beside
    ``/upper``, where no guest path leads), and links that climb past the root."""
    guest_writes(
        state_disk(home),
        [
            "write top-secret secret",  # the disk's top folder: not the guest's root
            "cd /upper",
            "write guest-secret secret",
            "mkdir w",
            "mkdir w/deep",
            'symlink w/up "../../../../secret"',
            'symlink w/deep/up "../../../../../../../secret"',
            'symlink w/abs "/../../secret"',
            'symlink w/dir "../../.."',
            'symlink w/deep/parent ".."',
        ],
        {"top-secret": DISK_TOP_SECRET, "guest-secret": GUEST_SECRET},
    )
    return home


@pytest.mark.parametrize("path", ["/w/up", "/w/deep/up", "/w/abs", "/w/dir/secret"])
def test_dotdot_in_symlink_targets_is_clamped_at_the_guest_root(
    planted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str
) -> None:
    cp(capsys, f"ws:{path}", str(tmp_path / "got"))
    assert (tmp_path / "got").read_bytes() == GUEST_SECRET


def test_dotdot_in_a_symlink_target_resolves_from_the_link_folder(
    planted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``/w/deep/parent`` is ``..`` from ``/w/deep``: ``/w`` (so ``/w/deep/parent/up`` is
    ``/w/up``, a link to ``/secret``)."""
    cp(capsys, "ws:/w/deep/parent/up", str(tmp_path / "got"))
    assert (tmp_path / "got").read_bytes() == GUEST_SECRET


def test_writes_through_a_climbing_symlink_land_inside_the_guest_root(
    planted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "new"
    src.write_bytes(b"written through a link\n")
    cp(capsys, str(src), "ws:/w/up")
    assert inode_type(state_disk(planted), "/secret") == "regular"
    cp(capsys, "ws:/secret", str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == b"written through a link\n"
    disk_top = subprocess.run(
        ["debugfs", "-R", "cat /secret", str(state_disk(planted))], capture_output=True, check=True
    ).stdout
    assert disk_top == DISK_TOP_SECRET  # the disk's own top folder is untouched


# -- a symlink as the last component ---------------------------------------------------------


@pytest.fixture
def linked(home: Path) -> Path:
    guest_writes(
        state_disk(home),
        [
            "cd /upper",
            "mkdir w",
            "write result w/result.json",
            'symlink w/latest "result.json"',
            'symlink w/absolute "/w/result.json"',
            'symlink w/chain "latest"',
        ],
        {"result": b'{"ok": true}\n'},
    )
    return home


@pytest.mark.parametrize("link", ["latest", "absolute", "chain"])
def test_copy_out_follows_a_symlink_as_the_last_component(
    linked: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], link: str
) -> None:
    got = cp(capsys, f"ws:/w/{link}", str(tmp_path))
    assert got["bytes"] == len(b'{"ok": true}\n')
    assert (tmp_path / link).read_bytes() == b'{"ok": true}\n'  # named as the user named it


@pytest.mark.parametrize("link", ["latest", "absolute", "chain"])
def test_copy_in_writes_through_a_symlink_as_the_last_component(
    linked: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], link: str
) -> None:
    src = tmp_path / "new.json"
    src.write_bytes(b'{"ok": false}\n')
    cp(capsys, str(src), f"ws:/w/{link}")
    for name in ("latest", "absolute", "chain"):
        assert inode_type(state_disk(linked), f"/upper/w/{name}") == "symlink"
    cp(capsys, "ws:/w/result.json", str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == b'{"ok": false}\n'


# -- NAME:/path -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("ws:/a", ("ws", "/a")),
        ("ws:/a:b", ("ws", "/a:b")),
        ("ws:/", ("ws", "/")),
        ("ws:a", None),  # not absolute
        ("ws:", None),
        (":/a", None),  # no name
        ("a/b:/c", None),  # a host path with a colon in it
        ("./ws:/a", None),
        ("/abs/ws:/a", None),
        ("ws", None),
        ("/abs/path", None),
    ],
)
def test_remote_path_parsing_is_strict(text: str, parsed: tuple[str, str] | None) -> None:
    assert parse_remote_path(text) == parsed


@pytest.fixture
def in_tmp(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The workspace exists and the current folder is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_host_path_with_a_colon_is_a_host_path(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = in_tmp
    (tmp_path / "x:").mkdir()
    (tmp_path / "x:" / "y").write_bytes(b"colon\n")
    got = cp(capsys, "./x:/y", "ws:/y")
    assert (got["direction"], got["guestPath"], got["bytes"]) == ("to-workspace", "/y", 6)
    cp(capsys, "ws:/y", str(tmp_path / "x:"))
    assert (tmp_path / "x:" / "y").read_bytes() == b"colon\n"


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("ws:relative/path", "out"),  # `ws:relative/path` is a host path: two host paths
        (":/etc/hostname", "out"),
        ("dir/ws:/etc/hostname", "out"),
        ("ws:/etc/hostname", "ws:/copy"),  # two workspace paths
    ],
)
def test_exactly_one_side_must_be_a_workspace_path(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], source: str, target: str
) -> None:
    got = cp(capsys, source, target, code=2)
    assert got["error"]["message"] == (
        "exactly one of SOURCE and TARGET must be NAME:/absolute/path"
    )
    assert not (in_tmp / "out").exists()
