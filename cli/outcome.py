"""How a `pmx` command ends: what it did, per target, or one line saying why it could not.

User mistakes print one line and exit with a named code (errors.ExitCode); tracebacks
are for bugs. Shared by every command module (main.py, log_commands.py,
daemon_commands.py).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import click
from pmx.supervisor.errors import ExitCode, PmxError
from pmx.supervisor.protocol import Command, JsonObject

from . import render
from .client import Client

F = TypeVar("F", bound=Callable[..., object])


def fail(message: str, code: ExitCode) -> None:
    """Print one line to stderr and exit with `code`."""
    # One line, and nothing a terminal would act on, whatever the daemon sent.
    click.echo(render.error_line(message), err=True)
    sys.exit(int(code))


def handles_errors(function: F) -> F:
    """A command that turns PmxError into one line and its exit code, Ctrl-C into 130."""
    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return function(*args, **kwargs)
        except PmxError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            sys.exit(130)
        return None

    return wrapper  # type: ignore[return-value]


def report(result: JsonObject, verb: str) -> int:
    """Print the targets `verb` applied to and each error; the exit code they make."""
    names = result.get(verb) or []
    if isinstance(names, list) and names:
        click.echo(f"[pmx] {verb}: {', '.join(map(str, names))}")
    return report_errors(result)


def report_errors(result: JsonObject) -> int:
    """Print the reply's errors, one line each; FAILED when there is any."""
    errors = result.get("errors") or []
    if not isinstance(errors, list) or not errors:
        return int(ExitCode.OK)
    for error in errors:
        click.echo(f"pmx: {render.neutralise(' '.join(str(error).splitlines()))}", err=True)
    return int(ExitCode.FAILED)


def report_start(result: JsonObject, rows: list[JsonObject], *, command: str = "start") -> int:
    """What a start or resurrect did: what started, and what already ran (start is
    idempotent: starting what runs changes nothing and says so, with exit 0)."""
    code = report(result, "started")
    running = [str(label) for label in json_list(result.get("already_running"))]
    if running and command != "start":
        rest = "" if json_list(result.get("started")) else "; nothing to start"
        click.echo(f"[pmx] {command}: {', '.join(running)} already running{rest}")
        return code
    for label in running:
        name = label.split(":", 1)[0]
        chosen = {part.strip() for part in label.split(",")}
        shown = [row for row in rows if row.get("name") == name and not row.get("replacement")
                 and (chosen == {name} or f"{name}:{row.get('instance')}" in chosen)]
        pids = ", ".join(str(row.get("pid")) for row in shown if row.get("pid"))
        uptimes = [value for row in shown if isinstance(value := row.get("uptime"), int | float)]
        uptime = render.human_duration(max(uptimes, default=0))
        plural = "s" if "," in pids else ""
        click.echo(f"[pmx] {label} is already running (pid{plural} {pids or '-'}, up {uptime}); "
                   f"pmx restart {name} or pmx reload {name} to restart it")
    return code


def json_list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def list_rows(client: Client) -> list[JsonObject]:
    """The instances, as `pmx list --json` gives them."""
    rows = client.call(Command.LIST).get("instances")
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def show_list(client: Client, rows: list[JsonObject] | None = None) -> None:
    """The instance table, as `pmx list` draws it."""
    render.instance_table(list_rows(client) if rows is None else rows)


def target_args(targets: tuple[str, ...]) -> JsonObject:
    """One target as "target" (what every pmxd reads), several as "targets"."""
    return {"target": targets[0]} if len(targets) == 1 else {"targets": list(targets)}
