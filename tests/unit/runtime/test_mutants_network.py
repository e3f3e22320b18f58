"""The network rules, pinned down where the mutants of runtime/network.py outlived
test_network.py (docs/testing.md): refusals say exactly what and why, bounds sit exactly where
they are documented, and nothing from slirp4netns's API is taken on trust.
"""

from __future__ import annotations

import errno
import json
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.errors import InvalidInputError, VMError
from microagent.runtime import network
from microagent.runtime.backend import PublishedPort

WEB = PublishedPort("127.0.0.1", 18080, 80, "tcp")


class _Api:
    """A unix socket answering like slirp4netns: reads a request to EOF, writes ``reply``."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.path = path
        self.reply = reply
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                while conn.recv(4096):
                    pass
                conn.sendall(self.reply)


@pytest.fixture
def api_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ma-api-") as tmp:  # short: a socket path
        yield Path(tmp)


def _call(api_dir: Path, reply: bytes, name: str = "slirp.sock") -> dict[str, object]:
    api = _Api(api_dir / name, reply)
    try:
        return network.api_call(api.path, network.LIST_HOSTFWD)
    finally:
        api.server.close()


def test_a_reply_of_exactly_the_limit_is_read_whole(api_dir: Path) -> None:
    """Several receives' worth, joined as sent (padding between JSON tokens: a byte out of
    place would not parse); one byte more is refused, with the limit."""
    head, tail = b'{"return": {"entries": []}', b"}"
    body = head + b" " * (network.API_REPLY_MAX - len(head) - len(tail)) + tail
    assert len(body) == network.API_REPLY_MAX
    assert _call(api_dir, body) == {"return": {"entries": []}}
    over = head + b" " * (network.API_REPLY_MAX - len(head)) + tail
    with pytest.raises(VMError) as raised:
        _call(api_dir, over, "over.sock")
    assert raised.value.message == (
        f"slirp4netns API ({api_dir / 'over.sock'}) did not answer: "
        f"reply longer than {network.API_REPLY_MAX} bytes"
    )


def test_live_entries_missing_fields_are_skipped_not_trusted(api_dir: Path) -> None:
    ours = {
        "id": 1,
        "proto": "tcp",
        "host_addr": "127.0.0.1",
        "host_port": 18080,
        "guest_addr": "10.9.0.100",
        "guest_port": 80,
    }

    def without(key: str) -> dict[str, object]:
        return {k: v for k, v in ours.items() if k != key}

    entries = [
        "junk",  # skipped, and the rest still read
        without("host_addr"),
        without("host_port"),
        without("guest_port"),
        without("proto"),
        ours,
    ]
    api = _Api(api_dir / "slirp.sock", json.dumps({"return": {"entries": entries}}).encode())
    try:
        assert network.live_published(api.path) == (WEB,)
    finally:
        api.server.close()


def test_a_host_address_not_here_is_refused_with_what_to_use() -> None:
    with pytest.raises(InvalidInputError) as raised:
        network.probe_bind(PublishedPort("192.0.2.1", 18080, 80, "tcp"))
    assert raised.value.message == (
        "cannot publish 192.0.2.1:18080->80/tcp: 192.0.2.1 is not an address of this host"
    )
    assert raised.value.hint == (
        "use 127.0.0.1 (the default), 0.0.0.0 or an address from `ip -4 addr`"
    )


def test_a_taken_port_names_the_command_that_shows_who_has_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(Exception) as raised:
            network.probe_bind(PublishedPort("127.0.0.1", port, 80, "tcp"))
    error = raised.value
    assert getattr(error, "message", "") == (
        f"cannot publish 127.0.0.1:{port}->80/tcp: host port 127.0.0.1:{port} is already in use"
    )
    assert getattr(error, "hint", "") == (
        f"stop what listens there (ss -ltnp 'sport = :{port}') or publish another host port"
    )


def test_every_bind_failure_is_named() -> None:
    """Privileged ports (not reachable as root, so the errno is made up here) and anything
    else the kernel says."""
    denied = network._bind_error(WEB, "127.0.0.1:80", OSError(errno.EACCES, "Permission denied"))
    assert isinstance(denied, InvalidInputError)
    assert denied.message == "cannot publish 127.0.0.1:18080->80/tcp: ports below 1024 need root"
    assert denied.hint == "publish a host port of 1024 or more"
    other = network._bind_error(WEB, "127.0.0.1:80", OSError(errno.ENOBUFS, "No buffer space"))
    assert type(other) is VMError
    assert other.message == "cannot publish 127.0.0.1:18080->80/tcp: No buffer space"
    bare = network._bind_error(WEB, "127.0.0.1:80", OSError("odd"))
    assert bare.message == "cannot publish 127.0.0.1:18080->80/tcp: odd"


def test_a_socket_path_socat_would_misparse_is_refused_with_the_characters() -> None:
    with pytest.raises(InvalidInputError) as raised:
        network.check_socket_path(Path("/tmp/a:b,c/fwd.sock"))
    assert raised.value.message == (
        "forward socket path '/tmp/a:b,c/fwd.sock' contains ',:', which socat cannot take in "
        "an address"
    )
    assert raised.value.hint == (
        "use a socket path without , : ! ' \" \\ ( ) [ ] { } or control characters"
    )


@pytest.mark.parametrize("port", [1, 65535])
def test_guest_ports_at_the_bounds_are_taken(port: int) -> None:
    assert network.hostfwd_option(port).endswith(f":{port}")
    assert network.relay_argv("socat", port)[-1] == f"TCP4:127.0.0.1:{port}"


@pytest.mark.parametrize("port", [0, 65536, True])
def test_guest_ports_out_of_bounds_are_refused(port: int) -> None:
    with pytest.raises(InvalidInputError) as raised:
        network.hostfwd_option(port)
    assert raised.value.message == f"guest port {port!r} is not 1-65535"


def test_ip6tables_rules_reject_everything_but_loopback() -> None:
    assert network.ip6tables_rules() == (
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        "-A OUTPUT -o lo -j ACCEPT\n-A OUTPUT -j REJECT\nCOMMIT\n"
    )


def test_only_nameserver_lines_name_resolvers() -> None:
    text = (
        "\n# nameserver 9.9.9.9\noptions 1.2.3.4\nsearch 5.6.7.8\nnameserver\nnameserver 8.8.8.8\n"
    )
    assert network.parse_resolvers(text) == ("8.8.8.8",)
