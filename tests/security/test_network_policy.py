"""The guest's way out of ``user`` networking, attacked through the pure builders.

- the egress filter lets only global unicast IPv4 out (plus DNS to the host's resolvers):
  no private, CGNAT, link-local, loopback, "this network", multicast, reserved or broadcast
  destination, and no cloud metadata/agent address; IPv6 is off and rejected. The
  documentation ranges stay open (sandboxes put their egress proxy there), the host's own
  addresses are rejected in any range;
- a guestfwd ``cmd:`` carries its socket path as one quoted word, whatever the path holds,
  and paths socat would misparse are refused.

The iptables rules are checked by evaluating them (first match wins) for a table of
destinations, and for any address hypothesis comes up with.
"""

from __future__ import annotations

import functools
import ipaddress
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microagent import runner
from microagent.errors import InvalidInputError
from microagent.runtime import network
from microagent.runtime.backend import Accel, BootConfig, Disk, Forward, NetworkConfig
from microagent.runtime.configdisk import NetworkMode
from microagent.runtime.qemu import build_argv

RESOLVER = "10.255.255.53"
HOST = "203.0.113.200"  # the host's own (documentation range: rejected twice over)
HOST_PUBLIC = "198.41.0.4"  # a host with a public address: that one is rejected too


# -- a tiny iptables evaluator -----------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    target: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    proto: str | None = None
    dport: int | None = None
    out_iface: str | None = None

    def matches(self, dest: str, proto: str, dport: int, out_iface: str) -> bool:
        return (
            (self.network is None or ipaddress.ip_address(dest) in self.network)
            and self.proto in (None, proto)
            and self.dport in (None, dport)
            and self.out_iface in (None, out_iface)
        )


def parse_rules(text: str) -> list[Rule]:
    """The OUTPUT rules of an iptables-restore file (every option the builder uses)."""
    lines = text.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    assert ":OUTPUT ACCEPT [0:0]" in lines
    rules = []
    for line in lines:
        if not line.startswith("-A "):
            continue
        words = line.split()
        assert words[1] == "OUTPUT", line
        opts = dict(zip(words[2::2], words[3::2], strict=True))
        assert set(opts) <= {"-d", "-p", "--dport", "-o", "-j"}, line
        rules.append(
            Rule(
                target=opts["-j"],
                network=ipaddress.ip_network(opts["-d"]) if "-d" in opts else None,
                proto=opts.get("-p"),
                dport=int(opts["--dport"]) if "--dport" in opts else None,
                out_iface=opts.get("-o"),
            )
        )
    return rules


def verdict(rules: list[Rule], dest: str, proto: str = "tcp", dport: int = 443) -> str:
    """What the namespace does with a packet the VMM sends out of tap0."""
    for rule in rules:
        if rule.matches(dest, proto, dport, "tap0"):
            return rule.target
    return "ACCEPT"


@pytest.fixture(scope="module")
def rules() -> list[Rule]:
    policy = network.egress_policy((RESOLVER, "127.0.0.53"), (HOST, HOST_PUBLIC))
    return parse_rules(network.iptables_rules(policy))


# -- egress: global unicast only ---------------------------------------------------------------

REJECTED = [
    "0.0.0.0",
    "0.1.2.3",  # "this network"
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",  # private
    "100.64.0.1",
    "100.100.100.200",  # CGNAT, Alibaba metadata
    "127.0.0.1",
    "127.1.2.3",  # loopback, off lo
    "169.254.0.1",
    "169.254.169.254",
    "169.254.169.253",  # link-local, the metadata services
    "168.63.129.16",  # Azure wire server
    "192.0.0.8",
    "192.0.0.170",
    "198.18.0.1",
    "198.19.255.254",  # protocol, benchmarking
    "224.0.0.1",
    "224.0.0.251",
    "239.255.255.250",  # multicast (mDNS, SSDP)
    "240.0.0.1",
    "254.1.2.3",
    "255.255.255.255",  # reserved, broadcast
    "10.9.0.255",  # the slirp network's broadcast
    HOST_PUBLIC,
]
ALLOWED = [
    "1.1.1.1",
    "8.8.8.8",
    "93.184.216.34",
    "151.101.1.69",
    "104.16.0.1",
    "11.0.0.1",
    "100.63.255.255",
    "100.128.0.1",
    "172.15.255.255",
    "172.32.0.1",
    "192.167.255.255",
    "192.169.0.1",
    "168.63.129.17",
    "223.255.255.254",
]


@pytest.mark.parametrize("dest", REJECTED)
def test_non_global_destinations_are_rejected(rules: list[Rule], dest: str) -> None:
    for proto, port in (("tcp", 443), ("udp", 53), ("udp", 5353), ("icmp", 0)):
        assert verdict(rules, dest, proto, port) == "REJECT", (dest, proto, port)


@pytest.mark.parametrize("dest", ALLOWED)
def test_global_unicast_is_allowed(rules: list[Rule], dest: str) -> None:
    assert ipaddress.ip_address(dest).is_global
    assert verdict(rules, dest) == "ACCEPT"


@pytest.mark.parametrize("dest", ["192.0.2.1", "198.51.100.7", "203.0.113.80"])
def test_documentation_ranges_stay_open_but_not_the_host_in_them(
    rules: list[Rule], dest: str
) -> None:
    assert verdict(rules, dest) == "ACCEPT"  # a sandbox's egress proxy lives there
    assert verdict(rules, HOST) == "REJECT"  # the host's own address, in the same range


@functools.cache
def plain_rules() -> list[Rule]:
    return parse_rules(network.iptables_rules(network.egress_policy((RESOLVER,), ())))


@settings(max_examples=2000, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_address_ipaddress_calls_non_global_is_rejected(value: int) -> None:
    rules = plain_rules()
    address = ipaddress.IPv4Address(value)
    rejected = verdict(rules, str(address)) == "REJECT"
    documentation = any(address in ipaddress.ip_network(r) for r in network.DOCUMENTATION_RANGES)
    if (not address.is_global and not documentation) or address.is_multicast:
        assert rejected, address
    extra = ipaddress.ip_network("192.0.0.0/24")  # IETF protocol assignments, rejected whole
    if rejected:
        assert (
            not address.is_global
            or address.is_multicast
            or address in extra
            or (str(address) in network.METADATA_ADDRESSES)
        ), address


def test_the_range_list_covers_what_ipaddress_calls_private() -> None:
    """Every network ipaddress holds non-global (its private table, where it has one)."""
    constants = getattr(ipaddress.IPv4Address, "_constants", None)
    private = getattr(constants, "_private_networks", None)
    if not private:
        pytest.skip("this Python keeps no table of private IPv4 networks")
    listed = [ipaddress.ip_network(r) for r in network.NON_GLOBAL_RANGES]
    open_ = [ipaddress.ip_network(r) for r in network.DOCUMENTATION_RANGES]
    for net in [*private, ipaddress.ip_network("100.64.0.0/10")]:
        if net.version == 4 and not any(net.subnet_of(d) for d in open_):  # type: ignore[arg-type]
            assert any(net.subnet_of(r) for r in listed), net  # type: ignore[arg-type]


def test_dns_goes_only_to_the_resolvers_port(rules: list[Rule]) -> None:
    for proto in ("udp", "tcp"):
        assert verdict(rules, RESOLVER, proto, 53) == "ACCEPT"
    assert verdict(rules, RESOLVER, "tcp", 443) == "REJECT"
    assert verdict(rules, "10.255.255.54", "udp", 53) == "REJECT"
    assert verdict(rules, "127.0.0.53", "udp", 53) == "REJECT"  # loopback resolvers: slirp DNS


def test_odd_resolvers_open_nothing() -> None:
    policy = network.egress_policy(("0.0.0.0", "224.0.0.251", "255.255.255.255"), ())
    assert policy.resolvers == (network.SLIRP_DNS,)
    rules = parse_rules(network.iptables_rules(policy))
    for dest in ("0.0.0.0", "224.0.0.251", "255.255.255.255"):
        assert verdict(rules, dest, "udp", 53) == "REJECT"


def test_loopback_interface_stays_open(rules: list[Rule]) -> None:
    assert rules[0] == Rule("ACCEPT", out_iface="lo")


# -- IPv6: off, and rejected -------------------------------------------------------------------


def test_ipv6_is_rejected_whole() -> None:
    rules = parse_rules(network.ip6tables_rules())
    for dest in ("fd00:ec2::254", "2001:4860:4860::8888", "ff02::1", "fe80::1", "::1"):
        assert verdict(rules, dest) == "REJECT", dest
    assert rules[0] == Rule("ACCEPT", out_iface="lo")


def test_ipv6_is_off_in_qemu_and_slirp4netns(tmp_path: Path) -> None:
    config = BootConfig(
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        disks=(Disk(tmp_path / "root.ext4", readonly=True),),
        state_dir=tmp_path,
        network=NetworkConfig(NetworkMode.USER),
    )
    argv = build_argv("qemu", config, Accel.TCG)
    assert argv[argv.index("-netdev") + 1].split(",")[:3] == ["user", "id=n0", "ipv6=off"]
    assert not any("ipv6" in a for a in network.slirp4netns_argv("slirp4netns", "n", 3, 4))


def test_the_namespace_gets_the_ipv6_filter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``setup`` loads both rule sets into the namespace (commands recorded, nothing run)."""
    calls: list[tuple[list[str], bytes | None]] = []

    def fake_run(argv: list[str], **kwargs: object) -> runner.Completed:
        calls.append((list(argv), kwargs.get("input")))  # type: ignore[arg-type]
        return runner.Completed(tuple(argv), 0, "", "")

    monkeypatch.setattr(network.runner, "run", fake_run)
    monkeypatch.setattr(network, "network_problems", list)
    monkeypatch.setattr(network, "cleanup_stale", list)
    monkeypatch.setattr(network.NetworkSandbox, "_start_slirp", lambda self: None)
    monkeypatch.setattr(network, "HOST_IPV6", tmp_path)  # "the host has IPv6"
    sandbox = network.NetworkSandbox(NetworkConfig(NetworkMode.USER), tmp_path)
    sandbox.setup()
    loaded = {argv[-1]: data for argv, data in calls if argv[-1].endswith("tables-restore")}
    assert loaded["ip6tables-restore"] == network.ip6tables_rules().encode()
    assert b"-A OUTPUT -d 224.0.0.0/4 -j REJECT" in (loaded["iptables-restore"] or b"")
    assert "ip6tables-restore" in network.HOST_TOOLS


# -- guestfwd: the socket path is one word -----------------------------------------------------


def print_argv_tool(tmp_path: Path) -> Path:
    """A stand-in for socat that prints each argument on its own line."""
    tool = tmp_path / "bin" / "socat"
    tool.parent.mkdir()
    tool.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    tool.chmod(0o755)
    return tool


def qemu_unescape(option: str) -> str:
    return option.replace(",,", ",")


@pytest.mark.parametrize(
    "name",
    [
        "my sockets/fwd.sock",
        "a;touch {marker};b/fwd.sock",
        "x`touch {marker}`y/fwd.sock",
        "$HOME&&touch {marker}|#/fwd.sock",
    ],
)
def test_guestfwd_socket_path_is_one_quoted_word(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    socket_path = tmp_path / name.format(marker=marker)
    tool = print_argv_tool(tmp_path)
    option = network.guestfwd_option(Forward(80, host_port=1), socket_path, str(tool))
    prefix = "guestfwd=tcp:10.0.2.100:80-cmd:"
    assert option.startswith(prefix)
    cmd = qemu_unescape(option.removeprefix(prefix))
    expected = [str(tool), "STDIO", f"UNIX-CONNECT:{socket_path}"]
    assert shlex.split(cmd) == expected  # libslirp splits it like this (g_shell_parse_argv)
    out = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == expected[1:]
    assert not marker.exists()


def test_guestfwd_in_the_qemu_command_line(tmp_path: Path) -> None:
    sock = tmp_path / "a b;c.sock"
    config = BootConfig(
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        disks=(),
        state_dir=tmp_path,
        network=NetworkConfig(NetworkMode.USER, (Forward(81, unix_socket=sock),)),
    )
    argv = build_argv(
        "qemu", config, Accel.TCG, forwards=[(config.network.forwards[0], sock)], socat="/s,x/socat"
    )
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev.endswith(f"-cmd:/s,,x/socat STDIO 'UNIX-CONNECT:{sock}'")


@pytest.mark.parametrize("bad", [",", ":", "'", '"', "\\", "!", "(", "]", "{", "\n", "\t", "\x1b"])
def test_socket_paths_socat_would_misparse_are_refused(tmp_path: Path, bad: str) -> None:
    sock = tmp_path / f"fwd{bad}x.sock"
    with pytest.raises(InvalidInputError, match="forward socket path"):
        network.guestfwd_option(Forward(80, unix_socket=sock), sock, "socat")
    with pytest.raises(InvalidInputError, match="forward socket path"):
        network.bridge_argv("socat", sock, 8080)
