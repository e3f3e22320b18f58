"""Riding out a flaky registry: which faults are transient, how long to wait, and a blob
stream that resumes where it broke.

Transient: 429 and 5xx answers, a connection reset or closed early (before or in the middle
of a body), a read that stalls (no byte for ``read_timeout``) or trickles (slower than
``min_rate`` while waiting on the network). Not transient: a refused connection, a name that
does not resolve, a connect timeout, TLS errors, any other HTTP status, wrong content. Every
transport failure leaves here as :class:`~microagent.errors.RegistryError`; nothing from
requests or urllib3 escapes.

Every retry is told to a ``notify`` callback first (the CLI prints it on stderr), one line
such as ``registry 127.0.0.1:5000: HTTP 503 Service Unavailable; retrying in 1.2 s (attempt
2/4)``. The numbers come from the user's settings (:meth:`RetryPolicy.of`).
"""

from __future__ import annotations

import http.client
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from microagent import settings as defaults
from microagent.backoff import RETRY_STATUSES, next_pause, parse_retry_after, retry_note
from microagent.errors import RegistryError
from microagent.settings import Settings

BROKEN_HINT = (
    "the registry or the network kept failing; running the command again is safe "
    "(`microagent config show` lists the registry.* retry settings)"
)
RECOVERED = 1 << 20  # bytes read after a break that end a run of breaks (attempts count anew)
Sleep = Callable[[float], None]
Notify = Callable[[str], None]  # one line per retry, for the user
T = TypeVar("T")


