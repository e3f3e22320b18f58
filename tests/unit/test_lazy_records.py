"""Workspace records and boot documents load the spec's, credentials' and backend's types only
when they hold such parts (cp and status stay off the compiler): what they read back is the
same either way, and a damaged part is refused as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from microagent.compiler.credentials import Credential
from microagent.compiler.spec import Health, Mediation, Restart
from microagent.errors import InvalidInputError
from microagent.runtime.backend import PublishedPort
from microagent.runtime.rundir import BootDocument
from microagent.workspace.records import Record, published_ports


def _record(**parts: Any) -> Record:
    base: dict[str, Any] = {
        "name": "ws",
        "rootfs": "/store/rootfs.ext4",
        "rootfs_key": "sha256:" + "ab" * 32,
        "image": {"reference": "busybox:latest"},
        "command": ("sleep", "1"),
        "workdir": "/",
        "hostname": "ws",
        "env": {"A": "b"},
        "outputs": (("result", "/out/result.json"),),
        "memory_mib": 512,
        "cpus": 1,
        "state_size_mib": 256,
        "network": "user",
        "restart": "never",
    }
    return Record(**{**base, **parts})


def _round_trip(record: Record) -> Record:
    return Record.from_json(record.to_json())


def test_a_record_with_every_optional_part_reads_back_equal() -> None:
    credential = Credential.from_json(
        {
            "name": "anthropic",
            "source": "env:ANTHROPIC_API_KEY",
            "upstream": "https://api.anthropic.com",
            "header": "x-api-key",
            "format": "{value}",
            "baseUrlEnv": "ANTHROPIC_BASE_URL",
            "keyEnv": "ANTHROPIC_API_KEY",
        }
    )
    full = _record(
        published=(PublishedPort("127.0.0.1", 8080, 80),),
        mediation=Mediation(9900, "127.0.0.1", 9901, required=True),
        health=Health(("true",), interval_seconds=10),
        credentials=(credential,),
        egress_allow=("pypi.org",),
    )
    back = _round_trip(full)
    assert back == full
    assert isinstance(back.health, Health) and back.health.exec == ("true",)
    assert isinstance(back.mediation, Mediation) and back.mediation.required
    assert back.published[0].describe() == "127.0.0.1:8080->80/tcp"


def test_a_plain_record_reads_back_equal() -> None:
    plain = _record()
    back = _round_trip(plain)
    assert back == plain
    assert (back.published, back.credentials, back.egress_allow) == ((), (), ())
    assert back.mediation is None and back.health is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("credentials", "env:X", "credentials must be a list"),
        ("credentials", [{"name": "x"}], "a credential needs the string fields"),
        ("egress_allow", "pypi.org", "egress_allow must be a list"),
        ("egress_allow", ["x"] * 65, "egress_allow must be a list of at most 64"),
        ("egress_allow", [7], "egress_allow must hold host names"),
        ("published", [{"host": "0.0.0.0", "hostPort": 0, "guestPort": 80}], "published port"),
    ],
)
def test_a_damaged_optional_part_is_refused(key: str, value: object, message: str) -> None:
    data = _record().to_json()
    data[key] = value
    with pytest.raises(InvalidInputError, match=message):
        Record.from_json(data)


def test_published_ports_of_a_spec() -> None:
    from microagent.compiler.spec import Forward

    assert published_ports(()) == ()
    ports = published_ports(iter([Forward(8080, 80, host="127.0.0.1")]))
    assert [p.describe() for p in ports] == ["127.0.0.1:8080->80/tcp"]
    with pytest.raises(InvalidInputError, match="published port"):
        published_ports([Forward(8080, 80, host="::1")])


def test_a_boot_document_without_a_restart_policy_never_restarts(tmp_path: Path) -> None:
    from microagent.runtime.backend import BootConfig

    config = BootConfig(
        kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd", disks=(), state_dir=tmp_path
    )
    made = BootDocument(config, "fake")
    assert made.restart == Restart()
    back = BootDocument.from_json(made.to_json())
    assert back == made


def test_the_machine_enums_load_without_the_backend() -> None:
    """runtime/machine.py holds Accel and MachineType (the backend names the same objects), so
    code that needs only them does not load the backend's dataclasses."""
    import subprocess
    import sys

    from microagent.runtime import backend, machine

    assert backend.Accel is machine.Accel and backend.MachineType is machine.MachineType
    probe = "import sys, microagent.runtime.machine; print(sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "'microagent.runtime.machine'" in done.stdout  # the probe sees what it imported
    assert "microagent.runtime.backend" not in done.stdout
    assert "microagent.runtime.configdisk" not in done.stdout
