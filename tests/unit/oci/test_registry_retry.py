"""The registry client's fault handling without a network: which faults are transient, how long
it waits, how a broken blob download resumes, and the checks on small documents.
(Against a real registry behind a fault-injecting proxy: tests/integration/test_registry_faults.)"""

from __future__ import annotations

import random
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import urllib3.exceptions as u3

from microagent.digests import sha256_digest
from microagent.errors import IntegrityError, RegistryError
from microagent.oci import _retry
from microagent.oci._retry import (
    ResumingStream,
    RetryPolicy,
    Transient,
    Watch,
    is_transient,
    retrying,
    short,
    status_failure,
)
from microagent.oci.endpoints import Endpoint
from microagent.oci.registry import _bearer_challenge, _token_of, _verified, read_capped

NO_JITTER = 1.0


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda _a, b: b * NO_JITTER)


# -- the policy --------------------------------------------------------------------------------


def test_pauses_double_up_to_the_cap_and_stop_after_the_attempts(no_jitter: None) -> None:
    policy = RetryPolicy(attempts=6, backoff=0.5, max_pause=3.0, deadline=100.0)
    assert [policy.pause(n, 0.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, None]


def test_pauses_are_jittered_down_to_half() -> None:
    policy = RetryPolicy(backoff=1.0)
    pauses = {policy.pause(1, 0.0) for _ in range(200)}
    assert all(p is not None and 0.5 <= p <= 1.0 for p in pauses) and len(pauses) > 100


def test_retry_after_is_taken_as_is_within_the_cap(no_jitter: None) -> None:
    policy = RetryPolicy(backoff=0.5, max_pause=10.0)
    assert policy.pause(1, 0.0, retry_after=7.0) == 7.0
    assert policy.pause(1, 0.0, retry_after=0.0) == 0.0
    assert policy.pause(1, 0.0, retry_after=10.5) is None  # longer than we wait: give up


def test_no_try_starts_after_the_deadline(no_jitter: None) -> None:
    policy = RetryPolicy(backoff=1.0, deadline=5.0)
    assert policy.pause(1, 4.0) == 1.0
    assert policy.pause(1, 4.5) is None
    assert policy.pause(1, 0.0, retry_after=6.0) is None


@pytest.mark.parametrize(
    ("status", "header", "after"),
    [(503, "0.25", 0.25), (429, "3600", 3600.0), (502, None, None), (500, "soon", None),
     (504, "1" * 400, None)],
)  # fmt: skip
def test_a_transient_status_carries_its_retry_after(
    status: int, header: str | None, after: float | None
) -> None:
    """(How the header is read: tests/unit/test_backoff.py.)"""
    headers = {} if header is None else {"Retry-After": header}
    response = SimpleNamespace(status_code=status, reason="Nope", headers=headers)
    failure = status_failure(response, "GET /v2/x")
    assert failure is not None and failure.retry_after == after
    assert failure.message == f"GET /v2/x: HTTP {status} Nope"


def test_other_statuses_are_not_transient() -> None:
    for status in (200, 401, 404, 416):
        response = SimpleNamespace(status_code=status, reason="", headers={"Retry-After": "1"})
        assert status_failure(response, "GET /v2/x") is None


def test_retrying_pauses_between_tries_and_gives_up_with_a_count(no_jitter: None) -> None:
    sleeps: list[float] = []
    answers: Iterator[str | Transient] = iter(
        [Transient("x: HTTP 503"), Transient("x: HTTP 503", 0.2), "done"]
    )

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Transient):
            raise answer
        return answer

    assert retrying(flaky, RetryPolicy(backoff=0.1), sleeps.append) == "done"
    assert sleeps == [0.1, 0.2]

    def broken() -> str:
        raise Transient("GET /v2/x: HTTP 502 Bad Gateway")

    with pytest.raises(RegistryError, match=r"HTTP 502 Bad Gateway \(gave up after 3 tries\)"):
        retrying(broken, RetryPolicy(attempts=3, backoff=0.1), sleeps.append)
    assert len(sleeps) == 4


def test_retrying_does_not_retry_other_errors() -> None:
    calls: list[int] = []

    def denied() -> None:
        calls.append(1)
        raise RegistryError("access denied")

    with pytest.raises(RegistryError, match="access denied"):
        retrying(denied, RetryPolicy(), lambda _s: None)
    assert calls == [1]


def test_a_single_try_says_no_count_and_a_long_retry_after_says_so() -> None:
    policy = RetryPolicy(max_pause=10.0)
    assert Transient("x").final(1, policy).message == "x"
    error = Transient("x: HTTP 429", retry_after=3600.0).final(1, policy)
    assert error.message == "x: HTTP 429; the registry asks to retry after 3600 s"
    assert "at most 10 s" in error.hint


# -- which faults are transient ------------------------------------------------------------------


