"""CPU and memory of every instance, sampled with psutil off the event loop.

Memory is the resident set size (RSS) summed over the instance's whole process tree:
the main process and every descendant, so an app that forks workers is counted whole.
RSS is what the kernel's OOM killer and cgroup limits act on, and it is what PM2's
max_memory_restart measures; shared pages are counted once per process, which
overstates forked workers a little and is the safe side for a limit.

CPU is the tree's CPU time over the interval divided by the wall time, in percent of
one core (200% is two cores busy), as top shows it.

One sample reads /proc once for the parent map of all processes, then the stat and
statm of tree members only. It runs in the daemon's single worker thread, so /proc
reads never block the loop. Pids that vanish between two reads are skipped.

`ResourceMonitor` is the loop around it: a sample every interval, published on the
stats topic (also when nothing runs, so subscribers can tell pmxd is alive), then the
memory limits: an instance over `max_memory_restart` for `memory_limit_samples` samples
in a row is restarted through its app (a zero-downtime replacement in cluster mode).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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

    def sample(self, roots: Iterable[tuple[int, int]]) -> list[InstanceStats]:
        """roots: (instance id, main pid) pairs. Call from the worker thread."""
        import psutil

        roots = list(roots)
        if not roots:
            self._previous.clear()
            return []
        children: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid"]):
            ppid = proc.info.get("ppid")
            if ppid:
                children.setdefault(int(ppid), []).append(proc.pid)
        now_wall, now = time.time(), time.monotonic()
        results: list[InstanceStats] = []
        seen: set[int] = set()
        for instance_id, root in roots:
            tree = _tree(root, children)
            cpu_s, memory, alive = 0.0, 0, 0
            for pid in tree:
                try:
                    proc = psutil.Process(pid)
                    with proc.oneshot():
                        times = proc.cpu_times()
                        memory += proc.memory_info().rss
                    cpu_s += times.user + times.system
                    alive += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            if not alive:
                continue
            seen.add(root)
            previous = self._previous.get(root)
            cpu = 0.0
            if previous is not None and now > previous[1]:
                cpu = max(0.0, (cpu_s - previous[0]) / (now - previous[1]) * 100.0)
            self._previous[root] = (cpu_s, now)
            results.append(InstanceStats(instance_id, root, round(cpu, 1), memory, alive, now_wall))
        for gone in set(self._previous) - seen:
            del self._previous[gone]
        return results


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, ()))
    return tree


class ResourceMonitor:
    """Samples every instance each interval, publishes the figures, enforces memory limits."""

    def __init__(self, apps: Callable[[], Iterable[AppGroup]], *, interval_s: float,
                 publish: Publish, app_event: AppEvent) -> None:
        self._apps = apps
        self.interval_s = interval_s
        self._publish = publish
        self._app_event = app_event
        self.stats: dict[int, InstanceStats] = {}  # by pid
        self._over_limit: dict[int, int] = {}  # pid -> samples in a row over the limit
        self._sampler = Sampler()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pmx-sampler")

    def forget(self, pid: int) -> None:
        """A process ended: its figures are no longer true."""
        self.stats.pop(pid, None)
        self._over_limit.pop(pid, None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = time.monotonic()
            roots = [(inst.id, inst.pid) for app in self._apps()
                     for inst in app.all_instances() if inst.pid is not None and inst.state in RUNNING]
            try:
                samples = await loop.run_in_executor(self._worker, self._sampler.sample, roots)
            except Exception:
                log.exception("bug: sampling failed")
                samples = []
            self.stats = {sample.pid: sample for sample in samples}
            self._publish(STATS_TOPIC, {"time": time.time(), "instances": [
                {"id": s.id, "pid": s.pid, "cpu": s.cpu, "memory": s.memory,
                 "processes": s.processes} for s in samples]})
            self._enforce_memory_limits()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.01, self.interval_s - elapsed))

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def _enforce_memory_limits(self) -> None:
        for app in self._apps():
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
