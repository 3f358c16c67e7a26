"""Talking to pmxd: requests over the ROUTER socket, the publish stream, starting the daemon.

Every request times out and says what it waited for. The daemon is started (as PM2
does) only by commands that need one running; `ping`, `list` and friends report that
none runs instead of starting one. A daemon that died without cleaning up (SIGKILL, OOM)
leaves its socket and pid file behind: before waiting for an answer, the client checks
that the pid file names a live process holding the home's lock, and says at once that
pmxd is not running otherwise.

Before it connects, a client takes one of pmxd's client slots (an flock on a file in
home/clients/, see supervisor/home.py): pmxd keeps file descriptors free for that many
connections, because libzmq aborts it when accept() runs out of them. A client finding
every slot taken waits, then says pmxd is busy. Subscriptions (`logs`, `monit`, `web`),
which last, may take only SUBSCRIBER_SHARE of the slots, so requests always get through.

`SubscriberThread` is what `pmx monit`'s feed (monit_feed.py) and `pmx web`'s (web/feed.py)
share: a SUB socket and a Client in a thread of their own, reconnecting every RECONNECT_S
while pmxd is away, saying so once, and reading the stream one period at a time.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

import zmq
from pmx.supervisor.errors import CommandError, DaemonUnreachable, PmxError, ProtocolError
from pmx.supervisor.home import (
    CLIENT_SLOT_COUNT,
    CLIENTS_DIR,
    DAEMON_LOG,
    LOCK_FILE,
    PID_FILE,
    PUB_SOCKET,
    RPC_SOCKET,
    default_home,
)
from pmx.supervisor.procfs import read_stat
from pmx.supervisor.protocol import (
    MAX_MESSAGE_BYTES,
    PUBLISH_HWM,
    Command,
    JsonObject,
    Request,
    decode_publication,
    decode_reply,
    encode_request,
)

from .render import home_relative

DEFAULT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 10.0
LIVENESS_CHECK_S = 0.25  # while waiting for a reply: how often to check pmxd still lives
SUBSCRIBER_SHARE = 0.75  # of the client slots, what long-lived subscriptions may hold
SLOT_RETRY_S = 0.1
SLOT_WAIT_S = 10.0  # at most, for a free slot (a request waits no longer than its timeout)
RECONNECT_S = 1.0  # how often a SubscriberThread tries again while pmxd is away


def home_path() -> Path:
    """The home this client talks to ($PMX_HOME, or ~/.pmx), absolute."""
    return Path(os.path.abspath(default_home()))


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie holds no lock and answers nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True  # no /proc (macOS): the signal probe is all we have
    stat = read_stat(pid)
    return stat is not None and stat.state != "Z"


def _stopped(pid: int) -> bool:
    """The process is stopped by a signal (state T) or a tracer (t)."""
    stat = read_stat(pid)
    return stat is not None and stat.state in ("T", "t")


def lock_is_held(path: Path) -> bool:
    """Some process holds the flock on `path` (pmxd holds pmxd.lock for its whole life).

    Probed with a non-blocking shared lock, released at once. True whenever we cannot
    tell, so that a doubt costs the usual timeout rather than a false "not running"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # no lock file: not a crash's leftover (pmxd never removes it); unknown
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True  # EWOULDBLOCK: held; anything else: we cannot tell
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class Client:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home or home_path()
        self.rpc_path = self.home / RPC_SOCKET
        self.pub_path = self.home / PUB_SOCKET
        self.pid_path = self.home / PID_FILE
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._subscriber_slots: dict[zmq.Socket[bytes], int] = {}

    @property
    def context(self) -> zmq.Context[zmq.Socket[bytes]]:
        if self._context is None:
            self._context = zmq.Context()
        return self._context

    def close(self) -> None:
        for slot in self._subscriber_slots.values():
            os.close(slot)
        self._subscriber_slots.clear()
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    def is_running(self) -> bool:
        if not self.rpc_path.exists():
            return False
        try:
            self.call(Command.PING, timeout_s=2.0)
        except DaemonUnreachable:
            return False
        return True

    def has_daemon_files(self) -> bool:
        """Both the request socket and the pid file exist. pmxd removes both when it stops;
        a socket without a pid file is stale."""
        return self.rpc_path.exists() and self.pid_path.exists()

    def is_dead(self) -> bool:
        """The daemon files are left over: the pid file names a dead process, or a live one
        (a recycled pid) while nobody holds the lock. Cheap: no request is sent."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            pid = None  # unreadable: the lock decides
        if pid is not None and not pid_alive(pid):
            return True
        return not lock_is_held(self.home / LOCK_FILE)

    def not_running(self) -> DaemonUnreachable:
        return DaemonUnreachable(f"pmxd is not running (home {home_relative(self.home)}); "
                                 "start it with pmx start or pmxd")

    def call(self, command: Command, args: JsonObject | None = None, *,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> JsonObject:
        """Send one request, wait for its reply; raise CommandError for error replies."""
        if not self.has_daemon_files() or self.is_dead():
            raise self.not_running()
        self._check_access()
        request = Request(command, args or {})
        data = encode_request(request)
        if len(data) > MAX_MESSAGE_BYTES:
            # pmxd's socket drops a message over its limit unread, so it could not even
            # say no: refuse here, at once.
            raise CommandError("too_large", f"the {command.value} request is {len(data):,} bytes, "
                                            f"over pmx's {MAX_MESSAGE_BYTES:,} byte limit; "
                                            "large environments or env values are the usual cause")
        slot = self._take_slot(1.0, min(timeout_s, SLOT_WAIT_S))
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(f"ipc://{self.rpc_path}")
            sock.send(data)
            deadline = time.monotonic() + timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._no_answer(command, timeout_s)
                if not sock.poll(int(min(remaining, LIVENESS_CHECK_S) * 1000)):
                    # A long command (reload: up to 600 s) must not outlive its daemon.
                    if self.is_dead():
                        raise DaemonUnreachable(
                            f"pmxd died while running {command.value} (home "
                            f"{home_relative(self.home)}); see {DAEMON_LOG} there")
                    continue
                frames = sock.recv_multipart()
                try:
                    reply = decode_reply(frames[-1])
                except ProtocolError as exc:
                    raise DaemonUnreachable(
                        f"pmxd answered something that is not a pmx reply ({exc}); "
                        f"home {home_relative(self.home)}") from None
                if reply.id and reply.id != request.id:
                    continue  # a late reply to an earlier request on a reused identity
                if not reply.ok:
                    if reply.error_code == "denied":
                        raise CommandError("denied", f"permission denied by pmxd in "
                                                     f"{home_relative(self.home)}")
                    raise CommandError(reply.error_code, reply.error_message)
                return reply.result
        finally:
            sock.close(linger=0)
            if slot is not None:
                os.close(slot)

    def _take_slot(self, share: float, timeout_s: float) -> int | None:
        """Lock one of pmxd's client slots (of the first `share` of them); its fd, to close
        once the connection is closed. None when pmxd has no slots (it is starting)."""
        directory = self.home / CLIENTS_DIR
        try:
            count = int((directory / CLIENT_SLOT_COUNT).read_text())
        except (OSError, ValueError):
            return None
        usable = max(1, int(count * share))
        deadline = time.monotonic() + timeout_s
        while True:
            first = int.from_bytes(os.urandom(2), "little")
            for number in range(usable):
                try:
                    fd = os.open(directory / str((first + number) % usable),
                                 os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return None  # the slots are being remade: a new pmxd
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                return fd
            if time.monotonic() > deadline:
                raise CommandError("busy", f"pmxd is busy: all the {usable} client connections "
                                           f"it keeps file descriptors for are in use (home "
                                           f"{home_relative(self.home)}); try again, or raise "
                                           "its open-file limit (ulimit -n, LimitNOFILE)")
            time.sleep(SLOT_RETRY_S * (0.5 + first / 65536))

    def daemon_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _no_answer(self, command: Command, timeout_s: float) -> DaemonUnreachable:
        """The daemon lives but did not answer in time: say which one, and whether it is
        stopped (SIGSTOP, a debugger) rather than just slow."""
        pid = self.daemon_pid()
        who = f"pmxd (pid {pid})" if pid is not None else "pmxd"
        how = " and is stopped (SIGSTOP?); kill -CONT it" if pid is not None and _stopped(pid) else ""
        return DaemonUnreachable(f"{who} did not answer {command.value} within {timeout_s:g}s"
                                 f"{how} (home {home_relative(self.home)})")

    def _check_access(self) -> None:
        """Say "permission denied" at once instead of timing out against a daemon whose
        socket filter (IPC_FILTER_UID) silently drops other users' connections."""
        try:
            owner = os.stat(self.rpc_path).st_uid
        except OSError:
            return
        if owner != os.getuid() or not os.access(self.rpc_path, os.R_OK | os.W_OK):
            raise CommandError("denied", f"permission denied: pmxd in {home_relative(self.home)} "
                                         f"belongs to uid {owner}")

    def ensure_daemon(self, announce: bool = True) -> bool:
        """Start pmxd when none answers; True when this call started it."""
        if self.is_running():
            return False
        if self.has_daemon_files() and not self.is_dead():
            raise self._no_answer(Command.PING, 2.0)  # alive and locked: starting another fails
        import subprocess  # only when starting pmxd: `pmx list` does not pay for it

        result = subprocess.run(
            [sys.executable, "-m", "pmx.supervisor.pmxd", "--home", str(self.home)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            timeout=START_TIMEOUT_S, check=False,
        )
        lost_race = False
        if result.returncode != 0:
            # Another client started pmxd at the same time and its daemon took the home's
            # lock first: ours said "already running". Use the winner once it answers.
            lock = self.home / LOCK_FILE
            lost_race = lock.exists() and lock_is_held(lock)
            if not lost_race:
                message = result.stderr.decode(errors="replace").strip().splitlines()
                raise DaemonUnreachable(message[-1] if message else "pmxd failed to start")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.is_running():
            if time.monotonic() > deadline:
                raise DaemonUnreachable(f"pmxd did not answer within {START_TIMEOUT_S:g}s "
                                        f"after starting (see {self.home / DAEMON_LOG})")
            time.sleep(0.02)
        if lost_race:
            return False
        if announce:
            print(f"[pmx] started pmxd (home {home_relative(self.home)})", file=sys.stderr)
        return True

    def subscribe(self, topics: list[str]) -> zmq.Socket[bytes]:
        if not self.pub_path.exists():
            raise self.not_running()
        for old in [old for old in self._subscriber_slots if old.closed]:
            os.close(self._subscriber_slots.pop(old))
        slot = self._take_slot(SUBSCRIBER_SHARE, DEFAULT_TIMEOUT_S)
        sock = self.context.socket(zmq.SUB)
        if slot is not None:
            self._subscriber_slots[sock] = slot
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, PUBLISH_HWM)  # what we hold unread is bounded too
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sock.connect(f"ipc://{self.pub_path}")
        return sock

    def stream(self, sock: zmq.Socket[bytes], timeout_s: float | None = None
               ) -> Iterator[tuple[str, JsonObject]]:
        """Publications as (topic, body); stops after timeout_s without a message."""
        while True:
            if not sock.poll(None if timeout_s is None else int(timeout_s * 1000)):
                return
            frames = sock.recv_multipart()
            try:
                yield decode_publication(frames)
            except ProtocolError:
                continue


