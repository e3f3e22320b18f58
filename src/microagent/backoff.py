"""Back-off for network retries, shared by registry traffic (:mod:`microagent.oci`) and guest-kit
downloads (:mod:`microagent.kit`): which HTTP answers are worth another try, how long to pause
before it, and what a server's ``Retry-After`` header asks for.

Each caller keeps its own settings (attempts, first pause, longest pause), decides which
failures of its transport are transient, and words its own messages; only the arithmetic and
the header parsing live here. A ``Retry-After`` is untrusted input: it is bounded before it is
parsed and its value is bounded after (:data:`MAX_RETRY_AFTER`).
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from datetime import UTC

# HTTP answers worth another try: too many requests, and the server's own temporary failures.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 1e9  # seconds (~31 years): any longer wait reads as this (far past any cap)
MAX_RETRY_AFTER_CHARS = 64  # an HTTP date is 29 characters; anything longer is junk
MAX_DOUBLINGS = 64  # the back-off stops doubling here (no float overflow, whatever the tries)
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds from ``now`` (a Unix time; the clock by default):
    delta-seconds (fractions allowed) or an HTTP date (one in the past is 0). At most
    :data:`MAX_RETRY_AFTER`. None when absent, negative or unreadable (NaN, inf, exponents,
    garbage, longer than :data:`MAX_RETRY_AFTER_CHARS`): the usual back-off applies then."""
    value = (value or "").strip()
    if not value or len(value) > MAX_RETRY_AFTER_CHARS:
        return None
    if _DELTA_SECONDS.fullmatch(value):
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone at all: HTTP dates are in UTC
        when = when.replace(tzinfo=UTC)
    seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def next_pause(
    tries: int,
    *,
    attempts: int,
    backoff: float,
    max_pause: float,
    retry_after: float | None = None,
) -> float | None:
    """Seconds to wait after ``tries`` failed tries (of ``attempts`` in all, the first
    included) before the next one; None: give up.

    Without a ``retry_after``: ``backoff`` doubling after each try, at most ``max_pause``,
    jittered down to half. A ``retry_after`` of at most ``max_pause`` is waited for as asked
    (a negative one as 0); a longer one (or NaN) gives up at once."""
    if tries >= attempts:
        return None
    if retry_after is not None:
        if not retry_after <= max_pause:  # (NaN compares false)
            return None
        return max(retry_after, 0.0)
    doubled = backoff * 2.0 ** min(tries - 1, MAX_DOUBLINGS)
    return min(doubled, max_pause) * random.uniform(0.5, 1.0)


def retry_note(pause: float, tries: int, attempts: int, *, verb: str = "retrying") -> str:
    """The end of a retry line: ``retrying in 1.2 s (attempt 2/4)`` (``tries``: those that
    failed so far)."""
    return f"{verb} in {pause:.2g} s (attempt {tries + 1}/{attempts})"