def _refused() -> requests.ConnectionError:
    reason = u3.NewConnectionError(None, "Failed to establish a new connection: Connection refused")  # type: ignore[arg-type]
    return requests.ConnectionError(u3.MaxRetryError(None, "/v2/", reason))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (requests.ConnectionError(u3.ProtocolError("Connection aborted.", ConnectionResetError())),
         True),
        (requests.ReadTimeout("Read timed out."), True),
        (requests.exceptions.ChunkedEncodingError("Connection broken"), True),
        (u3.ProtocolError("Connection broken: IncompleteRead"), True),
        (u3.IncompleteRead(5, 10), True),
        (u3.ReadTimeoutError(None, "/v2/", "Read timed out."), True),  # type: ignore[arg-type]
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (_refused(), False),
        (requests.ConnectTimeout("connect timed out"), False),
        (requests.exceptions.SSLError("certificate verify failed"), False),
        (u3.DecodeError("bad gzip"), False),
        (ValueError("not a transport error"), False),
        (requests.exceptions.InvalidURL("no host"), False),  # RequestException is an OSError
        (requests.TooManyRedirects("30 redirects"), False),
        (requests.exceptions.ContentDecodingError("bad gzip"), False),
    ],
)  # fmt: skip
def test_what_is_worth_another_try(exc: Exception, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_transport_errors_in_a_few_words() -> None:
    reset = u3.ProtocolError(
        "Connection broken: ConnectionResetError(104, 'Connection reset by peer')"
    )
    assert short(reset) == "connection reset by peer"
    early = u3.ProtocolError(
        "Connection broken: IncompleteRead(5000 bytes read, 95000 more expected)"
    )
    assert short(early) == "the connection closed 95000 bytes early"
    assert short(_refused()) == "connection refused"
    assert short(ConnectionError()) == "ConnectionError"
    assert len(short(OSError("x" * 500 + "\nmore"))) == 160


# -- a blob download that breaks -----------------------------------------------------------------


class FakeRaw:
    """A urllib3 response body: ``chunks`` in turn, then ``then`` raised (or the end)."""

    def __init__(self, chunks: list[bytes], then: BaseException | None = None) -> None:
        self.chunks = list(chunks)
        self.then = then

    def read1(self, size: int, decode_content: bool = False) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)[:size]
        if self.then is not None:
            raise self.then
        return b""


