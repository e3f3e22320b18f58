"""The destination table egress checks every resolved address against, versus ``ipaddress``."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microagent.broker import addresses
from microagent.broker.addresses import destination_allowed, host_owns
from microagent.runtime import network
from testenv.prereq import unavailable

DOCUMENTATION = [ipaddress.IPv4Network(r) for r in addresses.DOCUMENTATION_RANGES]
LISTED = [ipaddress.IPv4Network(r) for r in addresses.NON_GLOBAL_RANGES]


def test_network_uses_the_same_tables() -> None:
    assert network.NON_GLOBAL_RANGES is addresses.NON_GLOBAL_RANGES
    assert network.DOCUMENTATION_RANGES is addresses.DOCUMENTATION_RANGES
    assert network.METADATA_ADDRESSES is addresses.METADATA_ADDRESSES


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "127.255.255.254",
        "0.0.0.0",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",
        "100.100.100.200",  # Alibaba metadata
        "169.254.169.254",  # AWS/GCP/Azure metadata
        "168.63.129.16",  # Azure wire server
        "192.0.0.8",
        "198.18.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%1",
        "fc00::1",
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "ff02::1",
        "2001:db8::1",  # documentation (IPv6): not global
        "2001::1",  # Teredo
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "64:ff9b:1::1",  # local-use NAT64: not global unicast
        "::127.0.0.1",  # IPv4-compatible (deprecated)
        "not-an-address",
        "",
        "1.2.3",
    ],
)
def test_refused(ip: str) -> None:
    allowed, why = destination_allowed(ip)
    assert not allowed and why


@pytest.mark.parametrize(
    "ip",
    [
        "1.1.1.1",
        "151.101.0.223",  # pypi.org (Fastly)
        "203.0.113.7",  # documentation: a sandbox's egress proxy lives there
        "192.0.2.1",
        "198.51.100.1",
        "2606:4700::1111",
        "2a04:4e42::223",
        "::ffff:1.1.1.1",
        "64:ff9b::101:101",  # NAT64 of 1.1.1.1 (an IPv6-only host with DNS64)
        "2002:101:101::1",  # 6to4 of 1.1.1.1
    ],
)
def test_allowed(ip: str) -> None:
    assert destination_allowed(ip) == (True, "")


def test_the_reason_says_which_rule() -> None:
    assert "127.0.0.0/8" in destination_allowed("127.0.0.1")[1]
    assert "metadata" in destination_allowed("168.63.129.16")[1]
    assert "127.0.0.1" in destination_allowed("::ffff:127.0.0.1")[1]


@settings(max_examples=3000, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv4_against_ipaddress(value: int) -> None:
    address = ipaddress.IPv4Address(value)
    allowed = destination_allowed(str(address))[0]
    documentation = any(address in net for net in DOCUMENTATION)
    if allowed:
        assert address.is_global or documentation, address
        assert str(address) not in addresses.METADATA_ADDRESSES
        assert not any(address in net for net in LISTED)
    else:
        assert (
            not address.is_global
            or str(address) in addresses.METADATA_ADDRESSES
            or any(address in net for net in LISTED)
        ), address
    if not address.is_global and not documentation:
        assert not allowed, address


@settings(max_examples=1000, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv6_forms_of_an_ipv4_address_get_its_verdict(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    verdict = destination_allowed(str(v4))[0]
    mapped = ipaddress.IPv6Address(f"::ffff:{v4}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | value)
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1)
    for form in (mapped, nat64, sixtofour):
        assert destination_allowed(str(form))[0] is verdict, (form, v4)


@settings(max_examples=1000, deadline=None)
@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_ipv6_outside_global_unicast_is_refused(value: int) -> None:
    address = ipaddress.IPv6Address(value)
    allowed = destination_allowed(str(address))[0]
    embeds = (
        address.ipv4_mapped or address.sixtofour or address in ipaddress.ip_network("64:ff9b::/96")
    )
    if allowed and not embeds:
        assert address in ipaddress.ip_network("2000::/3") and address.is_global, address


def test_host_owns_its_loopback_and_not_a_documentation_address() -> None:
    assert host_owns("127.0.0.1")
    assert not host_owns("203.0.113.77")
    assert not host_owns("not-an-address")


def test_host_owns_one_of_its_own_global_addresses() -> None:
    """The address a UDP socket would use to reach the internet is one of the host's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent
        except OSError:
            unavailable("no IPv4 route on this machine (the test needs a default route)")
        own = probe.getsockname()[0]
    assert host_owns(own)
