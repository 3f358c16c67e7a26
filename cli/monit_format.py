"""What `pmx monit` writes on screen, as text: the table's cells and column widths, the
header, the detail lines of an instance, log lines and chart data.

Pure functions of the model (cli/monit_board.py) that return rich Text or plain strings,
so they are tested without a terminal; the widgets (cli/monit_widgets.py) and MonitApp
(cli/monit.py) only place them. Sizes and durations are rendered by cli/render.py, as
`pmx list` renders them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from pmx.supervisor.errors import PmxError
from pmx.supervisor.protocol import JsonObject
from pmx.supervisor.states import State
from rich.text import Text

from . import render
from .monit_board import (
    HISTORY_POINTS,
    Board,
    LogLine,
    Row,
    clock_time,
    json_float,
    json_int,
    json_str,
)

COLUMNS = ("name", "id", "#", "mode", "status", "pid", "cpu", "mem", "↺", "uptime")
RIGHT = frozenset({"id", "#", "pid", "cpu", "mem", "↺", "uptime"})
FIXED_WIDTHS = {"mode": 7, "status": 9, "pid": 7, "cpu": 6, "mem": 8, "↺": 3, "uptime": 6}

# ---------------------------------------------------------------- the process table


def cell(text: str, width: int, *, right: bool = False, first: bool = False,
         style: str = "") -> Text:
    """One cell: a space before it (the column gap, but for the first), then the text
    justified in `width` and cut with an ellipsis when longer."""
    if len(text) > width:
        text = text[: max(0, width - 1)] + "…"
    padded = text.rjust(width) if right else text.ljust(width)
    return Text(padded if first else " " + padded, style=style, no_wrap=True)


def column_cell(index: int, text: str, widths: Mapping[str, int], style: str = "") -> Text:
    """The cell of column COLUMNS[index], justified as that column is."""
    column = COLUMNS[index]
    return cell(text, widths[column], right=column in RIGHT, first=index == 0, style=style)


def cpu_style(cpu: float) -> str:
    return "bold red" if cpu >= 90 else "yellow" if cpu >= 50 else ""


def row_texts(row: Row, now: float) -> tuple[tuple[str, str], ...]:
    """(text, style) per column."""
    running = row.is_running
    name = f"{row.app}{' (new)' if row.is_replacement else ''}"
    return (
        (name, ""),
        (str(row.id), "dim"),
        (str(row.instance), "dim"),
        (row.exec_mode, "dim"),
        (row.status, render.STATUS_STYLE.get(row.status, "")),
        (str(row.pid) if running and row.pid else "-", ""),
        (f"{row.cpu:.0f}%" if row.cpu >= 100 else f"{row.cpu:.1f}%",
         cpu_style(row.cpu) if running else "dim"),
        (render.human_size(row.memory) if running and row.memory else "-",
         "" if running else "dim"),
        (str(row.restarts), "yellow" if row.restarts else ""),
        (render.human_duration(row.uptime_s(now)) if running else "-", ""),
    )


def column_widths(rows: list[Row], total: int) -> dict[str, int]:
    """Each column's width for `rows` in `total` cells: the name takes what is left."""
    widths = dict(FIXED_WIDTHS)
    widths["id"] = max(2, *(len(str(r.id)) for r in rows)) if rows else 2
    widths["#"] = max(1, *(len(str(r.instance)) for r in rows)) if rows else 1
    used = sum(widths.values()) + len(widths) + 1  # one space after each, and the name's
    longest = max((len(r.app) + (6 if r.is_replacement else 0) for r in rows), default=8)
    widths["name"] = max(8, min(longest, total - used - 1))
    return widths


def header_text(board: Board, shown_home: str, *, is_connected: bool, filter_text: str) -> Text:
    """The top line: the home, how many apps and instances are online, CPU and memory."""
    rows = [r for r in board.rows.values() if not r.is_replacement]
    online = sum(1 for r in rows if r.status == State.ONLINE)
    cpu = sum(r.cpu for r in rows)
    memory = sum(r.memory for r in rows if r.is_running)
    header = Text(no_wrap=True, overflow="ellipsis")
    header.append(" pmx monit ", style="bold")
    header.append(f" {shown_home} ", style="dim")
    if not is_connected:
        header.append(" disconnected", style="bold red")
    else:
        header.append(f" {len(board.apps())} apps  ")
        header.append(f"{online}/{len(rows)} online", style="green" if online == len(rows)
                      else "yellow")
        header.append(f"  cpu {cpu:.1f}%  mem {render.human_size(memory) if memory else '-'}")
    if filter_text:
        header.append(f"  filter: {filter_text}", style="bold cyan")
    return header


