"""`pmx logs` and `pmx flush`: the apps' log files and the live log stream.

`logs` reads the last lines from the files `describe` names, then follows the publish
stream (`log.<app>:` topics). Each line is labelled with what wrote it: "api:1 |" (or
"api:1 !" for stderr on the stream), and "api |" for a merged file (`merge_logs`), which
does not record the instance. What it prints to a terminal is neutralised, colours (SGR)
excepted. Registered on the `pmx` group by main.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import click
from pmx.supervisor.protocol import (
    EVENT_PREFIX,
    LOG_PREFIX,
    Command,
    DroppedLines,
    JsonObject,
    event_topic,
    log_topic,
)

from . import render
from .client import Client
from .outcome import handles_errors, json_list

PM2_TIMESTAMP = "YYYY-MM-DD-HH:mm:ss"  # PM2's default for `pm2 logs --timestamp`
_LOOKS_LIKE_FORMAT = re.compile(r"%|YY|MM|DD|HH|hh|mm|ss|SSS")


@click.command()
@click.argument("target", default="all")
@click.option("--lines", default=15, show_default=True, help="last lines of each log to show")
@click.option("--nostream", is_flag=True, help="print the last lines and exit")
@click.option("--err", "only_err", is_flag=True, help="stderr only")
@click.option("--out", "only_out", is_flag=True, help="stdout only")
@click.option("--json", "as_json", is_flag=True,
              help="one JSON object per line: app, instance, stream, time, message")
@click.option("--timestamp", "time_format", is_flag=False, flag_value=PM2_TIMESTAMP,
              default=None, metavar="[FORMAT]",
              help=f'prefix live lines with the time (default format "{PM2_TIMESTAMP}", '
                   'or strftime with %)')
@handles_errors
def logs(target: str, lines: int, nostream: bool, only_err: bool, only_out: bool,
         as_json: bool, time_format: str | None) -> None:
    """Show the last log lines of an app (or all), then follow them live, with pmxd's
    events about the apps (reloads and why, memory restarts) as "[pmx]" lines."""
    if time_format is not None and target == "all" and not _LOOKS_LIKE_FORMAT.search(
            time_format):
        target, time_format = time_format, PM2_TIMESTAMP  # `pmx logs --timestamp api`
    client = Client()
    result = client.call(Command.DESCRIBE, {"target": target})
    apps = [a for a in result.get("apps") or [] if isinstance(a, dict)]  # type: ignore[union-attr]
    streams = ["out", "error"]
    if only_err:
        streams = ["error"]
    elif only_out:
        streams = ["out"]
    names = [str(a.get("name")) for a in apps]
    subscription = None
    if not nostream:
        subscription = client.subscribe(
            [topic for n in names for topic in (log_topic(n), event_topic(n))]
            if target != "all" else [LOG_PREFIX, EVENT_PREFIX])
    show = _Printer(as_json, time_format)
    error_logs = _error_logs(apps)
    for path, label in _log_files(apps, streams):
        tail = _tail(Path(path), lines)
        if tail and not as_json:
            click.echo(click.style(f"==> {path} (last {lines} lines) <==", dim=True))
        app, _, instance = label.partition(":")
        stream = "error" if path in error_logs else "out"
        for line in tail:
            show.line(app, int(instance) if instance.isdigit() else None, stream, None, line,
                      f"{label} |")
    if subscription is None:
        return
    if not as_json:
        click.echo(click.style("following live; Ctrl-C to stop", dim=True), err=True)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    dropped = DroppedLines()
    for topic, body in client.stream(subscription):
        if topic.startswith(EVENT_PREFIX):
            show.event(body)
            continue
        missed = dropped.missed(body)
        if missed:
            show.dropped(str(body.get("app")), missed)
        if body.get("stream") not in streams:
            continue
        name, index = str(body.get("app")), body.get("instance")
        marker = " !" if body.get("stream") == "error" else " |"
        for text in json_list(body.get("lines")):
            show.line(name, index if isinstance(index, int) else None,
                      str(body.get("stream")), time.time(), str(text), f"{name}:{index}{marker}")


class _Printer:
    """How `logs` writes a line: as it was logged (colours kept on a terminal, other
    escapes made inert), with a time in front, or as JSON."""

    def __init__(self, as_json: bool, time_format: str | None) -> None:
        self.as_json = as_json
        self.time_format = time_format
        clean = render.neutralise_keeping_colour if sys.stdout.isatty() else None
        self.clean = clean or (lambda text: text)  # piped: as logged

    def _stamp(self, when: float | None) -> str:
        if self.time_format is None or when is None:
            return ""
        from pmx.supervisor.date_format import format_time

        return format_time(self.time_format, when) + " "

    def line(self, app: str, instance: int | None, stream: str, when: float | None,
             text: str, label: str) -> None:
        if self.as_json:
            click.echo(json.dumps({"app": app, "instance": instance, "stream": stream,
                                   "time": when, "message": text}, ensure_ascii=False))
            return
        click.echo(f"{self._stamp(when)}{label} {self.clean(text)}", color=True)

    def dropped(self, app: str, count: int) -> None:
        """pmxd dropped lines this viewer did not read in time (suspended, a slow terminal)."""
        message = f"{count} lines dropped (the viewer was too slow)"
        if self.as_json:
            click.echo(json.dumps({"app": app, "instance": None, "stream": "pmx",
                                   "time": time.time(), "message": message}))
            return
        click.echo(self._stamp(time.time()) + click.style(f"[pmx] {app}: {message}", dim=True))

    def event(self, body: JsonObject) -> None:
        """pmxd's word about an app; state changes are left to `pmx list` and monit."""
        kind, app = body.get("kind"), str(body.get("app"))
        if kind == "state" or not isinstance(kind, str):
            return
        message = f"{kind.replace('_', ' ')}: {body.get('message')}"
        when = body.get("time")
        stamp = when if isinstance(when, int | float) else time.time()
        if self.as_json:
            click.echo(json.dumps({"app": app, "instance": None, "stream": "pmx",
                                   "time": stamp, "message": message}, ensure_ascii=False))
            return
        line = render.neutralise(f"[pmx] {app} {message}")
        click.echo(self._stamp(stamp) + click.style(line, dim=True))


