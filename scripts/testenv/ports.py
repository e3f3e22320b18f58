"""Free TCP ports on loopback, for tests that must name a port before anything listens on it.

(``testenv.registry`` keeps its own ``free_port``: it also runs as a stand-alone script.)"""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """Distinct ports that nothing listens on right now (held together while chosen, so none
    comes twice)."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    try:
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A port that nothing listens on right now."""
    return free_ports(1)[0]


def free_port_pair(tries: int = 50) -> int | None:
    """The first of two consecutive ports that nothing listens on right now (a
    ``MICROAGENT_SERVICE_PORT_BASE``), or None when ``tries`` picks found none."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base > 65000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    return None
