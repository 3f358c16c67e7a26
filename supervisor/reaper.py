"""Learning that children exited, without a thread per child and without polling.

Each instance's main process is watched through its pidfd on the event loop: the pidfd
becomes readable when the process exits, and `waitid(P_PIDFD)` reaps exactly that child.
Because pmxd is a child subreaper, processes that apps double-fork are re-parented to
pmxd when their parent dies; SIGCHLD reaps those strays. A watched child seen by that
loop first is dispatched the same way, so no exit is lost whichever path sees it first.

An exit handler runs *before* its child is reaped (waitid with WNOWAIT): while the
zombie exists its pid cannot be reused, so killing what is left of its process group
by that number can never hit an unrelated process (a group is never signalled by
number after its leader was reaped).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from collections.abc import Callable

from .procfs import children_of

log = logging.getLogger(__name__)

ExitCallback = Callable[[int], None]

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class Reaper:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watched: dict[int, tuple[int, ExitCallback]] = {}  # pid -> (pidfd, callback)

    def install(self) -> None:
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap_strays)

    def watched_pids(self) -> set[int]:
        return set(self._watched)

    def watch(self, pid: int, pidfd: int, on_exit: ExitCallback) -> None:
        self._watched[pid] = (pidfd, on_exit)
        self._loop.add_reader(pidfd, self._on_pidfd_readable, pid)

    def _on_pidfd_readable(self, pid: int) -> None:
        entry = self._watched.get(pid)
        if entry is None:
            return
        try:
            # WNOWAIT: learn the status but leave the zombie, so that the pid (and so its
            # process group's id) cannot be reused while the exit handler kills the group.
            result = os.waitid(os.P_PIDFD, entry[0], os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return  # reaped by reap_strays, which dispatched it
        if result is None:
            return
        self._dispatch(pid, _status_from_waitid(result))

    def _dispatch(self, pid: int, status: int) -> None:
        """Run the exit handler of an exited, not yet reaped, child; then reap it."""
        entry = self._watched.pop(pid, None)
        if entry is not None:
            self._loop.remove_reader(entry[0])
            try:
                entry[1](status)
            except Exception:
                log.exception("bug: exit handler for pid %d failed", pid)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def kill_escaped(self, markers: set[bytes]) -> None:
        """SIGKILL our children that carry one of these spawn markers (PMX_RUN_ID=...) but
        are not watched: they escaped their app's process group with setsid() and were
        re-parented to us (a subreaper). Only unwatched children's environ is read."""
        children = children_of(os.getpid())
        if children is None:  # no /proc/PID/task/*/children: psutil scans /proc instead
            import psutil

            children = [child.pid for child in psutil.Process().children()]
        for pid in children:
            if pid in self._watched:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as file:
                    found = markers.intersection(file.read().split(b"\0"))
                if not found:
                    continue
                os.kill(pid, signal.SIGKILL)
                log.warning("killed pid %d, which escaped its app's process group (%s)",
                            pid, next(iter(found)).decode(errors="replace"))
            except OSError:
                continue

    def reap_strays(self) -> None:
        """SIGCHLD: reap every exited child; watched ones are dispatched, others logged."""
        while True:
            try:
                result = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if result is None or result.si_pid == 0:
                return
            pid = result.si_pid
            if pid in self._watched:
                self._dispatch(pid, _status_from_waitid(result))
            else:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                log.debug("reaped stray pid %d (%s)", pid, result.si_status)


def _status_from_waitid(result: os.waitid_result) -> int:
    """Turn a waitid result into a waitpid-style status word."""
    if result.si_code == os.CLD_EXITED:
        return (result.si_status & 0xFF) << 8
    return result.si_status & 0x7F  # killed or dumped: the signal number
