"""Instance, the state machine of one app slot, driven with real processes and a fake Runtime.

Each test runs its own event loop through `drive`. Processes are real (`spawn.py`'s Popen);
`FakeRuntime` stands in for the daemon: it records every published state, drains the
output pipes, and learns exits from a duplicate of the instance's pidfd on the loop
(`waitid(P_PIDFD)`), which also reaps the child. A test that simulates a crash calls
`on_exit` by hand while a `/bin/sleep` still runs; the instance then SIGKILLs its group
and `forget`s it, and the fake only reaps that process without reporting it again.

Whatever a test leaves behind is stopped, then SIGKILLed and reaped in `drive`, even when
the test fails. Exceptions raised in loop callbacks (a bad move inside `on_exit` or a
restart timer) are collected and fail the test instead of only being logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pmx.supervisor.config import AppSpec, parse_app
from pmx.supervisor.errors import IllegalTransition, SpawnError
from pmx.supervisor.launch import unignore_signals
from pmx.supervisor.process import Instance, next_restart_delay
from pmx.supervisor.procfs import read_stat
from pmx.supervisor.states import State

SLEEPER: Mapping[str, object] = {"script": "/bin/sleep", "args": ["30"]}
CRASHER: Mapping[str, object] = {"script": "/bin/false"}  # exits with code 1 at once
DEADLINE_S = 2.0  # generous: every wait below is over in milliseconds


def spec(**options: object) -> AppSpec:
    table = {"name": "t", "script": "/bin/true", "interpreter": "none", **options}
    return parse_app(table, source="t", index=0, base_dir=Path("/"))


def exited(code: int) -> int:
    """The wait status of a process that exited with `code`."""
    return code << 8


def gone(pid: int) -> bool:
    """True when `pid` no longer runs: absent, or a zombie its parent has not reaped."""
    stat = read_stat(pid)
    return stat is None or stat.state in ("Z", "X")


def constant(app_spec: AppSpec) -> Callable[[], AppSpec]:
    return lambda: app_spec


@contextlib.contextmanager
def ignoring(signum: signal.Signals) -> Iterator[None]:
    """This process ignores `signum` meanwhile."""
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE_S, what: str = "") -> None:
    """Poll `condition` on the loop until it holds; fail after `timeout` seconds."""
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        await asyncio.sleep(0.001)  # the poll interval


async def outlive(delay_s: float) -> None:
    """Let the loop run past `delay_s`: loop timers fire in deadline order, so any timer
    due within `delay_s` (a restart the test expects to be cancelled) has fired by then."""
    await asyncio.sleep(delay_s)


def wait_status(result: os.waitid_result) -> int:
    """A waitid result as a waitpid-style status word."""
    if result.si_code == os.CLD_EXITED:
        return (result.si_status & 0xFF) << 8
    return result.si_status & 0x7F  # killed (or dumped) by this signal


@dataclass
class Watch:
    pidfd: int  # our own duplicate of the instance's pidfd
    instance: Instance | None  # None once the instance has been told of the exit another way


class FakeRuntime:
    """The daemon's side of the Runtime protocol: records, reaps and drains; nothing else."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.notify_socket_path: str | None = None
        self.published: list[tuple[State, str]] = []
        self.published_at: list[float] = []  # monotonic, one per published state
        self.spawned: list[int] = []  # every pid an instance watched, in order
        self.exits: dict[int, int] = {}  # pid -> wait status, once reaped here
        self.stdout: dict[int, bytearray] = {}
        self.stderr: dict[int, bytearray] = {}
        self.forgotten: list[int | None] = []
        self.stray_runs: list[str] = []
        self.errors: list[str] = []  # exceptions raised in loop callbacks
        self._instances: list[Instance] = []
        self._watches: dict[int, Watch] = {}
        self._pipes: set[int] = set()
        loop.set_exception_handler(self._on_loop_error)

    # ------------------------------------------------------------ the protocol

    def publish_state(self, instance: Instance) -> None:
        self.published.append((instance.state, instance.reason))
        self.published_at.append(time.monotonic())

    def cgroup_for(self, instance: Instance) -> Path | None:
        return None

    def before_popen(self) -> None:
        pass

    def discard_cgroup(self, group: Path) -> None:
        pass

    def watch_exit(self, instance: Instance, pid: int, pidfd: int, *, in_cgroup: bool) -> None:
        own = os.dup(pidfd)  # the instance closes its pidfd when it is told of the exit
        self._watches[pid] = Watch(own, instance)
        self.spawned.append(pid)
        if instance not in self._instances:
            self._instances.append(instance)
        self.loop.add_reader(own, self._on_pidfd_readable, pid)

    def attach_output(self, instance: Instance, stdout_fd: int, stderr_fd: int) -> None:
        assert instance.pid is not None
        out = self.stdout.setdefault(instance.pid, bytearray())
        err = self.stderr.setdefault(instance.pid, bytearray())
        for fd, buffer, tail in ((stdout_fd, out, None), (stderr_fd, err, instance)):
            os.set_blocking(fd, False)
            self._pipes.add(fd)
            self.loop.add_reader(fd, self._drain, fd, buffer, tail)

    def forget(self, instance: Instance) -> None:
        self.forgotten.append(instance.pid)
        watch = self._watches.get(instance.pid) if instance.pid is not None else None
        if watch is not None:
            watch.instance = None  # the test called on_exit: reap the process, report nothing

    def kill_strays(self, run_id: str) -> None:
        self.stray_runs.append(run_id)

    # ------------------------------------------------------------ helpers for tests

    def states(self) -> list[State]:
        return [state for state, _ in self.published]

    def reasons(self, state: State) -> list[str]:
        return [reason for seen, reason in self.published if seen is state]

    def new_instance(self, app_spec: AppSpec | Callable[[], AppSpec], *,
                     on_change: Callable[[Instance], None] = lambda inst: None) -> Instance:
        """An instance of app "t" on this runtime; `app_spec` may be a callable that the
        instance reads at each spawn, as AppGroup's is."""
        return Instance(app="t", index=0, instance_id=7,
                        spec=app_spec if callable(app_spec) else constant(app_spec),
                        runtime=self, base_env=lambda: dict(os.environ),
                        inheritance=lambda index: None, on_change=on_change)

    # ------------------------------------------------------------ internals

    def _on_pidfd_readable(self, pid: int) -> None:
        watch = self._watches[pid]
        result = os.waitid(os.P_PIDFD, watch.pidfd, os.WEXITED | os.WNOHANG)
        if result is None:
            return
        self._unwatch(pid)
        self.exits[pid] = wait_status(result)
        if watch.instance is not None:
            watch.instance.on_exit(self.exits[pid])  # raises into _on_loop_error

    def _unwatch(self, pid: int) -> None:
        watch = self._watches.pop(pid)
        self.loop.remove_reader(watch.pidfd)
        os.close(watch.pidfd)

    def _drain(self, fd: int, buffer: bytearray, tail: Instance | None) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_pipe(fd)
            return
        buffer.extend(data)
        if tail is not None:  # stderr: what the daemon's log reader keeps for error messages
            tail.stderr_tail.extend(line.decode("utf-8", "replace") for line in data.splitlines())

    def _close_pipe(self, fd: int) -> None:
        self.loop.remove_reader(fd)
        os.close(fd)
        self._pipes.discard(fd)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    async def close(self) -> None:
        """Stop every instance, then SIGKILL and reap whatever still runs; close the pipes."""
        try:
            for instance in self._instances:
                async with asyncio.timeout(DEADLINE_S):
                    await instance.stop("test over")
        finally:
            for pid in list(self._watches):
                watch = self._watches[pid]
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # not reaped yet, so the pid is still ours
                os.waitid(os.P_PIDFD, watch.pidfd, os.WEXITED)
                self._unwatch(pid)
            for fd in list(self._pipes):
                self._close_pipe(fd)
        assert not self.errors, f"exceptions in loop callbacks: {self.errors}"


