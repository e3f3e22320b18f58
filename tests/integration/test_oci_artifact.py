"""The image `build --push` publishes runs outside microagent: copied with skopeo, unpacked
with umoci into an OCI runtime bundle, and its process run from the bundle's root filesystem
(`unshare --root`, the chroot an OCI runtime would do) — the path docs/ci.md gives teams that
run the same artifact under another OCI engine. The build uses the fake VM backend, whose
setup steps leave real marker files in their layers; the registry is the real local one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from microagent.runner import find_tool
from microagent.runner import run as run_tool
from microagent.runtime.fake import SETUP_MARKER_DIR
from testenv.clitools import cli_json
from testenv.registry import RegistryHandle
from testenv.standin import IMAGE_PATH

pytestmark = [pytest.mark.integration, pytest.mark.tools("skopeo", "umoci", "unshare", "env")]

SECRET = "sk-artifact-secret-4417"
HOST_KEY = "sk-ant-host-key-9902"
SETUP = "mkdir -p /srv/data"
SCRIPT = f"""#!/bin/sh
echo "greeting=$GREETING"
echo "cwd=$(pwd)"
echo "args=$*"
echo "api_key=${{API_KEY:-unset}} anthropic=${{ANTHROPIC_API_KEY:-unset}}"
cat {SETUP_MARKER_DIR}/*
"""
ROOTLESS = os.geteuid() != 0


@dataclass(frozen=True)
class Unpacked:
    """An image copied out of the registry and unpacked into a runtime bundle."""

    layout: Path
    bundle: Path
    inspected: dict[str, Any]  # `skopeo inspect --config` of the pushed image
    pushed: dict[str, Any]  # the pushed manifest
    copied: dict[str, Any]  # the manifest of the gzip copy umoci unpacked

    @property
    def process(self) -> dict[str, Any]:
        spec = json.loads((self.bundle / "config.json").read_text())
        process: dict[str, Any] = spec["process"]
        return process

    def run(self) -> str:
        """The bundle's process as an OCI runtime starts it: exactly its env, its cwd, its
        args resolved with its own PATH inside the root filesystem."""
        process = self.process
        argv = [find_tool("env"), "-i", *process["env"], find_tool("unshare")]
        argv += ["-r"] if ROOTLESS else []
        argv += [f"--root={self.bundle / 'rootfs'}", f"--wd={process['cwd']}", *process["args"]]
        return run_tool(argv, timeout=60).stdout


def _spec(project: Path, body: str) -> str:
    (project / "run.sh").write_text(SCRIPT)
    spec = project / "microagent.yaml"
    spec.write_text(
        "name: artifact\n"
        "image: oci:layout:latest\n"
        f"setup: [{json.dumps(SETUP)}]\n"
        "files: [{src: run.sh, dst: /app/run.sh, mode: '0755'}]\n"
        "credentials: [{name: anthropic}]\n" + body
    )
    return str(spec)


def _push(capsys: pytest.CaptureFixture[str], spec: str, ref: str) -> dict[str, Any]:
    built = cli_json(capsys, "build", "-f", spec, "--push", ref, "-e", f"API_KEY={SECRET}")
    assert built["published"][0]["tags"][-1] == ref.rpartition(":")[2]
    return built


def _inspect(*args: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(run_tool(["skopeo", "inspect", *args]).stdout)
    return found


def _unpack(ref: str, work: Path) -> Unpacked:
    """skopeo copy (layers as gzip: Debian 12's umoci 0.4.7 predates zstd) + umoci unpack."""
    layout, bundle = work / "layout", work / "bundle"
    source = [f"docker://{ref}", "--tls-verify=false"]
    run_tool(["skopeo", "copy", "--src-tls-verify=false", "--dest-compress-format", "gzip",
              f"docker://{ref}", f"oci:{layout}:run"])  # fmt: skip
    rootless = ["--rootless"] if ROOTLESS else []
    run_tool(["umoci", "unpack", *rootless, "--image", f"{layout}:run", str(bundle)])
    return Unpacked(
        layout,
        bundle,
        inspected=_inspect("--config", *source),
        pushed=_inspect("--raw", *source),
        copied=_inspect("--raw", f"oci:{layout}:run"),
    )


def _files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_pushed_image_runs_from_an_umoci_bundle(
    busybox_project: Path,
    registry: RegistryHandle,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", HOST_KEY)  # a credential the host holds
    spec = _spec(
        busybox_project,
        "env: {GREETING: hello-from-spec, LOG_LEVEL: debug}\n"
        "workdir: /app\n"
        "entrypoint: [/app/run.sh, --once, two words]\n",
    )
    ref = f"{registry.host}/team/oci-artifact:v1"
    _push(capsys, spec, ref)
    image = _unpack(ref, tmp_path)

    assert image.copied["config"] == image.pushed["config"], "the same image, only recompressed"
    assert "application/vnd.oci.image.layer.v1.tar+zstd" in {
        layer["mediaType"] for layer in image.pushed["layers"]
    }
    assert len(image.copied["layers"]) == len(image.pushed["layers"]) == 3  # busybox, setup, files

    runtime = image.inspected["config"]
    assert runtime["Entrypoint"] == ["/app/run.sh", "--once", "two words"]
    assert "Cmd" not in runtime, "the base image's Cmd ['sh'] would be appended as arguments"
    assert runtime["Env"] == [IMAGE_PATH, "GREETING=hello-from-spec", "LOG_LEVEL=debug"]
    assert runtime["WorkingDir"] == "/app"
    assert runtime["Labels"]["io.microagent.runtime-env-keys"] == "API_KEY"

    process = image.process
    assert process["args"] == ["/app/run.sh", "--once", "two words"]
    assert process["cwd"] == "/app"
    assert {IMAGE_PATH, "GREETING=hello-from-spec", "LOG_LEVEL=debug"} <= set(process["env"])
    assert not [e for e in process["env"] if e.startswith(("API_KEY=", "ANTHROPIC_"))]

    out = image.run().splitlines()
    assert out[:4] == [
        "greeting=hello-from-spec",
        "cwd=/app",
        "args=--once two words",
        "api_key=unset anthropic=unset",
    ]
    assert out[4:] == [f"/bin/sh -eu -c '{SETUP}'"], "the setup layer is in the image"

    for path in _files(image.layout, image.bundle):  # layers unpacked, configs in plain text
        data = path.read_bytes()
        assert SECRET.encode() not in data, path
        assert HOST_KEY.encode() not in data, path


def test_string_entrypoint_spec_env_over_base_env_and_default_workdir(
    busybox_project: Path,
    registry: RegistryHandle,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    spec = _spec(
        busybox_project,
        "env: {GREETING: from-path, PATH: '/app:/usr/bin:/bin'}\n"
        "entrypoint: run.sh found-on-the-spec-path\n",
    )
    ref = f"{registry.host}/team/oci-artifact-shell:latest"
    _push(capsys, spec, ref)
    image = _unpack(ref, tmp_path)

    runtime = image.inspected["config"]
    assert runtime["Entrypoint"] == ["/bin/sh", "-lc", "run.sh found-on-the-spec-path"]
    assert "Cmd" not in runtime
    assert runtime["Env"] == ["PATH=/app:/usr/bin:/bin", "GREETING=from-path"], "spec wins"
    assert runtime["WorkingDir"] == "/"
    assert image.process["cwd"] == "/"

    out = image.run().splitlines()
    assert out[:3] == ["greeting=from-path", "cwd=/", "args=found-on-the-spec-path"]
