"""Listening sockets for cluster mode, bound by the daemon and kept across restarts.

The daemon binds every `listen` address of a cluster app before any instance starts and
keeps the sockets open for as long as the app exists. Instances inherit them (fd 3 on),
so while an instance restarts or is replaced, connections wait in the kernel's backlog
instead of being refused. With `reuse_port`, each instance slot has its own
SO_REUSEPORT socket on the same address, also owned by the daemon and handed to the
slot's replacement: the kernel balances connections across slots.

Nothing is half-bound: `AppSockets.bind` (and each reuse_port slot) closes what it
opened when one address fails, and the error names the address, the app and the OS reason.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass, field

from .errors import SpawnError

log = logging.getLogger(__name__)

BACKLOG = 4096  # capped by net.core.somaxconn


@dataclass
class ListenSocket:
    address: str
    sock: socket.socket
    unix_path: str | None = None

    @property
    def port(self) -> int | None:
        if self.unix_path is not None:
            return None
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def bind_address(address: str, app: str, *, reuse_port: bool = False) -> ListenSocket:
    """Bind one listening socket. Raises SpawnError naming the address and the app."""
    try:
        if address.startswith("unix:"):
            return _bind_unix(address, app)
        host, port = _split_host_port(address)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return ListenSocket(address, sock)
    except socket.gaierror as exc:
        raise SpawnError(f'cannot bind {address} for app "{app}": {exc.strerror}') from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        raise SpawnError(f'cannot bind {address} for app "{app}": {reason.lower()}') from None


def _bind_unix(address: str, app: str) -> ListenSocket:
    path = address[len("unix:"):]
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise SpawnError(f'cannot bind {address} for app "{app}": {path} exists and is not '
                             "a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens there any more
        except OSError:
            pass
        else:
            raise SpawnError(f'cannot bind {address} for app "{app}": address already in use')
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)  # owner and group: a front proxy in the group may connect
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return ListenSocket(address, sock, unix_path=path)


@dataclass
class AppSockets:
    """All listening sockets of one cluster app: shared ones, or one set per slot."""

    app: str
    addresses: tuple[str, ...]
    reuse_port: bool
    shared: list[ListenSocket] = field(default_factory=list)
    per_slot: dict[int, list[ListenSocket]] = field(default_factory=dict)

    def bind(self) -> None:
        """Bind the shared sockets (or the first slot's), all or nothing."""
        if self.reuse_port:
            self.ensure_slot(0)
            return
        opened: list[ListenSocket] = []
        try:
            for address in self.addresses:
                opened.append(bind_address(address, self.app))
        except SpawnError:
            for item in opened:
                item.close()
            raise
        self.shared = opened

    def ensure_slot(self, index: int) -> list[ListenSocket]:
        if not self.reuse_port:
            return self.shared
        if index not in self.per_slot:
            opened: list[ListenSocket] = []
            try:
                for address in self.addresses:
                    opened.append(bind_address(address, self.app, reuse_port=True))
            except SpawnError:
                for item in opened:
                    item.close()
                raise
            self.per_slot[index] = opened
        return self.per_slot[index]

    def release_slot(self, index: int) -> None:
        for item in self.per_slot.pop(index, []):
            item.sock.close()  # reuseport slots never own a unix path

    def bound_addresses(self) -> list[str]:
        """The addresses as bound (port 0 resolved to the real port)."""
        sockets = self.shared or next(iter(self.per_slot.values()), [])
        result = []
        for item in sockets:
            if item.unix_path is not None:
                result.append(item.address)
            else:
                host, port = item.sock.getsockname()[:2]
                result.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return result

    def close(self) -> None:
        for item in self.shared:
            item.close()
        for group in self.per_slot.values():
            for item in group:
                item.sock.close()
        self.shared = []
        self.per_slot = {}
