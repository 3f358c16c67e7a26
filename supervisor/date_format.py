"""Timestamps for log lines: PM2's day.js formats and strftime formats.  Standard library only.

`log_date_format` comes from two worlds. PM2 files use day.js tokens
("YYYY-MM-DD HH:mm:ss Z"); people who know Python or C write strftime ("%Y-%m-%d %H:%M:%S").
A format containing "%" is strftime; anything else is read as day.js, so a PM2 format
is never printed literally.

    YYYY YY          year (2026, 26)           MMMM MMM MM M   month (November, Nov, 11, 11)
    DD D             day of the month          dddd ddd dd d   weekday (Monday, Mon, Mo, 1)
    HH H  hh h       hour, 24h and 12h         A a             AM/PM, am/pm
    mm m  ss s       minute, second            SSS             milliseconds
    Z ZZ             UTC offset (+01:00, +0100) X x            unix seconds, milliseconds
    [text]           text kept as it is (day.js escaping)

`compile_date_format` turns a format into a stamp function once; the log readers call it
per chunk of lines. Unless the format has a sub-second token (SSS, x), the stamp of the
current second is cached, so most calls cost one time.time() and an integer comparison.
Times are local, as PM2 writes them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

Stamp = Callable[[], bytes]
_Field = Callable[[time.struct_time, float], str]

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_WEEKDAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")

# Longest tokens first, as day.js matches them; "[...]" is literal text.
_TOKENS = re.compile(r"\[([^\]]*)]|YYYY|YY|M{1,4}|D{1,2}|d{1,4}|H{1,2}|h{1,2}|A|a|m{1,2}|s{1,2}"
                     r"|Z{1,2}|SSS|X|x")
_SUBSECOND = frozenset({"SSS", "x"})


def _offset(tm: time.struct_time, separator: str) -> str:
    minutes = (tm.tm_gmtoff or 0) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}{separator}{minutes:02d}"


def _hour12(tm: time.struct_time) -> int:
    return tm.tm_hour % 12 or 12


def _weekday(tm: time.struct_time) -> int:
    return (tm.tm_wday + 1) % 7  # day.js counts from Sunday = 0; struct_time from Monday = 0


FIELDS: dict[str, _Field] = {
    "YYYY": lambda tm, now: f"{tm.tm_year:04d}",
    "YY": lambda tm, now: f"{tm.tm_year % 100:02d}",
    "MMMM": lambda tm, now: _MONTHS[tm.tm_mon - 1],
    "MMM": lambda tm, now: _MONTHS[tm.tm_mon - 1][:3],
    "MM": lambda tm, now: f"{tm.tm_mon:02d}",
    "M": lambda tm, now: str(tm.tm_mon),
    "DD": lambda tm, now: f"{tm.tm_mday:02d}",
    "D": lambda tm, now: str(tm.tm_mday),
    "dddd": lambda tm, now: _WEEKDAYS[_weekday(tm)],
    "ddd": lambda tm, now: _WEEKDAYS[_weekday(tm)][:3],
    "dd": lambda tm, now: _WEEKDAYS[_weekday(tm)][:2],
    "d": lambda tm, now: str(_weekday(tm)),
    "HH": lambda tm, now: f"{tm.tm_hour:02d}",
    "H": lambda tm, now: str(tm.tm_hour),
    "hh": lambda tm, now: f"{_hour12(tm):02d}",
    "h": lambda tm, now: str(_hour12(tm)),
    "A": lambda tm, now: "PM" if tm.tm_hour >= 12 else "AM",
    "a": lambda tm, now: "pm" if tm.tm_hour >= 12 else "am",
    "mm": lambda tm, now: f"{tm.tm_min:02d}",
    "m": lambda tm, now: str(tm.tm_min),
    "ss": lambda tm, now: f"{tm.tm_sec:02d}",
    "s": lambda tm, now: str(tm.tm_sec),
    "SSS": lambda tm, now: f"{int(now * 1000) % 1000:03d}",
    "Z": lambda tm, now: _offset(tm, ":"),
    "ZZ": lambda tm, now: _offset(tm, ""),
    "X": lambda tm, now: str(int(now)),
    "x": lambda tm, now: str(int(now * 1000)),
}


def is_strftime(fmt: str) -> bool:
    return "%" in fmt


def compile_dayjs(fmt: str) -> tuple[list[str | _Field], bool]:
    """The format as literal strings and field functions, and whether it has a
    sub-second token. "MMMMM" is "MMMM" then "M", as in day.js."""
    parts: list[str | _Field] = []
    has_subsecond = False
    position = 0
    for match in _TOKENS.finditer(fmt):
        if match.start() > position:
            parts.append(fmt[position:match.start()])
        escaped = match.group(1)
        token = match.group(0)
        if escaped is not None:
            parts.append(escaped)
        else:
            parts.append(FIELDS[token])
            has_subsecond = has_subsecond or token in _SUBSECOND
        position = match.end()
    if position < len(fmt):
        parts.append(fmt[position:])
    # Adjacent literals joined once here, not on every line.
    merged: list[str | _Field] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    return merged, has_subsecond


def format_time(fmt: str, now: float) -> str:
    """`now` (seconds since the epoch) in local time, in a day.js or strftime format."""
    tm = time.localtime(now)
    if is_strftime(fmt):
        return time.strftime(fmt, tm)
    parts, _ = compile_dayjs(fmt)
    return "".join(part if isinstance(part, str) else part(tm, now) for part in parts)


class _Stamper:
    """The current time rendered by `render`, re-rendered only when the second changes
    (unless `per_call`: a format with milliseconds)."""

    __slots__ = ("_clock", "_per_call", "_render", "_second", "_stamp")

    def __init__(self, render: Callable[[float], str], clock: Callable[[], float],
                 per_call: bool) -> None:
        self._render, self._clock, self._per_call = render, clock, per_call
        self._second = -1
        self._stamp = b""

    def __call__(self) -> bytes:
        now = self._clock()
        if self._per_call:
            return self._render(now).encode()
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, self._render(second).encode()
        return self._stamp


def compile_date_format(fmt: str, clock: Callable[[], float] = time.time) -> Stamp:
    """A function giving the current time in `fmt` as UTF-8 bytes, cached per second
    when the format has no sub-second token."""
    if is_strftime(fmt):
        return _Stamper(lambda now: time.strftime(fmt, time.localtime(now)), clock, False)
    parts, has_subsecond = compile_dayjs(fmt)

    def render(now: float) -> str:
        tm = time.localtime(now)
        return "".join(part if isinstance(part, str) else part(tm, now) for part in parts)

    return _Stamper(render, clock, has_subsecond)
