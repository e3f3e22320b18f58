"""Issue 19, items 7-9: portable `oci:` paths, a strict user config with `config show`, a fake
backend that downloads nothing, and `doctor` explaining a failed KVM test boot."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from microagent import settings as settings_module
from microagent.cli import main
from microagent.errors import ConfigError
from microagent.kit import guestkit
from microagent.kit.guestkit import GuestKit
from microagent.oci.registry import RegistryClient
from microagent.runtime.backend import Availability
from microagent.settings import read_config
from microagent.store.content import Store
from microagent.workspace import doctor
from testenv import standin

ROOT = Path(__file__).resolve().parents[2]
FAKE_DIGEST = "sha256:" + "12" * 32


def run_json(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> dict[str, Any]:
    """``microagent --json ARGS``: its document, after checking the exit code."""
    capsys.readouterr()
    got = main(["--json", *args])
    out = capsys.readouterr().out
    assert got == code, f"microagent {' '.join(args)} exited {got}: {out}"
    data: dict[str, Any] = json.loads(out)
    return data


def no_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything builds a registry client (a registry would be contacted)."""

    def refuse(*_args: object, **_kwargs: object) -> RegistryClient:
        raise AssertionError("a registry client was made")

    monkeypatch.setattr(RegistryClient, "from_settings", classmethod(refuse))


# -- item 7: local layouts in microagent.lock and plan --------------------------------------


