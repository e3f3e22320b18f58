"""The loader's checks report exactly what is wrong, where, with the hint: every problem at once.

Written against the mutants that outlived tests/unit/compiler (docs/testing.md): each case here
is a spec with several problems of one family, and the whole rendered report is compared, so a
check that goes quiet, points at the wrong key, loses its hint or fires on a valid value fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from microagent.compiler.loader import MAX_SETUP_FILE_BYTES, load_spec
from microagent.compiler.spec import DiskMode, FileEntry, SetupStep
from microagent.errors import InvalidInputError, SpecError, SpecNotFoundError

EXT4 = b"\0" * 1080 + b"\x53\xef"  # the ext2/3/4 superblock magic, where the loader looks


def _project(
    tmp_path: Path,
    spec: str,
    files: Mapping[str, bytes | None] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """A folder with ``microagent.yaml`` and ``files`` (None: a folder)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {}).items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
    if extra is not None:
        extra(tmp_path)
    (tmp_path / "microagent.yaml").write_text(spec)
    return tmp_path / "microagent.yaml"


def _report(spec: Path) -> list[str]:
    """Every problem, rendered as the CLI shows it (the project folder written as <D>)."""
    with pytest.raises(SpecError) as raised:
        load_spec(spec, display="microagent.yaml")
    return [d.render().replace(str(spec.parent.resolve()), "<D>") for d in raised.value.diagnostics]


def test_setup_files_that_cannot_be_scripts_are_each_reported(tmp_path: Path) -> None:
    spec = _project(
        tmp_path,
        "name: a\n"
        "setup:\n"
        "  - {file: adir}\n"
        "  - {file: big.sh}\n"
        "  - {file: missing.sh}\n"
        "  - {file: latin.sh}\n"
        "  - {file: empty.sh}\n"
        "setupFiles: [adir, big.sh]\n",
        {
            "adir": None,
            "big.sh": b"#" * (MAX_SETUP_FILE_BYTES + 1),
            "latin.sh": b"\xff\xfe",
            "empty.sh": b"  \n",
        },
    )
    assert _report(spec) == [
        "microagent.yaml:3:12: setup[0].file: 'adir' is not a regular file",
        "microagent.yaml:4:12: setup[1].file: 'big.sh' is larger than 1 MiB",
        "microagent.yaml:5:12: setup[2].file: file 'missing.sh' does not exist\n"
        "  hint: looked for <D>/missing.sh",
        "microagent.yaml:6:12: setup[3].file: cannot read 'latin.sh': 'utf-8' codec can't "
        "decode byte 0xff in position 0: invalid start byte",
        "microagent.yaml:7:12: setup[4].file: setup script 'empty.sh' is empty",
        "microagent.yaml:8:14: setupFiles[0]: 'adir' is not a regular file",
        "microagent.yaml:8:20: setupFiles[1]: 'big.sh' is larger than 1 MiB",
    ]


def test_setup_steps_say_where_they_come_from(tmp_path: Path) -> None:
    """A script of exactly 1 MiB is accepted; each step keeps its origin and its file."""
    spec = _project(
        tmp_path,
        "name: a\nsetup:\n  - echo one\n  - {run: echo two}\n  - {file: s.sh}\n"
        "setupFiles: [exact.sh]\n",
        {"s.sh": "echo 'é'\n".encode(), "exact.sh": b"#" * MAX_SETUP_FILE_BYTES},
    )
    loaded = load_spec(spec)
    base = tmp_path.resolve()
    assert loaded.setup == (
        SetupStep("echo one", "setup[0]"),
        SetupStep("echo two", "setup[1]"),
        SetupStep("echo 'é'", "setup[2].file (s.sh)", base / "s.sh"),
    )
    assert loaded.setup_files == (
        SetupStep("#" * MAX_SETUP_FILE_BYTES, "setupFiles[0] (exact.sh)", base / "exact.sh"),
    )
    single = _project(tmp_path / "one", "name: a\nsetup: echo hi\n")
    assert load_spec(single).setup == (SetupStep("echo hi", "setup"),)


def test_files_entries_that_cannot_be_delivered_are_each_reported(tmp_path: Path) -> None:
    spec = _project(
        tmp_path,
        "name: a\n"
        "files:\n"
        "  - {src: missing, dst: /a}\n"
        "  - {src: fifo, dst: /b}\n"
        "  - {src: f, dst: /c}\n"
        "  - {src: f, dst: /c/}\n"
        "  - {src: f, dst: /x/../y}\n"
        "  - {src: ../outside, dst: /z}\n",
        {"f": b"1"},
        lambda d: os.mkfifo(d / "fifo"),
    )
    assert _report(spec) == [
        "microagent.yaml:3:11: files[0].src: 'missing' does not exist\n"
        "  hint: looked for <D>/missing",
        "microagent.yaml:4:11: files[1].src: 'fifo' is not a regular file or folder",
        "microagent.yaml:6:19: files[3].dst: /c is already the target of files[2]",
        "microagent.yaml:7:19: files[4].dst: guest path '/x/../y' contains '..'\n"
        "  hint: write the path it means",
        "microagent.yaml:8:11: files[5].src: '../outside' leads outside the spec's folder "
        f"(to {tmp_path.parent.resolve()}/outside)\n"
        "  hint: paths in a spec are relative to its folder and stay inside it: copy or move "
        "the file next to microagent.yaml",
    ]


