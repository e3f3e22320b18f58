"""``microagent doctor``: can this host run microVMs, and how well?

Each check has a status (ok, warn, fail), a detail and an install hint. A failed *required*
check makes the verdict ``failed`` (non-zero exit); warnings make it ``degraded``.
"""

from __future__ import annotations

import enum
import grp
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent import runner
from microagent.errors import MicroagentError, ToolError
from microagent.kit import guestkit
from microagent.kit.guestkit import GuestKit
from microagent.runtime import network, qemu
from microagent.runtime.backend import Availability
from microagent.store.content import Store


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    hint: str = ""
    required: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "hint": self.hint,
            "required": self.required,
        }


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def verdict(self) -> str:
        if any(c.status is Status.FAIL and c.required for c in self.checks):
            return "failed"
        if any(c.status is not Status.OK for c in self.checks):
            return "degraded"
        return "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.verdict != "failed",
            "verdict": self.verdict,
            "checks": [c.to_json() for c in self.checks],
        }

    def render(self) -> str:
        marks = {Status.OK: "ok  ", Status.WARN: "warn", Status.FAIL: "FAIL"}
        lines = []
        for c in self.checks:
            lines.append(f"{marks[c.status]}  {c.name:<14} {c.detail}")
            if c.hint and c.status is not Status.OK:
                lines.append(f"{'':20}hint: {c.hint}")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def _tool(name: str, what: str, *, required: bool) -> Check:
    try:
        path = runner.find_tool(name)
    except ToolError as exc:
        status = Status.FAIL if required else Status.WARN
        return Check(what, status, exc.message, exc.hint, required)
    return Check(what, Status.OK, path, required=required)


def check_qemu() -> Check:
    try:
        binary = qemu.qemu_binary()
        version = qemu.qemu_version(binary)
        machines = runner.run([binary, "-M", "help"], timeout=30).stdout
    except ToolError as exc:
        return Check("qemu", Status.FAIL, exc.message, exc.hint, required=True)
    if "microvm" not in machines:
        return Check(
            "qemu",
            Status.WARN,
            f"{binary} {version} has no microvm machine",
            "use --machine q35, or install a QEMU with microvm",
            required=True,
        )
    return Check("qemu", Status.OK, f"{binary} {version} (microvm, q35)", required=True)


@dataclass(frozen=True)
class KvmHost:
    """What this host says about its KVM, to explain a test boot that fails although
    /dev/kvm opens."""

    pvm: bool  # the kvm_pvm module: a nested, paravirtual KVM (PVM)
    hardware: bool  # the CPU shows vmx or svm (hardware virtualisation)

    @classmethod
    def read(
        cls, modules: Path = Path("/sys/module"), cpuinfo: Path = Path("/proc/cpuinfo")
    ) -> KvmHost:
        try:
            words = set(cpuinfo.read_text(errors="replace").split())
        except OSError:
            words = {"vmx", "svm"}  # unknown: claim nothing
        return cls(pvm=(modules / "kvm_pvm").is_dir(), hardware=bool(words & {"vmx", "svm"}))

    def why(self) -> str:
        """Why a standard guest kernel cannot boot under this KVM ('' when nothing says so)."""
        if self.pvm:
            flags = "" if self.hardware else ", no vmx/svm CPU flags"
            return (
                f"this host's KVM is PVM (the kvm_pvm module{flags}), a nested hypervisor that "
                "boots only PVM-enabled guest kernels, not the guest kit's standard one"
            )
        if not self.hardware:
            return "the CPU shows no vmx/svm flags: this KVM may not run standard guests"
        return ""


TCG_HINT = (
    "guests run under TCG (software emulation, several times slower) and work; for KVM "
    "speed use a host with hardware virtualisation; MICROAGENT_ACCEL=tcg skips the test boot"
)
Probe = Callable[[GuestKit], Availability]


def kvm_access_hint(path: Path = Path("/dev/kvm")) -> str:
    """The fix when /dev/kvm exists but this user may not open it ('' otherwise)."""
    if not path.exists() or os.access(path, os.R_OK | os.W_OK):
        return ""
    try:
        group = grp.getgrgid(path.stat().st_gid).gr_name
    except (KeyError, OSError):
        group = "kvm"
    if group == "root":  # no group to join: the device node itself is too strict
        return (
            f"sudo chmod 0660 {path} && sudo chgrp kvm {path} (as distributions ship it), "
            f"then sudo usermod -aG kvm $USER and log in again; until then {TCG_HINT}"
        )
    return f"sudo usermod -aG {group} $USER, then log in again; until then {TCG_HINT}"


def _probe(store: Store) -> Probe:
    def probe(kit: GuestKit) -> Availability:
        try:
            return qemu.probe_kvm(qemu.qemu_binary(), kit.kernel, kit.initrd, store.root / "probes")
        except ToolError as exc:
            return Availability(False, exc.message)

    return probe


def check_accel(
    store: Store,
    *,
    probe: Probe | None = None,
    host: KvmHost | None = None,
    device_problem: str | None = None,
) -> list[Check]:
    """KVM usable (a real test boot, when a kit exists to boot) or the TCG fallback, and why:
    what was tried, what it left (QEMU's output, the console), what the host says."""
    problem = qemu.kvm_device_problem() if device_problem is None else device_problem
    tcg = Check("tcg", Status.OK, "software emulation available (fallback)")
    if problem:
        return [Check("kvm", Status.WARN, problem, kvm_access_hint() or TCG_HINT), tcg]
    why = (host or KvmHost.read()).why()
    kit = guestkit.find_kit(store)
    if kit is None:
        detail = "/dev/kvm opens, but no guest kit to test-boot yet (not probed)"
        if why:
            detail += f"\nlikely TCG: {why}"
        hint = "`microagent kernel install`, then doctor again: it test-boots the kit under KVM"
        return [Check("kvm", Status.WARN, detail, hint), tcg]
    result = (probe or _probe(store))(kit)
    if result.ok:
        return [Check("kvm", Status.OK, f"usable: {result.reason}"), tcg]
    return [Check("kvm", Status.WARN, _failed_boot(kit, result.reason, why), TCG_HINT), tcg]


