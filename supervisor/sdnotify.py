"""A tiny helper for Python apps run by pmx (or systemd): tell the supervisor you are ready.

    from pmx.supervisor.sdnotify import notify_ready
    ...bind, load, warm caches...
    notify_ready()                      # sends READY=1 to $NOTIFY_SOCKET

Without pmx installed, the same takes four lines of the standard library::

    import os, socket
    if path := os.environ.get("NOTIFY_SOCKET"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", path.replace("@", "\\0", 1) if path[0] == "@" else path)

Both are no-ops when NOTIFY_SOCKET is not set, so an app behaves the same outside pmx.
pmxd uses the same to tell systemd about itself (`tell_systemd`, `watchdog_loop`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


def send(message: str) -> bool:
    """Send one raw notify message ("READY=1\nSTATUS=..."); True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def notify(**fields: str) -> bool:
    """Send KEY=value lines (READY="1", STATUS="warming up", STOPPING="1"); True if sent."""
    return send("\n".join(f"{key}={value}" for key, value in fields.items()))


def notify_ready(status: str | None = None) -> bool:
    fields = {"READY": "1"}
    if status:
        fields["STATUS"] = status
    return notify(**fields)


def notify_stopping() -> bool:
    return notify(STOPPING="1")


def tell_systemd(message: str) -> None:
    """sd_notify for pmxd itself (Type=notify); a no-op when not run by systemd."""
    if os.environ.get("NOTIFY_SOCKET") and not send(message):
        log.warning("cannot notify systemd at %s", os.environ.get("NOTIFY_SOCKET"))


async def watchdog_loop() -> None:
    """Keep systemd's watchdog (WatchdogSec=) fed at half its period, if it is on for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    watchdog_pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (watchdog_pid and watchdog_pid != str(os.getpid())):
        return
    while True:
        tell_systemd("WATCHDOG=1")
        await asyncio.sleep(int(usec) / 2e6)
