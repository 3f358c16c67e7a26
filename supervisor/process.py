"""Instance: one slot of an app and the OS process running in it; its state machine.

The states and the table of allowed moves are in `states.py` (the CLI shares them).
`_move` is the only writer of `state`; it checks MOVES, records why and when, and
publishes the change. Exits arrive in one place, `on_exit`, called by the reaper; it
decides between stopped, waiting and errored with the pure `next_restart_delay`.
The instance owns its counters: `restarts` (every restart, shown in `pmx list`) and
`unstable_restarts` (exits sooner than min_uptime in a row, which lead to errored).
Readiness is a state, not a flag: an instance is ready when it is online.

The process runs in a session (and process group) of its own, so that stopping it can
SIGKILL every process it left in its group. Signals to the main process go through its
pidfd, so a recycled pid is never signalled. How the process is created is `spawn.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from .config import AppSpec
from .dropin import ListenReport, NodeChannel, uses_preload
from .errors import IllegalTransition, SpawnError
from .procfs import process_start_time
from .protocol import Json
from .spawn import Identity, Inheritance, spawn
from .states import MOVES, RUNNING, State

log = logging.getLogger(__name__)

BACKOFF_FACTOR = 1.5
BACKOFF_CAP_S = 15.0  # PM2's cap for exp_backoff_restart_delay
STDERR_TAIL_LINES = 20
# What servers print when their port is taken (Node, Python, Go, Rust, Java).
ADDRESS_IN_USE = ("EADDRINUSE", "Address already in use", "address already in use")


class NotReadyInTime(SpawnError):
    """The instance was still running but did not say it was ready in time."""


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

    def cgroup_for(self, instance: Instance) -> Path | None: ...

    def before_popen(self) -> None: ...

    def discard_cgroup(self, group: Path) -> None: ...

    def watch_exit(self, instance: Instance, pid: int, pidfd: int, *, in_cgroup: bool) -> None: ...

    def attach_output(self, instance: Instance, stdout_fd: int, stderr_fd: int) -> None: ...

    def forget(self, instance: Instance) -> None: ...

    def kill_strays(self, run_id: str) -> None: ...


class Instance:
    """One instance slot of an app: spawns, watches, restarts and stops its process."""

    def __init__(self, *, app: str, index: int, instance_id: int, spec: Callable[[], AppSpec],
                 runtime: Runtime, base_env: Callable[[], Mapping[str, str]],
                 inheritance: Callable[[int], Inheritance | None],
                 on_change: Callable[[Instance], None],
                 on_listening: Callable[[Instance, ListenReport], None] = lambda i, report: None,
                 ) -> None:
        self.app, self.index, self.id = app, index, instance_id
        self._spec = spec
        self._runtime = runtime
        self._base_env = base_env
        self._inheritance = inheritance
        self._on_change = on_change
        self._on_listening = on_listening
        self.state = State.STOPPED
        self.reason = "created"
        self.since = time.time()
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.start_time: int | None = None  # the kernel's, of pid: a recycled pid differs
        self.cgroup: Path | None = None  # its own cgroup, where pmxd can make one (cgroups.py)
        self.started_at: float | None = None  # monotonic, for uptime
        self.restarts = 0
        self.unstable_restarts = 0
        self.last_exit: str | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.status_text: str | None = None  # the app's last STATUS=... notification
        self._restart_timer: asyncio.TimerHandle | None = None
        self._exited: asyncio.Future[int] | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._ready_waiters: set[asyncio.Future[None]] = set()  # callers of wait_ready
        self.run_id = ""  # unique per spawn; marks the process and all it starts
        self.channel: NodeChannel | None = None  # Node apps in cluster mode (dropin.py)
        self.listening: list[str] = []  # addresses the app reported listening on

    # ------------------------------------------------------------ state

    @property
    def name(self) -> str:
        return f"{self.app}:{self.index}"

    @property
    def spec(self) -> AppSpec:
        return self._spec()

    @property
    def is_ready(self) -> bool:
        return self.state is State.ONLINE

    def uptime_s(self) -> float:
        if self.state in RUNNING and self.started_at is not None:
            return time.monotonic() - self.started_at
        return 0.0

    def _move(self, new: State, reason: str) -> None:
        if new not in MOVES[self.state]:
            raise IllegalTransition(self.name, self.state.value, new.value)
        self.state, self.reason, self.since = new, reason, time.time()
        log_level = logging.WARNING if new in (State.WAITING, State.ERRORED) else logging.INFO
        log.log(log_level, "%s (pid %s) -> %s: %s", self.name, self.pid, new.value, reason)
        self._runtime.publish_state(self)
        self._on_change(self)

    # ------------------------------------------------------------ counters

    def forget_instability(self) -> None:
        """A deliberate start by the user: the crash-loop count starts again."""
        self.unstable_restarts = 0

    def count_restart(self) -> None:
        """A deliberate restart (the caller stopped this instance and starts it again)."""
        self.restarts += 1
        self.unstable_restarts = 0

    def reset_counters(self) -> None:
        """`pmx reset`: both counters to 0, published like a state change."""
        self.restarts = self.unstable_restarts = 0
        self._runtime.publish_state(self)

    def succeed(self, old: Instance) -> None:
        """This instance replaces `old` in its slot: one more restart of that slot."""
        self.restarts = old.restarts + 1

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

    async def restart(self, reason: str = "restarting", *, started: str = "restarted") -> None:
        """Stop gracefully, count a restart, start again. Raises SpawnError (then errored)."""
        await self.stop(reason)
        self.restarts += 1
        self.start(started)

    def _spawn(self) -> None:
        spec = self.spec
        inheritance = self._inheritance(self.index)
        channel = None
        if inheritance is not None and inheritance.node_channel:
            channel = NodeChannel(self._runtime.loop, self._on_channel_message)
        group = self._runtime.cgroup_for(self)  # a new cgroup of its own, where pmxd can
        try:
            spawned = spawn(spec, Identity(self.app, self.index, self.id), self._base_env(),
                            inheritance, self._runtime.notify_socket_path,
                            channel.child_fd() if channel else None, group,
                            self._runtime.before_popen)
        except BaseException:  # SpawnError, or a bug: leave no channel or cgroup behind
            if channel is not None:
                channel.close()
            if group is not None:
                self._runtime.discard_cgroup(group)
            raise
        if channel is not None:
            channel.spawned()
        self.channel = channel
        self.listening = []
        self._popen = spawned.popen
        self.run_id = spawned.run_id
        self.pid = spawned.pid
        self.pidfd = os.pidfd_open(self.pid)
        self.start_time = process_start_time(self.pid)  # names this process for good
        self.started_at = time.monotonic()
        self._exited = self._runtime.loop.create_future()
        # First the journal and, for a process that did not enter its cgroup itself, the
        # move (before the program can fork: a log file may take a moment to open), then
        # its output.
        self.cgroup = group
        self._runtime.watch_exit(self, self.pid, self.pidfd, in_cgroup=spawned.in_cgroup)
        self._runtime.attach_output(self, spawned.stdout_fd, spawned.stderr_fd)
        log.info("%s spawned pid %d: %s", self.name, self.pid, " ".join(spawned.argv))

    def restore(self, state: State, reason: str, since: float, *, restarts: int,
                unstable_restarts: int, last_exit: str | None, stderr_tail: list[str]) -> None:
        """After `pmx update` (handover.py): what the previous image knew of this slot.
        No move and no event: nothing happened to the process."""
        self.state, self.reason, self.since = state, reason, since
        self.restarts, self.unstable_restarts, self.last_exit = restarts, unstable_restarts, last_exit
        self.stderr_tail.extend(stderr_tail)

    def restart_in(self) -> float | None:
        """Seconds until a waiting instance restarts (for `pmx update`); None if it is not."""
        timer = self._restart_timer
        return None if timer is None else max(0.0, timer.when() - self._runtime.loop.time())

    def restart_later(self, delay_s: float) -> None:
        """After `pmx update`: a slot restored as waiting restarts when it would have."""
        self._cancel_restart_timer()
        self._restart_timer = self._runtime.loop.call_later(delay_s, self._restart_after_wait)

    def adopt(self, pid: int, pidfd: int, start_time: int, run_id: str, started_at: float,
              channel: tuple[socket.socket, bytes] | None) -> None:
        """After `pmx update`: the running process the previous image handed over (the
        caller watches its pidfd and reads its pipes). `started_at` is monotonic, which
        is system-wide: uptime goes on."""
        self.pid, self.pidfd, self.start_time, self.run_id = pid, pidfd, start_time, run_id
        self.started_at = started_at
        self._exited = self._runtime.loop.create_future()
        if channel is not None:
            self.channel = NodeChannel(self._runtime.loop, self._on_channel_message,
                                       ours=channel[0], buffered=channel[1])

    # ------------------------------------------------------------ messages from the app

    def _on_channel_message(self, message: Json) -> None:
        """A message on Node's IPC channel: PM2's "ready", or a preload's report."""
        if message == "ready":
            self.mark_ready("the app sent 'ready'")
        elif isinstance(message, dict) and message.get("pmx") == "listening":
            report = ListenReport.from_node(message)
            if report is not None:
                self.report_listening(report)

    def report_listening(self, report: ListenReport) -> None:
        """The preload says the app listens (on an inherited socket, or its own)."""
        if self.pid is None or report.address in self.listening:
            return
        self.listening.append(report.address)
        self._on_listening(self, report)

    # ------------------------------------------------------------ readiness

    def mark_ready(self, how: str) -> None:
        """Called by readiness checks; moves starting/launching instances online."""
        if self.state in (State.STARTING, State.LAUNCHING):
            self._move(State.ONLINE, f"{self.reason}; {how}")  # keep why it was started
        for waiter in self._ready_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until ready; raise SpawnError with the reason when it exits or times out."""
        if self.is_ready:
            return
        waiter = self._runtime.loop.create_future()
        self._ready_waiters.add(waiter)
        exited = self._exited
        assert exited is not None
        try:
            async with asyncio.timeout(timeout_s):
                done, _ = await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise NotReadyInTime(f"{self.name} (pid {self.pid}) was not ready within "
                                 f"{timeout_s:g}s") from None
        finally:
            self._ready_waiters.discard(waiter)
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
        # A cluster app with preloads recovers by itself: a restart gets the learned socket.
        if self.unstable_restarts and spec.instances > 1 and not uses_preload(spec) \
                and self._port_was_taken():
            self._move(State.ERRORED, f"{self.last_exit}: its port is already in use, most likely "
                       "by another instance of this app: this program binds its port itself and "
                       "cannot share it; give the app exec_mode = \"cluster\" with listen and "
                       "serve on the inherited socket ({fd}, LISTEN_FDS), or use reuse_port, "
                       "or run 1 instance")
            return
        delay = next_restart_delay(self.unstable_restarts, spec)
        if delay is None:
            self._move(State.ERRORED, f"{self.last_exit}; gave up after {spec.max_restarts} "
                                      f"restarts that each lasted less than min_uptime "
                                      f"({spec.min_uptime_s:g}s)")
            return
        self._move(State.WAITING, f"{self.last_exit}; restarting in {delay:g}s")
        if delay > 0:
            self._restart_timer = self._runtime.loop.call_later(delay, self._restart_after_wait)
        else:  # at once, not a loop turn later: a crashed instance is back in ~3 ms
            self._restart_after_wait()

    def _port_was_taken(self) -> bool:
        return any(marker in line for line in self.stderr_tail for marker in ADDRESS_IN_USE)

    def _restart_after_wait(self) -> None:
        self._restart_timer = None
        if self.state is not State.WAITING:
            return
        self.restarts += 1
        with contextlib.suppress(SpawnError):  # already errored, with the reason
            self.start(f"restarted after {self.last_exit}")

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
        if self.channel is not None:
            self.channel.close()
            self.channel = None
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
            # PM2's shutdown_with_message: the message instead of the signal, when it can go.
            if not (spec.shutdown_with_message and self.channel is not None
                    and self.channel.send("shutdown")):
                self.send_signal(signal.Signals[spec.stop_signal])
            try:
                async with asyncio.timeout(spec.kill_timeout_s):
                    await asyncio.shield(exited)
                return
            except TimeoutError:
                if exited.done() or self.pidfd is None:
                    return  # it ended as the time ran out: its number may be reused already
                # Not reaped yet (the reaper reaps only after the exit handler), so the
                # number still names this process and its group.
                log.warning("%s (pid %d) still running %.1fs after %s; SIGKILL to its group",
                            self.name, self.pid, spec.kill_timeout_s, spec.stop_signal)
                _kill_group(self.pid, signal.SIGKILL)
        await asyncio.shield(exited)

    async def wait_exit(self) -> None:
        if self._exited is not None:
            await asyncio.shield(self._exited)


def _kill_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