class FakeResponse:
    def __init__(self, raw: FakeRaw) -> None:
        self.raw = raw
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Registry:
    """Answers each reopen with the next of ``answers``: (chunks, then, bytes to skip),
    None for "nothing follows" (416), or an exception to raise."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.offsets: list[int] = []

    def __call__(self, offset: int) -> tuple[Any, int]:
        self.offsets.append(offset)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        if answer is None:
            return None, 0
        chunks, then, skip = answer
        return FakeResponse(FakeRaw(chunks, then)), skip


RESET = u3.ProtocolError("Connection broken: ConnectionResetError(104, 'Connection reset by peer')")
FAST = RetryPolicy(attempts=3, backoff=0.01, read_timeout=60.0, min_rate=0)


def _stream(first: FakeResponse, registry: Registry, sleeps: list[float]) -> ResumingStream:
    return ResumingStream(first, registry, FAST, sleeps.append, "blob sha256:abc")


def test_a_reset_resumes_at_the_offset_reached() -> None:
    registry = Registry([([b"defg", b"hij"], None, 0)])
    sleeps: list[float] = []
    first = FakeResponse(FakeRaw([b"abc"], RESET))
    stream = _stream(first, registry, sleeps)
    assert stream.read() == b"abcdefghij"
    assert registry.offsets == [3] and len(sleeps) == 1 and first.closed


def test_a_restart_from_zero_drops_what_was_read_already() -> None:
    registry = Registry([([b"ab", b"cdefg", b"hij"], None, 5)])
    stream = _stream(FakeResponse(FakeRaw([b"abcde"], RESET)), registry, [])
    assert stream.read() == b"abcdefghij"


def test_nothing_after_the_offset_ends_the_stream() -> None:
    registry = Registry([None])
    stream = _stream(FakeResponse(FakeRaw([b"abc"], u3.IncompleteRead(3, 100))), registry, [])
    assert stream.read() == b"abc"
    assert stream.read(10) == b"" and registry.offsets == [3]


def test_too_many_breaks_in_a_row_is_a_registry_error() -> None:
    registry = Registry([([b"d"], RESET, 0), ([], RESET, 0)])
    stream = _stream(FakeResponse(FakeRaw([b"abc"], RESET)), registry, [])
    with pytest.raises(RegistryError) as caught:
        stream.read()
    assert caught.value.message == (
        "blob sha256:abc: the download broke at byte 4: connection reset by peer "
        "(gave up after 3 tries)"
    )
    assert caught.value.hint and registry.offsets == [3, 4]


def test_progress_after_a_break_starts_the_count_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_retry, "RECOVERED", 2)
    answers = [([b"de"], RESET, 0), ([b"fg"], RESET, 0), ([b"hi"], RESET, 0), ([b"j"], None, 0)]
    registry = Registry(answers)
    stream = _stream(FakeResponse(FakeRaw([b"abc"], RESET)), registry, [])
    assert stream.read() == b"abcdefghij"  # four breaks, but never two without progress


def test_a_failed_reopen_counts_as_a_break_and_other_errors_pass() -> None:
    registry = Registry([Transient("GET: HTTP 503"), ([b"def"], None, 0)])
    assert _stream(FakeResponse(FakeRaw([b"abc"], RESET)), registry, []).read() == b"abcdef"

    gone = Registry([RegistryError("blob: not found")])
    with pytest.raises(RegistryError, match="not found"):
        _stream(FakeResponse(FakeRaw([b"abc"], RESET)), gone, []).read()
    bad = FakeResponse(FakeRaw([b"abc"], u3.DecodeError("bad")))
    with pytest.raises(RegistryError, match="broke at byte 3: bad"):
        _stream(bad, Registry([]), []).read()


def test_a_trickle_is_a_stall() -> None:
    ticks = iter(float(n) for n in range(100))
    policy = RetryPolicy(read_timeout=3.0, min_rate=11)
    watch = Watch(policy, clock=lambda: next(ticks))  # each read waits 1 s
    raw = FakeRaw([b"x" * 10] * 10)
    assert watch.read(raw, 100, False, "blob") == b"x" * 10
    assert watch.read(raw, 100, False, "blob") == b"x" * 10
    with pytest.raises(Transient, match=r"blob: stalled \(30 bytes in 3.0 s\)"):
        watch.read(raw, 100, False, "blob")  # 30 bytes in 3 s < 11 bytes/s
    assert watch.read(raw, 100, False, "blob") == b"x" * 10  # a new window

    ticks = iter(float(n) for n in range(100))
    fast = Watch(policy, clock=lambda: next(ticks))
    for _ in range(9):
        fast.read(FakeRaw([b"x" * 11]), 100, False, "blob")  # 11 bytes/s: not a stall


# -- small documents -------------------------------------------------------------------------


class Small:
    def __init__(self, body: bytes, length: str | None = None) -> None:
        self.raw = FakeRaw([body[i : i + 4] for i in range(0, len(body), 4)])
        self.headers = {"Content-Length": length} if length is not None else {}


def test_read_capped_refuses_what_is_too_large_announced_or_not() -> None:
    watch = Watch(RetryPolicy())
    assert read_capped(Small(b"0123456789"), 10, "manifest", watch) == b"0123456789"
    with pytest.raises(IntegrityError, match=r"larger than 9 bytes \(10 bytes announced\)"):
        read_capped(Small(b"0123456789", "10"), 9, "manifest", watch)
    with pytest.raises(IntegrityError, match=r"manifest is larger than 9 bytes$"):
        read_capped(Small(b"0123456789", "3"), 9, "manifest", watch)


def test_read_capped_translates_a_broken_transfer() -> None:
    small = Small(b"")
    small.raw = FakeRaw([b"{"], RESET)
    with pytest.raises(Transient, match="reading manifest: connection reset by peer"):
        read_capped(small, 100, "manifest", Watch(RetryPolicy()))


WHERE = Endpoint("registry.example", "https")
DOC = b'{"schemaVersion":2}'
DIGEST = sha256_digest(DOC)
OTHER = sha256_digest(b"other")


def test_a_manifest_is_checked_against_the_reference_then_the_header() -> None:
    fetched = _verified(DOC, DIGEST, {"Content-Type": "a/b; x=y"}, WHERE)
    assert (fetched.digest, fetched.media_type) == (DIGEST, "a/b")
    assert _verified(DOC, "latest", {"Docker-Content-Digest": DIGEST}, WHERE).digest == DIGEST
    with pytest.raises(IntegrityError, match=f"does not match {OTHER}"):
        _verified(DOC, OTHER, {}, WHERE)  # no header to fall back on: the reference decides
    with pytest.raises(IntegrityError, match=f"does not match {OTHER}"):
        _verified(DOC, OTHER, {"Docker-Content-Digest": OTHER}, WHERE)  # agreeing liars
    with pytest.raises(IntegrityError, match=f"header says {OTHER}"):
        _verified(DOC, "latest", {"Docker-Content-Digest": OTHER}, WHERE)


def test_bearer_challenges_and_token_answers() -> None:
    header = 'Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"'
    assert _bearer_challenge(header) == {
        "realm": "https://auth.example/token", "service": "reg", "scope": "repository:a:pull",
    }  # fmt: skip
    assert _bearer_challenge('Basic realm="x"') == {}
    assert _token_of(b'{"token": "t1"}') == "t1"
    assert _token_of(b'{"access_token": "t2"}') == "t2"
    assert _token_of(b'{"token": ""}') is None
    assert _token_of(b'{"token": 5}') is None
    assert _token_of(b"[1]") is None
    assert _token_of(b"not json") is None


def test_a_manifest_asked_for_by_another_kind_of_digest_is_refused() -> None:
    sha512 = "sha512:" + "0" * 128  # we cannot check it, so we do not take it unchecked
    with pytest.raises(IntegrityError, match="does not match sha512:"):
        _verified(DOC, sha512, {}, WHERE)
