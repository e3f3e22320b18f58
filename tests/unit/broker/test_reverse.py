"""The credential broker through its public door: a guest-side HTTP client on the gateway's
unix socket, a real fake upstream on loopback (plain HTTP, and HTTPS with a throwaway CA),
and the audit log it writes. Nothing of the broker is mocked."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_fakes import (
    KEY,
    MEGABYTE,
    PLACEHOLDER,
    Authority,
    GuestConnection,
    Running,
    Upstream,
    audit_entries,
    credential,
    error_message,
    make_authority,
    raw_exchange,
    request,
    request_while_one_waits,
    run_gateway,
    serve_upstream,
)

from microagent.broker.audit import AuditLog
from microagent.broker.gateway import Limits
from microagent.broker.reverse import ReverseProxy
from microagent.broker.reverse import Upstream as UpstreamURL
from microagent.errors import InvalidInputError


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return make_authority(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with serve_upstream(prefix="/base") as served:
        yield served


@pytest.fixture
def broker(sockdir: Path, upstream: Upstream) -> Iterator[Running]:
    with run_gateway(sockdir, (credential(sockdir, upstream.url),)) as running:
        yield running


# --- the key -------------------------------------------------------------------------------


GUEST_AUTH = {
    "Authorization": "Bearer guest-held-token",
    "x-api-key": PLACEHOLDER,
    "X-Goog-Api-Key": "guest-goog",
    "api-key": "guest-azure",
    "Proxy-Authorization": "Basic Z3Vlc3Q6cHc=",
    "Cookie": "session=guest-cookie",
}


def test_the_guests_auth_headers_are_dropped_and_the_real_key_arrives(
    broker: Running, upstream: Upstream
) -> None:
    headers = {
        **GUEST_AUTH,
        "Host": "evil.example",
        "Connection": "X-Hop",
        "X-Hop": "hop-value",
        "anthropic-version": "2023-06-01",
    }
    status, _, body = request(broker.socket, "POST", "/v1/messages?beta=true", b"{}", headers)
    assert status == 200, body
    [seen] = upstream.seen
    assert seen.path == "/base/v1/messages?beta=true"  # prefix + path + query
    assert seen.header("x-api-key") == [KEY]
    for name in ("Authorization", "X-Goog-Api-Key", "api-key", "Proxy-Authorization", "Cookie"):
        assert seen.header(name) == [], name
    assert seen.header("X-Hop") == []  # named by Connection: hop-by-hop
    assert seen.header("anthropic-version") == ["2023-06-01"]  # the rest passes
    assert seen.header("Host") == [upstream.url.split("//")[1].split("/")[0]]
    assert json.loads(body)["length"] == 2


def test_an_authorization_credential_replaces_the_guests_bearer(
    sockdir: Path, upstream: Upstream
) -> None:
    route = credential(sockdir, upstream.url, header="Authorization")
    with run_gateway(sockdir, (route,)) as running:
        status, _, _ = request(running.socket, "GET", "/models", None, GUEST_AUTH)
    assert status == 200
    [seen] = upstream.seen
    assert seen.header("Authorization") == [f"Bearer {KEY}"]
    assert seen.header("x-api-key") == []


def test_the_audit_log_has_one_entry_per_request_and_never_a_key_or_query(
    broker: Running,
) -> None:
    request(
        broker.socket, "POST", "/v1/messages?key=query-secret", b'{"body-secret":1}', GUEST_AUTH
    )
    broker.wait_audit(1)  # audited after its answer: else the next one's entry may come first
    request(broker.socket, "GET", "/v1/models", None, GUEST_AUTH)
    entries = broker.wait_audit(2)
    first = entries[0]
    assert first["kind"] == "broker"
    assert first["credential"] == "model"
    assert (first["method"], first["path"], first["status"]) == ("POST", "/base/v1/messages", 200)
    assert first["decision"] == "allow"
    assert first["bytesIn"] == len(b'{"body-secret":1}')
    assert first["bytesOut"] > 0
    assert "reason" not in first
    assert {"time", "durationMs"} <= first.keys()
    assert entries[1]["path"] == "/base/v1/models"
    text = broker.config.audit.read_text()
    for secret in (KEY, "query-secret", "body-secret", "guest-held-token", "guest-cookie"):
        assert secret not in text


# --- TLS -----------------------------------------------------------------------------------


def test_an_https_upstream_is_verified_against_the_extra_ca(
    sockdir: Path, authority: Authority
) -> None:
    with serve_upstream(authority.server_context()) as served:
        route = credential(sockdir, served.url)
        with run_gateway(sockdir, (route,), cafile=authority.ca) as running:
            status, _, body = request(running.socket, "GET", "/v1/models", None, GUEST_AUTH)
        assert status == 200, body
        assert served.seen[0].header("x-api-key") == [KEY]


def test_an_untrusted_certificate_is_a_502_and_audited(sockdir: Path, authority: Authority) -> None:
    with serve_upstream(authority.server_context()) as served:
        route = credential(sockdir, served.url)
        with run_gateway(sockdir, (route,), cafile=None) as running:  # system trust only
            status, _, body = request(running.socket, "GET", "/v1/models")
            [entry] = running.wait_audit(1)
        assert served.seen == []
    assert status == 502
    assert "certificate" in error_message(body)
    assert entry["status"] == 502
    assert "certificate" in entry["reason"]


def test_plain_http_to_a_host_that_is_not_loopback_is_refused(tmp_path: Path) -> None:
    for url in ("http://api.example.com", "http://10.0.0.1:8080/v1", "http://169.254.169.254"):
        with pytest.raises(InvalidInputError, match="loopback"):
            UpstreamURL.parse(url)
    # Even an Upstream built by hand (no parsing) is refused by the broker itself.
    audit = AuditLog(tmp_path / "audit.jsonl")
    forged = UpstreamURL("http", "api.example.com", 80)
    with pytest.raises(InvalidInputError, match="loopback"):
        ReverseProxy("x", forged, audit, header="x-api-key", value_format="{value}", secret=KEY)
    assert UpstreamURL.parse("http://localhost:8080/v1").prefix == "/v1"
    assert UpstreamURL.parse("http://[::1]:8080").authority == "[::1]:8080"


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pw@api.example.com",
        "https://api.example.com/#frag",
        "https://api.example.com/?q=1",
        "ftp://api.example.com",
        "https://api.example.com/v1/../admin",
        "https://bad_host!/",
        "https://api.example.com:99999",
        "https://api.example.com/a b",
    ],
)
def test_bad_upstream_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInputError):
        UpstreamURL.parse(url)


def test_an_unreachable_upstream_is_a_502(sockdir: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with run_gateway(sockdir, (credential(sockdir, f"http://127.0.0.1:{port}"),)) as running:
        status, _, body = request(running.socket, "GET", "/x")
        [entry] = running.wait_audit(1)
    assert status == 502
    assert "connect" in error_message(body)
    assert (entry["status"], entry["decision"]) == (502, "allow")


# --- refusals ------------------------------------------------------------------------------


def _refused(running: Running, data: bytes, status: int) -> str:
    answer = raw_exchange(running.socket, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    [entry] = running.wait_audit(1)
    assert (entry["status"], entry["decision"]) == (status, "deny")
    return error_message(body)


def test_a_body_over_the_limit_is_a_413_before_the_upstream_is_called(
    sockdir: Path, upstream: Upstream
) -> None:
    limits = Limits(max_body_bytes=1000)
    with run_gateway(sockdir, (credential(sockdir, upstream.url),), limits=limits) as running:
        data = b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n" + b"a" * 1001
        assert "1000 bytes" in _refused(running, data, 413)
    assert upstream.seen == []


def test_a_chunked_body_over_the_limit_is_a_413(sockdir: Path, upstream: Upstream) -> None:
    limits = Limits(max_body_bytes=1000)
    with run_gateway(sockdir, (credential(sockdir, upstream.url),), limits=limits) as running:
        data = b"POST /v1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        data += b"200\r\n" + b"a" * 512 + b"\r\n"
        data += b"200\r\n" + b"a" * 512 + b"\r\n0\r\n\r\n"
        assert "1000 bytes" in _refused(running, data, 413)
        # Under the limit, chunked passes (re-chunked toward the upstream).
        status, _, body = request(running.socket, "POST", "/v1", iter([b"a" * 600]))
    assert status == 200
    assert json.loads(body)["length"] == 600


def test_a_head_over_64k_is_a_431(broker: Running) -> None:
    data = b"GET /v1 HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * (64 << 10) + b"\r\n\r\n"
    assert "head" in _refused(broker, data, 431)


def test_many_small_headers_over_64k_are_a_431(broker: Running) -> None:
    line = b"X-Pad: " + b"a" * 200 + b"\r\n"
    data = b"GET /v1 HTTP/1.1\r\n" + line * 400 + b"\r\n"
    _refused(broker, data, 431)


def test_an_absolute_form_target_is_refused(broker: Running, upstream: Upstream) -> None:
    data = b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    assert "origin-form" in _refused(broker, data, 400)
    assert upstream.seen == []


def test_connect_is_refused(broker: Running) -> None:
    data = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
    assert "CONNECT" in _refused(broker, data, 405)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /v1/../../admin HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/%2e%2e/admin HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1 HTTP/2.0\r\n\r\n", 505),
        (b"GET /v1\r\n\r\n", 400),
        (b"GET /v1 HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /v1 HTTP/1.1\r\n folded: x\r\n\r\n", 400),
        (b"GET /v1 HTTP/1.1\r\nX: a\x01b\r\n\r\n", 400),
        (b"POST /v1 HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"POST /v1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
        (b"POST /v1 HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400),
        (b"POST /v1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ],
)
def test_malformed_requests_are_refused(
    broker: Running, upstream: Upstream, data: bytes, status: int
) -> None:
    _refused(broker, data, status)
    assert upstream.seen == []


def test_the_concurrency_cap_answers_429(sockdir: Path, upstream: Upstream) -> None:
    limits = Limits(max_concurrent=1)
    with run_gateway(sockdir, (credential(sockdir, upstream.url),), limits=limits) as running:
        (status, headers, body), results = request_while_one_waits(running.socket, upstream, "/v1")
    assert status == 429
    assert headers["retry-after"] == "1"
    assert "in flight" in error_message(body)
    assert results == [200]


def test_the_rate_cap_answers_429_with_retry_after(sockdir: Path, upstream: Upstream) -> None:
    limits = Limits(rate_per_minute=2)
    with run_gateway(sockdir, (credential(sockdir, upstream.url),), limits=limits) as running:
        statuses: list[int] = []
        for count in (1, 2):  # each audited (after its answer) before the next is sent
            statuses.append(request(running.socket, "GET", "/v1")[0])
            running.wait_audit(count)
        status, headers, body = request(running.socket, "GET", "/v1")
        entries = running.wait_audit(3)
    assert statuses == [200, 200]
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= 30
    assert "a minute" in error_message(body)
    assert [e["decision"] for e in entries] == ["allow", "allow", "deny"]
    assert len(upstream.seen) == 2


# --- streaming -----------------------------------------------------------------------------


def test_server_sent_events_reach_the_guest_one_by_one(broker: Running, upstream: Upstream) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(broker.socket))
        sock.sendall(b"POST /v1/sse HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        received = b""
        while b"data: one" not in received:
            chunk = sock.recv(4096)  # times out (fails) if the broker buffers the stream
            assert chunk
            received += chunk
        # The first event is here while the upstream has not sent the last one yet.
        assert not upstream.sse_last_sent.is_set()
        upstream.release.set()
        while not received.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(4096)
            assert chunk
            received += chunk
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert b"content-type: text/event-stream" in head
    assert b"transfer-encoding: chunked" in head
    assert received.index(b"data: one") < received.index(b"data: three")


def test_a_megabyte_response_passes_intact(broker: Running) -> None:
    status, headers, body = request(broker.socket, "GET", "/big")
    assert status == 200
    assert headers["content-length"] == str(len(MEGABYTE))
    assert body == MEGABYTE
    [entry] = broker.wait_audit(1)
    assert entry["bytesOut"] == len(MEGABYTE)


def test_a_close_delimited_response_is_rechunked_and_keeps_the_connection(
    broker: Running,
) -> None:
    conn = GuestConnection(broker.socket)
    try:
        conn.request("GET", "/bigclose")
        response = conn.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert response.read() == MEGABYTE
        conn.request("POST", "/v1/echo", body=MEGABYTE)  # same connection, kept alive
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert answer["sha256"] == hashlib.sha256(MEGABYTE).hexdigest()
    assert [e["status"] for e in broker.wait_audit(2)] == [200, 200]


def test_an_http10_guest_gets_a_close_delimited_body(broker: Running) -> None:
    answer = raw_exchange(broker.socket, b"GET /bigclose HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in head.lower()
    assert body == MEGABYTE


def test_expect_100_continue_is_answered_by_the_broker(broker: Running, upstream: Upstream) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(broker.socket))
        sock.sendall(
            b"POST /v1 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        answer = b""
        while not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
    assert upstream.seen[0].header("Expect") == []
    assert upstream.seen[0].body == b"hello"


def test_the_audit_log_is_bounded_per_field(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.write({"path": "/" + "a" * 5000})
    [entry] = audit_entries(tmp_path / "a.jsonl")
    assert len(entry["path"]) < 600


def test_an_upstream_whose_lookup_hangs_is_a_504_within_the_connect_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream's name lookup is bounded like its connect: no guest request waits on the
    system resolver's retries."""
    release = threading.Event()

    def hung(*args: object, **kwargs: object) -> object:
        release.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    audit = AuditLog(tmp_path / "audit.jsonl")
    proxy = ReverseProxy(
        "x", "https://api.example.test", audit, header="x-api-key", value_format="{value}",
        secret=KEY, connect_timeout=0.3,
    )  # fmt: skip
    guest, served = socket.socketpair()
    worker = threading.Thread(target=proxy.handle, args=(served,), daemon=True)
    try:
        began = time.monotonic()
        worker.start()
        guest.sendall(b"GET /x HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n")
        guest.settimeout(30)
        answer = b""
        while chunk := guest.recv(65536):
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 504 "), answer[:200]
        assert "looking up the upstream host" in error_message(body)
        assert time.monotonic() - began < 30  # the bound, not the resolver's 60 s
    finally:
        release.set()
        guest.close()
        worker.join(10)
