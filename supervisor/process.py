"""Instance: one slot of an app and the OS process running in it; its state machine.

    (new) stopped ──start──> starting ──ready──> online ──stop──> stopping ──exit──> stopped
                               │   │                │ exit (crash)
                               │   └──exit──┐       v
                               │            └──> waiting ──delay over──> starting
                               └── spawn failed, or too many unstable restarts ──> errored
    launching: a reload's replacement before it is ready -> online, or stopping/stopped
    (or errored) when it fails; the old instance keeps serving meanwhile.

`_move` is the only writer of `state`; it checks MOVES, records why and when, and
publishes the change. Exits arrive in one place, `on_exit`, called by the reaper; it
decides between stopped, waiting and errored with the pure `next_restart_delay`.

The process runs in a session (and process group) of its own, so that stopping it can
SIGKILL every process it left in its group. Signals to the main process go through its
pidfd, so a recycled pid is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import grp
import itertools
import logging
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .config import AppSpec
from .errors import IllegalTransition, SpawnError

log = logging.getLogger(__name__)

BACKOFF_FACTOR = 1.5
BACKOFF_CAP_S = 15.0  # PM2's cap for exp_backoff_restart_delay
STDERR_TAIL_LINES = 20
FD_RESERVE = 64  # fds pmxd keeps free: libzmq aborts the whole process on EMFILE
_run_ids = itertools.count(1)


class State(enum.StrEnum):
    STARTING = "starting"
    LAUNCHING = "launching"
    ONLINE = "online"
    STOPPING = "stopping"
    STOPPED = "stopped"
    WAITING = "waiting"
    ERRORED = "errored"


MOVES: Mapping[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.LAUNCHING, State.ERRORED}),
    State.STARTING: frozenset({State.ONLINE, State.STOPPING, State.WAITING, State.ERRORED,
                               State.STOPPED}),
    State.LAUNCHING: frozenset({State.ONLINE, State.STOPPING, State.STOPPED, State.ERRORED}),
    State.ONLINE: frozenset({State.STOPPING, State.WAITING, State.ERRORED, State.STOPPED}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.WAITING: frozenset({State.STARTING, State.STOPPED, State.ERRORED}),
    State.ERRORED: frozenset({State.STARTING, State.STOPPED, State.LAUNCHING}),
}
# States in which a process exists and may be signalled.
RUNNING: frozenset[State] = frozenset({State.STARTING, State.LAUNCHING, State.ONLINE,
                                       State.STOPPING})
# States that change by themselves; everything else is at rest.
TRANSITIONAL: frozenset[State] = frozenset({State.STARTING, State.LAUNCHING, State.STOPPING,
                                            State.WAITING})


def next_restart_delay(unstable_restarts: int, spec: AppSpec) -> float | None:
    """Seconds to wait before restart number `unstable_restarts` in a row, or None to give up.

    `unstable_restarts` counts exits sooner than min_uptime after start, the one being
    handled included; a stable run resets it, so a long-lived app is never errored."""
    if unstable_restarts > spec.max_restarts:
        return None
    if spec.exp_backoff_restart_delay_s > 0 and unstable_restarts > 0:
        delay = spec.exp_backoff_restart_delay_s * BACKOFF_FACTOR ** (unstable_restarts - 1)
        return max(min(BACKOFF_CAP_S, delay), spec.restart_delay_s)
    return spec.restart_delay_s


def describe_status(status: int) -> str:
    """A wait status as words: "exit code 3", "killed by SIGKILL"."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exit code {os.WEXITSTATUS(status)}"


