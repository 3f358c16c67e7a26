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
    click.echo(f"pmx: {render.neutralise(' '.join(message.splitlines()))}", err=True)
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
    errors = result.get("errors") or []
    names = result.get(verb) or []
    if isinstance(names, list) and names:
        click.echo(f"[pmx] {verb}: {', '.join(map(str, names))}")
    if isinstance(errors, list):
        for error in errors:
            click.echo(f"pmx: {render.neutralise(' '.join(str(error).splitlines()))}", err=True)
        if errors:
            return int(ExitCode.FAILED)
    return int(ExitCode.OK)


def show_list(client: Client) -> None:
    """The instance table, as `pmx list` draws it."""
    result = client.call(Command.LIST)
    rows = result.get("instances")
    render.instance_table([r for r in rows if isinstance(r, dict)] if isinstance(rows, list)
                          else [])
