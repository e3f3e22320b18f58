"""Bounded reachability checks of host TCP services (the mediation target)."""

from __future__ import annotations

import socket

PROBE_TIMEOUT = 2.0


def tcp_reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout`` seconds, else why
    not. The connection is closed at once: a mediation target must tolerate such probes."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)
