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
"""

from __future__ import annotations

import os
import socket


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
