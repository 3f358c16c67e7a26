"""Listening sockets for cluster mode, bound by the daemon and kept across restarts.

The daemon binds every `listen` address of a cluster app before any instance starts and
keeps the sockets open for as long as the app exists. Instances inherit them (fd 3 on),
so while an instance restarts or is replaced, connections wait in the kernel's backlog
instead of being refused. With `reuse_port`, each instance slot has its own
SO_REUSEPORT socket on the same address, also owned by the daemon and handed to the
slot's replacement: the kernel balances connections across slots.

Nothing is half-bound: `AppSockets.bind` (and each reuse_port slot) closes what it
opened when one address fails, and the error names the address, the app and the OS reason.

The app (app.py) closes its sockets when nothing of it runs any more (stopped, errored,
deleted), so clients are refused at once instead of waiting in a backlog nobody serves,
and binds them again on start. `unserved` tells which addresses no instance accepts on
(accepting.py), and `adopt` takes over a port a drop-in app bound itself (dropin.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .accepting import is_accepting, socket_inode
from .dropin import FAMILIES, ListenReport, take_socket
from .errors import SpawnError

log = logging.getLogger(__name__)

BACKLOG = 4096  # capped by net.core.somaxconn
MAX_LEARNED = 16  # sockets pmxd takes from one drop-in app (a hostile app could ask for more)
ACCEPT_POLL_S = 0.02  # how often a starting instance is checked for accepting
SERVED_LOOKS_S = (1.0, 2.0, 4.0)  # pauses between the looks for addresses nobody serves


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

    @property
    def bound_address(self) -> str:
        """The address as bound: port 0 resolved to the real port."""
        if self.unix_path is not None:
            return self.address
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

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

    def release_slots_except(self, kept: set[int]) -> None:
        """Close the reuse_port sockets of the other slots: the kernel would still hand
        them a share of the connections, which nobody would ever accept."""
        for index in [i for i in self.per_slot if i not in kept]:
            self.release_slot(index)

    def bound_addresses(self) -> list[str]:
        """The addresses as bound (port 0 resolved to the real port)."""
        sockets = self.shared or next(iter(self.per_slot.values()), [])
        return [item.bound_address for item in sockets]

    def unserved(self, pids: Mapping[int, int]) -> list[str]:
        """The addresses (as bound) that the processes of `pids` (slot -> main pid) do not
        accept connections on: a shared socket no process accepts on, or a reuse_port
        slot's socket its own process does not accept on."""
        found: list[str] = []
        checks = [(item, list(pids.values())) for item in self.shared] + [
            (item, [pid]) for index, pid in pids.items() for item in self.per_slot.get(index, [])]
        for item, candidates in checks:
            inode = socket_inode(item.sock.fileno())
            if not any(is_accepting(pid, [inode]) for pid in candidates) \
                    and item.bound_address not in found:
                found.append(item.bound_address)
        return found

    async def wait_accepting(self, index: int, pid: int, is_starting: Callable[[], bool]) -> bool:
        """Wait while `is_starting()` until `pid`'s process tree waits for connections on
        slot `index`'s sockets (accepting.py); False when it stopped starting first."""
        inodes = [socket_inode(item.sock.fileno()) for item in self.ensure_slot(index)]
        while inodes and is_starting():
            if is_accepting(pid, inodes):
                return True
            await asyncio.sleep(ACCEPT_POLL_S)
        return False

    def adopt(self, report: ListenReport, pid: int, pidfd: int) -> None:
        """Take a copy of the listening socket a drop-in app bound itself (`report.fd` in
        instance `pid`, or in the process of its group the report names): from now on
        pmxd holds it and every instance shares it."""
        for held in self.shared:
            if held.unix_path is None and held.sock.getsockname()[1] == report.port \
                    and FAMILIES.get(held.sock.family) == report.family:
                return  # already ours (another instance reported it first)
        if len(self.shared) >= MAX_LEARNED:
            log.warning("%s: not taking %s: an app shares at most %d learned sockets",
                        self.app, report.address, MAX_LEARNED)
            return
        try:
            if report.pid in (None, pid):
                sock = take_socket(pidfd, report.fd)
            else:  # a process of the instance's group, not its main one
                assert report.pid is not None
                other = os.pidfd_open(report.pid)
                try:
                    sock = take_socket(other, report.fd)
                finally:
                    os.close(other)
            # The report comes from the app: believe the socket, not the message.
            if sock.getsockname()[1] != report.port or FAMILIES.get(sock.family) != report.family \
                    or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.close()
                raise OSError(f"fd {report.fd} is not a socket listening on {report.address}")
            sock.listen(BACKLOG)  # the app may have asked for a small backlog
        except OSError as exc:
            log.warning("%s: cannot take the socket of %s from the app (%s); other "
                        "instances cannot share that port", self.app, report.address, exc)
            return
        self.shared.append(ListenSocket(report.address, sock))
        self.addresses = (*self.addresses, report.address)
        log.info("%s: pmxd now holds %s; every instance shares it", self.app, report.address)

    def close(self) -> None:
        for item in self.shared:
            item.close()
        for group in self.per_slot.values():
            for item in group:
                item.sock.close()
        self.shared = []
        self.per_slot = {}


async def find_unserved(sockets: Callable[[], AppSockets | None],
                        online: Callable[[], Mapping[int, int]],
                        reported: Sequence[str]) -> list[str] | None:
    """A few looks, some seconds apart, at the addresses no online instance accepts on
    (`online`: slot -> main pid): their clients would hang until their own timeout. An
    address seen served once is served; one not in `reported` yet is logged. None when no
    look saw an instance online, or the sockets closed meanwhile: nothing to tell."""
    pending: list[str] | None = None
    name = ""
    for pause in SERVED_LOOKS_S:
        await asyncio.sleep(pause)
        current, pids = sockets(), online()
        if current is None:
            return None
        name = current.app
        if pids:
            found = current.unserved(pids)
            pending = found if pending is None else [a for a in pending if a in found]
            if not pending:
                break
    for address in pending or ():
        if address not in reported:
            log.warning("%s: no instance accepts connections on %s (%gs after start-up): its "
                        "clients wait until they time out; serve every socket the app is given "
                        "(LISTEN_FDS, {fd}) or remove it from listen", name, address,
                        sum(SERVED_LOOKS_S))
    return pending
