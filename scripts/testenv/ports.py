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
