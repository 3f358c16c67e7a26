"""What PM2 users type every day, pmx's way: `reset`, `signal` (PM2's `sendSignal`), `show`
and `info` (describe), `jlist` and `prettylist` (list as JSON), and the start options for
file watching, cron reloads and autorestart (`start_options`, used by main.py's start).

Registered on the `pmx` group by main.py. The README's PM2 -> pmx table lists the rest.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click
from pmx.supervisor.protocol import Command, JsonObject

from . import render
from .client import Client
from .outcome import handles_errors, report, report_errors, show_list, target_args
from .usage import TABLE_OPTION

if TYPE_CHECKING:
    from pmx.supervisor.config import AppSpec

F = TypeVar("F", bound=Callable[..., object])
SCRIPT_SETTINGS = "pmx_script_settings"  # ctx.meta key: the app settings these options give


def _setting(key: str, convert: object = None) -> object:
    """A click callback storing an option's value as the app setting `key`."""
    def store(ctx: click.Context, param: click.Parameter, value: object) -> object:
        if value not in (None, False, ()):
            settings = ctx.meta.setdefault(SCRIPT_SETTINGS, {})
            settings[key] = convert(value) if callable(convert) else value
        return value

    return store


def _words(values: tuple[str, ...]) -> list[str]:
    """PM2 takes `--ignore-watch "node_modules logs"`: split on spaces and commas."""
    return [word for value in values for word in value.replace(",", " ").split()]


_START_OPTIONS = (
    click.option("--watch", is_flag=True, expose_value=False, callback=_setting("watch"),
                 help="reload (no downtime) when a file in the app's folder changes"),
    click.option("--ignore-watch", multiple=True, expose_value=False,
                 callback=_setting("ignore_watch", _words),
                 help='with --watch: globs or paths not to watch, e.g. "*.log tmp"'),
    click.option("--watch-delay", expose_value=False, callback=_setting("watch_delay"),
                 help='with --watch: quiet time before the reload, e.g. "1s"'),
    click.option("--cron-restart", "--cron", expose_value=False,
                 callback=_setting("cron_restart"),
                 help='reload (no downtime) at these times, e.g. "0 3 * * *"'),
    click.option("--no-autorestart", is_flag=True, expose_value=False,
                 callback=_setting("autorestart", lambda value: False),
                 help="do not restart the app when it exits (with --cron: a cron job)"),
)


def start_options(function: F) -> F:
    """The start options of this module, on `pmx start`."""
    for option in reversed(_START_OPTIONS):
        function = option(function)
    return function


def with_settings(specs: list[AppSpec]) -> list[AppSpec]:
    """The apps with the settings the options above gave on the command line (for a
    file, every app of it, as PM2 does), validated again: an invalid one is a ConfigError
    naming the option's key."""
    from pmx.supervisor.config import spec_from_table

    settings = click.get_current_context().meta.get(SCRIPT_SETTINGS, {})
    if not settings:
        return specs
    return [spec_from_table({**spec.to_table(), **settings}, source="command line")
            for spec in specs]


@click.command()
@click.argument("targets", metavar="TARGET...", nargs=-1, required=True)
@TABLE_OPTION
@handles_errors
def reset(targets: tuple[str, ...], show_table: bool) -> None:
    """Set the restart counters of apps, instance ids, or all to 0."""
    client = Client()
    code = report(client.call(Command.RESET, target_args(targets)), "reset")
    if show_table:
        show_list(client)
    sys.exit(code)


@click.command(name="signal")
@click.argument("signal_name", metavar="SIGNAL")
@click.argument("targets", metavar="TARGET...", nargs=-1, required=True)
@handles_errors
def signal_command(signal_name: str, targets: tuple[str, ...]) -> None:
    """Send a signal (SIGUSR2, USR2 or 12) to the running instances of apps, ids, or all.

    PM2's spelling works too: pmx sendSignal SIGUSR2 api
    """
    args: JsonObject = {"signal": signal_name, **target_args(targets)}
    result = Client().call(Command.SIGNAL, args)
    names = result.get("signalled") or []
    if isinstance(names, list) and names:
        click.echo(f"[pmx] sent {signal_name} to: {', '.join(map(str, names))}")
    sys.exit(report_errors(result))


@click.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True)
@click.option("--show-secrets", is_flag=True, help="show env values whose names look secret")
@click.pass_context
def show(ctx: click.Context, target: str, as_json: bool, show_secrets: bool) -> None:
    """PM2's name for describe: everything about an app or instance id."""
    group = ctx.parent.command if ctx.parent is not None else None
    describe = group.get_command(ctx.parent, "describe") if isinstance(
        group, click.Group) and ctx.parent is not None else None
    if describe is None:  # pragma: no cover - registered on the pmx group
        raise click.UsageError("describe is not available")
    ctx.invoke(describe, target=target, as_json=as_json, show_secrets=show_secrets)


@click.command()
@handles_errors
def jlist() -> None:
    """Every instance as JSON on one line (PM2's jlist; pmx list --json is indented)."""
    instances = Client().call(Command.LIST).get("instances")
    sys.stdout.write(json.dumps(instances, separators=(",", ":")) + "\n")


@click.command()
@handles_errors
def prettylist() -> None:
    """Every instance as indented JSON (PM2's prettylist; the same as pmx list --json)."""
    render.print_json(Client().call(Command.LIST).get("instances"))


def _alias(command: click.Command, name: str) -> click.Command:
    alias = copy.copy(command)
    alias.name = name
    return alias


COMMANDS = (reset, signal_command, _alias(signal_command, "sendSignal"), show,
            _alias(show, "info"), jlist, prettylist)