Body = Callable[[FakeRuntime], Coroutine[Any, Any, None]]


def drive(body: Body) -> None:
    """Run one test body on a fresh event loop with a FakeRuntime, cleaning up after it;
    fail if a file descriptor (pidfd, pipe) outlives the test."""
    async def main() -> None:
        runtime = FakeRuntime(asyncio.get_running_loop())
        try:
            await body(runtime)
        finally:
            await runtime.close()

    before = open_fds()
    asyncio.run(main())
    assert open_fds() == before, "file descriptors leaked"


# ---------------------------------------------------------------- start and readiness


def test_start_without_readiness_settings_is_online_at_once() -> None:
    async def body(rt: FakeRuntime) -> None:
        changes: list[State] = []
        inst = rt.new_instance(spec(**SLEEPER), on_change=lambda i: changes.append(i.state))
        assert (inst.state, inst.reason, inst.pid, inst.is_ready) == (State.STOPPED, "created", None, False)
        inst.start()
        assert inst.state is State.ONLINE and inst.is_ready
        assert rt.published == [(State.STARTING, "started"), (State.ONLINE, "started")]
        assert changes == [State.STARTING, State.ONLINE]  # on_change follows every move
        assert inst.pid is not None and rt.spawned == [inst.pid] and inst.pidfd is not None
        assert inst.run_id and not gone(inst.pid)
        assert os.getpgid(inst.pid) == inst.pid  # a process group (and session) of its own
        assert (inst.restarts, inst.unstable_restarts) == (0, 0)

    drive(body)


@pytest.mark.parametrize("readiness", [{"wait_ready": True}, {"ready_check": "tcp:127.0.0.1:9"}],
                         ids=["wait_ready", "ready_check"])
def test_with_a_readiness_setting_it_stays_starting_until_mark_ready(readiness: dict[str, object]) -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**SLEEPER, **readiness))
        inst.start()
        assert (inst.state, inst.is_ready) == (State.STARTING, False)
        await outlive(0.02)
        assert rt.states() == [State.STARTING]  # nothing in Instance makes it online by itself
        inst.mark_ready("READY=1 received")
        assert inst.state is State.ONLINE and inst.is_ready
        assert inst.reason == "started; READY=1 received"  # keeps why it was started
        inst.mark_ready("again")  # already online: no second move
        assert rt.states() == [State.STARTING, State.ONLINE]
        await inst.wait_ready(0.001)  # returns at once when online
        await inst.stop()
        assert not inst.is_ready  # readiness is the state, not a flag left behind

    drive(body)


def test_wait_ready_returns_when_marked_ready_meanwhile() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**SLEEPER, wait_ready=True))
        inst.start()
        rt.loop.call_later(0.01, inst.mark_ready, "READY=1 received")
        await inst.wait_ready(DEADLINE_S)
        assert inst.state is State.ONLINE

    drive(body)


def test_wait_ready_raises_when_the_process_exits_first() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(script="/bin/sh", args=["-c", "exit 3"], wait_ready=True,
                                    autorestart=False))
        inst.start()
        pid = inst.pid
        with pytest.raises(SpawnError, match="exited before it was ready") as caught:
            await inst.wait_ready(DEADLINE_S)
        assert str(caught.value).startswith(f"t:0 (pid {pid}) exited before it was ready (exit code 3)")
        assert (inst.state, inst.reason) == (State.STOPPED, "exited (exit code 3); autorestart is off")
        assert inst.pidfd is None

    drive(body)


def test_wait_ready_raises_when_not_ready_in_time() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**SLEEPER, wait_ready=True))
        inst.start()
        with pytest.raises(SpawnError, match=r"was not ready within 0\.05s"):
            await inst.wait_ready(0.05)
        assert rt.states() == [State.STARTING]  # what happens next is the caller's decision
        inst.mark_ready("late")
        assert inst.state is State.ONLINE

    drive(body)


def test_two_concurrent_wait_ready_calls_both_return_on_mark_ready() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**SLEEPER, wait_ready=True))
        inst.start()
        first = asyncio.ensure_future(inst.wait_ready(0.2))
        second = asyncio.ensure_future(inst.wait_ready(0.2))
        await asyncio.sleep(0)  # both are now waiting (tasks run in the order they were made)
        inst.mark_ready("READY=1 received")
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert [result is None for result in results] == [True, True], results

    drive(body)


def test_a_replacement_is_launching_until_ready_and_is_not_restarted_when_it_exits() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**SLEEPER))
        inst.start("reloaded", replacement=True)
        assert inst.state is State.LAUNCHING and not inst.is_ready  # even without readiness settings
        inst.mark_ready("ready")
        assert (inst.state, inst.reason) == (State.ONLINE, "reloaded; ready")

        failing = rt.new_instance(spec(**SLEEPER))
        failing.start("reloaded", replacement=True)
        failing.on_exit(exited(1))
        assert (failing.state, failing.reason) == (State.STOPPED, "exited before it was ready (exit code 1)")
        await outlive(0.02)
        assert len(rt.spawned) == 2 and failing.restarts == 0

    drive(body)


# ---------------------------------------------------------------- exits and the restart policy