@pytest.fixture
def layout_spec(
    tmp_path: Path, busybox_layout: standin.BuiltImage, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """``proj/sub/microagent.yaml`` naming the busybox layout ``layouts/bb`` the long way."""
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    (tmp_path / "layouts").mkdir()
    (tmp_path / "layouts" / "bb").symlink_to(busybox_layout.layout)
    sub = tmp_path / "proj" / "sub"
    sub.mkdir(parents=True)
    spec = sub / "microagent.yaml"
    spec.write_text("name: paths\nimage: oci:./../../layouts/./bb/\nentrypoint: echo hi\n")
    return spec


def test_lock_keeps_a_layout_relative_and_normalised(
    layout_spec: Path, busybox_layout: standin.BuiltImage, capsys: pytest.CaptureFixture[str]
) -> None:
    data = run_json(capsys, "lock", "-f", str(layout_spec))
    assert data["changed"] is True
    lock = layout_spec.parent / "microagent.lock"
    text = lock.read_text()
    assert str(layout_spec.parents[2]) not in text  # no path of this machine in a git file
    entry = json.loads(text)["images"]["oci:../../layouts/bb"]
    assert entry["reference"] == "oci:../../layouts/bb"
    assert entry["digest"] == busybox_layout.digest
    assert run_json(capsys, "lock", "-f", str(layout_spec))["changed"] is False
    assert lock.read_text() == text
    plan = run_json(capsys, "plan", "--offline", "-f", str(layout_spec))
    assert plan["image"]["reference"] == "oci:../../layouts/bb"
    assert plan["steps"][0]["label"] == "oci:../../layouts/bb"
    assert str(layout_spec.parents[2]) not in json.dumps(plan["image"])


def test_an_old_lock_with_absolute_paths_still_loads(
    layout_spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = layout_spec.parents[2]
    old = {
        "lockVersion": 1,
        "images": {
            "oci:./../../layouts/./bb/": {
                "reference": f"oci:{root}/proj/sub/../../layouts/bb",
                "digest": FAKE_DIGEST,  # not the layout's: proves the lock is what is read
                "platforms": {},
            }
        },
    }
    lock = layout_spec.parent / "microagent.lock"
    lock.write_text(json.dumps(old))
    plan = run_json(capsys, "plan", "--offline", "-f", str(layout_spec))
    assert plan["image"]["digest"] == FAKE_DIGEST
    assert plan["image"]["reference"] == "oci:../../layouts/bb"
    # `lock` rewrites it in the portable form and keeps the pinned digest
    assert run_json(capsys, "lock", "-f", str(layout_spec))["changed"] is True
    assert json.loads(lock.read_text())["images"] == {
        "oci:../../layouts/bb": {
            "reference": "oci:../../layouts/bb",
            "digest": FAKE_DIGEST,
            "platforms": {},
        }
    }


def test_plan_offline_reads_a_local_layout_without_a_lock(
    layout_spec: Path,
    busybox_layout: standin.BuiltImage,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_registry(monkeypatch)
    plan = run_json(capsys, "plan", "--offline", "-f", str(layout_spec))
    assert plan["image"]["digest"] == busybox_layout.digest
    assert not (layout_spec.parent / "microagent.lock").exists()
    # a registry tag still needs a lock (or a digest) offline
    layout_spec.write_text("name: paths\nimage: python:3.13-slim\n")
    capsys.readouterr()
    assert main(["plan", "--offline", "-f", str(layout_spec)]) == 2
    assert "microagent lock" in capsys.readouterr().err


def test_a_missing_layout_offline_is_a_clear_error(
    layout_spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout_spec.write_text("name: paths\nimage: oci:nowhere\n")
    capsys.readouterr()
    assert main(["plan", "--offline", "-f", str(layout_spec)]) == 1
    assert "is not an OCI image layout" in capsys.readouterr().err


# -- item 8: the user config, strict; config show; the environment documented -------------


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.yaml"
    monkeypatch.setenv("MICROAGENT_CONFIG", str(path))
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    return path


def test_an_unknown_key_is_located_with_did_you_mean(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file.write_text("registries:\n  docker.io:\n    mirors: [http://127.0.0.1:5000]\n")
    spec = tmp_path / "microagent.yaml"
    spec.write_text(f"name: x\nimage: python@{FAKE_DIGEST}\n")
    capsys.readouterr()
    assert main(["validate", "-f", str(spec)]) == 2  # at start-up, before any registry
    err = capsys.readouterr().err
    assert f"{config_file}:3:5: registries.docker.io.mirors: unknown setting" in err
    assert "hint: did you mean 'mirrors'?" in err
    error = run_json(capsys, "list", code=2)["error"]
    assert error["kind"] == "invalid_config"
    first = error["diagnostics"][0]
    assert first["location"] == {"file": str(config_file), "line": 3, "column": 5}
    assert "did you mean 'mirrors'?" in first["hint"]


def test_a_key_in_the_wrong_place_says_where_it_belongs(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file.write_text("mirors: [http://x]\ncache: {from: a, from: b}\ngest: {}\n")
    with pytest.raises(ConfigError) as raised:
        read_config(config_file)
    rendered = raised.value.render()
    assert f"{config_file}:1:1: mirors: unknown setting" in rendered
    assert "'mirrors' belongs under registries.<host>" in rendered
    assert f"{config_file}:2:18: cache.from: repeated key" in rendered
    assert f"{config_file}:3:1: gest: unknown setting" in rendered
    assert "did you mean 'guest'?" in rendered
    config_file.write_text("registries:\n  mirrors: [http://x]\n")
    with pytest.raises(ConfigError, match="'mirrors' is not a registry host"):
        read_config(config_file)


def test_a_yaml_error_is_located_with_a_hint(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file.write_text("registries:\n  docker.io: [\n")
    capsys.readouterr()
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(config_file))}:3:1: not valid YAML: ", err)
    assert "hint: the config file is YAML: check the indentation" in err
    assert "Traceback" not in err
    config_file.write_text("cache:\n\tfrom: x\n")
    assert main(["list"]) == 2
    assert "replace the tab characters" in capsys.readouterr().err


def test_an_empty_section_is_fine(config_file: Path) -> None:
    config_file.write_text("registries:\n#  docker.io: {mirrors: [http://x]}\ncache:\n")
    assert read_config(config_file).mirrors == {}


def rows_by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in data["settings"]}


def test_config_show_says_where_each_setting_came_from(
    config_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config_file.write_text(
        "registries:\n"
        "  docker.io:\n"
        "    mirrors: [http://127.0.0.1:5000]\n"
        "cache:\n"
        "  from: [ghcr.io/acme/cache]\n"
    )
    monkeypatch.setenv("MICROAGENT_BACKEND", "fake")
    monkeypatch.setenv("MICROAGENT_REGISTRY_MIRRORS", "ghcr.io=http://m:1")
    for name in ("MICROAGENT_ACCEL", "MICROAGENT_CACHE_TO", "MICROAGENT_CACHE_FROM"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "flag-home"
    data = run_json(capsys, "--home", str(home), "config", "show")
    assert data["configFile"] == {
        "path": str(config_file),
        "exists": True,
        "source": "environment",
        "origin": "MICROAGENT_CONFIG",
    }
    rows = rows_by_name(data)
    assert rows["home"] == {
        "name": "home",
        "value": str(home.resolve()),
        "source": "flag",
        "origin": "--home",
        "env": "MICROAGENT_HOME",
    }
    assert rows["registries.docker.io.mirrors"]["source"] == "config file"
    assert rows["registries.docker.io.mirrors"]["origin"] == f"{config_file}:3:14"
    assert rows["registries.ghcr.io.mirrors"]["value"] == ["http://m:1"]
    assert rows["registries.ghcr.io.mirrors"]["origin"] == "MICROAGENT_REGISTRY_MIRRORS"
    assert rows["cache.from"]["value"] == ["ghcr.io/acme/cache"]
    assert rows["cache.from"]["source"] == "config file"
    assert (rows["backend"]["value"], rows["backend"]["source"]) == ("fake", "environment")
    assert (rows["accel"]["value"], rows["accel"]["source"]) == ("auto", "default")
    assert rows["debianMirror"]["value"].startswith("https://")
    capsys.readouterr()
    assert main(["config", "show"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^backend +fake +environment \(MICROAGENT_BACKEND\)$", text, re.M)
    assert re.search(
        rf"^cache\.from +ghcr\.io/acme/cache +config file \({config_file}:5:9\)$", text, re.M
    )
    assert re.search(r"^accel +auto +default$", text, re.M)


def test_config_show_covers_every_variable_of_the_settings(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = run_json(capsys, "config", "show")
    shown = {row["env"] for row in data["settings"]} | {data["configFile"]["origin"]}
    shown |= {"MICROAGENT_CONFIG"}  # the config file's own variable: `configFile` above
    variables = {
        value
        for name, value in vars(settings_module).items()
        if name.endswith("_ENV") and isinstance(value, str)
    }
    assert variables and variables <= shown


def _variables_in(paths: list[Path]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        found |= set(re.findall(r"MICROAGENT_[A-Z][A-Z0-9_]*", path.read_text(errors="replace")))
    return found


def test_every_variable_the_code_reads_is_documented() -> None:
    sources = [p for p in (ROOT / "src" / "microagent").rglob("*") if p.is_file()]
    sources = [p for p in sources if p.suffix in (".py", ".j2", ".json", ".sh", ".awk")]
    sources += [*(ROOT / "scripts").glob("*.sh"), *(ROOT / "scripts" / "testenv").glob("*.py")]
    sources.append(ROOT / "tests" / "vm" / "conftest.py")
    variables = _variables_in(sources)
    assert "MICROAGENT_SERVICE_PORT_BASE" in variables and "MICROAGENT_VM_HOME" in variables
    docs = (ROOT / "docs" / "cli.md").read_text()
    environment = docs[docs.index("### Environment") :]
    missing = sorted(v for v in variables if f"`{v}`" not in environment)
    assert not missing, f"not in docs/cli.md's Environment section: {missing}"


# -- item 9: the fake backend downloads nothing; doctor explains KVM -------------------------


def test_the_fake_backend_creates_and_starts_without_the_guest_kit(
    busybox_project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MICROAGENT_KERNEL", "MICROAGENT_INITRD"):  # no placeholders from the fixture
        monkeypatch.delenv(name)
    monkeypatch.setenv("MICROAGENT_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")  # unreachable

    def no_download(*_args: object, **_kwargs: object) -> GuestKit:
        raise AssertionError("the guest kit was fetched")

    monkeypatch.setattr(guestkit, "ensure_kit", no_download)
    spec = busybox_project / "microagent.yaml"
    spec.write_text(
        "name: nokit\nimage: oci:layout:latest\nsetup: [echo hi]\nentrypoint: echo run\n"
    )
    created = run_json(capsys, "create", "-f", str(spec))
    assert created["ok"] is True
    started = run_json(capsys, "start", "nokit", "--wait")
    assert started["exitCode"] == 0
    home = busybox_project.parent / "home"
    assert not (home / "store" / "kits").exists()
    assert (home / "fake-kit" / "vmlinuz").is_file()


def kit(tmp_path: Path) -> GuestKit:
    return GuestKit(tmp_path / "vmlinux", tmp_path / "initrd.img", "k" * 64, "6.1.0-test-amd64")


def test_doctor_explains_a_failed_kvm_test_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guestkit, "find_kit", lambda _store: kit(tmp_path))
    tried: list[GuestKit] = []

    def hung(boot: GuestKit) -> Availability:
        tried.append(boot)
        return Availability(
            False, "a KVM test boot hung (killed after 10s); qemu: (nothing); console: (no output)"
        )

    pvm = doctor.KvmHost(pvm=True, hardware=False)
    kvm, tcg = doctor.check_accel(Store(tmp_path), probe=hung, host=pvm, device_problem="")
    assert tried == [kit(tmp_path)]
    assert kvm.status is doctor.Status.WARN and tcg.status is doctor.Status.OK
    lines = kvm.detail.splitlines()
    assert lines[0].endswith("TCG will be used")
    assert lines[1].startswith("tried: the guest kit (6.1.0-test-amd64) under KVM: qemu -M microvm")
    assert lines[2] == "failed: hung (killed after 10s); qemu: (nothing); console: (no output)"
    assert lines[3].startswith("why: this host's KVM is PVM (the kvm_pvm module, no vmx/svm")
    assert "TCG" in kvm.hint
    # a host with hardware virtualisation: no guess at why, the tails still shown
    vmx = doctor.KvmHost(pvm=False, hardware=True)
    kvm, _ = doctor.check_accel(Store(tmp_path), probe=hung, host=vmx, device_problem="")
    assert len(kvm.detail.splitlines()) == 3
    ok = doctor.check_accel(
        Store(tmp_path),
        probe=lambda _kit: Availability(True, "a KVM test boot succeeded"),
        host=vmx,
        device_problem="",
    )[0]
    assert (ok.status, ok.detail) == (doctor.Status.OK, "usable: a KVM test boot succeeded")


def test_doctor_without_a_kit_warns_a_pvm_host_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guestkit, "find_kit", lambda _store: None)
    pvm = doctor.KvmHost(pvm=True, hardware=False)
    kvm, _ = doctor.check_accel(Store(tmp_path), host=pvm, device_problem="")
    assert "not probed" in kvm.detail and "likely TCG: this host's KVM is PVM" in kvm.detail
    kvm, _ = doctor.check_accel(Store(tmp_path), device_problem="/dev/kvm does not exist")
    assert kvm.detail == "/dev/kvm does not exist"


def test_kvm_host_reads_modules_and_cpu_flags(tmp_path: Path) -> None:
    modules, cpuinfo = tmp_path / "module", tmp_path / "cpuinfo"
    (modules / "kvm_pvm").mkdir(parents=True)
    cpuinfo.write_text("flags\t\t: fpu sse2 hypervisor\n")
    assert doctor.KvmHost.read(modules, cpuinfo) == doctor.KvmHost(pvm=True, hardware=False)
    cpuinfo.write_text("flags\t\t: fpu vmx\n")
    (modules / "kvm_pvm").rmdir()
    host = doctor.KvmHost.read(modules, cpuinfo)
    assert host == doctor.KvmHost(pvm=False, hardware=True) and host.why() == ""
