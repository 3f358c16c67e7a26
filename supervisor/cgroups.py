"""Each instance in its own cgroup, where pmxd may create cgroups (issue 16, item 7).

A process group and the PMX_RUN_ID marker find everything an app leaves behind, except
a descendant that both calls setsid() and clears its environment. A cgroup holds every
descendant whatever it does, and `cgroup.kill` (Linux 5.14) ends them all at once. So
where a cgroup v2 subtree is delegated to pmxd (systemd's `Delegate=yes`, which the unit
`pmx startup` writes sets; a container whose cgroup is writable; root on a host whose
own cgroup is writable), each process gets a new cgroup `pmx-HOME-TOKEN-ID-SERIAL` under
pmxd's own one, made before its spawn. A process spawned through the sh shim (spawn.py:
most of them) enters it itself, first thing, before it executes the program: the program
never runs a moment outside it, however fast it forks. One spawned through Popen (where
the shim would change something for the app: see spawn.py) is moved right after its
spawn, while it is still being executed. When its main process ends, `cgroup.kill` ends
the rest and the empty cgroup is removed. Elsewhere, today's way stays: the process group
and the marker. `pmx describe` says which is in use.

Memory: where the memory controller can be enabled for these cgroups, the sampler reads
`memory.current` (one read per instance, what the kernel charges the app, page cache
included, as systemd's MemoryMax counts); elsewhere it sums the tree's resident pages.
Enabling a controller for children needs a cgroup without processes of its own, so pmxd
moves itself into a `supervisor` leaf first when its cgroup is not the root.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import signal
import threading
import time
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

PREPARED_S = 0.005  # after a cgroup move, the next one is quick for at least this long

PREFIX = "pmx-"


class Cgroups:
    """The cgroup v2 directory pmxd puts its instances' cgroups in."""

    def __init__(self, base: Path, home: Path) -> None:
        self.base = base
        self._own = base  # pmxd's own cgroup: base, or its `supervisor` leaf (_enable_memory)
        # pmx-HOME-: this home's; then this pmxd image's own token (a `pmx update` keeps
        # the pid): what a previous image left is this home's with another token.
        # (crc32, not hashlib: that would load libcrypto, 3.5 MiB resident, for one tag)
        self._home_tag = f"{PREFIX}{zlib.crc32(str(home).encode()):08x}-"
        self._tag = f"{self._home_tag}{os.urandom(3).hex()}-"
        self.memory = False  # memory.current is there in the instances' cgroups
        self._last_move = 0.0  # monotonic time of pmxd's last cgroup move (see prepare)
        # Names each process's cgroup (made before its pid), with this image's own token:
        # after `pmx update` the tag is the previous image's, and so are its serials.
        self._serials = itertools.count(1)
        self._image = os.urandom(2).hex()
        self._warmer: threading.Event | None = None  # wakes the warm-up thread (warm_up_soon)

    @classmethod
    def detect(cls, home: Path, *, setup: bool = True) -> Cgroups | None:
        """pmxd's own cgroup v2 directory, if pmxd may create cgroups in it. `setup`:
        also enable the memory controller and clear what a dead pmxd left (pmxd does;
        a mere look, as in the tests, does not)."""
        base = _own_cgroup_dir()
        if base is None or not (base / "cgroup.procs").exists():
            return None
        probe = base / f"{PREFIX}probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError:
            return None  # not delegated to us
        groups = cls(base, home)
        if setup:
            groups.memory = groups._enable_memory()
        return groups

    @property
    def tag(self) -> str:
        return self._tag

    def continue_tag(self, tag: str) -> None:
        """After `pmx update`: the instances adopted from the previous image live in its
        cgroups, which are this image's from now on (not stale ones to clear)."""
        if tag.startswith(self._home_tag) and "/" not in tag:
            self._tag = tag

    def describe(self) -> str:
        memory = "memory.current" if self.memory else "the processes' resident pages"
        return f"cgroup v2 under {self.base} (cgroup.kill; memory from {memory})"

    def create(self, instance_id: int) -> Path | None:
        """A new, empty cgroup for the process about to be spawned for `instance_id`; None
        (and the usual way: its process group) when it cannot be made."""
        group = self.base / f"{self._tag}{instance_id}-{self._image}{next(self._serials)}"
        try:
            group.mkdir()
        except OSError as exc:
            log.warning("cannot make a cgroup for instance %d (%s); its process group is "
                        "used instead", instance_id, exc.strerror)
            return None
        return group

    def prepare(self) -> None:
        """Before a spawn through Popen, whose process pmxd moves (`enter`) right after.
        The kernel makes the first cgroup move after a quiet spell wait for an RCU grace
        period (1-20 ms), and a program that forks at once would have its child outside
        the cgroup by the time the move is done. So pmxd takes that wait before the spawn,
        by moving itself into the cgroup it is in (a move that changes nothing), and the
        move right after the spawn is quick. (A process spawned through the sh shim takes
        that wait itself, before its program runs, and pmxd none.)"""
        if not self._recently_moved():
            self._move_self()

    def warm_up_soon(self) -> None:
        """An instance's process ended, and its replacement is spawned a millisecond or
        two from now; it will wait for the kernel's grace period before its program runs
        (prepare). A thread of pmxd starts that wait now, by the same null move, so the
        two overlap: the replacement's own move comes in the same grace period or after
        it, and is quick. The loop does not wait."""
        if self._recently_moved():
            return
        if self._warmer is None:
            self._warmer = threading.Event()
            threading.Thread(target=self._warm_up_loop, args=(self._warmer,),
                             name="pmx-cgroup-warm-up", daemon=True).start()
        self._warmer.set()

    def _warm_up_loop(self, wake: threading.Event) -> None:
        while True:
            wake.wait()
            wake.clear()  # exits while this move runs ask for none more: it is the one
            self._move_self()

    def _recently_moved(self) -> bool:
        return time.monotonic() - self._last_move < PREPARED_S

    def _move_self(self) -> None:
        """The null move: pmxd into the cgroup it is in (it waits out the grace period)."""
        with contextlib.suppress(OSError):
            (self._own / "cgroup.procs").write_text(f"{os.getpid()}\n")
        self._last_move = time.monotonic()

    def enter(self, group: Path, pid: int) -> bool:
        """Move `pid` into `group` (made by `create`); False, with the group removed, when
        that fails: the process group is used instead."""
        try:
            (group / "cgroup.procs").write_text(f"{pid}\n")
            self._last_move = time.monotonic()
        except OSError as exc:
            log.warning("cannot put pid %d in a cgroup of its own (%s); its process group "
                        "is used instead", pid, exc.strerror)
            self.remove(group)
            return False
        return True

    def kill(self, group: Path) -> None:
        """SIGKILL everything left in `group` (its main process has ended)."""
        try:
            (group / "cgroup.kill").write_text("1\n")
            return
        except FileNotFoundError:
            return  # already removed
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOENT):
                raise
        for pid in _procs(group):  # a kernel before 5.14: no cgroup.kill
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, group: Path) -> bool:
        """Remove `group` once nothing runs in it; False while something still does."""
        try:
            group.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    async def remove_all(self, timeout_s: float = 2.0) -> None:
        """pmxd is stopping: end what is left in its instances' cgroups and remove them
        (the killed processes must be reaped first, which the loop does meanwhile)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            left = self.tagged()
            for group in left:
                self.kill(group)
            left = [group for group in left if not self.remove(group)]
            if not left or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        for group in left:
            log.warning("cgroup %s is not empty; left in place", group)

    def tagged(self, *, previous: bool = False) -> list[Path]:
        """The cgroups of this pmxd's instances; `previous`: of earlier pmxds of the home."""
        try:
            return [entry for entry in self.base.iterdir() if entry.is_dir() and (
                entry.name.startswith(self._home_tag) and not entry.name.startswith(self._tag)
                if previous else entry.name.startswith(self._tag))]
        except OSError:
            return []

    def remove_soon(self, loop: asyncio.AbstractEventLoop, group: Path, attempts: int = 50) -> None:
        """Remove `group` once its killed processes are gone (reaped by the loop)."""
        if not self.remove(group) and attempts > 1:
            loop.call_later(0.1, self.remove_soon, loop, group, attempts - 1)

    def memory_of(self, group: Path) -> int | None:
        if not self.memory:
            return None
        try:
            return int((group / "memory.current").read_text())
        except (OSError, ValueError):
            return None

    def remove_stale(self) -> None:
        """Cgroups this home's previous pmxd left (it died, or exec'd a new version): end
        what still runs there, remove them. Called after recovery stopped its processes
        gracefully."""
        for group in self.tagged(previous=True):
            self.kill(group)
            if not self.remove(group):
                log.info("cgroup %s is still emptying; it is removed later", group)

    def _enable_memory(self) -> bool:
        """Enable the memory controller for the instances' cgroups, if it can be."""
        try:
            available = (self.base / "cgroup.controllers").read_text().split()
        except OSError:
            return False
        if "memory" not in available:
            return False
        control = self.base / "cgroup.subtree_control"
        try:
            control.write_text("+memory\n")
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return False
        # EBUSY: pmxd's cgroup has processes of its own (pmxd): move pmxd to a leaf.
        try:
            leaf = self.base / "supervisor"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(f"{os.getpid()}\n")
            self._own = leaf
            control.write_text("+memory\n")
            return True
        except OSError as exc:
            log.info("memory controller not enabled for the instances' cgroups: %s",
                     exc.strerror)
            return False


def describe_tracking(groups: Cgroups | None) -> str:
    """How instances' processes are found and ended, for `pmx describe`."""
    if groups is not None:
        return groups.describe()
    return "process group and PMX_RUN_ID marker (no cgroup v2 delegated to pmxd)"


def _own_cgroup_dir() -> Path | None:
    """The directory of this process's cgroup in the cgroup v2 hierarchy, if mounted."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return None
    for mount in mounts:
        left, _, right = mount.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            mount_point = left.split()[4]
            return Path(mount_point) / relative.lstrip("/")
    return None


def _procs(group: Path) -> list[int]:
    try:
        return [int(line) for line in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []
