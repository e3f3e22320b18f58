"""Network command construction: egress rules, slirp4netns, guestfwd, bridges, stale netns,
and published ports (checks, the slirp4netns API, the port-taken probe)."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.errors import ConflictError, InvalidInputError, VMError
from microagent.runtime import network
from microagent.runtime.backend import Forward, NetworkConfig, PublishedPort
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


def test_without_direct_egress_only_published_replies_leave() -> None:
    """network.allow: no DNS, no destination at all; the proxy is the only way out."""
    policy = network.egress_policy(("10.255.255.53",), ("192.0.2.2",), (8080,), direct_egress=False)
    rules = network.iptables_rules(policy).splitlines()
    assert not any("--dport 53" in line for line in rules)
    assert rules[-2:] == ["-A OUTPUT -j REJECT", "COMMIT"]
    assert rules[4] == "-A OUTPUT -o lo -j ACCEPT"
    assert "--sport 8080" in rules[5] and "ESTABLISHED" in rules[5]
    assert len(rules) == 8


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
    assert network.netns_name().startswith(f"{network.NETNS_PREFIX}{os.getpid()}-")


def test_user_mode_without_a_tun_device_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not root: the rootless path; without /dev/net/tun it is refused before anything runs."""
    monkeypatch.setattr(network.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(network, "TUN_DEVICE", tmp_path / "no-tun")
    sandbox = network.NetworkSandbox(NetworkConfig(NetworkMode.USER), tmp_path)
    with pytest.raises(VMError, match="no-tun does not exist") as raised:
        sandbox.setup()
    assert "modprobe tun" in raised.value.hint and "--network isolated" in raised.value.hint
    assert list(tmp_path.iterdir()) == []  # no holder log: nothing was started


def test_isolated_needs_nothing_but_refuses_forwards(tmp_path: Path) -> None:
    network.NetworkSandbox(NetworkConfig(NetworkMode.ISOLATED), tmp_path).setup()
    bad = NetworkConfig(NetworkMode.ISOLATED, (Forward(80, host_port=1),))
    with pytest.raises(VMError, match="forwards need network mode 'user'"):
        network.NetworkSandbox(bad, tmp_path).setup()
    sandbox = network.NetworkSandbox(NetworkConfig(), tmp_path)
    assert sandbox.wrap(["qemu"]) == ["qemu"]


# -- published ports (host->guest) ---------------------------------------------------------------

WEB = PublishedPort("127.0.0.1", 18080, 80)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (("localhost", 8080, 80), "not an IPv4 address"),
        (("::1", 8080, 80), "IPv6 host addresses are not supported"),
        (("127.000.0.1", 8080, 80), "not an IPv4 address"),
        (("1.2.3.4 ", 8080, 80), "not an IPv4 address"),
        (("224.0.0.1", 8080, 80), "not an address a listener can bind"),
        (("255.255.255.255", 8080, 80), "not an address a listener can bind"),
        (("127.0.0.1", 0, 80), "ports must be integers from 1 to 65535"),
        (("127.0.0.1", 8080, 65536), "ports must be integers from 1 to 65535"),
        (("127.0.0.1", True, 80), "ports must be integers from 1 to 65535"),
        (("127.0.0.1", "8080", 80), "ports must be integers from 1 to 65535"),
        (("127.0.0.1", 8080, 80, "udp"), "TCP only"),
        (("127.0.0.1,x", 8080, 80), "not an IPv4 address"),
        (("1" * 300, 8080, 80), "must be an IPv4 address"),
    ],
)
def test_published_port_is_checked_when_made(fields: tuple[Any, ...], problem: str) -> None:
    with pytest.raises(InvalidInputError, match=problem):
        PublishedPort(*fields)


def test_published_port_json_round_trip_is_checked() -> None:
    assert PublishedPort.from_json(WEB.to_json()) == WEB
    assert WEB.to_json() == {
        "protocol": "tcp",
        "host": "127.0.0.1",
        "hostPort": 18080,
        "guestPort": 80,
    }
    with pytest.raises(InvalidInputError):
        PublishedPort.from_json({**WEB.to_json(), "host": "0.0.0.0 -j ACCEPT"})
    with pytest.raises(InvalidInputError):
        PublishedPort.from_json({"host": "127.0.0.1"})


def test_hostfwd_option_and_namespace_ports() -> None:
    ports = (WEB, PublishedPort("0.0.0.0", 18081, 80), PublishedPort("127.0.0.1", 2222, 22))
    assert network.netns_ports(ports) == (22, 80)
    assert network.hostfwd_option(80) == "hostfwd=tcp:127.0.0.1:80-10.0.2.15:80"
    assert network.relay_argv("/usr/bin/socat", 80) == [
        "/usr/bin/socat",
        "-t",
        "3600",
        "TCP4-LISTEN:80,bind=10.9.0.100,reuseaddr,fork,backlog=128",
        "TCP4:127.0.0.1:80",
    ]
    for bad in (0, 65536, True):
        with pytest.raises(InvalidInputError):
            network.hostfwd_option(bad)
        with pytest.raises(InvalidInputError):
            network.relay_argv("socat", bad)


def test_listening_reads_the_namespace_of_a_process() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert not network.listening(os.getpid(), "127.0.0.1", port)  # bound, not listening
        server.listen(1)
        assert network.listening(os.getpid(), "127.0.0.1", port)
        assert not network.listening(os.getpid(), "127.0.0.2", port)
    assert not network.listening(999_999_999, "127.0.0.1", port)


def test_add_hostfwd_request() -> None:
    assert json.loads(network.add_hostfwd_request(WEB)) == {
        "execute": "add_hostfwd",
        "arguments": {
            "proto": "tcp",
            "host_addr": "127.0.0.1",
            "host_port": 18080,
            "guest_addr": "10.9.0.100",
            "guest_port": 80,
        },
    }


def test_published_replies_pass_the_egress_filter() -> None:
    policy = network.egress_policy(("10.255.255.53",), (), published_ports=(80, 22, 80))
    assert policy.published_ports == (22, 80)
    lines = network.iptables_rules(policy).splitlines()
    accept = "-m conntrack --ctstate ESTABLISHED --ctdir REPLY -j ACCEPT"
    assert lines[4:8] == [
        "-A OUTPUT -o lo -j ACCEPT",
        f"-A OUTPUT -s 10.9.0.100/32 -p tcp --sport 22 {accept}",
        f"-A OUTPUT -s 10.9.0.100/32 -p tcp --sport 80 {accept}",
        "-A OUTPUT -d 10.255.255.53/32 -p udp --dport 53 -j ACCEPT",
    ]
    none = network.iptables_rules(network.egress_policy(("10.255.255.53",), ()))
    assert "conntrack" not in none


def test_slirp4netns_argv_with_api_socket() -> None:
    argv = network.slirp4netns_argv("slirp4netns", "n", 7, 9, Path("/run/x/slirp.sock"))
    assert argv[-3:] == ["--api-socket=/run/x/slirp.sock", "/run/netns/n", "tap0"]


class FakeSlirpApi:
    """A unix socket answering like slirp4netns: reads a request to EOF, writes ``reply``."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.path = path
        self.reply = reply
        self.requests: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(4096):  # EOF only once the client shut its side
                    data += chunk
                self.requests.append(data)
                conn.sendall(self.reply)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def api_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ma-api-") as tmp:  # short: a socket path
        yield Path(tmp)


def test_publish_over_the_api(api_dir: Path) -> None:
    api = FakeSlirpApi(api_dir / "slirp.sock", b'{"return": {"id": 7}}')
    try:
        assert network.publish(api.path, WEB) == 7
        assert api.requests == [network.add_hostfwd_request(WEB)]
    finally:
        api.close()


def test_publish_failure_is_clear(api_dir: Path) -> None:
    reply = b'{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}'
    api = FakeSlirpApi(api_dir / "slirp.sock", reply)
    try:
        with pytest.raises(
            VMError, match=re.escape("cannot publish 127.0.0.1:18080->80/tcp")
        ) as raised:
            network.publish(api.path, WEB)
        assert "slirp_add_hostfwd failed" in raised.value.message
        assert "in use" in raised.value.hint
    finally:
        api.close()


@pytest.mark.parametrize("reply", [b"not json", b"[1]", b"{" + b" " * (70 << 10) + b"}"])
def test_api_replies_are_bounded_and_checked(api_dir: Path, reply: bytes) -> None:
    api = FakeSlirpApi(api_dir / "slirp.sock", reply)
    try:
        with pytest.raises(VMError, match="slirp4netns API"):
            network.api_call(api.path, network.LIST_HOSTFWD)
    finally:
        api.close()


def test_live_published_lists_what_slirp_forwards(api_dir: Path) -> None:
    entry = {"id": 1, "proto": "tcp", "host_addr": "127.0.0.1", "host_port": 18080}
    entries = [
        {**entry, "guest_addr": "10.9.0.100", "guest_port": 80},
        {**entry, "guest_addr": "10.9.0.5", "guest_port": 81},  # not ours
        {**entry, "guest_addr": "10.9.0.100", "guest_port": 0},  # invalid
        "junk",
    ]
    api = FakeSlirpApi(api_dir / "slirp.sock", json.dumps({"entries": entries}).encode())
    try:
        assert network.live_published(api.path) == (WEB,)
    finally:
        api.close()
    assert network.live_published(api_dir / "absent.sock") == ()


def test_a_taken_host_port_is_a_conflict() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = PublishedPort("127.0.0.1", taken.getsockname()[1], 80)
        with pytest.raises(ConflictError, match="already in use") as raised:
            network.check_published((port,))
        assert f"sport = :{port.host_port}" in raised.value.hint


def test_a_host_address_not_on_this_host_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="not an address of this host"):
        network.probe_bind(PublishedPort("192.0.2.254", 18080, 80))


def test_a_free_port_passes_and_stays_free() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = PublishedPort("127.0.0.1", probe.getsockname()[1], 80)
    network.check_published((port, port))  # probing twice: the probe let it go
    with socket.socket() as again:
        again.bind(("127.0.0.1", port.host_port))


def test_isolated_refuses_published_ports(tmp_path: Path) -> None:
    bad = NetworkConfig(NetworkMode.ISOLATED, published=(WEB,))
    with pytest.raises(VMError, match="published ports need network mode 'user'"):
        network.NetworkSandbox(bad, tmp_path).setup()


def test_a_taken_port_stops_the_sandbox_before_it_makes_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made: list[list[str]] = []
    monkeypatch.setattr(network, "network_problems", list)
    monkeypatch.setattr(network.runner, "run", lambda argv, **_: made.append(list(argv)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = PublishedPort("127.0.0.1", taken.getsockname()[1], 80)
        sandbox = network.NetworkSandbox(
            NetworkConfig(NetworkMode.USER, published=(port,)), tmp_path
        )
        with pytest.raises(ConflictError):
            sandbox.setup()
    assert made == []
    assert sandbox.api_socket == tmp_path / "slirp.sock"
    assert network.NetworkSandbox(NetworkConfig(NetworkMode.USER), tmp_path).api_socket is None
