"""The CLI's quick commands never import the heavy libraries (a guard, not a timing).

jsonschema (with referencing, attrs, rpds), oras, requests, zstandard, jinja2 and rich each
cost tens of milliseconds to import; ``plan --offline``, ``--help``, ``status`` and a cache-hit
``create`` (the image's tag resolved recently) need none of them. Each case runs the real CLI as
a child process under ``python -X importtime`` and reads the modules it imported from that report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testenv.clitools import cli_json

HEAVY = (
    *("jsonschema", "oras", "requests", "zstandard", "jinja2", "referencing", "urllib3"),
    "rich",  # the live progress view: loaded only when something is shown on a terminal
)
DIGEST = "sha256:" + "ab" * 32


def imported(*args: str, cwd: Path | None = None) -> set[str]:
    """The modules ``microagent ARGS`` imports (exit code checked: 0)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "microagent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
    )
    report = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert done.returncode == 0, done.stdout + "\n".join(
        line for line in done.stderr.splitlines() if not line.startswith("import time:")
    )
    assert len(report) > 50  # the report is there: an empty set would prove nothing
    return {line.split("|")[-1].strip() for line in report[1:]}


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(set(HEAVY) & {name.split(".")[0] for name in modules})


# What building needs and a cache hit does not: the registry client, the guest kit (and its
# Debian, kernel and initramfs code), flattening layers into ext4, remote caches, publishing.
BUILD_ONLY = (
    "microagent.oci.registry",
    "microagent.oci.transport",
    "microagent.kit.",
    "microagent.ext4.rootfs",
    "microagent.ext4.upper",
    "microagent.remotecache.publish",
    "microagent.remotecache.restore",
)


def build_only_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith(BUILD_ONLY))


def test_the_guard_sees_a_heavy_import(tmp_path: Path) -> None:
    """An invalid spec is worded by jsonschema: the same probe must see it imported."""
    spec = tmp_path / "microagent.yaml"
    spec.write_text(f"name: 7bad name\nimage: busybox@{DIGEST}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "microagent.cli", "validate", "-f", str(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert "| jsonschema" in done.stderr


def test_plan_offline_imports_nothing_heavy(
    tmp_path: Path, fake_backend: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "microagent.yaml"
    spec.write_text(
        f"name: quick\nimage: busybox@{DIGEST}\nsetup:\n  - echo one\nentrypoint: sleep 1\n"
        "env:\n  A: b\nresources:\n  memoryMiB: 512\n"
    )
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    modules = imported("plan", "--offline", "-f", str(spec))
    assert "yaml" in modules and "microagent.compiler.plan" in modules
    assert heavy_in(modules) == []
    # nothing of workspaces, booting, building or disks; of the reports, plan's own only
    beyond = ("microagent.workspace", "microagent.runtime", "microagent.build", "microagent.ext4")
    assert sorted(m for m in modules if m.startswith(beyond)) == []
    assert "microagent.compiler.reports" in modules


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("plan", "--help")])
def test_help_imports_nothing_heavy(args: tuple[str, ...]) -> None:
    assert heavy_in(imported(*args)) == []


