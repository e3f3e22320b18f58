"""The gateway: its config (every field checked), its unix sockets, its connection cap, the
egress wiring, and the process contract of ``main`` (secrets on stdin, ``ready`` on stdout,
exit 0 on SIGTERM, exit 2 on a bad config or a missing secret)."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_fakes import (
    KEY,
    Upstream,
    audit_entries,
    credential,
    error_message,
    raw_exchange,
    request,
    request_while_one_waits,
    run_gateway,
    serve_upstream,
)

from microagent.broker.gateway import (
    CredentialRoute,
    EgressRoute,
    Gateway,
    GatewayConfig,
    Limits,
    load_config,
)
from microagent.errors import InvalidInputError


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with serve_upstream() as served:
        yield served


def example(directory: Path) -> dict[str, Any]:
    """The contract's example ``gateway.json``."""
    return {
        "version": 1,
        "audit": str(directory / "audit.jsonl"),
        "cafile": "/abs/path/extra-ca.pem",
        "credentials": [
            {
                "name": "anthropic",
                "upstream": "https://api.anthropic.com",
                "header": "x-api-key",
                "format": "{value}",
                "socket": str(directory / "cred0.sock"),
            }
        ],
        "egress": {"allow": ["pypi.org", ".pythonhosted.org"], "socket": str(directory / "e.sock")},
        "limits": {"maxBodyBytes": 33554432, "maxConcurrent": 16, "ratePerMinute": 600},
    }


# --- config --------------------------------------------------------------------------------


def test_the_contract_example_parses_and_round_trips(sockdir: Path) -> None:
    config = GatewayConfig.from_json(example(sockdir))
    assert config.credentials[0] == CredentialRoute(
        "anthropic", "https://api.anthropic.com", "x-api-key", "{value}", sockdir / "cred0.sock"
    )
    assert config.egress == EgressRoute(("pypi.org", ".pythonhosted.org"), sockdir / "e.sock")
    assert config.limits == Limits()
    assert config.cafile == Path("/abs/path/extra-ca.pem")
    assert config.to_json() == example(sockdir)
    assert GatewayConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_optional_fields_default(sockdir: Path) -> None:
    data = example(sockdir)
    del data["cafile"], data["egress"], data["limits"]
    config = GatewayConfig.from_json(data)
    assert (config.cafile, config.egress, config.limits) == (None, None, Limits())
    data["credentials"] = []
    data["egress"] = {"allow": [], "socket": str(sockdir / "e.sock")}
    assert GatewayConfig.from_json(data).credentials == ()


def _route(index: int, **change: Any) -> dict[str, Any]:
    route = {
        "name": f"c{index}",
        "upstream": "https://api.example.com/v1",
        "header": "Authorization",
        "format": "Bearer {value}",
        "socket": f"/run/ma/c{index}.sock",
    }
    return {**route, **change}


