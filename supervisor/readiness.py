"""When a new instance counts as ready: the notify socket, TCP/HTTP probes, or uptime.

1. `wait_ready = true`: the app sends "READY=1" to $NOTIFY_SOCKET, systemd's notify
   protocol, so apps that support systemd notification work unchanged. pmxd has one
   datagram socket for all instances and learns the sender's pid from the kernel
   (SO_PASSCRED), never from the message; a sender counts for an instance when it is
   the instance's main process or in its process group (a worker announcing for it).
   STATUS=... is kept for `describe`; STOPPING=1 is logged.
2. `ready_check`: "tcp:HOST:PORT" must accept a connection, or "http://..." must answer
   2xx/3xx; probed every 100 ms.
3. Neither: a reload's replacement is ready once it has stayed up for listen_timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 0.1
MAX_DATAGRAM = 4096

NotifyHandler = Callable[[int, dict[str, str]], None]  # (sender pid, fields)


class NotifySocket:
    """The daemon's NOTIFY_SOCKET: a unix datagram socket that reads sender credentials."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: Path, handler: NotifyHandler) -> None:
        self.path = str(path)
        self._loop = loop
        self._handler = handler
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(self.path)
        # Like everything in the home: the home is 0700, so an app run as another user
        # (user = "...") could not reach it anyway, and a looser mode would only show.
        os.chmod(self.path, 0o600)
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(64):
            try:
                data, ancillary, _, _ = self._sock.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(struct.calcsize("3i")))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("notify socket: %s", exc)
                return
            pid = _sender_pid(ancillary)
            if pid is None:
                continue
            fields = parse_notify(data)
            if fields:
                self._handler(pid, fields)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        Path(self.path).unlink(missing_ok=True)


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, _, _ = struct.unpack("3i", data[: struct.calcsize("3i")])
            return int(pid)
    return None


def parse_notify(data: bytes) -> dict[str, str]:
    """"READY=1\\nSTATUS=warming up" -> {"READY": "1", "STATUS": "warming up"}."""
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value[:200]
    return fields


async def probe_once(check: str, timeout_s: float = 1.0) -> bool:
    """One TCP connect or HTTP GET; True when it succeeded (HTTP: 2xx or 3xx)."""
    try:
        if check.startswith("tcp:"):
            host, _, port = check[4:].rpartition(":")
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.close()
            return True
        return await _http_ok(check, timeout_s)
    except (OSError, TimeoutError, ValueError):
        return False


async def _http_ok(url: str, timeout_s: float) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\n"
                         "Connection: close\r\n\r\n".encode())
            status_line = await reader.readline()
        finally:
            writer.close()
    pieces = status_line.split()
    return len(pieces) >= 2 and pieces[1][:1] in (b"2", b"3")


async def wait_probe(check: str, is_alive: Callable[[], bool]) -> bool:
    """Probe until it succeeds; False as soon as the instance is gone."""
    while is_alive():
        if await probe_once(check):
            return True
        await asyncio.sleep(PROBE_INTERVAL_S)
    return False
