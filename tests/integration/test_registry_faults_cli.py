"""``image pull`` and ``create --cache-from`` through a registry that misbehaves on purpose
(``testenv.faultproxy``): a transient fault is ridden out, a persistent one is a registry error
with a hint (never a urllib3 traceback), and nothing half-fetched or wrong is stored."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from microagent.oci.registry import RetryPolicy
from microagent.settings import Settings
from testenv import standin
from testenv.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

FAST = RetryPolicy(backoff=0.02, max_pause=0.5, read_timeout=0.3)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's client with sub-second stalls (its setting) and pauses (the back-off has no
    setting: the policy the settings make is given FAST's)."""
    monkeypatch.setenv("MICROAGENT_REGISTRY_READ_TIMEOUT", str(FAST.read_timeout))
    of = RetryPolicy.of.__func__

    def fast_of(cls: type[RetryPolicy], settings: Settings) -> RetryPolicy:
        return replace(of(cls, settings), backoff=FAST.backoff, max_pause=FAST.max_pause)

    monkeypatch.setattr(RetryPolicy, "of", classmethod(fast_of))


def _cli(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> dict[str, Any]:
    capsys.readouterr()
    got = main(["--json", *args])
    out = capsys.readouterr()
    assert got == code, out.out + out.err
    result: dict[str, Any] = json.loads(out.out)
    return result


# -- image pull --------------------------------------------------------------------------------


@pytest.fixture
def busybox_via_proxy(
    busybox_image: standin.PushedImage,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, str]:
    """``(reference through the proxy, digest of its one layer)``; MICROAGENT_HOME in tmp."""
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    blobs = busybox_image.layout / "blobs" / "sha256"
    manifest = json.loads((blobs / busybox_image.digest[7:]).read_bytes())
    (layer,) = manifest["layers"]
    return f"{fault_proxy.host}/{busybox_image.repository}:{busybox_image.tag}", layer["digest"]


def test_image_pull_resumes_a_blob_reset_midway(
    busybox_via_proxy: tuple[str, str],
    busybox_image: standin.PushedImage,
    fault_proxy: FaultProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref, layer = busybox_via_proxy
    fault_proxy.inject(Fault.reset(after=256 << 10), f"/blobs/{layer}", times=2)
    pulled = _cli(capsys, "image", "pull", ref)
    assert pulled["digest"] == busybox_image.digest and pulled["cached"] is False
    assert [s.fault for s in fault_proxy.seen(f"/blobs/{layer}")] == ["reset", "reset", None]


@pytest.mark.parametrize(
    "case",
    [
        (Fault.reset(after=64 << 10), "connection reset by peer"),  # urllib3 ProtocolError
        (Fault.truncate(after=64 << 10), "bytes early"),  # IncompleteRead
        (Fault.stall(seconds=5.0, after=64 << 10), "timed out"),  # ReadTimeoutError
    ],
    ids=["reset", "truncated", "stalled"],
)
def test_image_pull_that_keeps_breaking_is_a_registry_error_with_a_hint(
    busybox_via_proxy: tuple[str, str],
    fault_proxy: FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: tuple[Fault, str],
) -> None:
    ref, layer = busybox_via_proxy
    fault, says = case
    fault_proxy.inject(fault, f"/blobs/{layer}", times=None)
    error = _cli(capsys, "image", "pull", ref, code=1)["error"]
    assert error["kind"] == "registry", error
    assert says in error["message"] and "gave up after 4 tries" in error["message"]
    assert "again is safe" in error["hint"]
    store = tmp_path / "home" / "store"
    assert not list(store.rglob(layer[7:])), "nothing half-fetched is kept"
    assert not list(store.glob("rootfs/*"))

    fault_proxy.clear()
    fault_proxy.inject(fault, f"/blobs/{layer}", times=None)
    capsys.readouterr()
    assert main(["image", "pull", ref]) == 1
    err = capsys.readouterr().err
    retries = [line for line in err.splitlines() if line.startswith("registry ")]
    assert len(retries) == 3 and "(attempt 4/4)" in retries[-1]  # one line per retry
    assert err.splitlines()[3].startswith("error: ") and "\nhint: " in err
    assert "Traceback" not in err and "urllib3" not in err and "internal error" not in err


def test_image_pull_does_not_retry_a_wrong_byte(
    busybox_via_proxy: tuple[str, str],
    fault_proxy: FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref, layer = busybox_via_proxy
    fault_proxy.inject(Fault.corrupt(at=1000), f"/blobs/{layer}", times=None)
    error = _cli(capsys, "image", "pull", ref, code=1)["error"]
    assert error["kind"] == "integrity" and "digest mismatch" in error["message"]
    assert len(fault_proxy.seen(f"/blobs/{layer}")) == 1
    assert not list((tmp_path / "home" / "store").rglob(layer[7:]))


# -- create --cache-from: the remote-cache restore path ----------------------------------------


@dataclass
class Published:
    """A project built and pushed on machine a; machine b restores it through ``proxy``."""

    spec: str
    b: Path
    key: str  # the rootfs key machine a built
    cache: str  # the cache reference through the proxy
    proxy: FaultProxy
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    def create(self, code: int = 0) -> dict[str, Any]:
        self.monkeypatch.setenv("MICROAGENT_HOME", str(self.b))
        return _cli(self.capsys, "create", "-f", self.spec, "--cache-from", self.cache, code=code)

    def nothing_restored(self) -> bool:
        hexd = self.key.removeprefix("sha256:")
        store = self.b / "store"
        return (
            not (store / "keys" / f"{hexd}.json").exists()
            and not (store / "rootfs" / f"{hexd}.ext4").exists()
        )


@pytest.fixture
def published(
    busybox_project: Path,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Published:
    spec = busybox_project / "microagent.yaml"
    spec.write_text(
        "name: ws\nimage: oci:layout:latest\n"
        'setup: ["mkdir -p /workspace", "echo one > /workspace/one"]\n'
    )
    repo = f"faults/{tmp_path.name.lower().replace('_', '-')}"
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "a"))
    built = _cli(capsys, "build", "-f", str(spec), "--push", f"{fault_proxy.upstream}/{repo}")
    return Published(
        str(spec), tmp_path / "b", built["rootfsKey"], f"{fault_proxy.host}/{repo}",
        fault_proxy, monkeypatch, capsys,
    )  # fmt: skip


def test_restore_rides_out_5xx_and_resets_mid_blob(published: Published) -> None:
    published.proxy.inject(Fault.error(503, retry_after="0.05"), "/manifests/", times=2)
    published.proxy.inject(Fault.reset(after=100), "/blobs/", method="GET", times=3)
    created = published.create()
    assert created["setupBoots"] == 0 and created["rootfsKey"] == published.key
    remote = created["remote"]
    assert remote["steps"][0]["key"] == published.key
    assert (remote["rootfsImages"], remote["warnings"]) == (1, []), "no fallback to flattening"
    faults = [s.fault for s in published.proxy.injected()]
    assert faults == ["status", "status", "reset", "reset", "reset"]


def test_restore_never_stores_a_blob_with_a_wrong_digest(published: Published) -> None:
    published.proxy.inject(Fault.corrupt(at=50), "/blobs/", method="GET", times=None)
    error = published.create(code=1)["error"]
    assert error["kind"] == "integrity" and "corrupt" in error["message"]
    assert published.cache in error["message"]
    assert published.nothing_restored()


def test_restore_from_a_registry_that_keeps_failing_is_a_registry_error(
    published: Published,
) -> None:
    published.proxy.inject(Fault.reset(after=100), "/blobs/", method="GET", times=None)
    error = published.create(code=1)["error"]
    assert error["kind"] == "registry" and "gave up after 4 tries" in error["message"]
    assert error["hint"]
    assert published.nothing_restored()
