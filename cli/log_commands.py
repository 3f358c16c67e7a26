"""`pmx logs` and `pmx flush`: the apps' log files and the live log stream.

`logs` reads the last lines from the files `describe` names, then follows the publish
stream (`log.<app>:` topics). Each line is labelled with what wrote it: "api:1 |" (or
"api:1 !" for stderr on the stream), and "api |" for a merged file (`merge_logs`), which
does not record the instance. What it prints to a terminal is neutralised, colours (SGR)
excepted. Registered on the `pmx` group by main.py.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click
from pmx.supervisor.protocol import LOG_PREFIX, Command, JsonObject, log_topic

from . import render
from .client import Client
from .outcome import handles_errors, json_list


@click.command()
@click.argument("target", default="all")
@click.option("--lines", default=15, show_default=True, help="last lines of each log to show")
@click.option("--nostream", is_flag=True, help="print the last lines and exit")
@click.option("--err", "only_err", is_flag=True, help="stderr only")
@click.option("--out", "only_out", is_flag=True, help="stdout only")
@handles_errors
def logs(target: str, lines: int, nostream: bool, only_err: bool, only_out: bool) -> None:
    """Show the last log lines of an app (or all), then follow them live."""
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
        subscription = client.subscribe([log_topic(n) for n in names] if target != "all"
                                        else [LOG_PREFIX])
    clean = render.neutralise_keeping_colour if sys.stdout.isatty() else (lambda text: text)
    for path, label in _log_files(apps, streams):
        tail = _tail(Path(path), lines)
        if tail:
            click.echo(click.style(f"==> {path} (last {lines} lines) <==", dim=True))
        for line in tail:
            click.echo(f"{label} | {clean(line)}", color=True)  # piped: as logged
    if subscription is None:
        return
    click.echo(click.style("following live; Ctrl-C to stop", dim=True), err=True)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    for _, body in client.stream(subscription):
        if body.get("stream") not in streams:
            continue
        prefix = f"{body.get('app')}:{body.get('instance')}"
        marker = " !" if body.get("stream") == "error" else " |"
        received = body.get("lines")
        for text in json_list(received):
            click.echo(f"{prefix}{marker} {clean(str(text))}", color=True)


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