def _error_logs(apps: list[JsonObject]) -> set[str]:
    return {str(inst.get("error_log")) for app in apps
            for inst in json_list(app.get("instances")) if isinstance(inst, dict)}


def _log_files(apps: list[JsonObject], streams: list[str]) -> list[tuple[str, str]]:
    """(path, label) of each log file once: "app:N" for an instance's own file, "app" for
    a file several instances share (merge_logs), since its lines do not say whose."""
    owners: dict[str, set[str]] = {}
    for app in apps:
        name = str(app.get("name"))
        spec = app.get("spec")
        merged = isinstance(spec, dict) and spec.get("merge_logs") is True
        for inst in [i for i in json_list(app.get("instances")) if isinstance(i, dict)]:
            for stream in streams:
                path = str(inst.get("out_log" if stream == "out" else "error_log"))
                label = name if merged else f"{name}:{inst.get('instance')}"
                owners.setdefault(path, set()).add(label)
    return [(path, labels.pop() if len(labels) == 1 else min(labels).split(":", 1)[0])
            for path, labels in owners.items()]


def _tail(path: Path, count: int) -> list[str]:
    """The last `count` lines of a file, reading at most 1 MiB from its end."""
    if count <= 0:
        return []
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - 1024 * 1024))
            data = file.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    return text[-count:]


@click.command()
@click.argument("target", default="all")
@handles_errors
def flush(target: str) -> None:
    """Empty the log files of an app (or all)."""
    result = Client().call(Command.FLUSH, {"target": target})
    files = result.get("flushed") or []
    click.echo(f"[pmx] flushed {len(files)} log files")  # type: ignore[arg-type]


COMMANDS = (logs, flush)
