"""`pmx web`: the browser dashboard, JSON API and Prometheus /metrics (package pmx.web).

A separate client of pmxd, like `pmx monit`: it needs no running daemon to start, shows
"daemon unreachable" while there is none, and follows the next one. It listens on
loopback unless --allow-remote is given. aiohttp is imported only when it serves, so no
other command pays for it. Registered on the `pmx` group by main.py.

A serving `pmx web` writes where it listens to PMX_HOME/web.address (and removes it when
it stops), so that `pmx web --show-token` without --listen links to that port.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from . import usage
from .client import home_path
from .outcome import handles_errors

DEFAULT_LISTEN = "127.0.0.1:9615"
ADDRESS_FILE = "web.address"  # in PMX_HOME: where the serving `pmx web` listens


def parse_listen(text: str) -> tuple[str, int]:
    """"HOST:PORT" or "[IPV6]:PORT" -> (host, port); raises ValueError saying why."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f'--listen must look like 127.0.0.1:9615 or [::1]:9615, got "{text}"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    import ipaddress

    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f'--listen needs an IP address or localhost, got "{host}"') from None
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    import ipaddress

    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def page_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


@click.command()
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="address to serve on")
@click.option("--allow-remote", is_flag=True,
              help="allow an address other than loopback (plain HTTP: put TLS in front)")
@click.option("--show-token", is_flag=True, help="print the access token and the page's URL, then exit")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="read the token from this file (created 0600 if missing); "
                   "default PMX_HOME/web.token")
@handles_errors
def web(listen: str, allow_remote: bool, show_token: bool, token_file: Path | None) -> None:
    """Serve the web dashboard, the JSON API and Prometheus /metrics."""
    from pmx.web.token import default_token_path, load_or_create_token

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        usage.refuse(str(exc))
    home = home_path()
    path = token_file.absolute() if token_file else default_token_path(home)
    token = load_or_create_token(path, home=home)
    if show_token:
        if click.get_current_context().get_parameter_source("listen") is ParameterSource.DEFAULT:
            host, port = recorded_address(home) or (host, port)  # the one serving, if any
        click.echo(token)
        click.echo(f"{page_url(host, port)}#token={token}", err=True)
        return
    if not is_loopback(host):
        if not allow_remote:
            usage.refuse(f"{listen} is reachable from other machines; pass --allow-remote to "
                         "serve there (plain HTTP: put TLS in front of it)")
        click.echo(f"pmx web: warning: serving on {listen}, reachable from other machines over "
                   "plain HTTP; the token crosses the network in clear unless TLS is in front",
                   err=True)
    _serve(home, token, host, port)


def _serve(home: Path, token: str, host: str, port: int) -> None:
    import asyncio
    import logging

    from pmx.web.server import serve  # imports aiohttp: only this command pays for it

    logging.basicConfig(level=logging.WARNING, format="pmx web: %(levelname)s %(message)s")
    serving: list[str] = []  # the address once this one listens (and recorded it)

    def ready(address: str) -> None:
        url = page_url(host, port)
        # The token goes to a terminal only, never to a log file (under pmx, stdout is one).
        opened = f"{url}#token={token}" if sys.stdout.isatty() else \
            f"{url} (token: pmx web --show-token)"
        click.echo(f"[pmx] web: serving {address} for pmxd in {home}; open {opened}")
        sys.stdout.flush()
        _record_address(home, address)
        serving.append(address)

    try:
        asyncio.run(serve(home, token, host, port, ready))
    except KeyboardInterrupt:
        pass  # a second Ctrl-C while shutting down
    finally:
        # Ours only: not one that failed to bind, nor another `pmx web` started since.
        if serving and recorded_address(home) == (host, port):
            with contextlib.suppress(OSError):
                os.unlink(home / ADDRESS_FILE)


def _record_address(home: Path, address: str) -> None:
    """Best effort: a home that is not there yet only costs --show-token the port."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with contextlib.suppress(OSError), os.fdopen(os.open(home / ADDRESS_FILE, flags, 0o600),
                                                  "w") as file:
        file.write(address + "\n")


def recorded_address(home: Path) -> tuple[str, int] | None:
    """(host, port) of the `pmx web` serving this home, as it wrote it; None without one."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        with os.fdopen(os.open(home / ADDRESS_FILE, flags), "rb") as file:
            return parse_listen(file.read(256).decode().strip())
    except (OSError, ValueError):  # missing, planted, or not an address (UnicodeError too)
        return None


COMMANDS = (web,)
