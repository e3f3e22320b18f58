"""The library without the CLI: settings and collaborators are passed in, not read from the
environment, and the same operations give the same results as the commands."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from microagent import Microagent, Settings
from microagent.compiler.overrides import Overrides, RuntimeEnv
from microagent.errors import InvalidInputError
from microagent.runtime.configdisk import RunConfig
from microagent.runtime.fake import FakeBackend, FakeOutcome
from microagent.workspace.run import OneShot
from testenv import standin
from testenv.fakeguest import ext4_like


@pytest.fixture
def api(tmp_path: Path, busybox_layout: standin.BuiltImage) -> Microagent:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    settings = Settings(
        home=tmp_path / "home", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd"
    )
    seen: list[RunConfig] = []

    def guest(config: RunConfig) -> FakeOutcome:
        seen.append(config)
        return FakeOutcome(stdout="ran\n")

    backend = FakeBackend(guest)
    shutil.copytree(busybox_layout.layout, tmp_path / "proj" / "layout")
    (tmp_path / "proj" / "microagent.yaml").write_text(
        "name: lib\nimage: oci:layout:latest\nsetup: [mkdir -p /w]\nentrypoint: 'true'\n"
    )
    return Microagent(settings, injected_backend=backend)


def test_build_plan_and_create_through_the_library(
    api: Microagent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "elsewhere"))  # must be ignored
    spec = tmp_path / "proj" / "microagent.yaml"
    built = api.build(spec, env=RuntimeEnv({"TOKEN": "s3cret"}))
    assert (built.outcome.boots, built.outcome.built.built) == (1, 1)
    backend = api.backend()
    assert isinstance(backend, FakeBackend)
    assert backend.machines[0].run_config.command[-1] == "mkdir -p /w"
    plan = api.plan(spec, env=RuntimeEnv({"TOKEN": "other"}))
    assert all(status.cached for status in plan.status)
    created = api.create(spec, Overrides(name="lib2"))
    assert (created.workspace.name, created.boots) == ("lib2", 0)
    assert [w["name"] for w in api.list_workspaces()] == ["lib2"]
    assert not (tmp_path / "elsewhere").exists()
    assert b"s3cret" not in b"".join(p.read_bytes() for p in api.store.root.rglob("*.json"))


def test_one_shot_run_uses_the_injected_backend(api: Microagent, tmp_path: Path) -> None:
    ext4_like(tmp_path / "root.ext4")  # run checks for an ext4 image
    result = api.run(OneShot(command=("echo", "x"), rootfs=tmp_path / "root.ext4"))
    assert (result.exit_code, result.stdout) == (0, "ran\n")
    with pytest.raises(InvalidInputError, match="give an image and a command"):
        OneShot(command=("x",))