# ---------------------------------------------------------------- the detail panel


def detail_lines(row: Row, app: JsonObject, info: JsonObject,
                 events: Iterable[str]) -> list[tuple[str, str, str]]:
    """The selected instance as (key, value, style): state first (what a small screen
    shows), then how it runs, then the app's recent events. `app` and `info` are the
    last describe's objects of its app and of the instance ({} before the first)."""
    spec = app.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    lines: list[tuple[str, str, str]] = []

    def line(key: str, value: str, style: str = "") -> None:
        lines.append((key, render.neutralise(value), style))

    since = clock_time(row.since) if row.since else "?"
    line("status", f"{row.status} since {since}: {row.reason}",
         render.STATUS_STYLE.get(row.status, ""))
    for key, label in (("last_exit", "last exit"), ("status_text", "app says")):
        value = info.get(key)
        if isinstance(value, str) and value:
            line(label, value)
    cwd = json_str(spec.get("cwd"))
    script = json_str(spec.get("script"))
    if script:
        inside = cwd and script.startswith(cwd.rstrip(os.sep) + os.sep)
        line("script", script[len(cwd.rstrip(os.sep)) + 1:] if inside else
             render.home_relative(script))
    command = info.get("command")
    if isinstance(command, list) and command:
        line("command", " ".join(os.path.basename(str(c)) if str(c).startswith("/")
                                 else str(c) for c in command))
    if cwd:
        line("cwd", render.home_relative(cwd))
    listen = app.get("listen") or list(row.listen)
    if isinstance(listen, list) and listen:
        line("listen", ", ".join(map(str, listen)))
    if spec:
        line("limits", limits_text(spec))
    recent = list(events)[-8:]
    if recent:
        line("events", "\n".join(reversed(recent)), "dim")
    return lines


def limits_text(spec: JsonObject) -> str:
    """An app's memory limit, kill timeout and restart limits, from describe's spec (whose
    durations are in milliseconds)."""
    limits = []
    if json_int(spec.get("max_memory_restart")):
        limits.append(f"memory {render.human_size(spec.get('max_memory_restart'))}")
    limits.append(f"kill after {_seconds(spec, 'kill_timeout')}")
    limits.append(f"gives up after {json_int(spec.get('max_restarts'))} restarts under "
                  f"{_seconds(spec, 'min_uptime')}")
    if spec.get("autorestart") is False:
        limits.append("no autorestart")
    return ", ".join(limits)


def _seconds(spec: JsonObject, key: str) -> str:
    return render.human_duration(json_float(spec.get(key)) / 1000, exact=True)


def chart(history: list[float]) -> list[float]:
    """A fixed five-minute window for Sparkline, which scales from the smallest value to
    the largest: the leading zero keeps the scale at zero (a steady 30mb is a full bar,
    not noise blown up), and time not seen yet is empty on the left."""
    return [0.0] * (HISTORY_POINTS + 1 - len(history)) + history


# ---------------------------------------------------------------- the log panel


def log_text(line: LogLine, colour: str) -> Text:
    """app:instance in the app's colour, a marker (! for stderr), the line neutralised."""
    is_error = line.stream == "error"
    return Text.assemble((f"{line.app}:{line.instance}", colour),
                         (" ! " if is_error else " | ", "red" if is_error else "dim"),
                         render.neutralise(line.text), no_wrap=True)


# ---------------------------------------------------------------- outcomes


def action_outcome(verb: str, done_verb: str, shown: str,
                   result: JsonObject | PmxError) -> tuple[str, bool]:
    """What an action on `shown` did, in one line, and whether it failed (wholly, or for
    some of its targets: the reply's errors)."""
    if isinstance(result, PmxError):
        return f"{verb} {shown} failed: {result}", True
    reported = result.get("errors")
    errors = [str(e) for e in reported] if isinstance(reported, list) else []
    return f"{done_verb} {shown}" + (f"; {'; '.join(errors)}" if errors else ""), bool(errors)
