"""PMX_HOME: where it is, its safety checks, the daemon's lock, and every file name in it.

The CLI imports the names from here, so client and daemon can never disagree on where
a socket or the pid file lives. Standard library only (the CLI's start-up time counts).

    PMX_HOME/            0700, owned by the daemon's user
      rpc.sock           requests (ZeroMQ ROUTER), 0600
      pub.sock           events, stats and logs (ZeroMQ PUB), 0600
      quick.sock         list and ping on a plain Unix socket (quick.py), 0600
      notify.sock        the apps' NOTIFY_SOCKET (readiness), 0600
      pmxd.lock          flock held for the daemon's whole life
      pmxd.pid           the daemon's pid, written once the lock is held
      pmxd.log           the daemon's own log
      state.json         the live state, for crash recovery (recovery.py)
      spawned.jsonl      the spawn journal: pids spawned since state.json was last
                         written; state.json and it are removed by a clean stop
      dump.toml          `pmx save` (and dump.toml.bak, the one before)
      logs/              the apps' logs (unless out_file/error_file put them elsewhere)
      clients/           client slots: `count`, and one lock file per client connection
                         pmxd keeps file descriptors for (see client_slots)
      web.token          `pmx web`'s access token, 0600, made by pmx web (web/token.py),
                         not by pmxd

Files are 0600 and folders 0700: pmxd runs under a 077 umask, and also sets the mode
of its sockets, pid file and log, and of the files safe_files.py makes (the apps' logs,
the temporaries of state.json and dump.toml), explicitly.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat
from pathlib import Path
from typing import TextIO

from .errors import HomeError

RPC_SOCKET = "rpc.sock"
PUB_SOCKET = "pub.sock"
QUICK_SOCKET = "quick.sock"  # list and ping without ZeroMQ (quick.py)
NOTIFY_SOCKET = "notify.sock"
LOCK_FILE = "pmxd.lock"
PID_FILE = "pmxd.pid"
DAEMON_LOG = "pmxd.log"
STATE_FILE = "state.json"
SPAWN_JOURNAL = "spawned.jsonl"  # pids spawned since state.json was last written
DUMP_FILE = "dump.toml"
LOGS_DIR = "logs"
CLIENTS_DIR = "clients"
CLIENT_SLOT_COUNT = "count"


def default_home() -> Path:
    """$PMX_HOME, or ~/.pmx."""
    return Path(os.environ.get("PMX_HOME") or Path.home() / ".pmx")


def prepare_home(home: Path) -> None:
    """Create the home 0700, or refuse one that another user could tamper with."""
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(home)
    except OSError as exc:
        raise HomeError(f"cannot use home {home}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise HomeError(f"refusing home {home}: it is a symlink or not a directory")
    if info.st_uid != os.getuid():
        raise HomeError(f"refusing home {home}: it belongs to uid {info.st_uid}, not to you "
                        f"(uid {os.getuid()})")
    if info.st_mode & 0o022:
        raise HomeError(f"refusing home {home}: it is writable by group or others "
                        f"(mode {stat.S_IMODE(info.st_mode):o}); chmod 700 it")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(home, 0o700)
    (home / LOGS_DIR).mkdir(mode=0o700, exist_ok=True)


class HomeLock:
    """An exclusive flock on home/pmxd.lock plus the pid file, held for the daemon's life."""

    def __init__(self, home: Path) -> None:
        self.path = home / LOCK_FILE
        self.pid_path = home / PID_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        # As the pid file below: never through a symlink, and 0600 whatever the umask or
        # the mode of a lock file left by an older pmx.
        fd = open_no_link(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise HomeError(f"pmxd is already running (pid {self.holder()}) in "
                                f"{self.path.parent}") from None
            raise
        self._fd = fd
        try:
            # O_NOFOLLOW and fchmod: the mode is set, never left to the umask (issue 16).
            pid_fd = os.open(self.pid_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(pid_fd, 0o600)
                os.write(pid_fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(pid_fd)
        except OSError as exc:  # a full disk, most likely: say so rather than hang
            self.release()
            raise HomeError(f"cannot write {self.pid_path}: {exc.strerror}") from None

    def holder(self) -> str:
        try:
            return self.pid_path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            self.pid_path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def open_no_link(path: Path, flags: int) -> int:
    """os.open with O_NOFOLLOW in `flags` (creating 0600); a symlink there is a HomeError."""
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise HomeError(f"refusing {path}: it is a symlink") from None
        raise


def open_private_log(path: Path) -> TextIO:
    """`path` (pmxd.log) opened to append text: created 0600 (an existing file is made
    0600), never through a symlink, and only a regular file (a FIFO would block)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = open_no_link(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HomeError(f"refusing {path}: not a regular file")
        os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
    except BaseException:
        os.close(fd)
        raise


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; return the soft limit in force.

    libzmq aborts the whole process on EMFILE, and every child costs two pipe fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# ---------------------------------------------------------------- fds for clients
#
# libzmq's ipc listener accepts every connection at once and aborts the whole process
# when accept() fails with EMFILE (libzmq 4.3.5, src/ipc_listener.cpp: EMFILE is not
# among the errors it tolerates), so a burst of clients must never find pmxd out of fds.
# pmxd keeps fds free for a number of client connections (spawns are refused before they
# eat into them, see spawn.py), and clients take a slot before they connect: an flock on
# one of the files in home/clients/, held while the connection lives (the kernel releases
# it when a client dies). A client finding every slot taken waits, then says pmxd is busy.

MIN_FD_RESERVE = 64  # fds spawns always leave free, whatever the limit
OWN_FD_SPARE = 48  # of them, pmxd's own passing needs (/proc reads, rotation, state file)


def client_slots(fd_limit: int) -> int:
    """How many client connections pmxd keeps fds for under `fd_limit`."""
    return max(16, min(1024, fd_limit // 16))


def fd_reserve(fd_limit: int) -> int:
    """How many fds a spawn must leave free: the client slots and pmxd's own spare."""
    return max(MIN_FD_RESERVE, client_slots(fd_limit) + OWN_FD_SPARE)


def prepare_client_slots(home: Path, fd_limit: int) -> int:
    """Create home/clients/ with one lock file per slot and `count`; the slot count."""
    count = client_slots(fd_limit)
    directory = home / CLIENTS_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    for number in range(count):
        os.close(os.open(directory / str(number), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC,
                         0o600))
    staged = directory / f"{CLIENT_SLOT_COUNT}.new"
    staged.write_text(f"{count}\n")
    os.replace(staged, directory / CLIENT_SLOT_COUNT)
    return count