def test_files_entries_keep_source_target_and_mode(tmp_path: Path) -> None:
    spec = _project(
        tmp_path,
        "name: a\nfiles:\n  - {src: f, dst: /app//f, mode: '0750'}\n  - {src: d, dst: /d}\n"
        "  - {src: f, dst: /f2}\n",
        {"f": b"1", "d": None},
    )
    base = tmp_path.resolve()
    assert load_spec(spec).files == (
        FileEntry(src=base / "f", dst="/app/f", mode=0o750),
        FileEntry(src=base / "d", dst="/d", mode=None),
        FileEntry(src=base / "f", dst="/f2", mode=None),
    )


def test_unreadable_files_entry_is_reported_not_raised(tmp_path: Path) -> None:
    """A source the loader may not stat (a looping symlink) is a problem at its key."""
    spec = _project(
        tmp_path,
        "name: a\nfiles:\n  - {src: loop/x, dst: /a}\n",
        extra=lambda d: (d / "loop").symlink_to("loop"),
    )
    report = _report(spec)
    assert len(report) == 1
    assert report[0].startswith("microagent.yaml:3:11: files[0].src: ")


def test_network_rules_that_clash_are_each_reported(tmp_path: Path) -> None:
    spec = _project(
        tmp_path,
        "name: a\n"
        "network:\n"
        "  mode: isolated\n"
        "  forwards: [{hostPort: 80, guestPort: 80}, {hostPort: 80, guestPort: 81, host: 0.0.0.0},"
        " {hostPort: 81, guestPort: 81, host: 8.8.8.8},"
        " {hostPort: 81, guestPort: 82, host: 8.8.8.8}]\n"
        '  allow: [example.com, example.com, "*", .example.org]\n',
    )
    assert _report(spec) == [
        "microagent.yaml:4:13: network.forwards: forwards need a network, but network.mode is "
        "isolated\n  hint: remove the forwards or use mode: user",
        "microagent.yaml:4:45: network.forwards[1]: 0.0.0.0:80 is forwarded twice "
        "(with 127.0.0.1:80)\n  hint: each host address and port is published once; "
        "0.0.0.0 takes every address",
        "microagent.yaml:4:137: network.forwards[3]: 8.8.8.8:81 is forwarded twice\n"
        "  hint: each host address and port is published once; 0.0.0.0 takes every address",
        "microagent.yaml:5:24: network.allow[1]: example.com is listed twice",
        "microagent.yaml:5:37: network.allow[2]: allow entry '*': no wildcards\n"
        "  hint: a leading dot allows every name under a domain: .example.com",
    ]


def test_allowed_hosts_keep_their_order(tmp_path: Path) -> None:
    spec = _project(tmp_path, "name: a\nnetwork: {allow: [b.example, .a.example, c.example]}\n")
    assert load_spec(spec).network.allow == ("b.example", ".a.example", "c.example")


def test_outputs_declared_twice_or_climbing_are_reported(tmp_path: Path) -> None:
    spec = _project(
        tmp_path,
        "name: a\noutputs: [{name: r, path: /a}, {name: r, path: /a/../b}, {name: s, path: /s/}]\n",
    )
    assert _report(spec) == [
        "microagent.yaml:2:39: outputs[1].name: output 'r' is declared twice",
        "microagent.yaml:2:48: outputs[1].path: guest path '/a/../b' contains '..'\n"
        "  hint: write the path it means",
    ]


def test_disks_that_cannot_be_attached_are_each_reported(tmp_path: Path) -> None:
    spec = _project(
        tmp_path,
        "name: a\n"
        "disks:\n"
        "  - {name: rootfs, path: d.ext4, mountpoint: /proc/x}\n"
        "  - {name: d2, path: missing.ext4, mountpoint: /m}\n"
        "  - {name: d3, path: plain, mountpoint: /n}\n"
        "  - {name: d4, path: adir, mountpoint: /o}\n"
        "  - {name: d5, path: d.ext4, mountpoint: /data}\n"
        "  - {name: d5, path: d.ext4, mountpoint: /data}\n"
        "bundles:\n"
        "  - {name: b, path: x.zip, mountpoint: /b}\n"
        "  - {name: c, path: gone.tar, mountpoint: /c}\n",
        {"d.ext4": EXT4, "plain": b"x" * 2000, "adir": None, "x.zip": b"x"},
    )
    assert _report(spec) == [
        "microagent.yaml:3:3: disks: disk name 'd5' is used twice",
        "microagent.yaml:3:3: disks: mount point /data is used twice",
        "microagent.yaml:3:12: disks[0].name: disk name 'rootfs' is reserved",
        "microagent.yaml:3:46: disks[0].mountpoint: cannot mount a disk on /proc/x: /proc "
        "belongs to the guest system\n  hint: pick a mount point such as /data or /mnt/corpus",
        "microagent.yaml:4:22: disks[1].path: 'missing.ext4' does not exist\n"
        "  hint: looked for <D>/missing.ext4",
        "microagent.yaml:5:22: disks[2].path: 'plain' is not an ext4 file system image "
        "(no ext2/3/4 superblock)\n  hint: make one with `mke2fs -t ext4 -d DIR IMAGE 256M`, "
        "or list a .tar archive under `bundles:` instead",
        "microagent.yaml:6:22: disks[3].path: 'adir' is not a regular file",
        "microagent.yaml:10:21: bundles[0].path: a bundle must be a .tar, .tar.gz or .tgz archive",
        "microagent.yaml:11:21: bundles[1].path: 'gone.tar' does not exist\n"
        "  hint: looked for <D>/gone.tar",
    ]


