"""Settings: the environment and the user config file, read once, with one error policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.errors import ConfigError, InvalidInputError
from microagent.oci.endpoints import RegistryConfig
from microagent.settings import Settings, read_config


def _settings(tmp_path: Path, text: str | None, **env: str) -> Settings:
    config = tmp_path / "config.yaml"
    if text is not None:
        config.write_text(text)
    return Settings.from_environ({"MICROAGENT_CONFIG": str(config), "HOME": str(tmp_path), **env})


def test_defaults_without_a_config_file(tmp_path: Path) -> None:
    settings = _settings(tmp_path, None, MICROAGENT_HOME=str(tmp_path / "h"))
    assert settings.home == (tmp_path / "h").resolve()
    assert settings.store_dir == settings.home / "store"
    assert settings.workspaces_dir == settings.home / "workspaces"
    assert (settings.backend, settings.accel, settings.ram_stage, settings.cache_rootfs) == (
        "qemu",
        "auto",
        True,
        True,
    )
    assert settings.registry_mirrors == {} and settings.cache_from == ()
    assert settings.extra_ca_bundle() is None
    assert settings.auth_files[-1] == tmp_path / ".docker" / "config.json"


def test_config_file_sections(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        "registries:\n"
        "  docker.io: {mirrors: ['http://127.0.0.1:5000']}\n"
        "  reg.internal:5000: {insecure: true}\n"
        "cache:\n  from: a.example/x, b.example/y\n  to: [c.example/z]\n"
        "guest:\n  extraCA: host\n",
    )
    assert settings.registry_mirrors == {"docker.io": ("http://127.0.0.1:5000",)}
    assert settings.insecure_registries == frozenset({"reg.internal:5000"})
    assert settings.cache_from == ("a.example/x", "b.example/y")
    assert (settings.cache_to, settings.extra_ca) == ("c.example/z", "host")
    endpoints = RegistryConfig.from_settings(settings).endpoints("reg.internal:5000")
    assert [str(e) for e in endpoints] == ["http://reg.internal:5000"]


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    text = "registries: {docker.io: {mirrors: [http://file:1]}, q.io: {mirrors: [http://q:2]}}\n"
    settings = _settings(
        tmp_path,
        text + "cache: {from: [file.example/a]}\n",
        MICROAGENT_REGISTRY_MIRRORS="docker.io=http://env:5000",
        MICROAGENT_INSECURE_REGISTRIES="h:1, h:2",
        MICROAGENT_CACHE_FROM="",
        MICROAGENT_RAM_STAGE="off",
        MICROAGENT_CACHE_ROOTFS="0",
        MICROAGENT_ACCEL="TCG",
        MICROAGENT_BACKEND="fake",
    )
    assert settings.registry_mirrors == {
        "docker.io": ("http://env:5000",),
        "q.io": ("http://q:2",),
    }
    assert settings.insecure_registries == frozenset({"h:1", "h:2"})
    assert settings.cache_from == ()
    assert (settings.ram_stage, settings.cache_rootfs) == (False, False)
    assert (settings.accel, settings.backend) == ("tcg", "fake")


def test_broken_config_files_name_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "registries:\n  docker.io:\n    mirrors: http://x\n    insecure: 1\nregistires: {}\n"
    )
    with pytest.raises(ConfigError) as raised:
        read_config(path)
    rendered = raised.value.render()
    assert f"{path}:3:14: registries.docker.io.mirrors: must be a list of strings" in rendered
    assert f"{path}:4:15: registries.docker.io.insecure: must be true or false" in rendered
    assert f"{path}:5:1: registires: unknown setting" in rendered
    assert "did you mean 'registries'? (known here: registries, cache, guest, registry)" in rendered
    path.write_text("cache: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config(path)


def test_bad_mirror_variable_and_missing_ca_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="expected REGISTRY=MIRROR"):
        _settings(tmp_path, None, MICROAGENT_REGISTRY_MIRRORS="nonsense")
    settings = _settings(tmp_path, None, MICROAGENT_EXTRA_CA=str(tmp_path / "none.pem"))
    with pytest.raises(InvalidInputError, match="cannot read the CA bundle"):
        settings.extra_ca_bundle()


def test_a_broken_config_file_is_a_clear_cli_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("guest:\n  extraCA: [a, b]\n")
    monkeypatch.setenv("MICROAGENT_CONFIG", str(config))
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    assert main(["--json", "list"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "invalid_config"
    assert error["location"] == {"file": str(config), "line": 2, "column": 12}
    assert main(["list"]) == 2
    assert f"{config}:2:12: guest.extraCA: must be a string" in capsys.readouterr().err