def test_status_and_a_cache_hit_create_import_nothing_heavy(
    busybox_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = busybox_project / "microagent.yaml"
    spec.write_text("name: quick\nimage: oci:layout:latest\nsetup:\n  - echo one\n")
    cli_json(capsys, "create", "-f", str(spec))  # in this process: builds the step
    assert heavy_in(imported("status", "quick")) == []
    assert heavy_in(imported("--json", "list")) == []
    hit = imported("create", "-f", str(spec), "--name", "quick-2")
    assert heavy_in(hit) == []


def test_a_cache_hit_create_of_a_registry_tag_resolved_lately_imports_nothing_heavy(
    busybox_project: Path, busybox_image: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unlocked, by tag: the recent resolution (MICROAGENT_RESOLVE_TTL) answers, so neither
    the registry client (oras, requests) nor anything else heavy is loaded."""
    spec = busybox_project / "microagent.yaml"
    spec.write_text(f"name: tagged\nimage: {busybox_image.ref}\nsetup:\n  - echo one\n")
    cli_json(capsys, "create", "-f", str(spec))  # resolves the tag, pulls, builds
    hit = imported("create", "-f", str(spec), "--name", "tagged-2")
    assert heavy_in(hit) == []
    assert build_only_in(hit) == []
    # create returns its own report: none of the other operations' report types are built
    reports = ("microagent.compiler.reports", "microagent.workspace.reports")
    assert {*reports, "microagent.workspace.copying"} & hit == set()
    refreshed = imported("create", "-f", str(spec), "--name", "tagged-3", "--refresh")
    assert "requests" in refreshed  # the probe sees the registry client when it is used
    assert "microagent.oci.registry" in build_only_in(refreshed)


# What a boot needs and `cp` (a stopped workspace's disk) or a cache-hit `create` without
# --warm does not: the lifecycle (networking, the broker, snapshots, warm templates).
BOOT_ONLY = (
    "microagent.workspace.lifecycle",
    "microagent.workspace.templates",
    "microagent.workspace.services",
    "microagent.runtime.network",
    "microagent.broker.",
)


def boot_only_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith(BOOT_ONLY))


# What `cp` of a workspace whose record holds no credentials, health check, mediation, egress
# rules or published ports does not read: a spec (the compiler), a boot document (the
# backend's, the config disk's and the health check's types), the store (digests, blobs), or
# the other workspace commands (their build flags, tables and confirmations).
NOT_FOR_CP = (
    *("microagent.compiler.", "microagent.store.", "microagent.digests"),
    *("microagent.runtime.backend", "microagent.runtime.configdisk", "microagent.runtime.health"),
    *("microagent.commands.workspace", "microagent.commands.build", "microagent.commands.table"),
    "microagent.workspace.reports",  # the other operations' reports (cp's: workspace.copying)
)


def test_cp_and_a_cache_hit_create_load_nothing_a_boot_needs(
    busybox_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = busybox_project / "microagent.yaml"
    spec.write_text("name: quick\nimage: oci:layout:latest\nsetup:\n  - echo one\n")
    cli_json(capsys, "create", "-f", str(spec))
    hit = imported("create", "-f", str(spec), "--name", "quick-2")
    assert boot_only_in(hit) == []
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"x" * 4096)
    copied = imported("cp", str(blob), "quick:/tmp/blob.bin")
    assert boot_only_in(copied) == []
    assert "yaml" not in copied  # no spec and no config file read: PyYAML not loaded
    assert sorted(m for m in copied if m.startswith(NOT_FOR_CP)) == []
    assert "microagent.workspace.records" in copied  # the probe sees the record being read
    assert "microagent.workspace.copying" in copied
    assert "microagent.ext4.overlay" in copied  # the probe sees what cp does use
    assert cli_json(capsys, "cp", "quick:/tmp/blob.bin", str(tmp_path / "back.bin"))["ok"]
    assert (tmp_path / "back.bin").read_bytes() == blob.read_bytes()


def test_a_command_loads_only_its_own_command_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cli.py imports a command's module when that command runs (LazyCommands)."""
    spec = tmp_path / "microagent.yaml"
    spec.write_text(f"name: quick\nimage: busybox@{DIGEST}\n")
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    modules = imported("plan", "--offline", "-f", str(spec))
    loaded = sorted(m for m in modules if m.startswith("microagent.commands."))
    # spec's plan reuses build's cache-control flags; the rest are what every command shares
    assert set(loaded) <= {
        *("microagent.commands.spec", "microagent.commands.build"),
        *("microagent.commands.context", "microagent.commands.envelope"),
        *("microagent.commands.group", "microagent.commands.progress"),
        "microagent.commands.table",
    }, loaded
    assert "microagent.commands.spec" in loaded


def test_the_command_table_names_what_each_module_defines() -> None:
    """cli.COMMAND_MODULES (what LazyCommands reads) matches every module's COMMANDS, in
    order, so a command added to a module but not to the table cannot go missing."""
    import importlib

    from microagent import cli

    for module, names in cli.COMMAND_MODULES:
        commands = importlib.import_module(f"microagent.commands.{module}").COMMANDS
        assert tuple(c.name for c in commands) == names, module
    listed = [name for _module, names in cli.COMMAND_MODULES for name in names]
    assert list(cli.cli.commands) == listed
    assert len(set(listed)) == len(listed)


def test_lazy_commands_load_a_module_on_first_lookup_and_refuse_a_wrong_table() -> None:
    from microagent.commands.group import LazyCommands

    prepared: list[str] = []
    home = "microagent.commands.doctor"
    commands = LazyCommands({"doctor": home}, prepare=lambda c: prepared.append(str(c.name)))
    assert list(commands) == ["doctor"] and "doctor" in commands and prepared == []
    assert commands["doctor"] is commands["doctor"]  # loaded and prepared once
    assert prepared == ["doctor"]
    assert commands.get("nope") is None
    wrong = LazyCommands({"doctr": home}, prepare=lambda _c: None)
    with pytest.raises(LookupError, match="COMMANDS has no doctr"):
        wrong.get("doctr")
