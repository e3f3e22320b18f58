"""``cp``'s disk copy, pinned down where mutants of ext4/overlay.py outlived the disk tests
(docs/testing.md): Linux's path limits to the byte, each refusal's exact words and hint,
symlink targets with ``.`` and empty components, and the host mode under a strict umask.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from disk_kit import build_lower, mkfs

from microagent.errors import InvalidInputError, NotFoundError
from microagent.ext4.overlay import NAME_MAX, PATH_MAX, copy_in, copy_out, read_bytes


@pytest.fixture
def odd_rootfs(tmp_path: Path) -> Path:
    """The usual lower tree plus links with odd targets and a named pipe."""
    root = build_lower(tmp_path / "odd")
    (root / "dot").symlink_to("./usr/./bin")
    (root / "double").symlink_to("usr//bin/")
    os.mkfifo(root / "etc/pipe")
    return mkfs(root, tmp_path / "odd.ext4")


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _refusal(exc: type[Exception], fn: object, *args: object) -> tuple[str, str]:
    with pytest.raises(exc) as raised:
        fn(*args)  # type: ignore[operator]
    error = raised.value
    return getattr(error, "message", str(error)), getattr(error, "hint", "")


def test_path_limits_hold_to_the_byte(tmp_path: Path, state: Path, rootfs: Path) -> None:
    longest = "/workspace/" + "n" * NAME_MAX
    with pytest.raises(NotFoundError):  # allowed: merely missing
        copy_out(state, rootfs, longest, tmp_path / "o")
    message, hint = _refusal(
        InvalidInputError, copy_out, state, rootfs, longest + "n", tmp_path / "o"
    )
    assert (
        message
        == (  # the path is shown cut to 80 characters
            f"guest path {(longest + 'n')[:80]!r}: file name too long ({len(longest) + 1} bytes, "
            f"longest component {NAME_MAX + 1}; the limits are {PATH_MAX - 1} and {NAME_MAX})"
        )
    )
    assert hint == "the guest would get ENAMETOOLONG for this path too"
    deep = "/" + "/".join(["d" * 200] * 20)
    deep += "/" + "e" * (PATH_MAX - 1 - len(deep) - 1)
    assert len(deep) == PATH_MAX - 1
    with pytest.raises(NotFoundError):
        copy_out(state, rootfs, deep, tmp_path / "o")
    message, _ = _refusal(InvalidInputError, copy_out, state, rootfs, deep + "e", tmp_path / "o")
    assert f"file name too long ({PATH_MAX} bytes, longest component 200;" in message


def test_each_copy_in_refusal_says_why(tmp_path: Path, state: Path, rootfs: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    assert _refusal(NotFoundError, copy_in, state, rootfs, src, "/nope/deeper/f") == (
        "cannot copy to /nope/deeper/f: parent directory does not exist (/nope does not exist)",
        "copy into a directory that exists in the workspace (it is not created)",
    )
    assert _refusal(InvalidInputError, copy_in, state, rootfs, src, "/etc/hosts/x") == (
        "cannot copy to /etc/hosts/x: /etc/hosts is not a directory",
        "",
    )
    assert _refusal(InvalidInputError, copy_in, state, rootfs, src, "/") == (
        "cannot copy to /: it is a directory",
        "",
    )
    assert _refusal(InvalidInputError, copy_in, state, rootfs, src, "/workspace") == (
        "/workspace is a directory in the workspace",
        "give the full destination path, e.g. /workspace/NAME",
    )
    odd = tmp_path / "file" / "below"
    (tmp_path / "file").write_bytes(b"")
    message, _ = _refusal(InvalidInputError, copy_in, state, rootfs, odd, "/workspace/x")
    assert message == f"cannot read {odd}: Not a directory"


def test_each_copy_out_refusal_says_why(tmp_path: Path, state: Path, odd_rootfs: Path) -> None:
    assert _refusal(InvalidInputError, copy_out, state, odd_rootfs, "/etc/pipe", tmp_path) == (
        "/etc/pipe is not a regular file",
        "",
    )
    out = tmp_path / "out"
    (out / "hosts").mkdir(parents=True)
    assert _refusal(InvalidInputError, copy_out, state, odd_rootfs, "/etc/hosts", out) == (
        f"{out / 'hosts'} is a directory",
        "",
    )


def test_link_targets_with_dots_and_empty_components_resolve(state: Path, odd_rootfs: Path) -> None:
    tool = b"#!/bin/sh\necho tool\n"
    assert read_bytes(state, odd_rootfs, "/dot/tool") == tool
    assert read_bytes(state, odd_rootfs, "/double/tool") == tool


def test_the_host_mode_stays_within_the_umask(
    tmp_path: Path, state: Path, rootfs: Path, strict_umask: None
) -> None:
    copy_out(state, rootfs, "/usr/bin/tool", tmp_path / "tool")
    assert stat.S_IMODE((tmp_path / "tool").stat().st_mode) == 0o700
    copy_out(state, rootfs, "/etc/hosts", tmp_path / "hosts")
    assert stat.S_IMODE((tmp_path / "hosts").stat().st_mode) == 0o600


def test_the_root_and_odd_names_are_refused_with_the_reason(
    tmp_path: Path, state: Path, odd_rootfs: Path
) -> None:
    assert _refusal(InvalidInputError, copy_out, state, odd_rootfs, "/", tmp_path / "o") == (
        "/ is a directory; only regular files can be copied",
        "",
    )
    assert _refusal(InvalidInputError, copy_out, state, odd_rootfs, "/a\x7fb", tmp_path) == (
        "guest path '/a\\x7fb' must be absolute and clean",
        "e.g. /workspace/input.json (no '.', '..', '//', trailing '/' or control chars)",
    )
    src = tmp_path / "src"
    src.write_bytes(b"x")
    assert _refusal(InvalidInputError, copy_in, state, odd_rootfs, src, "/etc/pipe") == (
        "/etc/pipe exists and is not a regular file",
        "",
    )