def test_a_crash_before_min_uptime_waits_then_restarts() -> None:
    async def body(rt: FakeRuntime) -> None:
        app = spec(**SLEEPER, restart_delay="50ms")  # min_uptime: 1s by default
        inst = rt.new_instance(app)
        inst.start()
        first, first_run = inst.pid, inst.run_id
        assert first is not None
        crashed_at = time.monotonic()
        inst.on_exit(exited(1))
        delay = next_restart_delay(1, app)
        assert delay == 0.05
        assert (inst.state, inst.reason) == (State.WAITING, "exit code 1; restarting in 0.05s")
        assert (inst.unstable_restarts, inst.restarts, inst.last_exit) == (1, 0, "exit code 1")
        assert inst.pidfd is None and inst.uptime_s() == 0.0
        assert rt.forgotten == [first] and rt.stray_runs == [first_run]
        await wait_for(lambda: first in rt.exits, what="the crashed process reaped")
        assert rt.exits[first] == signal.SIGKILL  # its group is killed with it

        await wait_for(lambda: inst.state is State.ONLINE, what="restarted")
        assert time.monotonic() - crashed_at >= delay - 0.005
        assert inst.pid not in (None, first) and inst.run_id != first_run
        assert (inst.restarts, inst.unstable_restarts) == (1, 1)
        assert rt.published == [
            (State.STARTING, "started"), (State.ONLINE, "started"),
            (State.WAITING, "exit code 1; restarting in 0.05s"),
            (State.STARTING, "restarted after exit code 1"), (State.ONLINE, "restarted after exit code 1"),
        ]

        inst.on_exit(exited(2))  # crashes again at once: counted again
        assert inst.unstable_restarts == 2 and inst.reason == "exit code 2; restarting in 0.05s"
        await wait_for(lambda: inst.state is State.ONLINE, what="restarted twice")
        assert (inst.restarts, len(rt.spawned)) == (2, 3)

    drive(body)


def test_a_crash_after_min_uptime_resets_the_unstable_count_and_the_backoff() -> None:
    async def body(rt: FakeRuntime) -> None:
        app = spec(**SLEEPER, exp_backoff_restart_delay="20ms", min_uptime="1s")
        inst = rt.new_instance(app)
        inst.start()
        for count, shown in ((1, "0.02"), (2, "0.03")):
            inst.on_exit(exited(1))
            assert (inst.unstable_restarts, inst.reason) == (count, f"exit code 1; restarting in {shown}s")
            await wait_for(lambda: inst.state is State.ONLINE, what=f"restart {count}")
        assert inst.started_at is not None
        inst.started_at -= app.min_uptime_s  # it has now been up for min_uptime
        before = len(rt.published)
        inst.on_exit(exited(1))
        assert inst.unstable_restarts == 0
        # restart_delay (0), no back-off: restarted at once, in the same call
        assert rt.published[before] == (State.WAITING, "exit code 1; restarting in 0s")
        assert inst.reason == "restarted after exit code 1"
        await wait_for(lambda: inst.state is State.ONLINE, what="restart after a stable run")
        assert (inst.restarts, inst.unstable_restarts) == (3, 0)

    drive(body)


def test_with_min_uptime_zero_every_exit_is_stable_and_it_never_errors() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**CRASHER, min_uptime="0ms", max_restarts=0, restart_delay="5ms"))
        inst.start()
        await wait_for(lambda: inst.restarts >= 3, what="three restarts")
        await inst.stop()
        assert State.ERRORED not in rt.states() and inst.unstable_restarts == 0
        assert inst.state is State.STOPPED

    drive(body)


def test_too_many_unstable_restarts_end_in_errored() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**CRASHER, max_restarts=2))
        inst.start()
        await wait_for(lambda: inst.state is State.ERRORED, what="errored")
        cycle = [State.STARTING, State.ONLINE, State.WAITING]
        assert rt.states() == [*cycle, *cycle, State.STARTING, State.ONLINE, State.ERRORED]
        assert inst.reason.startswith("exit code 1; gave up after 2 restarts")
        assert "min_uptime (1s)" in inst.reason
        assert (inst.restarts, inst.unstable_restarts) == (2, 3)
        await outlive(0.02)
        assert len(rt.spawned) == 3 and inst.state is State.ERRORED  # and no further spawn

    drive(body)


def test_autorestart_off_is_stopped_after_an_exit() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(script="/bin/sh", args=["-c", "exit 4"], autorestart=False))
        inst.start()
        await wait_for(lambda: inst.state is State.STOPPED, what="stopped")
        assert rt.published[-1] == (State.STOPPED, "exited (exit code 4); autorestart is off")
        assert rt.states() == [State.STARTING, State.ONLINE, State.STOPPED]
        assert (inst.restarts, inst.unstable_restarts, len(rt.spawned)) == (0, 0, 1)

    drive(body)


def test_exp_backoff_delays_grow_by_one_and_a_half() -> None:
    async def body(rt: FakeRuntime) -> None:
        app = spec(**CRASHER, exp_backoff_restart_delay="50ms", max_restarts=3)
        inst = rt.new_instance(app)
        inst.start()
        await wait_for(lambda: inst.state is State.ERRORED, what="errored after three back-offs")
        delays = [0.05, 0.075, 0.1125]
        assert [next_restart_delay(n, app) for n in (1, 2, 3)] == pytest.approx(delays)
        assert rt.reasons(State.WAITING) == [f"exit code 1; restarting in {d:g}s" for d in delays]
        waited = [rt.published_at[i + 1] - rt.published_at[i]
                  for i, (state, _) in enumerate(rt.published) if state is State.WAITING]
        assert [w >= d - 0.005 for w, d in zip(waited, delays, strict=True)] == [True] * 3, waited

    drive(body)


def test_a_spawn_failure_after_the_backoff_is_errored_without_raising_into_the_loop() -> None:
    async def body(rt: FakeRuntime) -> None:
        current = [spec(**SLEEPER, restart_delay="10ms")]
        inst = rt.new_instance(lambda: current[-1])
        inst.start()
        inst.on_exit(exited(1))
        current.append(spec(script="/nonexistent/pmx-test-app"))  # e.g. deleted meanwhile
        await wait_for(lambda: inst.state is State.ERRORED, what="errored")
        assert inst.reason == 'cannot start app "t": /nonexistent/pmx-test-app: not found'
        assert rt.states()[-3:] == [State.WAITING, State.STARTING, State.ERRORED]
        assert inst.restarts == 1  # the attempt counts

    drive(body)


# ---------------------------------------------------------------- stopping and restarting


def test_stop_escalates_to_sigkill_of_the_group_when_sigterm_is_ignored() -> None:
    async def body(rt: FakeRuntime) -> None:
        script = 'trap "" TERM; sleep 30 & echo "$!"; wait'
        inst = rt.new_instance(spec(script="/bin/sh", args=["-c", script], kill_timeout="100ms"))
        inst.start()
        pid = inst.pid
        assert pid is not None
        await wait_for(lambda: b"\n" in rt.stdout[pid], what="the shell set its trap")
        child = int(rt.stdout[pid])
        assert os.getpgid(child) == pid
        asked = time.monotonic()
        await inst.stop()
        assert time.monotonic() - asked >= 0.1 - 0.005
        assert (inst.state, inst.reason) == (State.STOPPED, "stopped (killed by SIGKILL)")
        assert rt.states() == [State.STARTING, State.ONLINE, State.STOPPING, State.STOPPED]
        assert rt.published[2] == (State.STOPPING, "stopped")
        assert rt.exits[pid] == signal.SIGKILL and inst.pidfd is None
        await wait_for(lambda: gone(child), what="the shell's child killed with its group")

    drive(body)


def test_stop_of_a_process_that_obeys_the_stop_signal() -> None:
    async def body(rt: FakeRuntime) -> None:
        # Not SIGINT: a shell's background job (`pytest &`) ignores it, and children inherit that.
        inst = rt.new_instance(spec(**SLEEPER, stop_signal="SIGUSR1"))
        inst.start()
        await inst.stop("stopped by user")
        assert rt.published[-2:] == [(State.STOPPING, "stopped by user"),
                                     (State.STOPPED, "stopped (killed by SIGUSR1)")]
        await inst.stop()  # stopping a stopped instance does nothing
        assert len(rt.published) == 4

    drive(body)


def test_the_stop_signal_reaches_the_app_even_when_pmxd_was_started_ignoring_it() -> None:
    # exec keeps SIG_IGN: pmxd's start-up turns ignored signals into no-op handlers, which
    # exec resets to the default in the app.
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**SLEEPER, stop_signal="SIGUSR2", kill_timeout="50ms"))
        with ignoring(signal.SIGUSR2):  # as pmxd started by `pmxd &` from a script ignores SIGQUIT
            unignore_signals()
            inst.start()
        await inst.stop()
        assert inst.reason == "stopped (killed by SIGUSR2)"

    drive(body)


def test_restart_counts_one_restart_and_gives_a_new_pid() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**SLEEPER))
        inst.start()
        old = inst.pid
        await inst.restart()
        assert inst.state is State.ONLINE and inst.pid not in (None, old)
        assert (inst.restarts, inst.unstable_restarts) == (1, 0)
        assert rt.published == [
            (State.STARTING, "started"), (State.ONLINE, "started"),
            (State.STOPPING, "restarting"), (State.STOPPED, "stopped (killed by SIGTERM)"),
            (State.STARTING, "restarted"), (State.ONLINE, "restarted"),
        ]
        assert old is not None and rt.exits[old] == signal.SIGTERM

    drive(body)


def test_count_restart_succeed_and_forget_instability() -> None:
    async def body(rt: FakeRuntime) -> None:
        old = rt.new_instance(spec())
        old.restarts, old.unstable_restarts = 4, 3
        old.count_restart()
        assert (old.restarts, old.unstable_restarts) == (5, 0)
        old.unstable_restarts = 2
        old.forget_instability()
        assert (old.restarts, old.unstable_restarts) == (5, 0)
        new = rt.new_instance(spec())
        new.succeed(old)
        assert (new.restarts, new.unstable_restarts, old.restarts) == (6, 0, 5)
        assert rt.published == []  # counters are not moves

    drive(body)


def test_stop_while_waiting_cancels_the_restart() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**SLEEPER, restart_delay="30ms"))
        inst.start()
        inst.on_exit(exited(1))
        assert inst.state is State.WAITING
        await inst.stop("stopped by user")
        assert (inst.state, inst.reason) == (State.STOPPED, "stopped by user")
        await outlive(0.06)
        assert rt.states() == [State.STARTING, State.ONLINE, State.WAITING, State.STOPPED]
        assert len(rt.spawned) == 1 and inst.restarts == 0

    drive(body)


# ---------------------------------------------------------------- spawn failures and bad moves


def test_a_missing_executable_is_errored_and_raises(tmp_path: Path) -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(script=str(tmp_path / "missing")))
        before = open_fds()
        with pytest.raises(SpawnError) as caught:
            inst.start()
        assert str(caught.value) == f'cannot start app "t": {tmp_path / "missing"}: not found'
        assert (inst.state, inst.reason) == (State.ERRORED, str(caught.value))
        assert rt.published == [(State.STARTING, "started"), (State.ERRORED, str(caught.value))]
        assert rt.spawned == [] and inst.pid is None and open_fds() == before
        await inst.stop()  # errored -> stopped without a process
        assert (inst.state, inst.reason) == (State.STOPPED, "stopped")

    drive(body)


def test_a_cwd_that_is_not_a_directory_is_errored_and_raises(tmp_path: Path) -> None:
    async def body(rt: FakeRuntime) -> None:
        not_a_dir = tmp_path / "file"
        not_a_dir.write_text("")
        inst = rt.new_instance(spec(cwd=str(not_a_dir)))
        with pytest.raises(SpawnError, match=f"cwd {not_a_dir} is not a directory"):
            inst.start()
        assert inst.state is State.ERRORED and "is not a directory" in inst.reason
        assert rt.spawned == []

    drive(body)


def test_an_exec_failure_is_errored_and_leaks_no_fd(tmp_path: Path) -> None:
    async def body(rt: FakeRuntime) -> None:
        program = tmp_path / "garbage"
        program.write_bytes(b"\x00\x01 not a program\n")  # no #! line: execve says ENOEXEC
        program.chmod(0o755)
        inst = rt.new_instance(spec(script=str(program)))
        before = open_fds()
        with pytest.raises(SpawnError, match="Exec format error"):
            inst.start()
        assert inst.state is State.ERRORED and rt.spawned == [] and open_fds() == before

    drive(body)


def test_an_illegal_move_raises_and_changes_nothing() -> None:
    async def body(rt: FakeRuntime) -> None:
        inst = rt.new_instance(spec(**SLEEPER))
        with pytest.raises(IllegalTransition, match="t:0: illegal state move stopped -> online"):
            inst._move(State.ONLINE, "no")
        assert (inst.state, inst.reason, rt.published) == (State.STOPPED, "created", [])
        inst.start()
        pid = inst.pid
        with pytest.raises(IllegalTransition, match="online -> starting"):
            inst.start()  # already running
        assert (inst.state, inst.pid, rt.spawned) == (State.ONLINE, pid, [pid])

    drive(body)
