"""The commands about pmxd itself: ping, kill, update, save, resurrect, and running it at
boot as an OS service (startup, unstartup; the work is in cli/startup.py).

Registered on the `pmx` group by main.py.
"""

from __future__ import annotations

import os
import sys
import time

import click
from pmx.supervisor.errors import ExitCode, PmxError
from pmx.supervisor.home import DAEMON_LOG, DUMP_FILE
from pmx.supervisor.protocol import Command

from . import render
from .client import Client, pid_alive
from .outcome import fail, handles_errors, report_start, show_list
from .usage import TABLE_OPTION


@click.command()
@handles_errors
def ping() -> None:
    """Is pmxd up? Its version, pid and home."""
    click.echo(render.ping_line(Client().call(Command.PING, timeout_s=5)))


@click.command()
@handles_errors
def kill() -> None:
    """Stop every app, then the daemon."""
    client = Client()
    if not client.has_daemon_files() or client.is_dead():
        click.echo("[pmx] pmxd is not running")
        return
    result = client.call(Command.KILL, timeout_s=120)
    pid = result.get("pid")
    deadline = time.monotonic() + 10
    while isinstance(pid, int) and pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if isinstance(pid, int) and pid_alive(pid):
        fail(f"pmxd (pid {pid}) stopped its apps but did not exit within 10s", ExitCode.FAILED)
    click.echo(f"[pmx] stopped every app and pmxd (pid {pid})")


@click.command()
@handles_errors
def update() -> None:
    """Replace the running pmxd with the installed version; the apps keep running."""
    client = Client()
    before = client.call(Command.PING)
    running = _running_pids(client)
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
            fail(f"the new pmxd did not answer within 30s; see PMX_HOME/{DAEMON_LOG}",
                 ExitCode.FAILED)
        time.sleep(0.05)
    kept = len(running & _running_pids(client))
    replaced = f"; {len(running) - kept} restarted" if kept < len(running) else ""
    click.echo(f"[pmx] pmxd {before.get('version')} -> {after.get('version')} (pid "
               f"{after.get('pid')}) in {time.monotonic() - began:.2f}s; {kept} of "
               f"{len(running)} app processes kept running, same pids{replaced}")


def _running_pids(client: Client) -> set[int]:
    rows = client.call(Command.LIST).get("instances")
    pids = (row.get("pid") for row in (rows if isinstance(rows, list) else [])
            if isinstance(row, dict))  # a row has a pid while its process runs
    return {pid for pid in pids if isinstance(pid, int)}


@click.command()
@click.option("--force", is_flag=True, help="save even an empty list over a non-empty dump")
@handles_errors
def save(force: bool) -> None:
    """Write the running apps to PMX_HOME/dump.toml (an ecosystem file)."""
    result = Client().call(Command.SAVE, {"force": force})
    click.echo(f"[pmx] saved {result.get('apps')} apps to {result.get('path')}")


@click.command()
@TABLE_OPTION
@handles_errors
def resurrect(show_table: bool) -> None:
    """Start the apps of the last `pmx save` that do not run (pmxd too, if need be)."""
    client = Client()
    dump = client.home / DUMP_FILE
    if not dump.exists():  # said before starting a daemon for nothing
        fail(f"no dump at {dump}; run pmx save first", ExitCode.FAILED)
    client.ensure_daemon()
    result = client.call(Command.RESURRECT, {"base_env": dict(os.environ)}, timeout_s=60)
    if not any(result.get(key) for key in ("started", "already_running", "errors")):
        click.echo(f"[pmx] {result.get('path')} holds no app; nothing to start")
    code = report_start(result, [], command="resurrect")
    if show_table:
        show_list(client)
    sys.exit(code)


# ---------------------------------------------------------------- OS service (cli/startup.py)

_INIT_CHOICE = click.Choice(["systemd", "launchd"])


@click.command()
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


@click.command()
@click.argument("init_system", required=False, type=_INIT_CHOICE)
@click.option("--user", "user_name", help="as root: the user whose unit to remove")
@click.option("--unit-dir", hidden=True, help="remove the unit from here instead")
@handles_errors
def unstartup(init_system: str | None, user_name: str | None, unit_dir: str | None) -> None:
    """Disable and remove the unit `pmx startup` installed (a running pmxd keeps running)."""
    from . import startup as service

    sys.exit(service.unstartup(init_system, user=user_name, unit_dir=unit_dir))


COMMANDS = (ping, kill, update, save, resurrect, startup, unstartup)
