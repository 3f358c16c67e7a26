"""`pmx logs` and `pmx flush`: the apps' log files and the live log stream.

`logs` reads the last lines from the files `describe` names, then follows the publish
stream (`log.<app>:` topics); what it prints to a terminal is neutralised. Registered on
the `pmx` group by main.py.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click
from pmx.supervisor.protocol import LOG_PREFIX, Command, log_topic

from . import render
from .client import Client
from .outcome import handles_errors


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
    clean = render.neutralise if sys.stdout.isatty() else (lambda text: text)
    seen: set[str] = set()
    for app in apps:
        for inst in app.get("instances") or []:  # type: ignore[union-attr]
            if not isinstance(inst, dict):
                continue
            for stream in streams:
                path = str(inst.get("out_log" if stream == "out" else "error_log"))
                if path in seen:
                    continue
                seen.add(path)
                tail = _tail(Path(path), lines)
                if tail:
                    click.echo(click.style(f"==> {path} (last {lines} lines) <==", dim=True))
                for line in tail:
                    click.echo(f"{app.get('name')}:{inst.get('instance')} | {clean(line)}")
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
        for text in received if isinstance(received, list) else []:
            click.echo(f"{prefix}{marker} {clean(str(text))}")


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
