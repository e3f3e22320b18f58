"""Which destination addresses egress may reach: global unicast only.

One table for both enforcers: the namespace filter of ``user`` networking
(:mod:`microagent.runtime.network` turns it into iptables rules) and the egress proxy of
``network.allow`` (:mod:`microagent.broker.egress` checks every address a name resolves to
with :func:`destination_allowed` before it connects).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Every IPv4 range that is not global unicast (IANA special-purpose registry, multicast and
# the reserved block, which holds the broadcast address): a superset of what `ipaddress` calls
# non-global (192.0.0.0/24 is rejected whole, multicast too). Tests check it against ipaddress.
NON_GLOBAL_RANGES = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # carrier-grade NAT (also Alibaba's metadata at 100.100.100.200)
    "127.0.0.0/8",  # loopback on any interface but lo
    "169.254.0.0/16",  # link-local (the 169.254.169.254 metadata services)
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255
)
# The documentation ranges (TEST-NET-1/2/3) are not routed on the internet, so a guest reaches
# there only what its local network deliberately put there: sandboxed networks (this project's
# CI among them) resolve every public name to an egress proxy in 203.0.113.0/24. They stay
# allowed; the host's own addresses are rejected one by one whatever range they are in.
DOCUMENTATION_RANGES = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
# Global addresses that answer as the cloud host itself (Azure's wire server and DNS). A guest
# would reach fd00:ec2::254 (AWS IMDS over IPv6) only with IPv6, which is rejected whole.
METADATA_ADDRESSES = ("168.63.129.16",)

# A name lookup's own bound: the system resolver's retries (timeout x attempts x servers) can
# keep a guest's request waiting far longer, and a stuck lookup holds nothing else up.
LOOKUP_TIMEOUT = 10.0
LOOKUP_WORKERS = 8  # lookups in flight at once; later ones wait for a worker (and time out)

AddrInfo = tuple[Any, ...]  # one getaddrinfo entry: (family, type, proto, canonname, sockaddr)

_NON_GLOBAL = tuple(ipaddress.IPv4Network(r) for r in NON_GLOBAL_RANGES)
_DOCUMENTATION = tuple(ipaddress.IPv4Network(r) for r in DOCUMENTATION_RANGES)
_METADATA = frozenset(ipaddress.IPv4Address(a) for a in METADATA_ADDRESSES)
# IPv6: only global unicast (2000::/3) is reachable, and of it not the blocks that embed an
# IPv4 address (checked as that address) or that ipaddress calls non-global (2001::/23 with
# Teredo, 2001:db8::/32 documentation, ...). fd00:ec2::254 (AWS IMDS) is in fc00::/7.
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known prefix: the last 32 bits are IPv4


def destination_allowed(ip: str) -> tuple[bool, str]:
    """Whether egress may connect to ``ip`` (an address literal), and why not ('' if it may).

    Refused: loopback, every non-global IPv4 range (private, CGNAT, link-local, multicast,
    reserved, ...), the metadata addresses, IPv6 outside global unicast, and the IPv6 forms
    that carry a refused IPv4 address (IPv4-mapped, NAT64, 6to4). The documentation ranges
    stay allowed (see :data:`DOCUMENTATION_RANGES`).
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False, "not an IP address"
    if isinstance(address, ipaddress.IPv4Address):
        return _v4_allowed(address)
    return _v6_allowed(address)


def _v4_allowed(address: ipaddress.IPv4Address) -> tuple[bool, str]:
    if address in _METADATA:
        return False, f"{address} is a cloud metadata address"
    for network in _NON_GLOBAL:
        if address in network:
            return False, f"{address} is in the non-global range {network}"
    if any(address in network for network in _DOCUMENTATION):
        return True, ""
    if not address.is_global:  # anything ipaddress knows of that the table does not
        return False, f"{address} is not a global address"
    return True, ""


def _v6_allowed(address: ipaddress.IPv6Address) -> tuple[bool, str]:
    embedded = _embedded_v4(address)
    if embedded is not None:
        allowed, why = _v4_allowed(embedded)
        return allowed, f"{address} embeds {why}" if why else ""
    if address.scope_id is not None or address not in _GLOBAL_UNICAST_V6:
        return False, f"{address} is not a global unicast IPv6 address"
    if not address.is_global:
        return False, f"{address} is not a global IPv6 address"
    return True, ""


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, NAT64 (well-known prefix) or 6to4 address carries."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def host_owns(ip: str) -> bool:
    """Whether ``ip`` is an address of this host (binding to it succeeds).

    A global address of the host itself reaches the host's own services, so egress refuses
    it like loopback. Fails closed: any error but "not an address here" counts as the host's.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL and not _no_family(exc)
    return True


def _no_family(exc: OSError) -> bool:
    """No IPv6 on this host at all: then no IPv6 address is the host's either."""
    return exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)


class LookupTimeout(TimeoutError):
    """A name lookup that did not finish within its bound."""


class _Lookups:
    """The lookup workers, made on first use and forgotten in a forked child (the gateway's
    worker is forked from its keeper: a parent's threads do not exist there)."""

    pool: ThreadPoolExecutor | None = None
    made = threading.Lock()

    @classmethod
    def get(cls) -> ThreadPoolExecutor:
        with cls.made:
            if cls.pool is None:
                cls.pool = ThreadPoolExecutor(LOOKUP_WORKERS, thread_name_prefix="lookup")
            return cls.pool

    @classmethod
    def forget(cls) -> None:
        cls.pool, cls.made = None, threading.Lock()


os.register_at_fork(after_in_child=_Lookups.forget)


def lookup(host: str, port: int, timeout: float | None = None) -> list[AddrInfo]:
    """``getaddrinfo(host, port)`` for TCP, given up after ``timeout`` seconds (default
    :data:`LOOKUP_TIMEOUT`; :class:`LookupTimeout`); one given up on finishes in its worker."""
    timeout = LOOKUP_TIMEOUT if timeout is None else timeout
    future = _Lookups.get().submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return list(future.result(timeout))
    except TimeoutError:
        future.cancel()
        raise LookupTimeout(f"looking up {host!r} took longer than {timeout:g} s") from None