def silent(_line: str) -> None:
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How registry traffic rides out transient faults; anything else fails at once."""

    # tries of one request (or breaks of one download), the first included
    attempts: int = defaults.REGISTRY_ATTEMPTS
    backoff: float = 0.5  # the first pause; it doubles after each try, jittered down to half
    max_pause: float = 10.0  # the longest pause; a longer Retry-After fails at once
    # no new try starts later than this after the first
    deadline: float = defaults.REGISTRY_DEADLINE
    connect_timeout: float = defaults.REGISTRY_CONNECT_TIMEOUT
    read_timeout: float = defaults.REGISTRY_READ_TIMEOUT  # this long without a byte is a stall
    min_rate: int = 1024  # bytes/s while waiting on the network; slower (a trickle) is a stall

    @classmethod
    def of(cls, settings: Settings) -> RetryPolicy:
        """The policy the user's settings ask for (``registry.*`` in the config file, or
        their environment variables)."""
        return cls(
            attempts=settings.registry_attempts,
            deadline=settings.registry_deadline,
            connect_timeout=settings.registry_connect_timeout,
            read_timeout=settings.registry_read_timeout,
        )

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)

    def pause(self, tries: int, elapsed: float, retry_after: float | None = None) -> float | None:
        """Seconds to wait after ``tries`` failed tries before the next one, ``elapsed``
        seconds after the first began; None: give up (see :func:`~microagent.backoff.next_pause`;
        and no try starts after the ``deadline``)."""
        wait = next_pause(
            tries,
            attempts=self.attempts,
            backoff=self.backoff,
            max_pause=self.max_pause,
            retry_after=retry_after,
        )
        return wait if wait is not None and elapsed + wait <= self.deadline else None


class Transient(Exception):
    """A failure worth another try; never leaves the oci package (see :meth:`final`)."""

    def __init__(self, message: str, retry_after: float | None = None, cause: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.cause = cause or message  # what went wrong in a few words, for the retry line

    def final(self, tries: int, policy: RetryPolicy, hint: str = BROKEN_HINT) -> RegistryError:
        """The error to report once no more tries are made."""
        if self.retry_after is not None and self.retry_after > policy.max_pause:
            return RegistryError(
                f"{self.message}; the registry asks to retry after {self.retry_after:g} s",
                hint=f"try again later (microagent waits at most {policy.max_pause:g} s)",
            )
        if tries > 1:
            tried = f" (gave up after {tries} tries)"
        else:
            tried = " (1 try allowed)" if policy.attempts == 1 else ""
        return RegistryError(f"{self.message}{tried}", hint=hint)


def retry_line(
    host: str, cause: str, pause: float, tries: int, policy: RetryPolicy, *, verb: str = "retrying"
) -> str:
    """What the user sees before a retry: ``registry HOST: CAUSE; retrying in 1.2 s
    (attempt 2/4)`` (``tries``: those that failed so far)."""
    source = f"registry {host}" if host else "registry"
    return f"{source}: {cause}; {retry_note(pause, tries, policy.attempts, verb=verb)}"


def retrying(
    fn: Callable[[], T],
    policy: RetryPolicy,
    sleep: Sleep,
    *,
    notify: Notify = silent,
    host: str = "",
) -> T:
    """``fn()``, tried again after a pause while it raises :class:`Transient`; each retry is
    told to ``notify`` first (``host``: whom ``fn`` talks to)."""
    began = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            return fn()
        except Transient as exc:
            pause = policy.pause(tries, time.monotonic() - began, exc.retry_after)
            if pause is None:
                raise exc.final(tries, policy) from exc
            notify(retry_line(host, exc.cause, pause, tries, policy))
            sleep(pause)


def status_failure(response: Any, what: str) -> Transient | None:
    """A transient HTTP answer (429, 5xx) as :class:`Transient`, else None."""
    if response.status_code not in RETRY_STATUSES:
        return None
    status = f"HTTP {response.status_code} {response.reason}"
    return Transient(
        f"{what}: {status}", parse_retry_after(response.headers.get("Retry-After")), status
    )


def is_transient(exc: BaseException) -> bool:
    """Is this failure of the transport worth another try (see the module docstring)?"""
    # deferred: requests and urllib3 take ~0.1 s to import; only registry traffic needs them
    import requests
    import urllib3.exceptions as u3

    never = (
        requests.exceptions.ConnectTimeout,
        requests.exceptions.SSLError,
        u3.SSLError,
        u3.ConnectTimeoutError,  # also NewConnectionError: refused, unresolvable
        u3.DecodeError,
    )
    if isinstance(exc, never):
        return False
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)  # MaxRetryError -> what went wrong
        return not isinstance(reason, u3.ConnectTimeoutError | u3.SSLError)
    if isinstance(exc, requests.RequestException):  # (an OSError too: decide before that)
        read = (requests.exceptions.ReadTimeout, requests.exceptions.ChunkedEncodingError)
        return isinstance(exc, read)
    broken = (u3.ProtocolError, u3.ReadTimeoutError, http.client.HTTPException, OSError)
    return isinstance(exc, broken)  # a body cut short, reset, or stalled


def translate(exc: Exception, what: str) -> Transient | RegistryError:
    """A transport failure as :class:`Transient` or, when not worth a retry, RegistryError."""
    text = f"{what}: {short(exc)}"
    return Transient(text, cause=short(exc)) if is_transient(exc) else RegistryError(text)


def transport_errors() -> tuple[type[Exception], ...]:
    """What reading a body can raise besides our own errors."""
    # deferred: see is_transient
    import requests
    import urllib3.exceptions as u3

    return (requests.RequestException, u3.HTTPError, http.client.HTTPException, OSError)


def short(exc: BaseException) -> str:
    """A transport error in a few words (urllib3 nests its reasons in long reprs)."""
    text = str(exc)
    for marker in (
        "Connection refused",
        "Connection reset by peer",
        "Name or service not known",
        "timed out",
        "No route to host",
        "Temporary failure in name resolution",
        "Remote end closed connection without response",
    ):
        if marker in text:
            return marker.lower()
    found = re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", text)
    if found:
        return f"the connection closed {found[2]} bytes early"
    return (text.splitlines() or [type(exc).__name__])[0][:160]


class Watch:
    """Tells a stalled or trickling transfer: less than ``min_rate`` bytes per second spent
    waiting on the network, judged each time ``read_timeout`` seconds of waiting add up.
    (Time the reader spends elsewhere, e.g. writing to disk, does not count.)"""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.waited = 0.0
        self.got = 0

    def read(self, raw: Any, size: int, decode: bool, what: str) -> bytes:
        """Up to ``size`` bytes from a urllib3 response, as soon as some arrive."""
        began = self.clock()
        try:
            read1 = getattr(raw, "read1", None)  # urllib3 >= 2.1; read() waits for all
            data: bytes = (read1 or raw.read)(size, decode_content=decode)
        except transport_errors() as exc:
            raise translate(exc, what) from exc
        self.waited += self.clock() - began
        self.got += len(data)
        if data and self.waited >= self.policy.read_timeout:
            got, waited = self.got, self.waited
            self.waited, self.got = 0.0, 0  # a new window (and a fresh start after a break)
            if got < self.policy.min_rate * waited:
                stalled = f"stalled ({got} bytes in {waited:.1f} s)"
                raise Transient(f"{what}: {stalled}", cause=stalled)
        return data


class ResumingStream(io.RawIOBase):
    """A blob's raw body that survives transient breaks (a reset, an early close, a stall):
    ``reopen(offset)`` asks again for the rest and says how many bytes of its answer to
    drop (0 for a 206 answer to a Range request; ``offset`` when the registry sent it all),
    or gives no response when there is nothing after ``offset`` (416: the body was whole,
    its Content-Length was not). Too many breaks in a row (``attempts`` within ``deadline``,
    with less than :data:`RECOVERED` bytes between them), or any other failure, is a
    RegistryError. The reader verifies the digest of what it gets, as ever. Each resumption
    is told to ``notify`` first (``host``: where the blob comes from)."""

    def __init__(
        self,
        response: Any,
        reopen: Callable[[int], tuple[Any | None, int]],
        policy: RetryPolicy,
        sleep: Sleep,
        what: str,
        *,
        notify: Notify = silent,
        host: str = "",
    ) -> None:
        super().__init__()
        self.response: Any = response
        self.reopen, self.policy, self.sleep, self.what = reopen, policy, sleep, what
        self.notify, self.host = notify, host
        self.offset = 0  # bytes handed to the reader
        self.skip = 0  # bytes of a restarted answer still to drop
        self.breaks = 0  # in the current run
        self.run_began = 0.0  # when it began
        self.run_offset = 0  # where the last break was
        self.ended = False
        self.watch = Watch(policy)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        while True:
            try:
                data = self._read(size)
            except Transient as exc:
                self._drop()
                if self.breaks == 0:
                    self.run_began = time.monotonic()
                self.breaks += 1
                self.run_offset = self.offset
                elapsed = time.monotonic() - self.run_began
                pause = self.policy.pause(self.breaks, elapsed, exc.retry_after)
                if pause is None:
                    raise exc.final(self.breaks, self.policy) from exc
                cause = f"the download broke at byte {self.offset} ({exc.cause})"
                line = retry_line(
                    self.host, cause, pause, self.breaks, self.policy, verb="resuming"
                )
                self.notify(line)
                self.sleep(pause)
                continue
            if self.breaks and self.offset - self.run_offset >= RECOVERED:
                self.breaks = 0
            return data

    def _read(self, size: int) -> bytes:
        while True:
            if self.response is None:
                if self.ended:
                    return b""
                self.response, self.skip = self.reopen(self.offset)
                self.watch = Watch(self.policy)
                if self.response is None:
                    self.ended = True
                    return b""
            where = f"{self.what}: the download broke at byte {self.offset}"
            data = self.watch.read(self.response.raw, size, False, where)
            if self.skip and data:
                cut = min(self.skip, len(data))
                self.skip -= cut
                data = data[cut:]
                if not data:
                    continue
            self.offset += len(data)
            return data

    def _drop(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None

    def close(self) -> None:
        self._drop()
        super().close()
