"""`cron_restart` schedules for the export targets: a cron expression as systemd
OnCalendar= lines, and whether a Kubernetes CronJob can take it as it is.

The five standard fields (minute hour day-of-month month day-of-week, with `*`, lists,
ranges, steps and names), a sixth field of seconds *first* (as pmx reads cron_restart,
like PM2's cron library), and the @hourly ... @yearly macros are converted; anything else
(@reboot, croniter's extensions such as L or #) returns None and the caller reports it.
Each field is expanded to its explicit values, so the conversion is exact. Cron fires when
*either* a restricted day of month or a restricted day of week matches; systemd wants
both, so that case becomes two OnCalendar= lines (a timer fires on any of them).
"""

from __future__ import annotations

MACROS = {
    "@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_SYSTEMD_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
# (lowest, highest, names) per field: minute, hour, day of month, month, day of week.
_FIELDS: tuple[tuple[int, int, tuple[str, ...]], ...] = (
    (0, 59, ()), (0, 23, ()), (1, 31, ()), (1, 12, _MONTHS), (0, 7, _DAYS),
)


def kubernetes_schedule(expression: str) -> str | None:
    """The expression as a CronJob schedule (five fields or a macro; seconds "0" are
    dropped); None when a CronJob cannot run it."""
    text = " ".join(expression.split())
    if text in MACROS:
        return text
    parts = text.split()
    if len(parts) == 6 and _expand(parts[0], 0, 59, ()) == [0]:
        parts = parts[1:]
    return " ".join(parts) if _expand_all(" ".join(parts)) is not None else None


def to_on_calendar(expression: str) -> list[str] | None:
    """OnCalendar= values equivalent to a cron expression; None if it cannot convert."""
    parts = MACROS.get(expression.strip(), expression).split()
    seconds = [0]
    if len(parts) == 6:
        found = _expand(parts[0], 0, 59, ())
        if found is None:
            return None
        seconds, parts = found, parts[1:]
    fields = _expand_all(" ".join(parts))
    if fields is None:
        return None
    minutes, hours, days, months, weekdays = fields
    weekdays = sorted({day % 7 for day in weekdays})  # 7 is Sunday too
    time = f"{_numbers(hours, 0, 23)}:{_numbers(minutes, 0, 59)}:{_numbers(seconds, 0, 59)}"
    month_text = _numbers(months, 1, 12)
    # As in Vixie cron: a day field starting with "*" makes the two day fields AND.
    if not parts[2].startswith("*") and not parts[4].startswith("*"):  # either matches
        return [f"*-{month_text}-{_numbers(days, 1, 31)} {time}",
                f"{_weekdays(weekdays)} *-{month_text}-* {time}"]
    prefix = f"{_weekdays(weekdays)} " if len(weekdays) < 7 else ""
    return [f"{prefix}*-{month_text}-{_numbers(days, 1, 31)} {time}"]


def _expand_all(expression: str) -> list[list[int]] | None:
    parts = expression.split()
    if len(parts) != 5:
        return None
    fields = []
    for part, (low, high, names) in zip(parts, _FIELDS, strict=True):
        values = _expand(part, low, high, names)
        if values is None:
            return None
        fields.append(values)
    return fields


def _expand(part: str, low: int, high: int, names: tuple[str, ...]) -> list[int] | None:
    """One cron field as its sorted values; None when it is not standard cron."""
    values: set[int] = set()
    for item in part.split(","):
        span, _, step_text = item.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            return None
        if span == "*":
            first, last = low, high
        else:
            start, dash, end = span.partition("-")
            first_value = _value(start, names, low)
            last_value = _value(end, names, low) if dash else (high if step else first_value)
            if first_value is None or last_value is None:
                return None
            first, last = first_value, last_value
        if not (low <= first <= last <= high):
            return None
        values.update(range(first, last + 1, step or 1))
    return sorted(values)


def _value(text: str, names: tuple[str, ...], low: int) -> int | None:
    if text.isascii() and text.isdigit():
        return int(text)
    if text.lower() in names:
        return names.index(text.lower()) + low
    return None


def _numbers(values: list[int], low: int, high: int) -> str:
    """Values as systemd writes them: "*", or a list of numbers and A..B ranges."""
    if values == list(range(low, high + 1)):
        return "*"
    return ",".join(f"{a:02d}" if a == b else f"{a:02d}..{b:02d}" for a, b in _runs(values))


def _weekdays(values: list[int]) -> str:
    return ",".join(_SYSTEMD_DAYS[a] if a == b else f"{_SYSTEMD_DAYS[a]}..{_SYSTEMD_DAYS[b]}"
                    for a, b in _runs(values))


def _runs(values: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs
