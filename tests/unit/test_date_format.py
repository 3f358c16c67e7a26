"""log_date_format: PM2's day.js tokens and strftime, and the per-second stamp cache."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from pmx.supervisor.date_format import compile_date_format, format_time

# Tuesday 14 November 2023, 22:13:20.123 UTC
NOW = 1_700_000_000.123


@pytest.fixture
def tz(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC for the test (a POSIX TZ string: no tzdata needed)."""
    monkeypatch.setenv("TZ", "UTC0")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def set_tz(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TZ", value)
    time.tzset()


@pytest.mark.parametrize(("fmt", "expected"), [
    ("YYYY-MM-DD HH:mm:ss Z", "2023-11-14 22:13:20 +00:00"),
    ("YYYY-MM-DDTHH:mm:ss", "2023-11-14T22:13:20"),  # PM2's `time: true`
    ("YY M D H m s", "23 11 14 22 13 20"),
    ("hh:mm A", "10:13 PM"),
    ("h a", "10 pm"),
    ("HH:mm:ss.SSS", "22:13:20.123"),
    ("ZZ", "+0000"),
    ("X", "1700000000"),
    ("x", "1700000000123"),
    ("MMM MMMM", "Nov November"),
    ("d dd ddd dddd", "2 Tu Tue Tuesday"),
    ("[YYYY at] HH [h]", "YYYY at 22 h"),
    ("DD/MM/YYYY [-] HH:mm", "14/11/2023 - 22:13"),
    ("[no tokens] -- / :", "no tokens -- / :"),
    ("at h", "pmt 10"),  # as in day.js: letters that are tokens are tokens
    ("%Y-%m-%d %H:%M:%S", "2023-11-14 22:13:20"),  # strftime keeps working
    ("%d/%m [YYYY]", "14/11 [YYYY]"),  # a "%" means strftime: no day.js at all
])
def test_tokens(tz: None, fmt: str, expected: str) -> None:
    assert format_time(fmt, NOW) == expected
    assert compile_date_format(fmt, clock=lambda: NOW)() == expected.encode()


def test_single_digit_fields_and_midnight(tz: None) -> None:
    early = 1_672_887_845.0  # Thursday 5 January 2023, 03:04:05 UTC
    assert format_time("M/D H:m:s hh h A", early) == "1/5 3:4:5 03 3 AM"
    midnight = 1_672_876_800.0  # 2023-01-05 00:00:00
    assert format_time("h hh A a", midnight) == "12 12 AM am"
    noon = midnight + 12 * 3600
    assert format_time("h A", noon) == "12 PM"


def test_offsets_are_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        set_tz(monkeypatch, "CET-1")
        assert format_time("YYYY-MM-DD HH:mm Z ZZ", NOW) == "2023-11-14 23:13 +01:00 +0100"
        set_tz(monkeypatch, "EST5")
        assert format_time("HH:mm Z ZZ", NOW) == "17:13 -05:00 -0500"
        set_tz(monkeypatch, "IST-5:30")
        assert format_time("Z", NOW) == "+05:30"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_stamp_is_cached_per_second(tz: None) -> None:
    clock = [NOW]
    stamp = compile_date_format("HH:mm:ss", clock=lambda: clock[0])
    first = stamp()
    clock[0] = NOW + 0.5  # same second: the very same bytes, nothing formatted again
    assert stamp() is first
    clock[0] = NOW + 1
    assert stamp() == b"22:13:21"


def test_subsecond_formats_are_not_cached(tz: None) -> None:
    clock = [NOW]
    stamp = compile_date_format("ss.SSS", clock=lambda: clock[0])
    assert stamp() == b"20.123"
    clock[0] = NOW + 0.2
    assert stamp() == b"20.323"


def test_strftime_stamp_is_cached_too(tz: None) -> None:
    clock = [NOW]
    stamp = compile_date_format("%H:%M:%S", clock=lambda: clock[0])
    first = stamp()
    assert first == b"22:13:20"
    clock[0] = NOW + 0.7
    assert stamp() is first


def test_non_ascii_literals_are_utf8(tz: None) -> None:
    assert compile_date_format("[à] HH[h]", clock=lambda: NOW)() == "à 22h".encode()
