"""CPU and memory of every instance, sampled from /proc off the event loop.

Memory is the resident set size (RSS) summed over the instance's whole process tree:
the main process and every descendant, so an app that forks workers is counted whole.
RSS is what the kernel's OOM killer and cgroup limits act on, and it is what PM2's
max_memory_restart measures; shared pages are counted once per process, which
overstates forked workers a little and is the safe side for a limit.

CPU is the tree's CPU time over the interval divided by the wall time, in percent of
one core (200% is two cores busy), as top shows it.

One sample reads, per process of each instance's tree, /proc/PID/stat (CPU times,
resident pages and thread count in one read) and its threads' children lists, and
nothing else: no scan of every process on the machine, so a sample of 1,000 instances
costs about 10 ms. Where /proc is missing (macOS), psutil does the same work. A sample
that took more than INLINE_MAX_S runs in the daemon's single worker thread from then on,
so /proc reads never hold the loop up for long; a quick one (tens of processes) runs on
the loop, because handing it to a thread and back costs more CPU than the reads (on a
small VM, 1 % of a core a second against 0.1 %). Pids that vanish between two reads
are skipped.

`ResourceMonitor` is the loop around it: a sample every interval, published on the
stats topic (also when nothing runs, so subscribers can tell pmxd is alive), then the
memory limits: an instance over `max_memory_restart` for `memory_limit_samples` samples
in a row is restarted through its app (a zero-downtime replacement in cluster mode).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .options import format_size
from .protocol import STATS_TOPIC
from .states import RUNNING, State

if TYPE_CHECKING:
    from .app import AppGroup

log = logging.getLogger(__name__)

Publish = Callable[[str, Mapping[str, object]], None]
AppEvent = Callable[[str, str, str], None]  # (app, kind, message)


@dataclass(frozen=True, slots=True)
class InstanceStats:
    id: int
    pid: int
    cpu: float  # percent of one core
    memory: int  # bytes, RSS of the whole tree
    processes: int
    time: float


class Sampler:
    """Keeps the previous CPU times per pid, so each sample yields a rate."""

    def __init__(self) -> None:
        self._previous: dict[int, tuple[float, float]] = {}  # root pid -> (cpu_s, monotonic)
        self._stats: dict[int, InstanceStats] = {}  # root pid -> its last figures
        self._files = ProcFiles() if os.path.isdir("/proc/self/task") else None

    def sample(self, roots: Iterable[tuple[int, int]]) -> list[InstanceStats]:
        """roots: (instance id, main pid) pairs. On the loop or in the worker thread, one at a time."""
        now_wall, now = time.time(), time.monotonic()
        results: list[InstanceStats] = []
        previous_samples, self._previous = self._previous, {}
        last_stats, self._stats = self._stats, {}
        files = self._files
        at_rest = files.at_rest if files is not None else None
        kept_previous, kept_stats, append = self._previous, self._stats, results.append
        for instance_id, root in roots:
            last = last_stats.get(root)
            if last is not None and at_rest is not None and last.id == instance_id \
                    and root in previous_samples and at_rest(root):
                # A lone process that has not run since: its figures stand, its CPU is 0.
                # (Most instances, most of the time: a sample of 1,000 is mostly these.)
                if last.cpu:
                    last = dataclasses.replace(last, cpu=0.0, time=now_wall)
                kept_previous[root], kept_stats[root] = (previous_samples[root][0], now), last
                append(last)
                continue
            cpu_s, memory, alive = (_tree_from_proc(root, files) if files
                                    else _tree_from_psutil(root))
            if not alive:
                continue
            previous = previous_samples.get(root)
            cpu = 0.0
            if previous is not None and now > previous[1]:
                cpu = max(0.0, (cpu_s - previous[0]) / (now - previous[1]) * 100.0)
            self._previous[root] = (cpu_s, now)
            stats = self._stats[root] = InstanceStats(instance_id, root, round(cpu, 1), memory,
                                                      alive, now_wall)
            results.append(stats)
        if self._files is not None:
            self._files.close_unused()
        return results


INLINE_MAX_S = 0.005  # a sample quicker than this runs on the loop (see the top)
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ProcFiles:
    """/proc/PID/stat, the main thread's children list and /proc/PID/schedstat of each
    sampled process, kept open between samples and re-read with pread: opening a /proc
    file walks its path and costs twice what the read does, and an open file of a
    process that ended reads ESRCH rather than the figures of a new process given the
    same pid. At most a quarter of the fd limit is used so; past that, files are opened
    for each read.

    A single-threaded process whose schedstat (the CPU time it has had, from the
    scheduler) has not moved since the last sample has not run: its CPU time, memory and
    children cannot have grown, so its last figures are used without reading its stat.
    Most instances idle most of the time, and schedstat costs the kernel a fifth of what
    stat does: at 1,000 idle instances a sample is mostly these small reads."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[int, int, int]] = {}  # pid -> (stat, children, schedstat)
        self._last: dict[int, tuple[bytes, int, int, bytes]] = {}  # pid -> schedstat, figures
        self._budget = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4 // 3
        self._used: set[int] = set()

    def at_rest(self, pid: int) -> bool:
        """pid was, at its last read, a single-threaded process without children, and it has
        not run since (its schedstat has not moved): its whole tree is unchanged."""
        fds = self._open.get(pid)
        last = self._last.get(pid)
        if fds is None or last is None or last[3] or fds[2] < 0:
            return False
        try:
            ran = os.pread(fds[2], 256, 0)
        except OSError:
            return False  # ended: the full read says so
        if ran != last[0]:
            return False
        self._used.add(pid)
        return True

    def figures(self, pid: int) -> tuple[int, int, bytes] | None:
        """(CPU ticks, resident pages, children pids) of pid, or None when it is gone."""
        self._used.add(pid)
        fds = self._open.get(pid) or self._open_files(pid)
        if fds is None:
            return None
        try:
            ran = os.pread(fds[2], 256, 0) if fds[2] >= 0 else b""
            last = self._last.get(pid)
            if last is not None and ran and last[0] == ran:
                return last[1], last[2], last[3]  # it has not run since: nothing grew
            stat, children = os.pread(fds[0], 1024, 0), os.pread(fds[1], 65536, 0)
        except OSError:
            self._forget(pid)  # the process ended (ESRCH)
            return None
        finally:
            if pid not in self._open:  # over the budget, or just forgotten
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)
        fields = stat.rsplit(b")", 1)[-1].split(maxsplit=22)
        if len(fields) < 22 or fields[0] == b"Z":
            self._last.pop(pid, None)
            return None  # a zombie has no memory and no more CPU to count
        # Fields after the name, counted from state (field 3): utime 14, stime 15,
        # num_threads 20, rss 24 (pages).
        ticks, pages = int(fields[11]) + int(fields[12]), int(fields[21])
        if fields[17] == b"1":
            self._last[pid] = (ran, ticks, pages, children)
        else:  # other threads may have forked children, and run without the main one
            self._last.pop(pid, None)
            children = b" ".join(_read_proc(f"/proc/{pid}/task/{thread}/children", 65536) or b""
                                 for thread in _threads(pid))
        return ticks, pages, children

    def _open_files(self, pid: int) -> tuple[int, int, int] | None:
        opened: list[int] = []
        try:
            for name in ("stat", f"task/{pid}/children"):
                opened.append(os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            for fd in opened:
                os.close(fd)
            return None
        try:
            opened.append(os.open(f"/proc/{pid}/schedstat", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            opened.append(-1)  # a kernel without schedstat: stat every time
        fds = (opened[0], opened[1], opened[2])
        if len(self._open) < self._budget:
            self._open[pid] = fds
        return fds

    def close_unused(self) -> None:
        """Close the files of processes that were not read since the last call."""
        for pid in self._open.keys() - self._used:  # (set operations: no Python loop
            for fd in self._open.pop(pid):  # over 1,000 pids when none ended)
                if fd >= 0:
                    os.close(fd)
        for pid in self._last.keys() - self._used:
            del self._last[pid]
        self._used.clear()

    def _forget(self, pid: int) -> None:
        """Stop keeping pid's files (the caller closes them)."""
        self._open.pop(pid, None)
        self._last.pop(pid, None)


def _read_proc(path: str, size: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def _tree_from_proc(root: int, files: ProcFiles) -> tuple[float, int, int]:
    """(CPU seconds, resident bytes, processes) of a process and all its descendants."""
    cpu_ticks, pages, alive = 0, 0, 0
    stack = [root]
    while stack:
        figures = files.figures(stack.pop())
        if figures is None:
            continue
        cpu_ticks += figures[0]
        pages += figures[1]
        alive += 1
        stack.extend(int(child) for child in figures[2].split())
    return cpu_ticks / _TICKS_PER_S, pages * _PAGE_BYTES, alive


def _threads(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _tree_from_psutil(root: int) -> tuple[float, int, int]:
    import psutil

    cpu_s, memory, alive = 0.0, 0, 0
    try:
        tree = [psutil.Process(root)]
        tree += tree[0].children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0.0, 0, 0
    for proc in tree:
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                memory += proc.memory_info().rss
            cpu_s += times.user + times.system
            alive += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return cpu_s, memory, alive


class ResourceMonitor:
    """Samples every instance each interval, publishes the figures, enforces memory limits."""

    def __init__(self, apps: Callable[[], Iterable[AppGroup]], *, interval_s: float,
                 publish: Publish, app_event: AppEvent,
                 wants: Callable[[str], bool] = lambda topic: True) -> None:
        self._apps = apps
        self.interval_s = interval_s
        self._publish = publish
        self._wants = wants  # does anyone follow the stats? (else they are not built)
        self._app_event = app_event
        self.stats: dict[int, InstanceStats] = {}  # by pid
        self._over_limit: dict[int, int] = {}  # pid -> samples in a row over the limit
        self._sampler = Sampler()
        self._roots: list[tuple[int, int]] | None = None  # (instance id, pid) to sample
        self._limited: list[AppGroup] = []  # apps with max_memory_restart, with _roots
        self._groups: dict[int, Path] = {}  # pid -> its instance's cgroup, with _roots
        # memory.current of an instance's cgroup, where pmxd gave it one with the memory
        # controller (set by the daemon); else the tree's resident pages are summed.
        self.memory_of: Callable[[Path], int | None] | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pmx-sampler")
        self._sample_s = 0.0  # how long the last sample took

    def instances_changed(self) -> None:
        """An instance changed state (or pid): the list of processes to sample is stale."""
        self._roots = None

    def forget(self, pid: int) -> None:
        """A process ended: its figures are no longer true."""
        self.stats.pop(pid, None)
        self._over_limit.pop(pid, None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = time.monotonic()
            if self._roots is None:  # rebuilt only after a state change, not every second
                self._roots = [(inst.id, inst.pid) for app in self._apps()
                               for inst in app.all_instances()
                               if inst.pid is not None and inst.state in RUNNING]
                self._limited = [app for app in self._apps()
                                 if app.spec.max_memory_restart_bytes is not None]
                self._groups = {inst.pid: inst.cgroup for app in self._apps()
                                for inst in app.all_instances()
                                if inst.cgroup is not None and inst.pid is not None}
            roots = self._roots
            try:
                if self._sample_s < INLINE_MAX_S:
                    samples = self._timed_sample(roots)
                else:
                    samples = await loop.run_in_executor(self._worker, self._timed_sample, roots)
            except Exception:
                log.exception("bug: sampling failed")
                samples = []
            if self.memory_of is not None:  # the cgroup's own figure (cgroups.py)
                samples = [self._with_cgroup_memory(sample) for sample in samples]
            self.stats = {sample.pid: sample for sample in samples}
            if self._wants(STATS_TOPIC):
                self._publish(STATS_TOPIC, {"time": time.time(), "instances": [
                    {"id": s.id, "pid": s.pid, "cpu": s.cpu, "memory": s.memory,
                     "processes": s.processes} for s in samples]})
            self._enforce_memory_limits()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.01, self.interval_s - elapsed))

    def _timed_sample(self, roots: list[tuple[int, int]]) -> list[InstanceStats]:
        began = time.perf_counter()
        try:
            return self._sampler.sample(roots)
        finally:
            self._sample_s = time.perf_counter() - began

    def _with_cgroup_memory(self, sample: InstanceStats) -> InstanceStats:
        group = self._groups.get(sample.pid)
        memory = self.memory_of(group) if group is not None and self.memory_of else None
        return sample if memory is None else dataclasses.replace(sample, memory=memory)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def _enforce_memory_limits(self) -> None:
        for app in self._limited:
            limit = app.spec.max_memory_restart_bytes
            if limit is None:
                continue
            for instance in list(app.instances.values()):
                sample = self.stats.get(instance.pid or -1)
                if sample is None or instance.state is not State.ONLINE:
                    continue
                if sample.memory <= limit:
                    self._over_limit.pop(sample.pid, None)
                    continue
                count = self._over_limit[sample.pid] = self._over_limit.get(sample.pid, 0) + 1
                if count >= max(1, app.spec.memory_limit_samples) and app.busy is None:
                    reason = f"memory: {format_size(sample.memory)} > {format_size(limit)}"
                    self._app_event(app.name, "memory_restart", f"{instance.name}: {reason}")
                    app.restart_for_memory_nowait(instance, reason)