BAD_CONFIGS: dict[str, tuple[str, Any, str]] = {
    # case: (path to change, new value, expected words)
    "nine credentials": ("credentials", [_route(i) for i in range(9)], "at most 8"),
    "upper-case name": ("credentials", [_route(0, name="Model")], "name must match"),
    "long name": ("credentials", [_route(0, name="a" * 33)], "name must match"),
    "userinfo": ("credentials", [_route(0, upstream="https://u:p@api.example.com")], "user info"),
    "fragment": ("credentials", [_route(0, upstream="https://api.example.com/#x")], "fragment"),
    "plain http": ("credentials", [_route(0, upstream="http://api.example.com")], "loopback"),
    "not http": ("credentials", [_route(0, upstream="file:///etc/passwd")], "https://"),
    "bad header": ("credentials", [_route(0, header="x api key")], "header name"),
    "hop header": ("credentials", [_route(0, header="Content-Length")], "broker itself"),
    "no value": ("credentials", [_route(0, format="Bearer token")], "{value} exactly once"),
    "two values": ("credentials", [_route(0, format="{value}{value}")], "{value} exactly once"),
    "format CRLF": ("credentials", [_route(0, format="{value}\r\nX: y")], "printable ASCII"),
    "relative socket": ("credentials", [_route(0, socket="c.sock")], "absolute path"),
    "long socket": ("credentials", [_route(0, socket="/" + "s" * 107)], "at most 107 bytes"),
    "same names": ("credentials", [_route(0), _route(0, socket="/x.sock")], "same name"),
    "same sockets": ("credentials", [_route(0), _route(1, socket="/run/ma/c0.sock")], "share"),
    "missing field": ("credentials", [{"name": "a"}], "missing field"),
    "unknown field": ("credentials", [_route(0, extra=1)], "unknown field 'extra'"),
    "wrong type": ("credentials", [_route(0, upstream=5)], "non-empty string"),
    "version": ("version", 2, "must be 1"),
    "audit relative": ("audit", "audit.jsonl", "absolute"),
    "cafile relative": ("cafile", "ca.pem", "absolute"),
    "limits zero": ("limits", {"maxConcurrent": 0}, "maxConcurrent"),
    "limits bool": ("limits", {"ratePerMinute": True}, "ratePerMinute"),
    "limits huge": ("limits", {"maxBodyBytes": 1 << 40}, "maxBodyBytes"),
    "limits unknown": ("limits", {"maxTunnels": 1}, "unknown field"),
    "egress entry": ("egress", {"allow": ["https://pypi.org"], "socket": "/e.sock"}, "allow[0]"),
    "egress not list": ("egress", {"allow": "pypi.org", "socket": "/e.sock"}, "list"),
    "not an object": ("egress", [], "JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_are_refused_saying_where(sockdir: Path, case: str) -> None:
    key, value, expected = BAD_CONFIGS[case]
    data = copy.deepcopy(example(sockdir))
    data[key] = value
    with pytest.raises(InvalidInputError) as caught:
        GatewayConfig.from_json(data)
    assert expected in caught.value.message


def test_a_config_with_nothing_to_serve_is_refused(sockdir: Path) -> None:
    data = example(sockdir)
    data["credentials"], data["egress"] = [], None
    with pytest.raises(InvalidInputError, match="nothing to serve"):
        GatewayConfig.from_json(data)


def test_load_config_is_bounded_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text("{" * 100)
    with pytest.raises(InvalidInputError, match=f"{path}: nested deeper"):
        load_config(path)
    path.write_text(" " * (2 << 20))
    with pytest.raises(InvalidInputError, match="larger than"):
        load_config(path)
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_config(tmp_path / "missing.json")


# --- sockets -------------------------------------------------------------------------------


def test_sockets_are_private_and_removed_on_close(sockdir: Path, upstream: Upstream) -> None:
    routes = (credential(sockdir, upstream.url, name="a"), credential(sockdir, upstream.url))
    with run_gateway(sockdir, routes) as running:
        for path in running.gateway.sockets:
            mode = path.lstat().st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
        assert request(sockdir / "a.sock", "GET", "/x")[0] == 200
        assert request(sockdir / "model.sock", "GET", "/y")[0] == 200
        running.gateway.close()
        assert not (sockdir / "a.sock").exists()
        assert not (sockdir / "model.sock").exists()


def test_a_stale_socket_is_replaced_and_a_live_one_or_a_file_is_refused(
    sockdir: Path, upstream: Upstream
) -> None:
    route = credential(sockdir, upstream.url)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(route.socket))
    stale.close()  # the file stays, nobody listens: a gateway that died
    with run_gateway(sockdir, (route,)) as running:
        assert request(running.socket, "GET", "/x")[0] == 200
        with pytest.raises(InvalidInputError, match="another process"):
            run_gateway(sockdir, (route,)).__enter__()
    route.socket.write_text("not a socket")
    with pytest.raises(InvalidInputError, match="not a socket"):
        run_gateway(sockdir, (route,)).__enter__()
    assert route.socket.read_text() == "not a socket"


def test_the_connection_cap_answers_503_and_recovers(sockdir: Path, upstream: Upstream) -> None:
    with run_gateway(sockdir, (credential(sockdir, upstream.url),), max_connections=1) as running:
        (status, headers, body), done = request_while_one_waits(running.socket, upstream, "/x")
        # The slot comes back once the holder's connection is closed on both sides.
        deadline = time.monotonic() + 5
        while (again := request(running.socket, "GET", "/x")[0]) != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert again == 200
    assert status == 503
    assert headers["retry-after"] == "1"
    assert "too many connections" in error_message(body)
    assert done == [200]


def test_close_ends_connections_in_flight(sockdir: Path, upstream: Upstream) -> None:
    with run_gateway(sockdir, (credential(sockdir, upstream.url),)) as running:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(5)
        conn.connect(str(running.socket))
        conn.sendall(b"GET /x HTTP/1.1\r\n")  # half a head: the broker waits for more
        running.gateway.close()
        try:  # closed, not left hanging: an end of file, or a reset when the broker had not
            answer = conn.recv(100)  # read the half head yet (a unix socket closed unread)
        except ConnectionResetError:
            answer = b""
        assert answer == b""
        conn.close()


def test_the_egress_route_is_served_by_the_egress_proxy(sockdir: Path) -> None:
    config = GatewayConfig(
        audit=sockdir / "audit.jsonl",
        egress=EgressRoute(("pypi.org",), sockdir / "egress.sock"),
    )
    gateway = Gateway(config, {})
    thread = threading.Thread(target=gateway.serve_forever, daemon=True)
    thread.start()
    try:
        answer = raw_exchange(sockdir / "egress.sock", b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
    finally:
        gateway.close()
        thread.join(10)
    assert answer.startswith(b"HTTP/1.1 403")
    [entry] = audit_entries(sockdir / "audit.jsonl")
    assert (entry["kind"], entry["host"], entry["decision"]) == ("egress", "evil.example", "deny")


def test_a_missing_secret_is_refused_in_process(sockdir: Path, upstream: Upstream) -> None:
    config = GatewayConfig(
        audit=sockdir / "audit.jsonl", credentials=(credential(sockdir, upstream.url),)
    )
    with pytest.raises(InvalidInputError, match="no secret for credential 'model'"):
        Gateway(config, {})
    assert not (sockdir / "model.sock").exists()


def test_an_audit_log_that_cannot_be_written_fails_the_start(sockdir: Path) -> None:
    config = GatewayConfig(
        audit=sockdir / "no-such-dir" / "audit.jsonl",
        credentials=(credential(sockdir, "http://127.0.0.1:9"),),
    )
    with pytest.raises(InvalidInputError, match=r"audit log .*cannot write"):
        Gateway(config, {"model": KEY})
    assert not (sockdir / "model.sock").exists()


# --- the process ---------------------------------------------------------------------------


def _spawn(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "microagent.broker.gateway", str(config), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def _write_config(directory: Path, upstream: str) -> Path:
    config = GatewayConfig(
        audit=directory / "audit.jsonl", credentials=(credential(directory, upstream),)
    )
    path = directory / "gateway.json"
    path.write_text(json.dumps(config.to_json()))
    return path


def test_main_reads_stdin_says_ready_serves_and_exits_0_on_sigterm(
    sockdir: Path, upstream: Upstream
) -> None:
    proc = _spawn(_write_config(sockdir, upstream.url))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(json.dumps({"model": KEY}).encode())
        proc.stdin.close()
        assert proc.stdout.readline() == b"ready\n"
        status, _, _ = request(sockdir / "model.sock", "GET", "/v1/x", None, {"x-api-key": "p"})
        assert status == 200
        assert upstream.seen[0].header("x-api-key") == [KEY]
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0, err
    assert not (sockdir / "model.sock").exists()
    assert KEY.encode() not in err
    assert KEY not in (sockdir / "audit.jsonl").read_text()


@pytest.mark.parametrize(
    ("secrets", "expected"),
    [
        (b"{}", b"no value for credential 'model'"),
        (b"", b"no value for credential 'model'"),
        (json.dumps({"model": KEY + "\n"}).encode(), b"printable ASCII"),
        (b"not json " + KEY.encode(), b"not valid JSON"),
    ],
)
def test_main_exits_2_with_one_line_when_a_secret_is_missing_or_bad(
    sockdir: Path, upstream: Upstream, secrets: bytes, expected: bytes
) -> None:
    proc = _spawn(_write_config(sockdir, upstream.url))
    out, err = proc.communicate(secrets, timeout=30)
    assert proc.returncode == 2
    assert out == b""
    assert err.count(b"\n") == 1
    assert expected in err
    assert KEY.encode() not in err
    assert not (sockdir / "model.sock").exists()


def test_main_exits_2_on_a_bad_config_or_usage(sockdir: Path) -> None:
    path = sockdir / "gateway.json"
    path.write_text(json.dumps({"version": 1}))
    proc = _spawn(path)
    _out, err = proc.communicate(b"{}", timeout=30)
    assert proc.returncode == 2
    assert err.startswith(b"gateway: ") and b"missing field" in err
    proc = _spawn(path, "extra-argument")
    _out, err = proc.communicate(b"{}", timeout=30)
    assert proc.returncode == 2
    assert b"usage" in err
