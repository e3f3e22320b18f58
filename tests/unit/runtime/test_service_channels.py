"""Service channels as boot data: ServiceChannel checks, BootConfig limits, boot.json, and a
RunRequest's services reaching the config disk (``MA_SERVICE_PORTS``) and the BootConfig.
The relay itself is tested in test_agentlink.py and test_guest_agent.py."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from microagent.errors import InvalidInputError
from microagent.kit.guestkit import GuestKit
from microagent.runtime.backend import (
    MAX_SERVICES,
    BootConfig,
    Disk,
    Mediation,
    NetworkConfig,
    ServiceChannel,
)
from microagent.runtime.boot import RunRequest, prepare
from microagent.runtime.configdisk import NetworkMode
from microagent.runtime.rundir import BootDocument, RunDir

SOCK = Path("/run/vm/cred0.sock")


def boot(**changes: Any) -> BootConfig:
    return BootConfig(
        kernel=Path("/k"),
        initrd=Path("/i"),
        disks=(Disk(Path("/root.ext4"), readonly=True),),
        state_dir=Path("/run/vm"),
        **changes,
    )


def test_a_service_channel_round_trips_through_json() -> None:
    channel = ServiceChannel(18780, SOCK, "broker:anthropic")
    assert channel.to_json() == {
        "name": "broker:anthropic",
        "guestPort": 18780,
        "socket": "/run/vm/cred0.sock",
    }
    assert ServiceChannel.from_json(channel.to_json()) == channel


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ((0, SOCK, "x"), "guest port must be an integer from 1 to 65535"),
        ((65536, SOCK, "x"), "guest port must be an integer from 1 to 65535"),
        ((True, SOCK, "x"), "guest port must be an integer"),
        (("80", SOCK, "x"), "guest port must be an integer"),
        ((80, SOCK, ""), "name must be 1 to 64 characters"),
        ((80, SOCK, "n" * 65), "name must be 1 to 64 characters"),
        ((80, SOCK, "bad\nname"), "name must be printable ASCII"),
        ((80, SOCK, "caf\u00e9"), "name must be printable ASCII"),
        ((80, Path("rel.sock"), "x"), "socket must be an absolute path"),
        ((80, "/as/a/string.sock", "x"), "socket must be an absolute path"),
        ((80, Path("/x/" + "s" * 120), "x"), "at most 107 bytes, without NUL"),
        ((80, Path("/x/a\0b"), "x"), "at most 107 bytes, without NUL"),
    ],
)
def test_a_service_channel_is_checked_when_made(fields: tuple[Any, ...], problem: str) -> None:
    with pytest.raises(InvalidInputError, match=problem):
        ServiceChannel(*fields)


def test_from_json_checks_too() -> None:
    good = ServiceChannel(80, SOCK, "x").to_json()
    for bad in ({**good, "guestPort": "80"}, {**good, "socket": ""}, {**good, "name": 7}, {}):
        with pytest.raises(InvalidInputError):
            ServiceChannel.from_json(bad)


def test_boot_config_limits_and_distinct_ports() -> None:
    many = tuple(ServiceChannel(18780 + i, SOCK, f"s{i}") for i in range(MAX_SERVICES))
    assert boot(services=many).services == many
    extra = ServiceChannel(19000, SOCK, "one too many")
    with pytest.raises(InvalidInputError, match="11 service channels, but a boot takes at most"):
        boot(services=(*many, extra))
    twice = (ServiceChannel(18780, SOCK, "a"), ServiceChannel(18780, SOCK, "b"))
    with pytest.raises(InvalidInputError, match="guest port 18780 is taken by service channel"):
        boot(services=twice)
    mediation = Mediation(2048, "127.0.0.1", 8080)
    with pytest.raises(InvalidInputError, match="2048 is taken by the mediation channel"):
        boot(mediation=mediation, services=(ServiceChannel(2048, SOCK, "a"),))
    assert boot(mediation=mediation, services=(ServiceChannel(2049, SOCK, "a"),))


def test_boot_json_round_trip(tmp_path: Path) -> None:
    services = (
        ServiceChannel(18780, SOCK, "broker:anthropic"),
        ServiceChannel(18781, Path("/run/vm/egress.sock"), "egress-proxy"),
    )
    config = boot(mediation=Mediation(2048, "127.0.0.1", 8080), services=services)
    run = RunDir(tmp_path)
    run.write_boot(BootDocument(config, "fake"))
    stored = json.loads(run.boot_path.read_text())
    assert stored["services"] == [s.to_json() for s in services]
    assert run.read_boot().config == config
    # A boot.json from before service channels: none.
    del stored["services"]
    run.boot_path.write_text(json.dumps(stored))
    assert run.read_boot().config.services == ()
    stored["services"] = [{**services[0].to_json(), "guestPort": 2048}]
    run.boot_path.write_text(json.dumps(stored))
    with pytest.raises(InvalidInputError, match="taken by the mediation channel"):
        run.read_boot()


def run_json(config_disk: Path) -> dict[str, Any]:
    with tarfile.open(config_disk) as tar:
        member = tar.extractfile("run.json")
        assert member is not None
        data: dict[str, Any] = json.load(member)
        return data


def test_a_run_request_carries_its_services(tmp_path: Path) -> None:
    for name in ("k", "i", "root.ext4"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
    kit = GuestKit(tmp_path / "k", tmp_path / "i", key="k")
    services = (ServiceChannel(18781, SOCK, "b"), ServiceChannel(18780, SOCK, "a"))
    request = RunRequest(
        rootfs=tmp_path / "root.ext4",
        command=("true",),
        mediation=Mediation(2048, "127.0.0.1", 8080),
        services=services,
    )
    assert request.run_config().service_ports == (18781, 18780)
    (tmp_path / "vm").mkdir()
    config = prepare(request, kit, tmp_path / "vm")
    assert config.services == services
    doc = run_json(config.disks[2].path)
    assert (doc["mediationPort"], doc["servicePorts"]) == (2048, [18781, 18780])
    clash = RunRequest(
        rootfs=tmp_path / "root.ext4",
        command=("true",),
        mediation=Mediation(18780, "127.0.0.1", 8080),
        services=services,
    )
    (tmp_path / "vm2").mkdir()
    with pytest.raises(InvalidInputError, match="18780 is taken by the mediation channel"):
        prepare(clash, kit, tmp_path / "vm2")
    assert not list((tmp_path / "vm2").iterdir())  # refused before any disk was made


def test_a_boot_without_direct_egress_keeps_it_through_boot_json(tmp_path: Path) -> None:
    """network.allow's default-deny must survive the trip to the supervisor (it once did not:
    the namespace let the guest connect anywhere)."""
    network = NetworkConfig(NetworkMode.USER, direct_egress=False)
    config = dataclasses.replace(boot(), network=network)
    run = RunDir(tmp_path)
    run.write_boot(BootDocument(config, "fake"))
    assert run.read_boot().config.network.direct_egress is False
    stored = json.loads(run.boot_path.read_text())
    del stored["network"]["directEgress"]  # a boot.json from before network.allow
    run.boot_path.write_text(json.dumps(stored))
    assert run.read_boot().config.network.direct_egress is True
