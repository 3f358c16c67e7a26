"""Reading /proc/PID/stat: one parser for the fields pmx needs (standard library only).

The command name (field 2) is in parentheses and may itself contain spaces and
parentheses, so the fields are counted from the *last* ")".
"""

from __future__ import annotations

import os
from typing import NamedTuple


class ProcStat(NamedTuple):
    state: str  # R, S, D, Z, T, ...
    ppid: int
    pgid: int
    start_time: int  # clock ticks since boot: with the pid, names one process for good


def read_stat(pid: int) -> ProcStat | None:
    """The stat of a pid, or None when there is no such process (or it is unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return ProcStat(fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19]))


def process_start_time(pid: int) -> int | None:
    """The start time of a living pid (None when gone or a zombie)."""
    stat = read_stat(pid)
    if stat is None or stat.state == "Z":
        return None
    return stat.start_time


def children_of(pid: int) -> list[int] | None:
    """The pids of a process's children, from each of its threads' children list (a
    child belongs to the thread that forked it; an orphan re-parented to a subreaper, to
    any of its threads). None where the kernel has no such list (CONFIG_PROC_CHILDREN)."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    children: list[int] = []
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children", "rb") as file:
                children.extend(int(field) for field in file.read().split())
        except FileNotFoundError:
            if thread == str(pid):
                return None  # the main thread has none: not this kernel's feature
        except OSError:
            continue  # the thread ended meanwhile
    return children
