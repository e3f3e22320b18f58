"""Unprivileged networking (issue 17): the argv of the user-namespace path, the namespaces it
makes (real ones: ``unshare --user --map-root-user`` works for root as for anyone) and what
``doctor`` says a normal user lacks, with the distribution's fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.runtime import network
from microagent.runtime.backend import NetworkConfig
from microagent.runtime.configdisk import NetworkMode
from microagent.workspace import doctor
from testenv.prereq import require_tools

# -- argv ------------------------------------------------------------------------------------


def test_the_holder_owns_a_user_network_and_mount_namespace_and_dies_with_its_parent() -> None:
    assert network.holder_argv("/bin/setpriv", "/bin/unshare", "/bin/sleep") == [
        "/bin/setpriv", "--pdeathsig", "KILL",
        "/bin/unshare", "--user", "--map-root-user", "--net", "--mount", "--",
        "/bin/sleep", "infinity",
    ]  # fmt: skip


def test_helpers_enter_the_holders_namespaces_keeping_their_uid() -> None:
    assert network.nsenter_argv("/bin/nsenter", 42, ["socat", "-"]) == [
        "/bin/nsenter", "--target=42", "--user", "--net", "--mount", "--preserve-credentials",
        "--", "socat", "-",
    ]  # fmt: skip


def test_slirp4netns_joins_the_user_namespace_by_path() -> None:
    ns = Path("/proc/42/ns")
    argv = network.slirp4netns_argv("slirp4netns", ns / "net", 3, 4, userns=ns / "user")
    assert argv[-2:] == ["/proc/42/ns/net", "tap0"]
    assert argv.index("--userns-path=/proc/42/ns/user") < argv.index("--netns-type=path")
    assert "--disable-host-loopback" in argv
    root = network.slirp4netns_argv("slirp4netns", "microagent-1-x", 3, 4)
    assert root[-2] == "/run/netns/microagent-1-x"
    assert not any(a.startswith("--userns-path") for a in root)


def test_the_path_follows_the_uid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = NetworkConfig(NetworkMode.USER)
    monkeypatch.setattr(network.os, "geteuid", lambda: 1000)
    wrapped = network.NetworkSandbox(config, tmp_path).wrap(["qemu"])
    assert wrapped[0] == "nsenter" and wrapped[1] == "--target=<holder-pid>"
    assert wrapped[-2:] == ["--", "qemu"]
    assert "unshare" in network.required_tools(network.rootless())
    monkeypatch.setattr(network.os, "geteuid", lambda: 0)
    assert network.NetworkSandbox(config, tmp_path).wrap(["qemu"])[:3] == ["ip", "netns", "exec"]
    assert "unshare" not in network.required_tools(network.rootless())


# -- what the host allows -------------------------------------------------------------------


def _sysctl(root: Path, **values: int) -> Path:
    for name, value in values.items():
        path = root / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root


def test_each_disabled_switch_is_named_with_its_fix(tmp_path: Path) -> None:
    sysctl = _sysctl(
        tmp_path / "sys",
        user__max_user_namespaces=0,
        kernel__unprivileged_userns_clone=0,
        kernel__apparmor_restrict_unprivileged_userns=1,
    )
    problems = network.userns_problems(sysctl, tun=tmp_path / "tun")
    assert [p.what.split(" (")[-1] for p in problems[:3]] == [
        "user.max_user_namespaces = 0)",
        "kernel.unprivileged_userns_clone = 0)",
        "kernel.apparmor_restrict_unprivileged_userns = 1)",
    ]
    assert problems[0].fix.startswith("sudo sysctl -w user.max_user_namespaces=28633")
    assert problems[1].fix.startswith("sudo sysctl -w kernel.unprivileged_userns_clone=1")
    assert problems[3].what.endswith("tun does not exist (slirp4netns needs it)")
    assert problems[3].fix == "sudo modprobe tun"


def test_a_host_as_distributions_ship_it_has_no_problem(tmp_path: Path) -> None:
    sysctl = _sysctl(
        tmp_path / "sys", user__max_user_namespaces=63000, kernel__unprivileged_userns_clone=1
    )
    tun = tmp_path / "tun"
    tun.write_text("")
    tun.chmod(0o666)
    assert network.userns_problems(sysctl, tun=tun) == []


def test_a_tun_device_the_user_cannot_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tun = tmp_path / "tun"
    tun.write_text("")
    tun.chmod(0o600)
    monkeypatch.setattr(network.os, "access", lambda *_a, **_k: False)  # as a normal user sees it
    (problem,) = network.userns_problems(tmp_path, tun=tun)
    assert problem.what == f"{tun} is -rw-------: this user cannot open it (slirp4netns needs it)"
    assert problem.fix.startswith(f"sudo chmod 0666 {tun} ")


@pytest.mark.parametrize(
    ("os_release", "command"),
    [
        ('ID=debian\nVERSION_ID="12"\n', "sudo apt-get install iproute2 socat"),
        ("ID=ubuntu\nID_LIKE=debian\n", "sudo apt-get install iproute2 socat"),
        ('ID="fedora"\n', "sudo dnf install iproute socat"),
        ('ID="rocky"\nID_LIKE="rhel centos fedora"\n', "sudo dnf install iproute socat"),
        ("ID=arch\n", "sudo pacman -S iproute2 socat"),
        (
            'ID="opensuse-tumbleweed"\nID_LIKE="opensuse suse"\n',
            "sudo zypper install iproute2 socat",
        ),
        ("ID=something-else\n", "sudo apt-get install iproute2 socat"),
    ],
)
def test_the_fix_uses_the_distributions_package_manager(os_release: str, command: str) -> None:
    distro = doctor.parse_os_release(os_release)
    assert distro.install_command(["socat", "iproute2"]) == command


def test_doctor_names_a_missing_tool_with_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = network.runner.shutil.which

    def which(name: str, **kwargs: str) -> str | None:
        return None if name == "nsenter" else real(name, **kwargs)

    monkeypatch.setattr(network.runner.shutil, "which", which)
    fedora = doctor.parse_os_release("ID=fedora\n")
    checks = {c.name: c for c in doctor.check_network(is_rootless=True, distro=fedora)}
    assert checks["nsenter"].status is doctor.Status.WARN
    assert checks["nsenter"].hint == "sudo dnf install util-linux"
    assert checks["network"].detail.startswith("network 'user' unavailable: missing nsenter")
    assert "sudo dnf install util-linux" in checks["network"].hint
    as_root = {c.name for c in doctor.check_network(is_rootless=False, distro=fedora)}
    assert "nsenter" not in as_root


def test_the_doctor_command_tells_a_normal_user_what_to_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MICROAGENT_ACCEL", "tcg")
    monkeypatch.setattr(network.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(network, "SYSCTL", _sysctl(tmp_path / "sys", user__max_user_namespaces=0))
    monkeypatch.setattr(network, "TUN_DEVICE", tmp_path / "no-tun")
    main(["--json", "doctor"])
    checks = json.loads(capsys.readouterr().out)["checks"]
    rootless = [(c["status"], c["detail"], c["hint"]) for c in checks if c["name"] == "rootless"]
    assert [r[0] for r in rootless] == ["warn", "warn"]
    assert "user.max_user_namespaces = 0" in rootless[0][1]
    assert rootless[0][2].startswith("sudo sysctl -w user.max_user_namespaces=28633")
    assert rootless[1][1].endswith("no-tun does not exist (slirp4netns needs it)")
    assert rootless[1][2] == "sudo modprobe tun"
    (summary,) = [c for c in checks if c["name"] == "network"]
    assert summary["status"] == "warn" and "'isolated' works" in summary["detail"]
    assert "sudo modprobe tun" in summary["hint"]
    assert "not root" not in json.dumps(checks)  # no blanket 'needs root' any more


# -- the namespaces themselves ----------------------------------------------------------------


def _netns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_the_user_namespace_path_makes_and_removes_its_namespaces(tmp_path: Path) -> None:
    require_tools("unshare", "nsenter", "setpriv", "iptables-restore", "ip")
    ns = network.UserNetns(tmp_path)
    try:
        ns.create("nameserver 10.9.0.3\n")
        holder = ns.enter(["true"])[1].removeprefix("--target=")
        assert _netns(holder) != _netns("self")
        seen = network.runner.run(ns.enter(["cat", "/etc/resolv.conf"])).stdout
        assert seen == "nameserver 10.9.0.3\n"  # only inside: the host's file is unchanged
        assert Path("/etc/resolv.conf").read_text() != seen
        network.runner.run(
            ns.enter(["iptables-restore"]),
            input=network.iptables_rules(network.egress_policy(("192.0.2.53",), ())).encode(),
        )
        rules = network.runner.run(ns.enter(["iptables", "-S", "OUTPUT"])).stdout
        assert "-A OUTPUT -d 10.0.0.0/8 -j REJECT" in rules
        assert "10.0.0.0/8" not in network.runner.run(["iptables", "-S", "OUTPUT"]).stdout
        links = network.runner.run(ns.enter(["ip", "-o", "link"])).stdout
        assert [line.split(": ")[1] for line in links.splitlines()] == ["lo"]
    finally:
        ns.delete()
    assert not Path(f"/proc/{holder}").exists() or _comm(holder) != "sleep"
    assert not (tmp_path / "resolv.conf").exists()


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


HOLDER_PARENT = """
import sys
from pathlib import Path
from microagent.runtime import network
ns = network.UserNetns(Path(sys.argv[1]))
ns.create(None)
print(ns.enter(["true"])[1].removeprefix("--target="), flush=True)
sys.stdin.read()
"""


def test_the_holder_dies_with_the_process_that_made_it(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL leaves no namespace behind (its parent-death signal)."""
    require_tools("unshare", "nsenter", "setpriv", "ip")
    parent = subprocess.Popen(
        [sys.executable, "-c", HOLDER_PARENT, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    holder = parent.stdout.readline().strip()
    assert _comm(holder) == "sleep"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while _comm(holder) == "sleep" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _comm(holder) != "sleep"
