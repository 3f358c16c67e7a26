"""`pmx`: the command line. Thin: parse, send one request, show the reply.

User mistakes print one line and exit with a named code (errors.ExitCode); tracebacks
are for bugs. rich and psutil are imported only by the commands that draw tables.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click
from pmx.supervisor import __version__
from pmx.supervisor.errors import ConfigError, ExitCode, PmxError
from pmx.supervisor.protocol import Command, Json, JsonObject, log_topic

from . import render
from .client import Client

if TYPE_CHECKING:  # config (and tomllib) load only for the commands that read files
    from pmx.supervisor.config import AppSpec

F = TypeVar("F", bound=Callable[..., object])


def _fail(message: str, code: ExitCode) -> None:
    # One line, and nothing a terminal would act on, whatever the daemon sent.
    click.echo(f"pmx: {render.neutralise(' '.join(message.splitlines()))}", err=True)
    sys.exit(int(code))


def handles_errors(function: F) -> F:
    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return function(*args, **kwargs)
        except PmxError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            sys.exit(130)
        return None

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pmx")
def cli() -> None:
    """pmx: run and supervise apps in any language; cluster mode, zero-downtime reload."""


def _looks_like_ecosystem(target: str) -> bool:
    return target.endswith(".toml")


def _specs_for_script(script: str, name: str | None, instances: str | None,
                      interpreter: str | None, extra: tuple[str, ...],
                      listen: tuple[str, ...], max_memory: str | None) -> list[AppSpec]:
    from pmx.supervisor.config import parse_app

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
    return [parse_app(table, source="command line", index=0, base_dir=Path.cwd())]


def _report(result: JsonObject, verb: str) -> int:
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


def _show_list(client: Client) -> None:
    result = client.call(Command.LIST)
    rows = result.get("instances")
    render.instance_table([r for r in rows if isinstance(r, dict)] if isinstance(rows, list)
                          else [])


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--name", help="app name (default: the script's name)")
@click.option("-i", "--instances", help='number of instances, or "max"')
@click.option("--interpreter", help='program that runs the script ("none": run it directly)')
@click.option("--listen", multiple=True, help="cluster mode: address to share, e.g. 127.0.0.1:8000")
@click.option("--max-memory-restart", "max_memory", help='restart above this memory, e.g. "300M"')
@click.option("--only", multiple=True, help="with an ecosystem file: start only this app")
@click.option("--env", "env_name", help="with an ecosystem file: use its env_NAME table")
@handles_errors
def start(target: str, script_args: tuple[str, ...], name: str | None, instances: str | None,
          interpreter: str | None, listen: tuple[str, ...], max_memory: str | None,
          only: tuple[str, ...], env_name: str | None) -> None:
    """Start an ecosystem file, a script, or a stopped app by name or id.

    \b
      pmx start ecosystem.toml [--only api] [--env production]
      pmx start server.py --name web
      pmx start ./bin/server --name bin -- --port 9000
    """
    from pmx.supervisor.config import parse_ecosystem

    client = Client()
    if _looks_like_ecosystem(target):
        specs = parse_ecosystem(target, env_name=env_name, only=only)
    elif os.path.exists(target) or "/" in target:
        specs = _specs_for_script(target, name, instances, interpreter, script_args, listen,
                                  max_memory)
    else:
        # Not a file: an app name or id that the daemon knows (pmx start web).
        client.ensure_daemon()
        sys.exit(_report(client.call(Command.START, {"target": target}, timeout_s=30),
                         "started"))
    client.ensure_daemon()
    tables: list[Json] = [_jsonable(spec.to_table()) for spec in specs]
    result = client.call(Command.START, {"apps": tables, "base_env": dict(os.environ)},
                         timeout_s=60)
    code = _report(result, "started")
    _show_list(client)
    sys.exit(code)


def _jsonable(table: dict[str, object]) -> JsonObject:
    return {key: value for key, value in table.items()}  # type: ignore[misc]


def _target_command(command: Command, verb: str, help_text: str) -> None:
    @cli.command(name=command.value, help=help_text)
    @click.argument("target")
    @handles_errors
    def run(target: str) -> None:
        client = Client()
        result = client.call(command, {"target": target}, timeout_s=120)
        code = _report(result, verb)
        if command is not Command.DELETE:
            _show_list(client)
        sys.exit(code)


_target_command(Command.STOP, "stopped", "Stop an app, an instance id, or all.")
_target_command(Command.RESTART, "restarted",
                "Stop then start an app, an instance id, or all (see reload for no downtime).")
_target_command(Command.DELETE, "deleted", "Stop and forget an app, an instance id, or all.")


@cli.command()
@click.argument("target")
@click.option("--update-env", is_flag=True, help="also take the environment of this shell")
@click.option("--env", "env_name", help="with an ecosystem file: use its env_NAME table")
@handles_errors
def reload(target: str, update_env: bool, env_name: str | None) -> None:
    """Replace instances one at a time with no downtime (an app, an id, all, or a file)."""
    client = Client()
    args: JsonObject
    if _looks_like_ecosystem(target):
        from pmx.supervisor.config import parse_ecosystem

        specs = parse_ecosystem(target, env_name=env_name)
        args = {"apps": [_jsonable(spec.to_table()) for spec in specs],
                "base_env": dict(os.environ), "update_env": update_env}
        client.ensure_daemon()
    else:
        args = {"target": target}
    events = client.subscribe(["event."])
    try:
        result = _call_showing_progress(client, Command.RELOAD, args, events)
    finally:
        events.close(linger=0)
    code = _report(result, "reloaded")
    _show_list(client)
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


@cli.command()
@click.argument("name")
@click.argument("count")
@handles_errors
def scale(name: str, count: str) -> None:
    """Set the number of instances: 6, +2 or -1."""
    client = Client()
    result = client.call(Command.SCALE, {"target": name, "count": count}, timeout_s=120)
    click.echo(f"[pmx] {name} scaled to {result.get('instances')} instances")
    code = _report(result, "scaled")
    _show_list(client)
    sys.exit(code)


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="one object per instance")
@handles_errors
def list_command(as_json: bool) -> None:
    """Show every instance: status, pid, CPU, memory, restarts."""
    client = Client()
    result = client.call(Command.LIST)
    rows = result.get("instances")
    if as_json:
        render.print_json(rows)
        return
    render.instance_table([r for r in rows if isinstance(r, dict)] if isinstance(rows, list)
                          else [])


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
                                        else ["log."])
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


@cli.command()
@click.argument("target", default="all")
@handles_errors
def flush(target: str) -> None:
    """Empty the log files of an app (or all)."""
    result = Client().call(Command.FLUSH, {"target": target})
    files = result.get("flushed") or []
    click.echo(f"[pmx] flushed {len(files)} log files")  # type: ignore[arg-type]


@cli.command()
@handles_errors
def ping() -> None:
    """Is pmxd up? Its version, pid and home."""
    result = Client().call(Command.PING, timeout_s=5)
    click.echo(f"pmxd {result.get('version')} is up: pid {result.get('pid')}, "
               f"home {result.get('home')}, {result.get('apps')} apps, "
               f"up {render.human_duration(result.get('uptime'))}")


@cli.command()
@handles_errors
def kill() -> None:
    """Stop every app, then the daemon."""
    client = Client()
    if not client.rpc_path.exists() or not (client.home / "pmxd.pid").exists():
        click.echo("[pmx] pmxd is not running")
        return
    result = client.call(Command.KILL, timeout_s=120)
    pid = result.get("pid")
    deadline = time.monotonic() + 10
    while isinstance(pid, int) and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if isinstance(pid, int) and _alive(pid):
        _fail(f"pmxd (pid {pid}) stopped its apps but did not exit within 10s",
              ExitCode.FAILED)
    click.echo(f"[pmx] stopped every app and pmxd (pid {pid})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our pmxd's parent has not reaped it) counts as gone.
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@cli.command()
@handles_errors
def update() -> None:
    """Replace the running pmxd with the installed version (apps restart once)."""
    client = Client()
    before = client.call(Command.PING)
    began = time.monotonic()
    client.call(Command.UPDATE)
    deadline = time.monotonic() + 30
    while True:
        try:
            after = client.call(Command.PING, timeout_s=1)
            restarted = after.get("started") != before.get("started")
            if restarted and after.get("apps") == before.get("apps"):
                break
        except PmxError:
            pass
        if time.monotonic() > deadline:
            _fail("the new pmxd did not answer within 30s; see PMX_HOME/pmxd.log", ExitCode.FAILED)
        time.sleep(0.05)
    click.echo(f"[pmx] pmxd {before.get('version')} -> {after.get('version')} (pid "
               f"{after.get('pid')}); its {after.get('apps')} apps restarted; "
               f"{time.monotonic() - began:.2f}s in all")
    _show_list(client)


@cli.command()
@click.option("--force", is_flag=True, help="save even an empty list over a non-empty dump")
@handles_errors
def save(force: bool) -> None:
    """Write the running apps to PMX_HOME/dump.toml (an ecosystem file)."""
    result = Client().call(Command.SAVE, {"force": force})
    click.echo(f"[pmx] saved {result.get('apps')} apps to {result.get('path')}")


@cli.command()
@handles_errors
def resurrect() -> None:
    """Start the apps of the last `pmx save`."""
    client = Client()
    client.ensure_daemon()
    result = client.call(Command.RESURRECT, {"base_env": dict(os.environ)}, timeout_s=60)
    code = _report(result, "started")
    _show_list(client)
    sys.exit(code)


# ---------------------------------------------------------------- OS service (cli/startup.py)

_INIT_CHOICE = click.Choice(["systemd", "launchd"])


@cli.command()
@click.argument("init_system", required=False, type=_INIT_CHOICE)
@click.option("--print", "print_only", is_flag=True, help="print the unit instead of installing it")
@click.option("--user", "user_name", help="as root: the user pmxd runs as (default: SUDO_USER, "
              "else root)")
@click.option("--home", "pmx_home", help="PMX_HOME of the service (default: $PMX_HOME when it is "
              "yours, else ~USER/.pmx)")
@click.option("--unit-dir", hidden=True, help="write the unit here instead (tests, staging)")
@handles_errors
def startup(init_system: str | None, print_only: bool, user_name: str | None,
            pmx_home: str | None, unit_dir: str | None) -> None:
    """Start pmxd at boot with the apps of the last `pmx save` (systemd or launchd).

    \b
      pmx startup                  detect the init system, write and enable the unit
      pmx startup systemd --print  show the unit without installing it
      pmx unstartup                disable and remove it
    """
    from . import startup as service

    sys.exit(service.startup(init_system, print_only=print_only, user=user_name,
                             pmx_home=pmx_home, unit_dir=unit_dir))


@cli.command()
@click.argument("init_system", required=False, type=_INIT_CHOICE)
@click.option("--user", "user_name", help="as root: the user whose unit to remove")
@click.option("--unit-dir", hidden=True, help="remove the unit from here instead")
@handles_errors
def unstartup(init_system: str | None, user_name: str | None, unit_dir: str | None) -> None:
    """Disable and remove the unit `pmx startup` installed (a running pmxd keeps running)."""
    from . import startup as service

    sys.exit(service.unstartup(init_system, user=user_name, unit_dir=unit_dir))


@cli.command()
@click.option("--once", is_flag=True, help="print one snapshot of the table and exit")
@handles_errors
def monit(once: bool) -> None:
    """Live monitor: processes, CPU, memory and logs, with keys to act on them."""
    from . import monit as live  # imports textual: only this command pays for it

    sys.exit(live.run(Client(), once=once or not sys.stdout.isatty()))


def main() -> None:
    try:
        cli(prog_name="pmx")
    except ConfigError as exc:  # pragma: no cover - handled in commands
        _fail(str(exc), ExitCode.USAGE)


if __name__ == "__main__":
    main()
