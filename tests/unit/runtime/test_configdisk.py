"""The config disk: tar layout, run.json contract, run.sh quoting, validation."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from microagent.errors import InvalidInputError
from microagent.runner import run
from microagent.runtime.configdisk import (
    EXTRA_CA_MEMBER,
    MIN_DISK_BYTES,
    ExtraMount,
    GuestFile,
    GuestNetwork,
    NetworkMode,
    Output,
    RunConfig,
    build_archive,
    render_run_sh,
)

CONFIG = RunConfig(
    command=("python3", "-c", "print('it''s'); import sys"),
    env={"API": "a b'c\"$HOME`x`", "MULTI": "line1\nline2"},
    workdir="/work dir",
    hostname="agent-1",
    network=GuestNetwork(mode=NetworkMode.USER),
    outputs=(Output("result", "/workspace/result.json"),),
    mounts=(ExtraMount("vdd", "/data", readonly=True),),
)


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def test_layout_order_modes_and_padding() -> None:
    files = [GuestFile("/app/agent.py", b"print(1)\n", 0o755), GuestFile("/etc/x.conf", b"x")]
    data = build_archive(CONFIG, files, extra_ca=b"-----BEGIN CERTIFICATE-----\n")
    names = [m.name for m in members(data)]
    assert names == [
        "run.json",
        "run.sh",
        EXTRA_CA_MEMBER,
        "files/app/agent.py",
        "files/etc/x.conf",
    ]
    modes = {m.name: m.mode for m in members(data)}
    assert modes["files/app/agent.py"] == 0o755
    assert all(m.uid == 0 and m.mtime == 0 for m in members(data))
    assert len(data) >= MIN_DISK_BYTES and len(data) % 512 == 0


def test_big_archive_is_padded_to_512() -> None:
    data = build_archive(CONFIG, [GuestFile("/big", b"x" * (MIN_DISK_BYTES + 7))])
    assert len(data) % 512 == 0 and len(data) > MIN_DISK_BYTES


def test_run_json_contract() -> None:
    with tarfile.open(fileobj=io.BytesIO(build_archive(CONFIG))) as tar:
        member = tar.extractfile("run.json")
        assert member is not None
        doc = json.loads(member.read())
    assert doc == {
        "version": 1,
        "mode": "run",
        "command": list(CONFIG.command),
        "env": dict(CONFIG.env),
        "workdir": "/work dir",
        "hostname": "agent-1",
        "network": {
            "mode": "user",
            "address": "10.0.2.15/24",
            "gateway": "10.0.2.2",
            "dns": "10.0.2.3",
        },
        "outputs": [{"name": "result", "path": "/workspace/result.json"}],
        "extraCaBundle": None,
        "mounts": [{"device": "vdd", "path": "/data", "fstype": "ext4", "readonly": True}],
        "mediationPort": None,
        "servicePorts": [],
        "layers": [],
    }


def test_service_ports_reach_run_json_and_run_sh(tmp_path: Path) -> None:
    config = RunConfig(command=("x",), mediation_port=2048, service_ports=(18780, 18781))
    with tarfile.open(fileobj=io.BytesIO(build_archive(config))) as tar:
        member = tar.extractfile("run.json")
        assert member is not None
        doc = json.load(member)
    assert (doc["mediationPort"], doc["servicePorts"]) == (2048, [18780, 18781])
    script = tmp_path / "run.sh"
    script.write_text(render_run_sh(config))
    probe = f'. {script}\necho "<$MA_MEDIATION_PORT><$MA_SERVICE_PORTS>"\n'
    assert run(["sh", "-c", probe]).stdout == "<2048><18780 18781>\n"
    script.write_text(render_run_sh(RunConfig(command=("x",))))
    assert run(["sh", "-c", probe]).stdout == "<><>\n"


def test_run_sh_round_trips_through_a_shell(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text(render_run_sh(CONFIG))
    probe = (
        f". {script}\n"
        'eval "set -- $MA_ARGV"; for a in "$@"; do printf "<%s>" "$a"; done; echo "|"\n'
        'eval "set -- $MA_ENV"; for a in "$@"; do printf "<%s>" "$a"; done; echo "|"\n'
        'eval "w=$MA_WORKDIR"; printf "<%s>|\\n" "$w"\n'
        'echo "$MA_HOSTNAME $MA_NET_MODE $MA_NET_ADDRESS $MA_CA"\n'
    )
    out = run(["sh", "-c", probe]).stdout
    argv_part, env_part, workdir, rest = out.split("|\n", 3)
    assert argv_part == "".join(f"<{a}>" for a in CONFIG.command)
    assert env_part == "".join(f"<{k}={v}>" for k, v in CONFIG.env.items())
    assert workdir == "</work dir>"
    assert rest.strip() == "agent-1 user 10.0.2.15/24"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (RunConfig(command=()), "no command"),
        (RunConfig(command=("x",), env={"1BAD": "v"}), "invalid environment variable"),
        (RunConfig(command=("x",), hostname="bad_host"), "invalid hostname"),
        (RunConfig(command=("x",), workdir="rel"), "absolute guest path"),
        (RunConfig(command=("x",), outputs=(Output("r", "out.json"),)), "absolute guest path"),
        (RunConfig(command=("x",), mounts=(ExtraMount("vda", "/d"),)), "vdd..vdz"),
    ],
)
def test_validation(config: RunConfig, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        build_archive(config)


def test_file_paths_must_be_absolute_and_not_root() -> None:
    with pytest.raises(InvalidInputError):
        build_archive(CONFIG, [GuestFile("relative", b"")])
    with pytest.raises(InvalidInputError):
        build_archive(CONFIG, [GuestFile("/", b"")])


def test_dotdot_is_normalised_inside_the_guest_tree() -> None:
    data = build_archive(CONFIG, [GuestFile("/a/../../etc/passwd", b"x")])
    assert [m.name for m in members(data)][-1] == "files/etc/passwd"


def test_network_mode_parse() -> None:
    assert NetworkMode.parse("isolated") is NetworkMode.ISOLATED
    with pytest.raises(InvalidInputError, match="unknown network mode"):
        NetworkMode.parse("bridge")