def _failed_boot(kit: GuestKit, reason: str, why: str) -> str:
    """The story of a failed KVM test boot, one line each: verdict, tried, failed, why."""
    version = kit.kernel_version or kit.kernel.name
    lines = [
        "/dev/kvm opens, but a guest does not boot under it: TCG will be used",
        f"tried: the guest kit ({version}) under KVM: {qemu.probe_summary()}",
        f"failed: {reason.removeprefix('a KVM test boot ')}",
    ]
    if why:
        lines.append(f"why: {why}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Distro:
    """How this host's distribution installs packages (for the hints)."""

    install: str
    names: Mapping[str, str]  # Debian package name -> this distribution's

    def install_command(self, packages: Iterable[str]) -> str:
        return f"{self.install} {' '.join(sorted({self.names.get(p, p) for p in packages}))}"


DEBIAN = Distro("sudo apt-get install", {})
FEDORA = Distro("sudo dnf install", {"iproute2": "iproute"})
DISTROS: Mapping[str, Distro] = {
    "debian": DEBIAN,
    "ubuntu": DEBIAN,
    "fedora": FEDORA,
    "rhel": FEDORA,
    "centos": FEDORA,
    "arch": Distro("sudo pacman -S", {}),
    "suse": Distro("sudo zypper install", {}),
    "opensuse": Distro("sudo zypper install", {}),
    "alpine": Distro("sudo apk add", {}),
}


def parse_os_release(text: str) -> Distro:
    """The distribution named by os-release ``ID`` (or the first known ``ID_LIKE``); Debian's
    commands when none is known."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip("\"'")
    for name in (fields.get("ID", ""), *fields.get("ID_LIKE", "").split()):
        if name in DISTROS:
            return DISTROS[name]
    return DEBIAN


def host_distro(path: Path = Path("/etc/os-release")) -> Distro:
    try:
        return parse_os_release(path.read_text(errors="replace"))
    except OSError:
        return DEBIAN


def check_network(*, is_rootless: bool | None = None, distro: Distro | None = None) -> list[Check]:
    """The tools ``user`` networking runs and, for a normal user, what the kernel and the
    tun device allow: each missing piece named, with this distribution's fix."""
    rootless = network.rootless() if is_rootless is None else is_rootless
    distro = distro or host_distro()
    checks = [_network_tool(t, distro) for t in network.required_tools(rootless)]
    problems = network.userns_problems() if rootless else []
    missing = [c.name for c in checks if c.status is not Status.OK]
    if rootless and not problems and not missing:
        failed = network.probe_userns()
        if failed:
            hint = "see that nothing (seccomp, a security module, a container) forbids it"
            problems.append(network.Problem(failed, hint))
    checks.extend(Check("rootless", Status.WARN, p.what, p.fix) for p in problems)
    how = "user namespace" if rootless else "netns"
    if problems or missing:
        what = "; ".join([*(f"missing {m}" for m in missing), *(p.what for p in problems)])
        fixes = "; ".join(
            _dedupe([*(c.hint for c in checks if c.hint), *(p.fix for p in problems)])
        )
        detail = f"network 'user' unavailable: {what}; 'isolated' works"
        checks.append(Check("network", Status.WARN, detail, fixes))
    else:
        detail = f"user ({how} + slirp4netns + egress filter), isolated"
        checks.append(Check("network", Status.OK, detail))
    return checks


def _network_tool(name: str, distro: Distro) -> Check:
    try:
        return Check(name, Status.OK, runner.find_tool(name))
    except ToolError as exc:
        package = runner.PACKAGES.get(name, name)
        return Check(name, Status.WARN, exc.message, distro.install_command([package]))


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def check_kit(store: Store) -> Check:
    kit = guestkit.find_kit(store)
    if kit is None:
        return Check(
            "guest kit",
            Status.WARN,
            "not installed (built on first run, ~30 MB download)",
            "microagent kernel install",
        )
    return Check("guest kit", Status.OK, f"{kit.kernel_version} ({kit.key[:12]})")


def check_store(root: Path) -> Check:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".tmp-doctor-"):
            pass
    except OSError as exc:
        return Check(
            "store",
            Status.FAIL,
            f"{root} is not writable: {exc.strerror}",
            "set MICROAGENT_HOME to a writable directory",
            required=True,
        )
    return Check("store", Status.OK, f"{root} writable", required=True)


def diagnose(store: Store) -> Report:
    """Run every check (cheap; a KVM test boot only when /dev/kvm opens and a kit exists)."""
    steps: list[Callable[[], Check | list[Check]]] = [
        check_qemu,
        lambda: check_accel(store),
        lambda: _tool("mke2fs", "mke2fs", required=True),
        lambda: _tool("debugfs", "debugfs", required=False),
        check_network,
        lambda: check_kit(store),
        lambda: check_store(store.root),
    ]
    checks: list[Check] = []
    for step in steps:
        try:
            got = step()
        except MicroagentError as exc:
            got = Check(step.__name__, Status.FAIL, exc.message, exc.hint)
        checks.extend(got if isinstance(got, list) else [got])
    return Report(tuple(checks))
