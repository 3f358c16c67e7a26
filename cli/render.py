"""Showing daemon replies to a person or to a script (--json): one-line errors, sizes and
durations, terminal-safe text, the instance table and `pmx describe`'s table.

The instance table (`pmx list`, and the tables commands show with --table) is plain
aligned text drawn by table.py, without rich, so that the short path (entry.py) can use
this module. Only `describe` draws with rich, imported inside the function, so commands
that print plain text or JSON never pay for it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence

from pmx.supervisor.protocol import Json, JsonObject
from pmx.supervisor.states import State

from . import table

# Keyed by State, looked up with the status strings of a reply (a StrEnum equals its value).
STATUS_STYLE: dict[str, str] = {
    State.ONLINE: "green", State.STARTING: "cyan", State.LAUNCHING: "cyan",
    State.STOPPING: "yellow", State.WAITING: "yellow", State.STOPPED: "dim",
    State.ERRORED: "bold red",
}
# C0/C1 control characters except tab, and ESC: shown as \xNN on a terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# SGR (colour and text attributes: ESC [ params m), the one sequence logs may keep.
_SGR = re.compile(r"\x1b\[[0-9;:]{0,32}m")
_RESET = "\x1b[0m"


def error_line(message: str) -> str:
    """An error as pmx prints it: one line, nothing a terminal would act on."""
    return f"pmx: {neutralise(' '.join(message.splitlines()))}"


def ping_line(result: Mapping[str, Json]) -> str:
    return (f"pmxd {result.get('version')} is up: pid {result.get('pid')}, "
            f"home {result.get('home')}, {result.get('apps')} apps, "
            f"up {human_duration(result.get('uptime'))}")


def print_json(value: Json) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def human_size(size: object) -> str:
    """Bytes as 1.5gb, 31.0mb, 2.0kb or 512b; "0b" for nothing or not a number."""
    if not isinstance(size, int | float) or size <= 0:
        return "0b"
    for unit, factor in (("gb", 1024**3), ("mb", 1024**2), ("kb", 1024)):
        if size >= factor:
            return f"{size / factor:.1f}{unit}"
    return f"{int(size)}b"


def human_duration(seconds: object, *, exact: bool = False) -> str:
    """Seconds in the largest whole unit (3d, 5h, 12m, 40s), as an uptime is shown; with
    exact, in seconds as they are (1.6s, 60s), as a setting is shown. "0s" for nothing."""
    if not isinstance(seconds, int | float) or seconds <= 0:
        return "0s"
    if exact:
        return f"{seconds:g}s"
    value = int(seconds)
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= factor:
            return f"{value // factor}{unit}"
    return f"{value}s"


def home_relative(path: str | os.PathLike[str]) -> str:
    """A path under the user's home directory as ~/rest; any other path as it is."""
    text = str(path)
    user_home = os.path.expanduser("~")
    return "~" + text[len(user_home):] if text.startswith(user_home + os.sep) else text


def neutralise(text: str) -> str:
    """Make terminal escapes and other control characters visible instead of active."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def neutralise_keeping_colour(text: str) -> str:
    """Like neutralise, but colour sequences (SGR) stay active, so an app's coloured logs
    look as they would in its own terminal; cursor moves, screen clears, OSC (titles,
    links) and the rest stay visible and inert. A line that set a colour ends with a
    reset, so that it never bleeds into the next line's prefix."""
    pieces: list[str] = []
    position = 0
    for match in _SGR.finditer(text):
        pieces += (neutralise(text[position:match.start()]), match.group())
        position = match.end()
    if not pieces:
        return neutralise(text)
    pieces += (neutralise(text[position:]), _RESET)
    return "".join(pieces)


INSTANCE_COLUMNS = (table.Column("id", right=True), table.Column("name"), table.Column("mode"),
                    table.Column("pid", right=True), table.Column("uptime", right=True),
                    table.Column("↺", right=True), table.Column("status"),
                    table.Column("cpu", right=True), table.Column("mem", right=True),
                    table.Column("listen"))


def instance_table(rows: Sequence[Mapping[str, Json]], *, title: str | None = None) -> None:
    """The instance table of `pmx list` (plain text: see table.py for why not rich)."""
    out = sys.stdout
    colour = table.use_colour(out)
    if title:
        out.write(table.paint(title, "bold", colour) + "\n")
    rows, notes = _fold_replacements(rows)
    if not rows:
        out.write(table.paint("no apps; start one with", "dim", colour)
                  + " pmx start ecosystem.toml\n")
        return
    lines: list[list[table.Cell | str]] = []
    for row in rows:
        status = str(row.get("status", ""))
        listen = row.get("listen") or []
        if (row.get("name"), row.get("instance")) in notes:
            status = "replacing"  # this instance serves until its replacement is ready
        lines.append([
            str(row.get("id")), neutralise(f"{row.get('name')}:{row.get('instance')}"),
            str(row.get("exec_mode")), str(row.get("pid") or "-"),
            human_duration(row.get("uptime")), str(row.get("restarts")),
            table.Cell(status, STATUS_STYLE.get(status, "cyan")), f"{row.get('cpu', 0)}%",
            human_size(row.get("memory")) if row.get("memory") else "-",
            neutralise(", ".join(str(a) for a in listen)) if isinstance(listen, list) else "",
        ])
    out.write(table.render(INSTANCE_COLUMNS, lines, colour=colour))
    for note in notes.values():
        out.write(table.paint(neutralise(note), "cyan", colour) + "\n")
    for row in rows:
        if row.get("status") == State.ERRORED:
            name = neutralise(f"{row.get('name')}:{row.get('instance')} errored:")
            out.write(f"{table.paint(name, 'red', colour)} {neutralise(str(row.get('reason')))}\n")
    out.flush()


