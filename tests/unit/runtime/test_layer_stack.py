"""Read-only layer disks stacked over the rootfs (issue 15 item 1): RunRequest.layers through
prepare() (attach order, serials, limits) and run.sh's MA_LAYERS."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from microagent.errors import InvalidInputError
from microagent.runner import run
from microagent.runtime.boot import MAX_EXTRA_DISKS, ExtraDisk, RunRequest, prepare
from microagent.runtime.configdisk import ExtraMount, RunConfig, build_archive, render_run_sh
from testenv.fakeguest import ext4_like


@dataclass(frozen=True)
class Kit:
    kernel: Path
    initrd: Path


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    return {n: ext4_like(tmp_path / f"{n}.ext4") for n in ("root", "state", "d1", "l1", "l2", "l3")}


def request(images: dict[str, Path], **fields: Any) -> RunRequest:
    return RunRequest(
        rootfs=images["root"], command=("true",), state_disk=images["state"], **fields
    )


def test_layers_attach_read_only_after_the_extra_disks_bottom_first(
    images: dict[str, Path], tmp_path: Path
) -> None:
    req = request(
        images,
        disks=(ExtraDisk(images["d1"], "/data", readonly=False, name="data"),),
        layers=(images["l1"], images["l2"], images["l3"]),
    )
    config = prepare(req, Kit(images["root"], images["root"]), tmp_path)
    shown = [(d.path.name, d.readonly, d.serial) for d in config.disks]
    assert shown == [
        ("root.ext4", True, "rootfs"),
        ("state.ext4", False, "state"),
        ("config.tar", True, "config"),
        ("d1.ext4", False, "disk-data"),
        ("l1.ext4", True, "layer-1"),
        ("l2.ext4", True, "layer-2"),
        ("l3.ext4", True, "layer-3"),
    ]
    assert req.run_config().layers == ("vde", "vdf", "vdg")
    assert req.run_config().mounts == (ExtraMount("vdd", "/data"),)


def test_a_relative_layer_path_reaches_the_vmm_absolute(
    images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = prepare(
        request(images, layers=(Path("l1.ext4"),)), Kit(images["root"], images["root"]), tmp_path
    )
    assert config.disks[-1].path == images["l1"].resolve()


def test_layers_and_extra_disks_share_the_device_limit(images: dict[str, Path]) -> None:
    disks = tuple(ExtraDisk(images["d1"], f"/d{i}") for i in range(MAX_EXTRA_DISKS - 2))
    fits = request(images, disks=disks, layers=(images["l1"], images["l2"]))
    assert len(fits.extra_disks()) == MAX_EXTRA_DISKS
    assert fits.run_config().layers[-1] == "vds"  # the last device the limit allows
    over = request(images, disks=disks, layers=(images["l1"],) * 3)
    with pytest.raises(InvalidInputError) as raised:
        over.extra_disks()
    assert "3 layers and 14 extra disks" in raised.value.message
    assert f"at most {MAX_EXTRA_DISKS}" in raised.value.message
    assert "room for 2 layers" in raised.value.message
    assert "merge layers" in (raised.value.hint or "")
    only_layers = request(images, layers=(images["l1"],) * (MAX_EXTRA_DISKS + 1))
    with pytest.raises(InvalidInputError, match="room for 16 layers"):
        only_layers.extra_disks()


def test_a_missing_or_non_regular_layer_is_refused(images: dict[str, Path], tmp_path: Path) -> None:
    for bad in (tmp_path / "nope.ext4", tmp_path):
        with pytest.raises(InvalidInputError, match=r"layer 2: image .* does not exist or is not"):
            request(images, layers=(images["l1"], bad)).extra_disks()


def test_ma_layers_reaches_run_sh_and_run_json(tmp_path: Path) -> None:
    config = RunConfig(command=("x",), layers=("vde", "vdf"))
    script = tmp_path / "run.sh"
    script.write_text(render_run_sh(config))
    assert "MA_LAYERS='vde vdf'" in script.read_text()
    probe = f'. {script}\nfor d in $MA_LAYERS; do echo "<$d>"; done\n'
    assert run(["sh", "-c", probe]).stdout == "<vde>\n<vdf>\n"
    script.write_text(render_run_sh(RunConfig(command=("x",))))
    assert run(["sh", "-c", probe]).stdout == ""
    with tarfile.open(fileobj=io.BytesIO(build_archive(config))) as tar:
        member = tar.extractfile("run.json")
        assert member is not None
        assert json.load(member)["layers"] == ["vde", "vdf"]


@pytest.mark.parametrize(
    ("layers", "mounts", "problem"),
    [
        (("vdc",), (), "layer device 'vdc' must be vdd..vdz"),
        (("vde; reboot",), (), "must be vdd..vdz"),
        (("vd$(x)",), (), "must be vdd..vdz"),
        (("vde", "vde"), (), "'vde' is given twice"),
        (("vdd",), (ExtraMount("vdd", "/data"),), "'vdd' is given twice"),
    ],
)
def test_bad_layer_devices_never_reach_the_guest(
    layers: tuple[str, ...], mounts: tuple[ExtraMount, ...], problem: str
) -> None:
    with pytest.raises(InvalidInputError, match=problem.replace("$", r"\$").replace("(", r"\(")):
        build_archive(RunConfig(command=("x",), layers=layers, mounts=mounts))
