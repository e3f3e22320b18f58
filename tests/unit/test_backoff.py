"""The back-off shared by registry traffic and guest-kit downloads: the pause before a retry and
the reading of an untrusted Retry-After header (bounded, never an exception). How each caller
uses it: tests/unit/oci/test_registry_retry.py, tests/unit/runtime/test_kit_retry.py."""

from __future__ import annotations

import email.utils
import math
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microagent.backoff import (
    MAX_RETRY_AFTER,
    MAX_RETRY_AFTER_CHARS,
    next_pause,
    parse_retry_after,
    retry_note,
)

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda _a, b: b)


def at(seconds_from_now: float) -> str:
    return email.utils.formatdate(NOW + seconds_from_now, usegmt=True)


# -- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("5", 5.0), (" 120 ", 120.0), ("\t7\r\n", 7.0), ("0", 0.0), ("0.25", 0.25),
     ("000012", 12.0), ("1.000001", 1.000001), ("999999999", 999999999.0)],
)  # fmt: skip
def test_delta_seconds_with_fractions(header: str, seconds: float) -> None:
    assert parse_retry_after(header) == seconds


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", "-1", "-0.5", "+5", "1e3", "1E3", "nan", "NaN", "inf", "-inf", "Infinity",
     "0x10", "1_000", "1.", ".5", "1..2", "5 s", "5,6", "soon", "\u0663", "\u00b2", "5\x00",
     "Wed, 32 Oct 2015 07:28:00 GMT", "Wed, 21 Oct 99999 07:28:00 GMT",
     "Wed, 21 Oct 2015 07:28:00 +9999", "Wed, 21 Oct 2015 25:61:00 GMT", "a b c d e"],
)  # fmt: skip
def test_junk_and_negative_values_are_none(header: str | None) -> None:
    assert parse_retry_after(header, now=NOW) is None


def test_huge_numbers_are_bounded() -> None:
    assert parse_retry_after("1000000000") == MAX_RETRY_AFTER
    assert parse_retry_after("9" * MAX_RETRY_AFTER_CHARS) == MAX_RETRY_AFTER
    assert parse_retry_after("1" * 30 + "." + "5" * 30) == MAX_RETRY_AFTER


def test_very_long_values_are_not_parsed() -> None:
    assert parse_retry_after("9" * (MAX_RETRY_AFTER_CHARS + 1)) is None
    assert parse_retry_after("1" * 1_000_000) is None
    assert parse_retry_after(at(30) + " " * 10 + "x" * 100) is None
    assert parse_retry_after(" " * 1000 + "5" + " " * 1000) == 5.0  # white space is no length


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(at(30), 30.0), (at(0), 0.0), (at(-30), 0.0), (at(-40 * 365 * 86400), 0.0),
     ("Tue, 14 Nov 2023 23:13:20 +0100", 0.0), ("Tue, 14 Nov 2023 22:13:50 -0000", 30.0),
     ("Tuesday, 14-Nov-23 22:14:20 GMT", 60.0), ("Tue Nov 14 22:15:20 2023", 120.0),
     ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER),
     ("Fri, 31 Dec 9999 23:59:59 -2359", MAX_RETRY_AFTER)],
)  # fmt: skip
def test_http_dates_count_from_now_and_are_bounded(header: str, seconds: float) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


def test_a_date_counts_from_the_clock_by_default() -> None:
    got = parse_retry_after(email.utils.formatdate(time.time() + 30, usegmt=True))
    assert got is not None and 28 <= got <= 30


@given(st.one_of(st.text(max_size=200), st.from_regex(r"\s*[0-9.eE+-]{1,80}\s*")))
def test_any_text_is_none_or_a_bounded_number(header: str) -> None:
    got = parse_retry_after(header, now=NOW)
    assert got is None or (math.isfinite(got) and 0.0 <= got <= MAX_RETRY_AFTER)


# -- the pause -------------------------------------------------------------------------------


def test_pauses_double_up_to_the_cap_and_stop_after_the_attempts(no_jitter: None) -> None:
    pauses = [next_pause(n, attempts=6, backoff=0.5, max_pause=3.0) for n in range(1, 8)]
    assert pauses == [0.5, 1.0, 2.0, 3.0, 3.0, None, None]


def test_pauses_are_jittered_down_to_half() -> None:
    pauses = {next_pause(2, attempts=4, backoff=1.0, max_pause=10.0) for _ in range(200)}
    assert all(p is not None and 1.0 <= p <= 2.0 for p in pauses) and len(pauses) > 100


def test_a_retry_after_within_the_cap_is_waited_for_as_asked(no_jitter: None) -> None:
    def pause(after: float) -> float | None:
        return next_pause(1, attempts=4, backoff=0.5, max_pause=10.0, retry_after=after)

    assert pause(7.0) == 7.0
    assert pause(10.0) == 10.0
    assert pause(0.0) == 0.0
    assert pause(-5.0) == 0.0  # (the parser never gives one; no negative sleep regardless)
    assert pause(10.5) is None  # longer than we wait: give up at once
    assert pause(MAX_RETRY_AFTER) is None
    assert pause(math.inf) is None
    assert pause(math.nan) is None


def test_the_last_try_gives_up_even_when_asked_to_wait() -> None:
    assert next_pause(4, attempts=4, backoff=0.5, max_pause=10.0, retry_after=1.0) is None
    assert next_pause(1, attempts=1, backoff=0.5, max_pause=10.0) is None


def test_many_tries_do_not_overflow(no_jitter: None) -> None:
    assert next_pause(10_000, attempts=10**6, backoff=0.5, max_pause=8.0) == 8.0


def test_the_retry_note() -> None:
    assert retry_note(1.234, 1, 4) == "retrying in 1.2 s (attempt 2/4)"
    assert retry_note(0.0, 2, 4, verb="resuming") == "resuming in 0 s (attempt 3/4)"
