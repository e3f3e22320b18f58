"""Guards of the spec loader and the build plan, pinned through the public interface
(``load_spec``, ``compile_plan`` and the CLI's ``validate`` / ``plan --offline``).

Each test fails when its guard is loosened by one line: a reserved name compared as typed, a
guest path ``/`` (or one that only normalises to it) let through, two disks on one mount
point, one host port forwarded twice, ``bundles`` left out of the config step's inputs, a
symlink's target left out of the files step's. ``//`` at the start of a guest path is one
slash to the guest's kernel, but ``posixpath.normpath`` keeps it: ``dst: //`` used to pass as
a file target and ``mountpoint: //proc`` as an ordinary folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from microagent import ResolvedImage, Spec, SpecError, StepKind, compile_plan, load_spec
from microagent.errors import InvalidInputError
from microagent.runtime.configdisk import GuestFile, RunConfig, build_archive
from testenv.clitools import cli_json

IMAGE = ResolvedImage("docker.io/library/busybox:1", "sha256:" + "cd" * 32, "linux/amd64")
EXT4_MAGIC_AT = 1024 + 0x38


def project(tmp_path: Path, body: str) -> Path:
    """A spec ``name: guarded`` plus ``body``, beside a file, a folder, an ext4-looking image
    and two tar archives it may name."""
    (tmp_path / "agent.py").write_text("print('hi')\n")
    (tmp_path / "lib").mkdir(exist_ok=True)
    (tmp_path / "lib" / "util.py").write_text("X = 1\n")
    (tmp_path / "lib" / "other.py").write_text("X = 2\n")
    image = bytearray(4096)
    image[EXT4_MAGIC_AT : EXT4_MAGIC_AT + 2] = b"\x53\xef"
    (tmp_path / "data.ext4").write_bytes(bytes(image))
    (tmp_path / "one.tar").write_bytes(b"\0" * 1024)
    (tmp_path / "two.tar").write_bytes(b"\0" * 2048)
    spec = tmp_path / "microagent.yaml"
    spec.write_text("name: guarded\n" + body)
    return spec


def load(tmp_path: Path, body: str) -> Spec:
    return load_spec(project(tmp_path, body))


def problems(tmp_path: Path, body: str) -> list[str]:
    """Every diagnostic ``path: message`` of a spec that must be refused."""
    with pytest.raises(SpecError) as caught:
        load(tmp_path, body)
    return [f"{d.path}: {d.message}" for d in caught.value.diagnostics]


# -- guest paths: `/`, and what only normalises to it -----------------------------------------


@pytest.mark.parametrize("root", ["/.", "/./", "/.//.", "//", "///", "//./"])
@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("files: [{{src: agent.py, dst: '{p}'}}]\n", "files[0].dst"),
        ("outputs: [{{name: result, path: '{p}'}}]\n", "outputs[0].path"),
        ("disks: [{{name: data, path: data.ext4, mountpoint: '{p}'}}]\n", "disks[0].mountpoint"),
        ("bundles: [{{name: b, path: one.tar, mountpoint: '{p}'}}]\n", "bundles[0].mountpoint"),
    ],
    ids=["files", "outputs", "disks", "bundles"],
)
def test_a_guest_path_that_is_the_root_is_refused(
    tmp_path: Path, root: str, body: str, where: str
) -> None:
    assert problems(tmp_path, body.format(p=root)) == [f"{where}: the guest path must not be '/'"]


@pytest.mark.parametrize(
    ("written", "meant"),
    [("//etc", "/etc"), ("//etc/", "/etc"), ("//app//agent.py", "/app/agent.py"), ("///x", "/x")],
)
def test_leading_double_slash_means_one_slash(tmp_path: Path, written: str, meant: str) -> None:
    spec = load(
        tmp_path,
        f"files: [{{src: agent.py, dst: '{written}'}}]\n"
        f"outputs: [{{name: result, path: '{written}'}}]\n"
        f"disks: [{{name: data, path: data.ext4, mountpoint: '{written}'}}]\n",
    )
    assert spec.files[0].dst == meant
    assert spec.outputs[0].path == meant
    assert spec.disks[0].mountpoint == meant


@pytest.mark.parametrize("mount", ["//proc", "//sys/x", "//dev", "//run/user"])
def test_system_folders_cannot_be_reached_with_a_double_slash(tmp_path: Path, mount: str) -> None:
    top = "/" + mount.strip("/").split("/")[0]
    clean = "/" + mount.strip("/")
    body = f"disks: [{{name: d, path: data.ext4, mountpoint: '{mount}'}}]\n"
    assert problems(tmp_path, body) == [
        f"disks[0].mountpoint: cannot mount a disk on {clean}: {top} belongs to the guest system"
    ]


def test_double_slash_spellings_of_one_path_are_one_target(tmp_path: Path) -> None:
    got = problems(
        tmp_path,
        "files:\n  - {src: agent.py, dst: /app/a.py}\n  - {src: agent.py, dst: '//app/a.py'}\n"
        "disks: [{name: d, path: data.ext4, mountpoint: /data}]\n"
        "bundles: [{name: b, path: one.tar, mountpoint: '//data'}]\n",
    )
    assert got == [  # in the order of the file
        "files[1].dst: /app/a.py is already the target of files[0]",
        "disks: mount point /data is used twice",
    ]


def test_the_config_disk_refuses_root_spelled_with_two_slashes() -> None:
    """The same rule where guest files are packed for a boot (not only in the loader)."""
    config = RunConfig(command=("true",))
    for root in ("/", "//", "/./"):
        with pytest.raises(InvalidInputError, match="a file cannot be placed at /"):
            build_archive(config, [GuestFile(root, b"x")])
    archive = build_archive(config, [GuestFile("//etc/motd", b"hello")])
    assert b"files/etc/motd" in archive and b"files//etc" not in archive


# -- reserved names, whatever their case ----------------------------------------------------


@pytest.mark.parametrize("name", ["Images", "WORKSPACES", "Cache", "rootFS", "tmp"])
def test_reserved_workspace_names_in_any_case(tmp_path: Path, name: str) -> None:
    spec = project(tmp_path, "")
    spec.write_text(f"name: {name}\n")
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    assert [d.message for d in caught.value.diagnostics] == [f"{name!r} is a reserved name"]


@pytest.mark.parametrize("name", ["State", "ROOTFS", "Config", "state"])
@pytest.mark.parametrize("key", ["disks", "bundles"])
def test_reserved_disk_names_in_any_case(tmp_path: Path, name: str, key: str) -> None:
    path = "data.ext4" if key == "disks" else "one.tar"
    got = problems(tmp_path, f"{key}: [{{name: {name}, path: {path}, mountpoint: /d}}]\n")
    assert got == [f"{key}[0].name: disk name {name!r} is reserved"]


def test_names_close_to_reserved_ones_are_fine(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        "disks: [{name: states, path: data.ext4, mountpoint: /d}]\n"
        "bundles: [{name: rootfs2, path: one.tar, mountpoint: /b}]\n",
    )
    assert [d.name for d in spec.disks + spec.bundles] == ["states", "rootfs2"]


# -- one mount point, one host port -----------------------------------------------------------


@pytest.mark.parametrize(
    ("mounts", "shown"),
    [
        (("/data", "/data"), "/data"),
        (("/data", "/data/"), "/data"),
        (("/mnt/x", "/mnt/./x"), "/mnt/x"),
    ],
)
def test_two_disks_on_one_mount_point_are_refused(
    tmp_path: Path, mounts: tuple[str, str], shown: str
) -> None:
    got = problems(
        tmp_path,
        f"disks: [{{name: a, path: data.ext4, mountpoint: '{mounts[0]}'}}]\n"
        f"bundles: [{{name: b, path: one.tar, mountpoint: '{mounts[1]}'}}]\n",
    )
    assert got == [f"disks: mount point {shown} is used twice"]


def test_distinct_mount_points_are_fine(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        "disks: [{name: a, path: data.ext4, mountpoint: /data}]\n"
        "bundles: [{name: b, path: one.tar, mountpoint: /data2}]\n",
    )
    assert [d.mountpoint for d in spec.disks + spec.bundles] == ["/data", "/data2"]


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ("{hostPort: 8080, guestPort: 80}", "{hostPort: 8080, guestPort: 81}",
         "127.0.0.1:8080 is forwarded twice"),
        ("{hostPort: 8080, guestPort: 80, host: 0.0.0.0}", "{hostPort: 8080, guestPort: 81}",
         "127.0.0.1:8080 is forwarded twice (with 0.0.0.0:8080)"),
        ("{hostPort: 8080, guestPort: 80, host: 127.0.0.2}",
         "{hostPort: 8080, guestPort: 80, host: 0.0.0.0}",
         "0.0.0.0:8080 is forwarded twice (with 127.0.0.2:8080)"),
    ],
)  # fmt: skip
def test_one_host_port_forwarded_twice_is_refused(
    tmp_path: Path, first: str, second: str, message: str
) -> None:
    got = problems(tmp_path, f"network:\n  forwards: [{first}, {second}]\n")
    assert got == [f"network.forwards[1]: {message}"]


def test_one_port_on_two_host_addresses_is_fine(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        "network:\n  forwards:\n"
        "    - {hostPort: 8080, guestPort: 80}\n"
        "    - {hostPort: 8080, guestPort: 80, host: 127.0.0.2}\n"
        "    - {hostPort: 8081, guestPort: 80}\n",
    )
    assert [f.bind for f in spec.network.forwards] == [
        "127.0.0.1:8080",
        "127.0.0.2:8080",
        "127.0.0.1:8081",
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("8080:80", "8080:81"), "--publish '8080:81': 127.0.0.1:8080 is published twice"),
        (("0.0.0.0:8080:80", "127.0.0.1:8080:81"),
         "--publish '127.0.0.1:8080:81': 127.0.0.1:8080 overlaps 0.0.0.0:8080"),
    ],
)  # fmt: skip
def test_one_host_port_published_twice_on_the_command_line_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, ...], message: str
) -> None:
    spec = project(tmp_path, f"image: busybox@{IMAGE.digest}\n")
    args = [a for f in flags for a in ("--publish", f)]
    got = cli_json(capsys, "plan", "--offline", "-f", str(spec), *args, code=2)
    assert got["error"]["message"].startswith(message)


# -- what the plan's keys cover ---------------------------------------------------------------


def keys(spec_path: Path) -> dict[StepKind, str]:
    plan = compile_plan(load_spec(spec_path), IMAGE)
    return {s.kind: s.key for s in plan.steps}


BUNDLE = "bundles: [{name: b, path: one.tar, mountpoint: /bundle}]\n"


@pytest.mark.parametrize(
    "changed",
    [
        "",  # no bundle at all
        "bundles: [{name: b, path: two.tar, mountpoint: /bundle}]\n",
        "bundles: [{name: b, path: one.tar, mountpoint: /elsewhere}]\n",
        "bundles: [{name: c, path: one.tar, mountpoint: /bundle}]\n",
        "bundles: [{name: b, path: one.tar, mountpoint: /bundle, mode: rw}]\n",
    ],
    ids=["removed", "other-archive", "other-mount", "other-name", "other-mode"],
)
def test_the_config_key_follows_the_bundles(tmp_path: Path, changed: str) -> None:
    spec = project(tmp_path, BUNDLE)
    before = keys(spec)
    spec.write_text("name: guarded\n" + changed)
    after = keys(spec)
    assert after[StepKind.CONFIG] != before[StepKind.CONFIG]
    assert after[StepKind.FILES] == before[StepKind.FILES]  # the rootfs is not rebuilt
    assert after[StepKind.BASE] == before[StepKind.BASE]


def test_the_config_step_lists_the_bundles(tmp_path: Path) -> None:
    spec = project(tmp_path, BUNDLE)
    config = compile_plan(load_spec(spec), IMAGE).config_step.inputs
    assert config["disks"] == [
        {"name": "b", "path": str(tmp_path / "one.tar"), "mountpoint": "/bundle", "mode": "ro"}
    ]


def test_the_files_key_follows_a_symlink_target(tmp_path: Path) -> None:
    spec = project(tmp_path, "files: [{src: lib, dst: /app/lib}]\n")
    (tmp_path / "lib" / "current").symlink_to("util.py")
    before = keys(spec)
    (tmp_path / "lib" / "current").unlink()
    (tmp_path / "lib" / "current").symlink_to("other.py")
    after = keys(spec)
    assert after[StepKind.FILES] != before[StepKind.FILES]
    assert after[StepKind.BASE] == before[StepKind.BASE]
    (tmp_path / "lib" / "current").unlink()
    (tmp_path / "lib" / "current").symlink_to("util.py")
    assert keys(spec) == before  # the key is the target, not the link's inode or mtime


def test_the_files_step_records_a_symlink_as_its_target(tmp_path: Path) -> None:
    spec = project(tmp_path, "files: [{src: lib, dst: /app/lib}]\n")
    (tmp_path / "lib" / "current").symlink_to("../outside/never-read")
    step = compile_plan(load_spec(spec), IMAGE).of_kind(StepKind.FILES)[0]
    link = next(e for e in step.inputs["entries"] if e["path"] == "/app/lib/current")
    assert link == {"path": "/app/lib/current", "type": "symlink", "mode": "0777",
                    "target": "../outside/never-read"}  # fmt: skip