class Runtime(Protocol):
    """What an instance needs from the daemon: the seams tests can replace."""

    loop: asyncio.AbstractEventLoop
    notify_socket_path: str | None  # NOTIFY_SOCKET for the app (systemd's notify protocol)

    def publish_state(self, instance: Instance) -> None: ...

    def watch_exit(self, instance: Instance, pid: int, pidfd: int) -> None: ...

    def attach_output(self, instance: Instance, stdout_fd: int, stderr_fd: int) -> None: ...

    def forget(self, instance: Instance) -> None: ...

    def kill_strays(self, run_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Inheritance:
    """Listening sockets handed to an instance from fd 3 on, with their names."""

    fds: Sequence[int]
    names: Sequence[str]
    port: int | None


# Executed by the instance before the app itself when sockets are passed: it moves them
# to fds 3.. (subprocess can only keep fds at their own numbers) and sets LISTEN_PID to
# its own pid, which exec keeps; systemd's protocol wants the child's pid there, and the
# parent cannot know it before fork without an unsafe pre-exec hook.
_EXEC_SHIM = """\
import fcntl, os, sys
count = int(sys.argv[1])
sources = [int(fd) for fd in sys.argv[2:2 + count]]
argv = sys.argv[2 + count:]
floor = max(sources + [2 + count]) + 1
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in sources]
for fd in sources:
    os.close(fd)
for slot, fd in enumerate(moved):
    os.dup2(fd, 3 + slot)
    os.close(fd)
if "LISTEN_FDS" in os.environ:
    os.environ["LISTEN_PID"] = str(os.getpid())
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    sys.stderr.write(f"pmx: cannot execute {argv[0]}: {exc.strerror}\\n")
    os._exit(127)
"""


class Instance:
    """One instance slot of an app: spawns, watches, restarts and stops its process."""

    def __init__(
        self,
        *,
        app: str,
        index: int,
        instance_id: int,
        spec: Callable[[], AppSpec],
        runtime: Runtime,
        base_env: Mapping[str, str],
        inheritance: Callable[[int], Inheritance | None],
        on_change: Callable[[Instance], None],
    ) -> None:
        self.app = app
        self.index = index
        self.id = instance_id
        self._spec = spec
        self._runtime = runtime
        self._base_env = base_env
        self._inheritance = inheritance
        self._on_change = on_change
        self.state = State.STOPPED
        self.reason = "created"
        self.since = time.time()
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.started_at: float | None = None  # monotonic, for uptime
        self.started_wall: float | None = None
        self.restarts = 0
        self.unstable_restarts = 0
        self.last_exit: str | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.is_ready = False
        self.status_text: str | None = None  # the app's last STATUS=... notification
        self._restart_timer: asyncio.TimerHandle | None = None
        self._exited: asyncio.Future[int] | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._ready_waiter: asyncio.Future[None] | None = None
        self.run_id = ""  # unique per spawn; marks the process and all it starts

    # ------------------------------------------------------------ state

    @property
    def name(self) -> str:
        return f"{self.app}:{self.index}"

    @property
    def spec(self) -> AppSpec:
        return self._spec()

    def uptime_s(self) -> float:
        if self.state in RUNNING and self.started_at is not None:
            return time.monotonic() - self.started_at
        return 0.0

    def _move(self, new: State, reason: str) -> None:
        if new not in MOVES[self.state]:
            raise IllegalTransition(self.name, self.state.value, new.value)
        self.state, self.reason, self.since = new, reason, time.time()
        if new is State.ONLINE:
            self.is_ready = True
        log_level = logging.WARNING if new in (State.WAITING, State.ERRORED) else logging.INFO
        log.log(log_level, "%s (pid %s) -> %s: %s", self.name, self.pid, new.value, reason)
        self._runtime.publish_state(self)
        self._on_change(self)

    # ------------------------------------------------------------ spawning

    def start(self, reason: str = "started", *, replacement: bool = False) -> None:
        """Spawn the process now. A failure to spawn moves to errored and raises SpawnError."""
        self._cancel_restart_timer()
        target = State.LAUNCHING if replacement else State.STARTING
        self._move(target, reason)
        try:
            self._spawn()
        except SpawnError as exc:
            self._move(State.ERRORED, str(exc))
            raise
        if not replacement and not self.spec.wait_ready and not self.spec.ready_check:
            self._move(State.ONLINE, reason)

    def _command(self, inheritance: Inheritance | None) -> tuple[list[str], dict[str, str]]:
        spec = self.spec
        values = {"instance": str(self.index), "fd": "3", "port": ""}
        if inheritance is not None and inheritance.port is not None:
            values["port"] = str(inheritance.port)
        argv = [_template(arg, values) for arg in spec.command()]
        env = dict(self._base_env)
        env.update(spec.env)
        env.update({
            "PMX_APP_NAME": spec.name, "PMX_ID": str(self.id), "PMX_INSTANCE": str(self.index),
            "NODE_APP_INSTANCE": str(self.index), "pm_id": str(self.id), "name": spec.name,
        })
        self.run_id = f"{os.getpid()}.{next(_run_ids)}"
        env["PMX_RUN_ID"] = self.run_id
        for stale in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "PMX_LISTEN_FD",
                      "NOTIFY_SOCKET"):
            env.pop(stale, None)
        if inheritance is not None:
            env["PMX_LISTEN_FD"] = "3"
            # An app told its fd by argument ({fd}) gets no socket-activation variables:
            # servers such as gunicorn adopt LISTEN_FDS by themselves, close the fd, and
            # would then fail on --bind fd://3.
            if not any("{fd}" in arg for arg in spec.args):
                env.update({"LISTEN_FDS": str(len(inheritance.fds)),
                            "LISTEN_FDNAMES": ":".join(inheritance.names)})
            if inheritance.port is not None:
                env["PORT"] = str(inheritance.port)
        if self._runtime.notify_socket_path is not None:
            env["NOTIFY_SOCKET"] = self._runtime.notify_socket_path
        return argv, env

    def _spawn(self) -> None:
        spec = self.spec
        inheritance = self._inheritance(self.index)
        argv, env = self._command(inheritance)
        if not os.path.isdir(spec.cwd):
            raise SpawnError(f'cannot start app "{spec.name}": cwd {spec.cwd} is not a directory')
        executable = shutil.which(argv[0], path=env.get("PATH", os.defpath)) if (
            "/" not in argv[0]) else argv[0]
        if executable is None or not os.access(executable, os.X_OK) or os.path.isdir(executable):
            why = "not found" if executable is None or not os.path.exists(executable) else (
                "permission denied (not executable)")
            raise SpawnError(f'cannot start app "{spec.name}": {argv[0]}: {why}')
        argv[0] = executable
        _check_fd_headroom(spec.name, 4 + (len(inheritance.fds) if inheritance else 0))
        credentials = _credentials(spec, env)
        pass_fds: tuple[int, ...] = ()
        if inheritance is not None:
            pass_fds = tuple(inheritance.fds)
            argv = [sys.executable, "-I", "-S", "-c", _EXEC_SHIM, str(len(pass_fds)),
                    *map(str, pass_fds), *argv]
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            popen = subprocess.Popen(
                argv, cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_write,
                stderr=err_write, close_fds=True, pass_fds=pass_fds, start_new_session=True,
                user=credentials.uid, group=credentials.gid,
                extra_groups=credentials.groups,
            )
        except OSError as exc:
            for fd in (out_read, out_write, err_read, err_write):
                os.close(fd)
            raise SpawnError(f'cannot start app "{spec.name}": {argv[0]}: '
                             f"{exc.strerror or exc}") from None
        os.close(out_write)
        os.close(err_write)
        self._popen = popen
        self.pid = popen.pid
        self.pidfd = os.pidfd_open(popen.pid)
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.is_ready = False
        self._exited = self._runtime.loop.create_future()
        self._runtime.attach_output(self, out_read, err_read)
        self._runtime.watch_exit(self, popen.pid, self.pidfd)
        log.info("%s spawned pid %d: %s", self.name, popen.pid, " ".join(argv[-len(spec.command()):]))

    # ------------------------------------------------------------ readiness

    def mark_ready(self, how: str) -> None:
        """Called by readiness checks; moves starting/launching instances online."""
        if self.state in (State.STARTING, State.LAUNCHING):
            self._move(State.ONLINE, f"{self.reason}; {how}")  # keep why it was started
        if self._ready_waiter is not None and not self._ready_waiter.done():
            self._ready_waiter.set_result(None)

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until ready; raise SpawnError with the reason when it exits or times out."""
        if self.is_ready:
            return
        waiter = self._runtime.loop.create_future()
        self._ready_waiter = waiter
        exited = self._exited
        assert exited is not None
        try:
            async with asyncio.timeout(timeout_s):
                done, _ = await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise SpawnError(f"{self.name} (pid {self.pid}) was not ready within "
                             f"{timeout_s:g}s") from None
        finally:
            self._ready_waiter = None
        if waiter not in done:
            raise SpawnError(f"{self.name} (pid {self.pid}) exited before it was ready "
                             f"({self.last_exit}){self.stderr_excerpt()}")

    def stderr_excerpt(self) -> str:
        lines = list(self.stderr_tail)[-5:]
        return "; last stderr: " + " | ".join(lines) if lines else ""

    # ------------------------------------------------------------ exits

    def on_exit(self, status: int) -> None:
        """The reaper's report that the main process ended: decide what happens next."""
        pid, uptime = self.pid, self.uptime_s()
        self.last_exit = describe_status(status)
        self._release_process(status)
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(status)
        if self.state is State.STOPPING:
            self._move(State.STOPPED, f"stopped ({self.last_exit})")
            return
        if self.state is State.LAUNCHING:
            self._move(State.STOPPED, f"exited before it was ready ({self.last_exit})")
            return
        spec = self.spec
        log.warning("%s (pid %s) exited after %.1fs: %s", self.name, pid, uptime, self.last_exit)
        if not spec.autorestart:
            self._move(State.STOPPED, f"exited ({self.last_exit}); autorestart is off")
            return
        self.unstable_restarts = self.unstable_restarts + 1 if uptime < spec.min_uptime_s else 0
        delay = next_restart_delay(self.unstable_restarts, spec)
        if delay is None:
            self._move(State.ERRORED, f"{self.last_exit}; gave up after {spec.max_restarts} "
                                      f"restarts that each lasted less than min_uptime "
                                      f"({spec.min_uptime_s:g}s)")
            return
        self._move(State.WAITING, f"{self.last_exit}; restarting in {delay:g}s")
        self._restart_timer = self._runtime.loop.call_later(delay, self._restart_after_wait)

    def _restart_after_wait(self) -> None:
        self._restart_timer = None
        if self.state is not State.WAITING:
            return
        self.restarts += 1
        try:
            self.start(f"restarted after {self.last_exit}")
        except SpawnError:
            pass  # already errored, with the reason

    def _release_process(self, status: int) -> None:
        if self._popen is not None:
            self._popen.returncode = status  # reaped by us; stops Popen from waiting
            self._popen = None
        # Whatever the main process left in its group (workers, shells) goes with it.
        if self.pid is not None:
            _kill_group(self.pid, signal.SIGKILL)
            # Descendants that escaped the group with setsid() were re-parented to pmxd
            # (a subreaper); they still carry this spawn's PMX_RUN_ID.
            self._runtime.kill_strays(self.run_id)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self._runtime.forget(self)

    def _cancel_restart_timer(self) -> None:
        if self._restart_timer is not None:
            self._restart_timer.cancel()
            self._restart_timer = None

    # ------------------------------------------------------------ stopping

    def send_signal(self, signum: int) -> bool:
        if self.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            return False
        return True

    async def stop(self, reason: str = "stopped") -> None:
        """Stop gracefully: stop_signal, wait kill_timeout, then SIGKILL the process group."""
        self._cancel_restart_timer()
        if self.state in (State.WAITING, State.ERRORED):
            self._move(State.STOPPED, reason)
            return
        if self.state is State.STOPPED:
            return
        exited = self._exited
        assert exited is not None and self.pid is not None
        if self.state is not State.STOPPING:
            self._move(State.STOPPING, reason)
            spec = self.spec
            self.send_signal(signal.Signals[spec.stop_signal])
            try:
                async with asyncio.timeout(spec.kill_timeout_s):
                    await asyncio.shield(exited)
                return
            except TimeoutError:
                log.warning("%s (pid %d) still running %.1fs after %s; SIGKILL to its group",
                            self.name, self.pid, spec.kill_timeout_s, spec.stop_signal)
                _kill_group(self.pid, signal.SIGKILL)
        await asyncio.shield(exited)

    async def wait_exit(self) -> None:
        if self._exited is not None:
            await asyncio.shield(self._exited)

    def kill_now(self) -> None:
        """SIGKILL the group at once (daemon shutdown after its grace period)."""
        if self.pid is not None and self.state in RUNNING:
            _kill_group(self.pid, signal.SIGKILL)


