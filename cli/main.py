"""`pmx`: the command line. Thin: parse, send one request, show the reply.

This module holds the `cli` group, the commands that start, stop, change and show apps,
`monit`, and `main`, the entry point; the log commands are in log_commands.py, the
commands about pmxd itself in daemon_commands.py, how a command ends (one-line errors,
exit codes) in outcome.py, and how the command line is read (options after the script,
`--`, click's usage errors in one line) in usage.py. rich is imported only by `pmx
describe` (render.py) and `pmx monit`; no command here imports psutil. `pmx list`, `ls`,
`status` (with or without --json) and `pmx ping` never reach this module: cli/entry.py
answers them itself, with the plain table of table.py; only other command lines (those
commands with --help, say) come here.

A command prints what it did ("[pmx] stopped: web:0"); `start` and `list` also show the
instance table, and the other commands that change apps show it with --table.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from pmx.supervisor import __version__
from pmx.supervisor.errors import ConfigError, ExitCode, PmxError
from pmx.supervisor.protocol import EVENT_PREFIX, Command, Json, JsonObject

from . import (
    daemon_commands,
    export_command,
    habit_commands,
    import_command,
    log_commands,
    render,
    usage,
    web_command,
)
from .client import Client
from .outcome import (
    fail,
    handles_errors,
    list_rows,
    report,
    report_start,
    show_list,
    target_args,
)

if TYPE_CHECKING:  # config (and tomllib) load only for the commands that read files
    from pmx.supervisor.config import AppSpec


@click.group(cls=usage.PmxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pmx")
def cli() -> None:
    """pmx: run and supervise apps in any language; cluster mode, zero-downtime reload."""


# What a script or a config file is called, so that a missing one is "no such file" and
# not an unknown app name: PM2's script kinds, and its ecosystem files (.config.js, .json).
FILE_SUFFIXES = (".toml", ".py", ".js", ".mjs", ".cjs", ".ts", ".sh", ".bash", ".rb", ".php",
                 ".pl", ".jar", ".json", ".yaml", ".yml")


def _looks_like_ecosystem(target: str) -> bool:
    """A config file, not a script: .toml, and what pmx reads from PM2 as it is:
    *.config.js/.cjs/.mjs (and ecosystem*.js), .json, .yml/.yaml, Procfile."""
    from pmx.supervisor.pm2 import is_ecosystem_name

    return is_ecosystem_name(target)


def _looks_like_file(target: str) -> bool:
    return "/" in target or target.endswith(FILE_SUFFIXES)


def _specs_for_script(script: str, name: str | None, instances: str | None,
                      interpreter: str | None, extra: tuple[str, ...],
                      listen: tuple[str, ...], max_memory: str | None, *,
                      preload: bool = True, wait_ready: bool = False,
                      listen_timeout: str | None = None) -> list[AppSpec]:
    """One app from the command line. As in PM2, `-i` means cluster mode where pmx can
    share the port: with --listen, or for a Node or Python app (the preloads route its
    own listen() to a socket pmxd holds). Anything else with -i runs N forks."""
    from pmx.supervisor.config import parse_app
    from pmx.supervisor.dropin import runtime_of

    table: dict[str, object] = {"name": name or Path(script).stem, "script": script}
    if extra:
        table["args"] = list(extra)
    if instances is not None:
        table["instances"] = int(instances) if instances.isdigit() else instances
    if interpreter:
        table["interpreter"] = interpreter
    if listen:
        table["exec_mode"] = "cluster"
        table["listen"] = list(listen)
    if max_memory:
        table["max_memory_restart"] = max_memory
    if not preload:
        table["preload"] = False
    if wait_ready:
        table["wait_ready"] = True
    if listen_timeout is not None:
        table["listen_timeout"] = listen_timeout
    spec = parse_app(table, source="command line", index=0, base_dir=Path.cwd())
    if instances is not None and not listen and preload and runtime_of(spec) is not None:
        table["exec_mode"] = "cluster"
        spec = parse_app(table, source="command line", index=0, base_dir=Path.cwd())
    return [spec]


@cli.command(cls=usage.AppArgsCommand)
@click.argument("target")
@click.option("--name", help="app name (default: the script's name)")
@click.option("-i", "--instances", help='number of instances, or "max"')
@click.option("--interpreter", help='program that runs the script ("none": run it directly)')
@click.option("--listen", multiple=True, help="cluster mode: address to share, e.g. 127.0.0.1:8000")
@click.option("--max-memory-restart", "max_memory", help='restart above this memory, e.g. "300M"')
@click.option("--wait-ready", is_flag=True,
              help="ready when the app says so: process.send('ready') or READY=1")
@click.option("--listen-timeout", help='how long a new instance may take to be ready, e.g. "8s"')
@click.option("--no-preload", "no_preload", is_flag=True,
              help="with -i: no preload; the app must serve on fd 3 (LISTEN_FDS) itself")
@click.option("--only", multiple=True, help="with an ecosystem file: start only this app")
@click.option("--env", "env_name", help="with an ecosystem file: use its env_NAME table")
@habit_commands.start_options
@handles_errors
def start(target: str, name: str | None, instances: str | None, interpreter: str | None,
          listen: tuple[str, ...], max_memory: str | None, wait_ready: bool,
          listen_timeout: str | None, no_preload: bool, only: tuple[str, ...],
          env_name: str | None) -> None:
    """Start an ecosystem file, a script, or a stopped app by name or id.

    pmx's options may stand before or after the script; only what follows -- goes to
    the app. Starting what already runs changes nothing and says so (exit 0).

    \b
      pmx start ecosystem.toml [--only api] [--env production]
      pmx start server.py --name web
      pmx start app.js -i 4          # cluster: the instances share the port app.js listens on
      pmx start ./bin/server --name bin -- --port 9000
    """
    from .import_command import load_ecosystem  # parse_ecosystem, notes on stderr

    script_args = usage.app_args()
    is_file = _looks_like_ecosystem(target)
    is_script = not is_file and os.path.exists(target)
    if not is_file and not is_script and _looks_like_file(target):
        raise ConfigError(f"{target}: no such file")  # before starting any daemon
    if script_args and not is_script:
        usage.refuse(f"arguments after -- go to a script's app; {target} is not a script")
    if (only or env_name) and not is_file:
        usage.refuse("--only and --env need an ecosystem file (pmx start ecosystem.toml "
                     "--env NAME)")
    client = Client()
    if is_file or is_script:
        specs = load_ecosystem(target, env_name=env_name, only=only) if is_file else \
            _specs_for_script(target, name, instances, interpreter, script_args, listen,
                              max_memory, preload=not no_preload, wait_ready=wait_ready,
                              listen_timeout=listen_timeout)
        specs = habit_commands.with_settings(specs)  # --watch, --cron, --no-autorestart
        client.ensure_daemon()
        tables: list[Json] = [_jsonable(spec.to_table()) for spec in specs]
        result = client.call(Command.START, {"apps": tables, "base_env": dict(os.environ)},
                             timeout_s=60)
    else:
        # Not a file: an app name or id that the daemon knows (pmx start web).
        client.ensure_daemon()
        result = client.call(Command.START, {"target": target}, timeout_s=30)
    rows = list_rows(client)
    code = report_start(result, rows)
    show_list(client, rows)
    sys.exit(code)


def _jsonable(table: dict[str, object]) -> JsonObject:
    return {key: value for key, value in table.items()}  # type: ignore[misc]


def _target_command(command: Command, verb: str, help_text: str) -> None:
    @cli.command(name=command.value, help=help_text)
    @click.argument("targets", metavar="TARGET...", nargs=-1, required=True)
    @usage.TABLE_OPTION
    @handles_errors
    def run(targets: tuple[str, ...], show_table: bool) -> None:
        client = Client()
        result = client.call(command, target_args(targets), timeout_s=120)
        code = report(result, verb)
        if show_table:
            show_list(client)
        sys.exit(code)


_target_command(Command.STOP, "stopped", "Stop apps, instance ids, or all.")
_target_command(Command.RESTART, "restarted",
                "Stop then start apps, instance ids, or all (see reload for no downtime).")
_target_command(Command.DELETE, "deleted", "Stop and forget apps, instance ids, or all.")


@cli.command()
@click.argument("targets", metavar="TARGET...", nargs=-1, required=True)
@click.option("--update-env", is_flag=True, help="also take the environment of this shell")
@click.option("--env", "env_name", help="with an ecosystem file: use its env_NAME table")
@usage.TABLE_OPTION
@handles_errors
def reload(targets: tuple[str, ...], update_env: bool, env_name: str | None,
           show_table: bool) -> None:
    """Replace instances one at a time with no downtime (apps, ids, all, or a file)."""
    client = Client()
    args: JsonObject
    files = [target for target in targets if _looks_like_ecosystem(target)]
    if files and len(targets) > 1:
        usage.refuse(f"reload one ecosystem file at a time, without other targets: {files[0]}")
    if env_name and not files:
        usage.refuse("--env needs an ecosystem file (pmx reload ecosystem.toml --env NAME)")
    if files:
        from .import_command import load_ecosystem  # parse_ecosystem, notes on stderr

        specs = load_ecosystem(files[0], env_name=env_name)
        args = {"apps": [_jsonable(spec.to_table()) for spec in specs],
                "base_env": dict(os.environ), "update_env": update_env}
        client.ensure_daemon()
    else:
        args = target_args(targets)
        if update_env:
            args.update({"base_env": dict(os.environ), "update_env": True})
    events = client.subscribe([EVENT_PREFIX])
    try:
        result = _call_showing_progress(client, Command.RELOAD, args, events)
    finally:
        events.close(linger=0)
    code = report(result, "reloaded")
    started = result.get("started")
    if isinstance(started, list) and started:
        click.echo(f"[pmx] started: {', '.join(map(str, started))}")
    if show_table:
        show_list(client)
    sys.exit(code)


def _call_showing_progress(client: Client, command: Command, args: JsonObject,
                           events: object) -> JsonObject:
    """Run a long command while printing the reload events the daemon publishes."""
    import threading

    import zmq

    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            outcome["result"] = client.call(command, args, timeout_s=600)
        except PmxError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    assert isinstance(events, zmq.Socket)
    while worker.is_alive():
        if events.poll(50):
            for _, body in client.stream(events, timeout_s=0):
                if body.get("kind") == "reload":
                    click.echo(f"[pmx] {body.get('message')}")
    worker.join()
    error = outcome.get("error")
    if isinstance(error, PmxError):
        raise error
    result = outcome.get("result")
    return result if isinstance(result, dict) else {}


# ignore_unknown_options: "-1" is a count, not an option.
@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("count")
@usage.TABLE_OPTION
@handles_errors
def scale(name: str, count: str, show_table: bool) -> None:
    """Set the number of instances: 6, +2 or -1."""
    if not re.fullmatch(r"[+-]?[0-9]+", count):
        usage.refuse(f'count must be a number like 6, +2 or -1, got "{count}"')
    client = Client()
    result = client.call(Command.SCALE, {"target": name, "count": count}, timeout_s=120)
    click.echo(f"[pmx] {name} scaled to {result.get('instances')} instances")
    code = report(result, "scaled")
    if show_table:
        show_list(client)
    sys.exit(code)


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="one object per instance")
@handles_errors
def list_command(as_json: bool) -> None:
    """Show every instance: status, pid, CPU, memory, restarts."""
    client = Client()
    if as_json:
        render.print_json(client.call(Command.LIST).get("instances"))
        return
    show_list(client)


cli.add_command(list_command, name="ls")
cli.add_command(list_command, name="status")


@cli.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True)
@click.option("--show-secrets", is_flag=True, help="show env values whose names look secret")
@handles_errors
def describe(target: str, as_json: bool, show_secrets: bool) -> None:
    """Everything about an app or instance id: settings, state, reasons, log files."""
    result = Client().call(Command.DESCRIBE, {"target": target, "show_secrets": show_secrets})
    apps = result.get("apps")
    if as_json:
        render.print_json(apps)
        return
    render.describe([a for a in apps if isinstance(a, dict)] if isinstance(apps, list) else [])


@cli.command(name="env")
@click.argument("target")
@click.option("--show-secrets", is_flag=True, help="show values whose names look secret")
@handles_errors
def env_command(target: str, show_secrets: bool) -> None:
    """The environment an app is given by its config (secret-looking values masked)."""
    result = Client().call(Command.DESCRIBE, {"target": target, "show_secrets": show_secrets})
    for app in result.get("apps") or []:  # type: ignore[union-attr]
        spec = app.get("spec") if isinstance(app, dict) else None
        env = spec.get("env") if isinstance(spec, dict) else None
        for name, value in (env or {}).items() if isinstance(env, dict) else []:
            click.echo(f"{name}={render.neutralise(str(value))}")


@cli.command()
@click.option("--once", is_flag=True, help="print one snapshot of the table and exit")
@handles_errors
def monit(once: bool) -> None:
    """Live monitor: processes, CPU, memory and logs, with keys to act on them."""
    from . import monit as live  # imports textual: only this command pays for it

    sys.exit(live.run(Client(), once=once or not sys.stdout.isatty()))


for command in (*log_commands.COMMANDS, *daemon_commands.COMMANDS, *habit_commands.COMMANDS,
                *import_command.COMMANDS, *export_command.COMMANDS, *web_command.COMMANDS):
    cli.add_command(command)


def main() -> None:
    """Run `pmx`; every error is one line (click's usage errors included) with its code."""
    try:
        code = cli.main(prog_name="pmx", standalone_mode=False)
    except click.UsageError as exc:
        if exc.ctx is not None and type(exc).__name__ == "NoArgsIsHelpError":
            click.echo(exc.ctx.get_help())  # `pmx` alone (click >= 8.2): help, not an error
            sys.exit(0)
        fail(usage.one_line(exc), ExitCode.USAGE)
    except click.ClickException as exc:
        fail(exc.format_message(), ExitCode.FAILED)
    except click.Abort:
        sys.exit(130)
    except ConfigError as exc:  # pragma: no cover - handled in commands
        fail(str(exc), ExitCode.USAGE)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