class SubscriberThread(ABC):
    """A subscription to pmxd's publish stream and its own Client, in a daemon thread (ZeroMQ
    sockets belong to one thread, and every call is blocking).

    The thread connects (`_connect`: subscribe, then ask pmxd what to start from), then
    calls `_pump` until it returns False (pmxd is gone), closes the socket and connects
    again every RECONNECT_S, until `stop`. pmxd being away is said once (`_down`, which
    calls `_say_down`) until `_connect` succeeds and clears `_is_down`. An unexpected
    exception is a bug: said even when pmxd was already said to be away, it ends the thread.
    """

    def __init__(self, home: Path, *, program: str, thread_name: str,
                 stop_timeout_s: float) -> None:
        self._home = home
        self._program = program  # "pmx monit": who says it stopped following pmxd
        self._stop_timeout_s = stop_timeout_s
        self._stop = threading.Event()
        self._is_down = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._stop_timeout_s)

    @abstractmethod
    def _connect(self, client: Client) -> zmq.Socket[bytes] | None:
        """Subscribe (`_subscribe`) and seed; None, with `_down` called, when pmxd does
        not answer."""

    @abstractmethod
    def _pump(self, client: Client, sock: zmq.Socket[bytes]) -> bool:
        """Read one period (`_read_period`) and hand it on; False when pmxd is gone."""

    @abstractmethod
    def _say_down(self, why: str, crash: str | None) -> None:
        """Tell the user why pmxd is not followed; `crash` is a traceback when the thread
        hit a bug and stopped."""

    def _run(self) -> None:
        client = Client(self._home)
        sock: zmq.Socket[bytes] | None = None
        try:
            while not self._stop.is_set():
                if sock is None:
                    sock = self._connect(client)
                    if sock is None:
                        self._stop.wait(RECONNECT_S)
                    continue
                if not self._pump(client, sock):
                    sock.close(linger=0)
                    sock = None
                    self._down(self._unreachable())  # unless _pump already said why
        except Exception as exc:
            import traceback  # only for a bug: not every command pays for it

            self._is_down = False
            self._down(f"{self._program} stopped following pmxd: bug: "
                       f"{type(exc).__name__}: {exc}", traceback.format_exc())
        finally:
            if sock is not None:
                sock.close(linger=0)
            client.close()

    def _down(self, why: str, crash: str | None = None) -> None:
        if not self._is_down:
            self._is_down = True
            self._say_down(why, crash)

    def _unreachable(self) -> str:
        return f"pmxd is not running (home {home_relative(self._home)})"

    def _subscribe(self, client: Client, topics: list[str]) -> zmq.Socket[bytes]:
        """`client.subscribe`, then a pause: ZeroMQ's slow joiner. The subscription must
        reach the PUB before pmxd is asked anything, so that nothing published after the
        reply is missed."""
        sock = client.subscribe(topics)
        self._stop.wait(0.05)
        return sock

    def _read_period(self, sock: zmq.Socket[bytes], period_s: float,
                     take: Callable[[str, JsonObject], None]) -> None:
        """Hand each publication arriving within period_s (or until `stop`) to `take` as
        (topic, body); one that does not decode is skipped."""
        deadline = time.monotonic() + period_s
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if not sock.poll(max(1, int(remaining * 1000))):
                continue
            for _ in range(10000):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    topic, body = decode_publication(frames)
                except PmxError:
                    continue
                take(topic, body)