def _check_fd_headroom(app: str, needed: int) -> None:
    """Refuse a spawn that would eat into the reserve of file descriptors."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    in_use = len(os.listdir("/proc/self/fd"))
    if limit != resource.RLIM_INFINITY and in_use + needed > limit - FD_RESERVE:
        raise SpawnError(f'cannot start app "{app}": pmxd is near its open-file limit '
                         f"({in_use} of {limit} file descriptors in use, {FD_RESERVE} kept in "
                         "reserve); raise LimitNOFILE / ulimit -n")


@dataclass(frozen=True, slots=True)
class Credentials:
    uid: int | None = None
    gid: int | None = None
    groups: list[int] | None = None


def _credentials(spec: AppSpec, env: dict[str, str]) -> Credentials:
    """Popen arguments for `user`/`group`, and the user's HOME, USER and LOGNAME.

    Popen(user=...) alone would keep pmxd's group and supplementary groups (root's 0),
    so the gid and the exact supplementary groups of the user are passed as well."""
    if spec.user is None and spec.group is None:
        return Credentials()
    try:
        account = pwd.getpwnam(spec.user) if spec.user else pwd.getpwuid(os.getuid())
        gid = grp.getgrnam(spec.group).gr_gid if spec.group else account.pw_gid
    except KeyError as exc:
        raise SpawnError(f'cannot start app "{spec.name}": no such user or group '
                         f"{exc.args[0]}") from None
    if os.getuid() != 0 and (account.pw_uid != os.getuid() or gid != os.getgid()):
        raise SpawnError(f'cannot start app "{spec.name}" as {account.pw_name}: pmxd does '
                         "not run as root")
    env.update({"HOME": account.pw_dir, "USER": account.pw_name, "LOGNAME": account.pw_name})
    return Credentials(account.pw_uid, gid, os.getgrouplist(account.pw_name, gid))


def _kill_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _template(arg: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg
