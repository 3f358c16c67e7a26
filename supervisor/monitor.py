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
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass


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
