"""Network command construction: egress rules, slirp4netns, guestfwd, bridges, stale netns."""

from __future__ import annotations

from pathlib import Path

import pytest

from microagent.errors import VMError
from microagent.runtime import network
from microagent.runtime.backend import Forward, NetworkConfig
from microagent.runtime.configdisk import NetworkMode

IP_OUTPUT = """1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever
4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever
5: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\\       valid_lft forever
"""


def test_parse_host_addresses_skips_loopback() -> None:
    assert network.parse_host_addresses(IP_OUTPUT) == ("192.0.2.2", "172.17.0.1")


def test_parse_resolvers_ipv4_only() -> None:
    text = "# x\nnameserver 10.255.255.53\nnameserver ::1\nnameserver bogus\nsearch lan\n"
    assert network.parse_resolvers(text) == ("10.255.255.53",)


def test_policy_and_rules_golden() -> None:
    policy = network.egress_policy(("10.255.255.53",), ("192.0.2.2",))
    assert policy.netns_resolv_conf is None
    assert network.iptables_rules(policy) == "\n".join(
        [
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            "-A OUTPUT -o lo -j ACCEPT",
            "-A OUTPUT -d 10.255.255.53/32 -p udp --dport 53 -j ACCEPT",
            "-A OUTPUT -d 10.255.255.53/32 -p tcp --dport 53 -j ACCEPT",
            "-A OUTPUT -d 192.0.2.2/32 -j REJECT",
            "-A OUTPUT -d 0.0.0.0/8 -j REJECT",
            "-A OUTPUT -d 10.0.0.0/8 -j REJECT",
            "-A OUTPUT -d 100.64.0.0/10 -j REJECT",
            "-A OUTPUT -d 127.0.0.0/8 -j REJECT",
            "-A OUTPUT -d 169.254.0.0/16 -j REJECT",
            "-A OUTPUT -d 172.16.0.0/12 -j REJECT",
            "-A OUTPUT -d 192.0.0.0/24 -j REJECT",
            "-A OUTPUT -d 192.168.0.0/16 -j REJECT",
            "-A OUTPUT -d 198.18.0.0/15 -j REJECT",
            "-A OUTPUT -d 224.0.0.0/4 -j REJECT",
            "-A OUTPUT -d 240.0.0.0/4 -j REJECT",
            "-A OUTPUT -d 168.63.129.16/32 -j REJECT",
            "COMMIT",
            "",
        ]
    )


def test_loopback_resolver_uses_slirp_dns() -> None:
    policy = network.egress_policy(("127.0.0.53",), ())
    assert policy.resolvers == (network.SLIRP_DNS,)
    assert policy.netns_resolv_conf == f"nameserver {network.SLIRP_DNS}\n"


def test_slirp4netns_argv() -> None:
    assert network.slirp4netns_argv("/usr/bin/slirp4netns", "microagent-1-ab", 7, 9) == [
        "/usr/bin/slirp4netns",
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--cidr=10.9.0.0/24",
        "--netns-type=path",
        "--ready-fd=7",
        "--exit-fd=9",
        "/run/netns/microagent-1-ab",
        "tap0",
    ]


def test_netns_exec_wraps() -> None:
    assert network.netns_exec("n", ["qemu", "-M"]) == ["ip", "netns", "exec", "n", "qemu", "-M"]


def test_guestfwd_and_bridge() -> None:
    fwd = Forward(80, host_port=18080)
    sock = network.forward_socket(Path("/s"), fwd)
    assert sock == Path("/s/fwd-80.sock")
    assert network.guestfwd_option(fwd, sock, "socat") == (
        "guestfwd=tcp:10.0.2.100:80-cmd:socat STDIO UNIX-CONNECT:/s/fwd-80.sock"
    )
    assert network.bridge_argv("socat", sock, 18080) == [
        "socat",
        "UNIX-LISTEN:/s/fwd-80.sock,fork,mode=600,unlink-early",
        "TCP:127.0.0.1:18080",
    ]
    direct = Forward(81, unix_socket=Path("/run/proxy.sock"))
    assert network.forward_socket(Path("/s"), direct) == Path("/run/proxy.sock")


def test_stale_namespaces_only_ours_with_dead_owner() -> None:
    alive = f"{network.NETNS_PREFIX}1-aaaaaa"  # pid 1 is always alive
    dead = f"{network.NETNS_PREFIX}999999999-bbbbbb"
    assert network.stale_namespaces([alive, dead, "other-1-x", f"{network.NETNS_PREFIX}x"]) == [
        dead
    ]


def test_netns_name_records_pid() -> None:
    import os

    assert network.netns_name().startswith(f"{network.NETNS_PREFIX}{os.getpid()}-")


def test_user_mode_without_root_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(network.os, "geteuid", lambda: 1000)
    sandbox = network.NetworkSandbox(NetworkConfig(NetworkMode.USER), tmp_path)
    with pytest.raises(VMError, match="needs root") as raised:
        sandbox.setup()
    assert "--network isolated" in raised.value.hint


def test_isolated_needs_nothing_but_refuses_forwards(tmp_path: Path) -> None:
    network.NetworkSandbox(NetworkConfig(NetworkMode.ISOLATED), tmp_path).setup()
    bad = NetworkConfig(NetworkMode.ISOLATED, (Forward(80, host_port=1),))
    with pytest.raises(VMError, match="forwards need network mode 'user'"):
        network.NetworkSandbox(bad, tmp_path).setup()
    sandbox = network.NetworkSandbox(NetworkConfig(), tmp_path)
    assert sandbox.wrap(["qemu"]) == ["qemu"]
