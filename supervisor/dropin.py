"""Drop-in cluster mode: Node and Python apps that call listen(PORT) themselves.

PM2 users run `pm2 start app.js -i 4` with apps that bind their own port. pmx runs them
unchanged by loading a small preload into its own cluster children (never into anything
else): a Node `--require` module (NODE_OPTIONS) and a Python `sitecustomize` (PYTHONPATH).
The preloads live in `preload/` beside this module; their side of the contract is:

- PMX_CLUSTER=1 turns them on; PMX_CLUSTER_SOCKETS lists the daemon-owned listening
  sockets the instance inherited, as `FAMILY/HOST/PORT=FD` entries (inet or inet6).
- A listen on a listed port is served on the inherited socket instead of binding.
- Every TCP listen on a non-zero port is reported once it listens: family, host, port,
  the socket's fd in the app, and whether it was an inherited one. Node reports on the
  IPC channel Node itself expects (NODE_CHANNEL_FD, JSON lines), Python on NOTIFY_SOCKET
  (`PMX_LISTENING=...`). A report is the instance's readiness signal.
- On the stop signal, if the app installed no handler of its own, the preload drains the
  servers it manages (stop accepting, finish requests in flight, `Connection: close`)
  and exits before PMX_KILL_TIMEOUT_MS.

When an app declares no `listen`, pmxd learns the port: the first instance binds it
itself and reports it; pmxd takes a copy of that very socket (pidfd_getfd) and passes
it to every other instance and to every later replacement, so the port outlives any
instance exactly as a declared one does.

The IPC channel also carries PM2's app-side protocol: `process.send('ready')` (with
`wait_ready`) and the `'shutdown'` message (with `shutdown_with_message`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import AppSpec
from .logs import read_available
from .protocol import Json

log = logging.getLogger(__name__)

PRELOAD_DIR = Path(__file__).resolve().parent / "preload"
NODE_PRELOAD = PRELOAD_DIR / "node" / "pmx_cluster.js"
PYTHON_PRELOAD_DIR = PRELOAD_DIR / "python"
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
MAX_CHANNEL_BUFFER = 1024 * 1024  # a line longer than this closes the channel
FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}


def runtime_of(spec: AppSpec) -> str | None:
    """"node" or "python" when pmx has a preload for the program that runs the app."""
    program = os.path.basename(spec.command()[0])
    if program in ("node", "nodejs") or (program.startswith("node") and program[4:].isdigit()):
        return "node"
    if program.startswith(("python", "pypy")):
        return "python"
    return None


def uses_preload(spec: AppSpec) -> bool:
    return spec.is_cluster and spec.preload and runtime_of(spec) is not None


@dataclass(frozen=True, slots=True)
class ListenReport:
    """A preload's word that the app listens: where, and the socket's fd in the app."""

    family: str
    host: str
    port: int
    fd: int
    adopted: bool  # the app was given the daemon's socket (else it bound its own)
    pid: int | None = None  # the process holding `fd`, when not the instance's main one

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @staticmethod
    def from_node(message: Mapping[str, Json]) -> ListenReport | None:
        family, host, port, fd = (message.get(k) for k in ("family", "host", "port", "fd"))
        if family not in FAMILIES.values() or not isinstance(host, str) or len(host) > 100:
            return None
        if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(fd, int):
            return None
        return ListenReport(str(family), host, port, fd, message.get("adopted") is True)

    @staticmethod
    def from_notify(fields: Mapping[str, str], pid: int) -> ListenReport | None:
        """PMX_LISTENING=inet/0.0.0.0/8000, PMX_LISTEN_FD=5, PMX_ADOPTED=0|1."""
        family, _, rest = fields.get("PMX_LISTENING", "").partition("/")
        host, _, port = rest.rpartition("/")
        fd = fields.get("PMX_LISTEN_FD", "-1")
        if family not in FAMILIES.values() or not (port.isascii() and port.isdigit()):
            return None
        if not (fd.isascii() and fd.lstrip("-").isdigit()) or not 0 < int(port) < 65536:
            return None
        return ListenReport(family, host, int(port), int(fd), fields.get("PMX_ADOPTED") == "1", pid)


def socket_entry(sock: socket.socket, fd_in_child: int) -> str | None:
    """The PMX_CLUSTER_SOCKETS entry of a TCP listening socket; None for unix sockets."""
    family = FAMILIES.get(sock.family)
    if family is None:
        return None
    host, port = sock.getsockname()[:2]
    return f"{family}/{host}/{port}={fd_in_child}"


def preload_env(spec: AppSpec, sockets: Sequence[socket.socket], base_env: Mapping[str, str]
                ) -> dict[str, str]:
    """The variables that turn an instance's preload on, merged with the app's own."""
    runtime = runtime_of(spec)
    entries = [entry for index, sock in enumerate(sockets)
               if (entry := socket_entry(sock, 3 + index)) is not None]
    env = {"PMX_CLUSTER": "1", "PMX_CLUSTER_SOCKETS": ",".join(entries),
           "PMX_KILL_TIMEOUT_MS": str(round(spec.kill_timeout_s * 1000))}
    merged = {**base_env, **spec.env}
    if runtime == "node":
        own = merged.get("NODE_OPTIONS", "")
        # NODE_OPTIONS understands double quotes (with backslash escapes), not shell quoting.
        quoted = '"' + str(NODE_PRELOAD).replace("\\", "\\\\").replace('"', '\\"') + '"'
        env["NODE_OPTIONS"] = f"--require {quoted} {own}".strip()
    elif runtime == "python":
        own = merged.get("PYTHONPATH", "")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PYTHON_PRELOAD_DIR), own) if p)
    return env


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def take_socket(pidfd: int, fd: int) -> socket.socket:
    """A copy of the socket at `fd` in the process behind `pidfd` (Linux 5.6+).

    Raises OSError (EPERM when not allowed to ptrace it, EBADF for a wrong fd)."""
    copied = _libc().syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if copied < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    try:
        sock = socket.socket(fileno=copied)
    except OSError:
        os.close(copied)
        raise
    if sock.type != socket.SOCK_STREAM or sock.family not in FAMILIES:
        sock.close()
        raise OSError(f"fd {fd} is not a TCP socket")
    return sock


class NodeChannel:
    """The IPC channel Node expects on NODE_CHANNEL_FD: JSON, one message per line.

    pmxd keeps one end; the child gets the other at spawn. Messages from the app
    (`process.send(...)`) reach `on_message`; `send` writes one to the app."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[Json], None], *,
                 ours: socket.socket | None = None, buffered: bytes = b"") -> None:
        """`ours`: pmxd's end of a running app's channel, and what was read of its next
        message (after `pmx update`); else a new pair."""
        self._loop = loop
        self._on_message = on_message
        self._theirs: socket.socket | None = None
        if ours is None:
            self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self._ours = ours
        self._ours.setblocking(False)
        self._buffer = buffered
        self._open = True
        loop.add_reader(self._ours.fileno(), self._on_readable)

    def child_fd(self) -> int:
        assert self._theirs is not None
        return self._theirs.fileno()

    def spawned(self) -> None:
        """The child has its end: close ours of it."""
        if self._theirs is not None:
            self._theirs.close()
            self._theirs = None

    def hand_over(self) -> tuple[int, bytes]:
        """`pmx update`: stop reading; pmxd's end, kept open across exec, and any part of a
        message read so far."""
        self._open = False
        self._loop.remove_reader(self._ours.fileno())
        os.set_inheritable(self._ours.fileno(), True)
        return self._ours.fileno(), self._buffer

    def send(self, message: Json) -> bool:
        if not self._open:
            return False
        try:
            self._ours.send(json.dumps(message).encode() + b"\n")
        except OSError:
            return False
        return True

    def _on_readable(self) -> None:
        chunk = read_available(lambda: self._ours.recv(65536))
        if chunk is None:
            return
        if not chunk:
            self.close()
            return
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_CHANNEL_BUFFER:
            log.warning("closing a Node IPC channel: a message over %d bytes", MAX_CHANNEL_BUFFER)
            self.close()
            return
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            try:
                self._on_message(message)
            except Exception:
                log.exception("bug: handling a message from a Node app failed")

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self._ours.fileno())
            self._ours.close()
            if self._theirs is not None:
                with contextlib.suppress(OSError):
                    self._theirs.close()


def describe_mode(spec: AppSpec) -> str:
    """How the app runs, in words, for `describe`."""
    if not spec.is_cluster:
        return "fork: each instance on its own"
    how = "one SO_REUSEPORT socket per instance" if spec.reuse_port else "shared sockets"
    if uses_preload(spec):
        declared = "declared in listen" if spec.listen else "learned from the app"
        return (f"cluster: {how} owned by pmxd ({declared}); {runtime_of(spec)} preload "
                "routes the app's own listen() to them")
    return f"cluster: {how} owned by pmxd, passed as fd 3 on (LISTEN_FDS)"