def test_disks_and_bundles_keep_what_the_spec_says(tmp_path: Path) -> None:
    spec = _project(
        tmp_path,
        "name: a\n"
        "disks:\n  - {name: data, path: d.ext4, mountpoint: /data/}\n"
        "  - {name: logs, path: d.ext4, mountpoint: /logs, mode: rw}\n"
        "bundles:\n  - {name: b, path: x.tgz, mountpoint: /b}\n"
        "  - {name: c, path: y.tar.gz, mountpoint: /c}\n"
        "  - {name: e, path: z.tar, mountpoint: /e}\n",
        {"d.ext4": EXT4, "x.tgz": b"x", "y.tar.gz": b"y", "z.tar": b"z"},
    )
    loaded = load_spec(spec, display="microagent.yaml")
    base = tmp_path.resolve()
    got = [(d.name, d.path, d.mountpoint, d.mode, d.origin) for d in loaded.disks + loaded.bundles]
    assert got == [
        ("data", base / "d.ext4", "/data", DiskMode.RO, "disks[0]"),
        ("logs", base / "d.ext4", "/logs", DiskMode.RW, "disks[1]"),
        ("b", base / "x.tgz", "/b", DiskMode.RO, "bundles[0]"),
        ("c", base / "y.tar.gz", "/c", DiskMode.RO, "bundles[1]"),
        ("e", base / "z.tar", "/e", DiskMode.RO, "bundles[2]"),
    ]
    where = loaded.disks[1].location
    assert where is not None
    assert (where.file, where.line, where.column) == ("microagent.yaml", 4, 24)


def test_unreadable_disk_is_reported_not_raised(tmp_path: Path) -> None:
    spec = _project(
        tmp_path,
        "name: a\ndisks:\n  - {name: d, path: loop/x, mountpoint: /d}\n",
        extra=lambda d: (d / "loop").symlink_to("loop"),
    )
    report = _report(spec)
    assert len(report) == 1
    assert report[0].startswith("microagent.yaml:3:21: disks[0].path: cannot resolve 'loop/x'")


def test_a_spec_file_too_large_or_not_utf8_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"name: a\n" + b"#" * (1 << 20))
    with pytest.raises(InvalidInputError) as raised:
        load_spec(big)
    assert (raised.value.message, raised.value.hint) == (
        f"spec {big} is larger than 1 MiB",
        "is this the right file?",
    )
    exact = tmp_path / "exact.yaml"
    exact.write_bytes(b"name: a\n" + b"#" * ((1 << 20) - 8))
    assert load_spec(exact).name == "a"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: \xe9\n")
    with pytest.raises(InvalidInputError) as raised:
        load_spec(latin)
    assert raised.value.message == f"spec {latin} is not UTF-8 text"
    with pytest.raises(SpecNotFoundError):
        load_spec(tmp_path / "missing.yaml")


def test_guest_paths_with_a_newline_and_odd_forward_hosts_are_refused(tmp_path: Path) -> None:
    spec = _project(
        tmp_path,
        "name: a\n"
        'files: [{src: f, dst: "/a\\nb"}]\n'
        'outputs: [{name: r, path: "/o\\np"}, {name: s, path: "/n\\0ul"}]\n'
        "network:\n"
        "  forwards: [{hostPort: 80, guestPort: 80, host: 224.0.0.1}]\n"
        '  allow: ["*", "a*", ok.example]\n',
        {"f": b"1"},
    )
    report = _report(spec)
    assert report[:3] == [
        "microagent.yaml:2:23: files[0].dst: guest paths must not contain NUL or newline "
        "characters",
        "microagent.yaml:3:27: outputs[0].path: guest paths must not contain NUL or newline "
        "characters",
        "microagent.yaml:3:53: outputs[1].path: guest paths must not contain NUL or newline "
        "characters",
    ]
    assert report[3].startswith("microagent.yaml:5:50: network.forwards[0].host: ")
    assert report[3].endswith("\n  hint: e.g. 127.0.0.1")
    assert [r.split(": ", 2)[1] for r in report[4:]] == ["network.allow[0]", "network.allow[1]"]