def _fold_replacements(rows: Sequence[Mapping[str, Json]]
                       ) -> tuple[list[Mapping[str, Json]], dict[tuple[Json, Json], str]]:
    """One row per slot: during a reload, the row of the instance being replaced (it
    serves until its replacement is ready) is marked, and the replacement (same id and
    slot, marked "replacement") becomes a note under the table, by slot. A replacement
    with no old row is shown as it is."""
    serving = {(row.get("name"), row.get("instance")): row.get("pid") for row in rows
               if not row.get("replacement")}
    shown: list[Mapping[str, Json]] = []
    notes: dict[tuple[Json, Json], str] = {}
    for row in rows:
        slot = (row.get("name"), row.get("instance"))
        if row.get("replacement") and slot in serving:
            notes[slot] = (f"{slot[0]}:{slot[1]} replacing: pid {serving[slot] or '-'} -> pid "
                           f"{row.get('pid') or '-'} ({row.get('status')})")
        else:
            shown.append(row)
    return shown, notes


def setting(value: object, field: str) -> str:
    """An option's value as a person writes it: durations and sizes in units ("5s",
    "200M"), lists as words, tables as NAME=value; "-" for unset or empty. `field` is the
    AppSpec field, whose suffix gives the unit (_s: the wire carries milliseconds)."""
    from pmx.supervisor.options import format_size

    if value is None or value == [] or value == {} or value == ():
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and field.endswith("_s"):
        return _duration_ms(value)
    if isinstance(value, int) and field.endswith("_bytes"):
        return format_size(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


def _duration_ms(milliseconds: float) -> str:
    if milliseconds < 1000:
        return f"{milliseconds:g}ms" if milliseconds else "0"
    seconds = milliseconds / 1000
    for unit, factor in (("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{seconds / factor:g}{unit}"
    return f"{seconds:g}s"


def settings(spec: Mapping[str, Json]) -> list[tuple[str, str, str]]:
    """Every option, in the option table's order: (name, value, default), as shown."""
    from pmx.supervisor.options import OPTIONS

    rows = []
    for option in OPTIONS:
        default = option.default
        if isinstance(default, float) and option.field.endswith("_s"):
            default = default * 1000  # the option table holds seconds; the wire milliseconds
        value = spec.get(option.name)
        rows.append((option.name, setting(value, option.field), setting(default, option.field)))
    return rows


def describe(apps: Sequence[JsonObject]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)
    for app in apps:
        spec = app.get("spec")
        instances = app.get("instances")
        if not isinstance(spec, dict) or not isinstance(instances, list):
            continue
        table = Table(title=f"{app.get('name')}", title_justify="left", title_style="bold",
                      header_style="dim", box=None, pad_edge=False)
        table.add_column("option", style="bold")
        table.add_column("value", overflow="fold")
        table.add_column("default", style="dim", overflow="fold")
        if app.get("mode"):
            table.add_row("mode", neutralise(str(app.get("mode"))), "")
        if app.get("processes"):
            table.add_row("processes", neutralise(str(app.get("processes"))), "")
        unserved = app.get("unserved")
        if isinstance(unserved, list) and unserved:
            table.add_row("not accepting", neutralise(", ".join(map(str, unserved))
                                                     + ": no instance accepts connections here"), "")
        listen = app.get("listen")
        if listen:
            table.add_row("listening on", ", ".join(map(str, listen)) if isinstance(
                listen, list) else str(listen), "")
        for key, value, default in settings(spec):
            table.add_row(key, escape(neutralise(value)), escape(neutralise(default)))
        for key, value in auto_reload_rows(app):
            table.add_row(key, escape(neutralise(value)), "")
        console.print(table, highlight=False)
        for inst in instances:
            if not isinstance(inst, dict):
                continue
            status = str(inst.get("status"))
            console.print(
                f"  [bold]{app.get('name')}:{inst.get('instance')}[/] id {inst.get('id')} "
                f"[{STATUS_STYLE.get(status, '')}]{status}[/] pid {inst.get('pid') or '-'} "
                f"up {human_duration(inst.get('uptime'))} restarts {inst.get('restarts')} "
                f"cpu {inst.get('cpu')}% mem {human_size(inst.get('memory'))}", highlight=False)
            console.print(f"    reason: {neutralise(str(inst.get('reason')))}", highlight=False)
            if inst.get("last_exit"):
                console.print(f"    last exit: {inst.get('last_exit')}", highlight=False)
            if inst.get("status_text"):
                console.print(f"    status: {neutralise(str(inst.get('status_text')))}",
                              highlight=False)
            console.print(f"    out log: {inst.get('out_log')}", highlight=False)
            console.print(f"    error log: {inst.get('error_log')}", highlight=False)


def auto_reload_rows(app: Mapping[str, Json]) -> list[tuple[str, str]]:
    """describe's lines for watch and cron: the paths watched and the next cron run."""
    import time

    rows = []
    watching = app.get("watching")
    if isinstance(watching, list) and watching:
        rows.append(("watching", ", ".join(home_relative(str(path)) for path in watching)))
    next_run = app.get("cron_next_run")
    if isinstance(next_run, int | float):
        when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(next_run))
        rows.append(("cron next run", f"{when} (in {human_duration(next_run - time.time())})"))
    return rows
