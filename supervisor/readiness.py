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

`Readiness` applies these to one app's new instances, together with what drop-in cluster
mode adds: a preload's listen reports, and seeing the instance accept on the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .dropin import ListenReport, uses_preload
from .errors import SpawnError
from .process import Instance, NotReadyInTime
from .states import RUNNING, State

if TYPE_CHECKING:
    from .app import AppGroup

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


LISTEN_SETTLE_S = 0.1  # quiet time after a listen report before the other instances start


class Readiness:
    """When a new instance of one app counts as ready: its readiness checks (ready_check,
    wait_ready), its preload's listen reports, or being seen accepting on the app's
    sockets. In drop-in cluster mode a listen report also teaches pmxd the app's port."""

    def __init__(self, app: AppGroup) -> None:
        self._app = app
        self._heard_listening = asyncio.Event()  # a preload reported a listen (dropin.py)

    def on_listening(self, instance: Instance, report: ListenReport) -> None:
        """A preload says `instance` listens. A port the app bound itself becomes the
        app's: pmxd takes a copy of that socket and every other instance shares it."""
        spec, sockets = self._app.spec, self._app.sockets
        log.info("%s (pid %s) listens on %s%s", instance.name, instance.pid, report.address,
                 " (the shared socket)" if report.adopted else "")
        # Only a port learned from the app: with `listen` declared, the cluster's
        # addresses are those, and the app's other ports stay its own business.
        if not report.adopted and sockets is not None and uses_preload(spec) \
                and not spec.listen and instance.pid is not None and instance.pidfd is not None:
            sockets.adopt(report, instance.pid, instance.pidfd)
        self._heard_listening.set()
        if not spec.wait_ready and not spec.ready_check:
            instance.mark_ready(f"listening on {report.address}")

    def must_learn_port(self) -> bool:
        spec, sockets = self._app.spec, self._app.sockets
        return uses_preload(spec) and not spec.listen and sockets is not None and not sockets.shared

    async def wait_listening(self, instance: Instance) -> None:
        """The first instance of an app whose port is not known yet: wait until it listens
        (or exits, or listen_timeout passes) before starting the others on its socket."""
        self._heard_listening.clear()
        heard = asyncio.ensure_future(self._heard_listening.wait())
        exited = asyncio.ensure_future(instance.wait_exit())
        try:
            await asyncio.wait({heard, exited}, timeout=self._app.spec.listen_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            heard.cancel()
            exited.cancel()
        # An app may listen on several sockets one after the other (aiohttp binds IPv4,
        # then IPv6): the others start once the reports have stopped coming.
        while self._heard_listening.is_set() and instance.pid is not None:
            self._heard_listening.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heard_listening.wait(), LISTEN_SETTLE_S)

    async def settle_start(self, instance: Instance) -> None:
        """A plain start with a readiness check: online when ready, or after listen_timeout."""
        try:
            await self.wait(instance)
        except SpawnError as exc:
            if instance.state is State.STARTING:
                log.warning("%s: %s; counting it online as PM2 does", instance.name, exc)
                instance.mark_ready(f"assumed ready: {exc}")

    async def wait(self, instance: Instance) -> None:
        """Until `instance` is ready; SpawnError when it exits or a check never passes."""
        spec = self._app.spec
        if spec.ready_check:
            check = spec.ready_check.replace("{instance}", str(instance.index))
            inheritance = self._app.inheritance(instance.index)
            if inheritance is not None and inheritance.port is not None:
                check = check.replace("{port}", str(inheritance.port))
            probe = wait_probe(check, lambda: instance.state in RUNNING)
            try:
                async with asyncio.timeout(spec.listen_timeout_s):
                    passed = await probe
            except TimeoutError:
                raise SpawnError(f"{instance.name} (pid {instance.pid}): {check} did not "
                                 f"answer within listen_timeout ({spec.listen_timeout_s:g}s)") from None
            if not passed:
                raise SpawnError(f"{instance.name} exited before it was ready "
                                 f"({instance.last_exit}){instance.stderr_excerpt()}")
            instance.mark_ready(f"ready: {check} answered")
        elif spec.wait_ready:
            await instance.wait_ready(spec.listen_timeout_s)
        else:
            # No setting: ready when the app listens (its preload says so) or is seen
            # accepting on its sockets; a program pmx cannot see (a worker) is ready once it
            # has stayed up for listen_timeout.
            watcher = asyncio.ensure_future(self._watch_accepting(instance))
            try:
                await instance.wait_ready(spec.listen_timeout_s)
            except NotReadyInTime:
                instance.mark_ready(f"up for listen_timeout ({spec.listen_timeout_s:g}s)")
            finally:
                watcher.cancel()

    async def _watch_accepting(self, instance: Instance) -> None:
        sockets = self._app.sockets
        if sockets is not None and instance.pid is not None and await sockets.wait_accepting(
                instance.index, instance.pid,
                lambda: instance.state in (State.STARTING, State.LAUNCHING)):
            instance.mark_ready("accepting connections")
