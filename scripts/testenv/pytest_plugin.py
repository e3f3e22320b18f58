"""pytest plugin: a real local OCI registry and the stand-in images, for every test tier.

- ``registry`` (session): ``docker-registry`` on 127.0.0.1:<free port>, data in a tmp dir;
  ``registry.host`` is ``"127.0.0.1:PORT"``, ``registry.url`` is ``"http://127.0.0.1:PORT"``.
- ``busybox_layout`` / ``python_layout`` (session): the stand-in OCI layouts from the testenv cache
  (``$MICROAGENT_TESTENV_CACHE``, default ``~/.cache/microagent-testenv``), built if missing.
- ``busybox_image`` / ``python_image`` (session): those pushed to ``registry`` as
  ``HOST/library/busybox:latest`` and ``HOST/library/python:3.13-slim``; each has ``.ref``,
  ``.ref_by_digest``, ``.digest`` (manifest), ``.layout``.
- ``fault_proxy``: a :class:`~testenv.faultproxy.FaultProxy` in front of ``registry`` (no faults
  until the test injects some; ``fault_proxy.host`` is where to point the client).
- ``failing_mirror``: another one in front of ``registry`` that answers every request 503.
- ``fake_backend``: boot nothing (the fake VM backend, placeholder kernel and initrd).
- ``busybox_project``: ``tmp_path/proj`` holding the busybox stand-in as ``layout`` (a spec there
  says ``image: oci:layout:latest``), with ``fake_backend`` and ``MICROAGENT_HOME`` at
  ``tmp_path/home``; the test writes the spec.

A missing tool (or no root to run debootstrap for an uncached python stand-in) skips the test
locally, but fails it when ``CI=true``: CI must never go green by skipping (see
:mod:`testenv.prereq`, which also handles the ``tools``, ``root`` and ``modules`` markers).
Tests using the python stand-in are marked ``slow`` automatically (the first build takes ~45 s).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testenv import standin
from testenv.faultproxy import Fault, FaultProxy
from testenv.prereq import check_markers, require_root, require_tools, unavailable
from testenv.registry import RegistryHandle, start_registry

PYTHON_FIXTURES = {"python_layout", "python_image"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: uses the python stand-in image (~45 s to build once, then cached)"
    )
    config.addinivalue_line("markers", "tools(*names): needs these programs (testenv.prereq)")
    config.addinivalue_line("markers", "root(why): needs to run as root (testenv.prereq)")
    config.addinivalue_line("markers", "modules(*names): needs these Python packages")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PYTHON_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item: pytest.Item) -> None:
    check_markers(item)


@pytest.fixture(scope="session")
def testenv_cache() -> Path:
    return standin.default_cache_dir()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryHandle]:
    require_tools("docker-registry")
    handle = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def fault_proxy(registry: RegistryHandle) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as proxy:
        yield proxy


@pytest.fixture
def failing_mirror(registry: RegistryHandle) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as mirror:
        mirror.inject(Fault.error(503), times=None)
        yield mirror


@pytest.fixture(scope="session")
def busybox_layout(testenv_cache: Path) -> standin.BuiltImage:
    if not standin.BUSYBOX.is_file():
        unavailable(
            f"{standin.BUSYBOX} is missing; install it, e.g. `apt-get install busybox-static`"
        )
    return standin.build_busybox(testenv_cache)


@pytest.fixture(scope="session")
def python_layout(testenv_cache: Path) -> standin.BuiltImage:
    recipe = standin.python_recipe()
    if standin.cached_layout(recipe, testenv_cache) is None and not standin.shared_available(
        recipe
    ):
        require_tools("debootstrap")
        require_root("building the python stand-in (debootstrap), which is not cached")
    return standin.build_python(testenv_cache)


@pytest.fixture(scope="session")
def busybox_image(
    registry: RegistryHandle, busybox_layout: standin.BuiltImage
) -> standin.PushedImage:
    require_tools("skopeo")
    return standin.push(busybox_layout, registry.host)


@pytest.fixture(scope="session")
def python_image(
    registry: RegistryHandle, python_layout: standin.BuiltImage
) -> standin.PushedImage:
    require_tools("skopeo")
    return standin.push(python_layout, registry.host)


@pytest.fixture(scope="session")
def vm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MICROAGENT_HOME for a whole VM test session: the guest kit is fetched once."""
    require_tools("qemu-system-x86_64", "mke2fs", "debugfs")
    return tmp_path_factory.mktemp("vm-home")


@pytest.fixture
def fake_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Boot nothing: the fake VM backend, with placeholder kernel/initrd (no kit download),
    and no fake outcome or cache settings inherited from the environment."""
    kit = tmp_path / "fake-kit"
    kit.mkdir()
    (kit / "vmlinuz").write_bytes(b"kernel")
    (kit / "initrd").write_bytes(b"initrd")
    monkeypatch.setenv("MICROAGENT_BACKEND", "fake")
    monkeypatch.setenv("MICROAGENT_KERNEL", str(kit / "vmlinuz"))
    monkeypatch.setenv("MICROAGENT_INITRD", str(kit / "initrd"))
    for name in ("MICROAGENT_FAKE", "MICROAGENT_CACHE_FROM", "MICROAGENT_CACHE_TO"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def busybox_project(
    fake_backend: None,
    tmp_path: Path,
    busybox_layout: standin.BuiltImage,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """A project folder with the busybox stand-in as ``layout``, for workspaces made through the
    CLI with the fake backend; ``MICROAGENT_HOME`` is ``tmp_path/home``."""
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(busybox_layout.layout, proj / "layout")
    return proj
