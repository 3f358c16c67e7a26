"""AppGroup: the N instances of one app: start, stop, restart, scale, reload, memory restarts.

One operation at a time per app: `operation()` marks the app busy, and the control
server refuses a conflicting command at once with the name of what is running.

Reload replaces instances one at a time: start the replacement on the same sockets
(state launching), wait until it is ready, then stop the old one gracefully. If a
replacement exits or is not ready within listen_timeout, the reload stops there, the
replacement is stopped and every old instance that has not been replaced keeps serving.

A cluster app's sockets stay open across restarts, crash back-off and reloads, and close
once nothing of it runs between operations (stopped, errored, deleted): clients are refused
instead of hanging. Start binds them again. `pmx delete ID` leaves the others' slots (`_slots`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path

from .config import AppSpec
from .dropin import describe_mode, preload_env, runtime_of, uses_preload
from .errors import CommandError, SpawnError
from .logs import LogFile, LogFiles, instance_log_path
from .process import Instance, Runtime
from .readiness import Readiness
from .sockets import AppSockets, find_unserved
from .spawn import Inheritance
from .states import ENDED, RUNNING, State

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
SPAWNS_PER_TURN = 32  # spawns between two turns of the loop in a start of many


class AppGroup:
    def __init__(
        self,
        spec: AppSpec,
        *,
        base_env: Mapping[str, str],
        runtime: Runtime,
        logs_dir: Path,
        log_files: LogFiles,
        next_id: Callable[[], int],
    ) -> None:
        self.spec = spec
        self.base_env = dict(base_env)
        self._runtime = runtime
        self._logs_dir = logs_dir
        self._log_files = log_files
        self._next_id = next_id
        self.instances: dict[int, Instance] = {}  # by slot index
        self.replacing: dict[int, Instance] = {}  # a reload's replacement, by slot
        self.sockets: AppSockets | None = None
        self.busy: str | None = None
        self.unserved: list[str] = []  # listen addresses no instance accepts on
        self._served_check: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._operation: asyncio.Task[object] | None = None  # the task running `busy`
        self._automatic = False  # that task is a reload pmxd started by itself
        self._readiness = Readiness(self)

    @property
    def name(self) -> str:
        return self.spec.name

    def all_instances(self) -> list[Instance]:
        return [*self.instances.values(), *self.replacing.values()]

    def check_idle(self) -> None:
        """Raise the `busy` error when another operation is running on this app."""
        if self.busy is not None:
            raise CommandError("busy", f'app "{self.name}" is busy: {self.busy} is running')

    @contextlib.asynccontextmanager
    async def operation(self, what: str, *, automatic: bool = False) -> AsyncIterator[None]:
        """`automatic`: pmxd started it by itself (watch, cron); a user's command preempts it."""
        self.check_idle()
        self.busy = what
        self._operation, self._automatic = asyncio.current_task(), automatic
        try:
            yield
        finally:
            self.busy = None
            self._operation = None
            self._release_idle_sockets()

    async def preempt(self) -> None:
        """A user's command goes before a reload pmxd started by itself: that one is
        cancelled where it is (a replacement it started is stopped), so that `pmx stop`
        of an app whose files keep changing is never refused as busy."""
        task = self._operation
        if self.busy is not None and self._automatic and task is not None \
                and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})

    async def halt(self) -> None:
        """pmxd is stopping: end the running operation (a reload, a scale, a memory
        restart) where it is and refuse new ones, so that no replacement it would start
        next escapes the stop that follows."""
        running = [task for task in (self._operation, *self._tasks)
                   if task is not None and task is not asyncio.current_task()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        self.busy = "pmxd stopping"

    # ------------------------------------------------------------ instances

    def _slots(self) -> list[int]:
        """The slot indices the app runs in: its instances' (the lowest, as many as
        spec.instances), then the lowest free ones."""
        slots = sorted(self.instances)[: self.spec.instances]
        free = (index for index in itertools.count() if index not in self.instances)
        slots.extend(itertools.islice(free, self.spec.instances - len(slots)))
        return sorted(slots)

    def inheritance(self, index: int) -> Inheritance | None:
        node = runtime_of(self.spec) == "node"  # Node apps get the IPC channel Node expects
        if self.sockets is None and self.spec.is_cluster:
            self._bind()  # `pmx start ID` of an app whose sockets were closed
        if self.sockets is None:
            return Inheritance((), (), None, node_channel=True) if node else None
        sockets = self.sockets.ensure_slot(index)
        names = [f"{self.name}-{n}" for n in range(len(sockets))]
        env = preload_env(self.spec, [s.sock for s in sockets], self.base_env) if (
            uses_preload(self.spec)) else {}
        return Inheritance([s.sock.fileno() for s in sockets], names,
                           sockets[0].port if sockets else None, env, node)

    def _new_instance(self, index: int, instance_id: int | None = None) -> Instance:
        return Instance(
            app=self.name, index=index,
            instance_id=self._next_id() if instance_id is None else instance_id,
            spec=lambda: self.spec, runtime=self._runtime, base_env=lambda: self.base_env,
            inheritance=self.inheritance, on_change=self._on_instance_change,
            on_listening=self._readiness.on_listening,
        )

    def restore_instance(self, index: int, instance_id: int) -> Instance:
        """`pmx update`: the slot as the previous image had it (handover.py fills it in)."""
        instance = self.instances[index] = self._new_instance(index, instance_id)
        return instance

    def resume(self) -> None:
        """`pmx update`: the instances are restored; go on waiting for those starting."""
        for instance in self.instances.values():
            self._on_instance_change(instance)

    @property
    def mode(self) -> str:
        return describe_mode(self.spec)

    # ------------------------------------------------------------ listening sockets

    def _bind(self) -> None:
        """Bind the app's `listen` addresses (none yet for a port learned from the app)."""
        sockets = AppSockets(self.name, self.spec.listen, self.spec.reuse_port)
        sockets.bind()  # raises SpawnError naming the address; nothing is half-bound
        self.sockets = sockets

    def _release_idle_sockets(self) -> None:
        """Between operations, close what no instance serves: every socket when nothing
        runs (a drop-in app forgets its learned port, learned again on start), else the
        reuse_port sockets of slots whose instance has ended."""
        if self.sockets is None or self.busy is not None:
            return
        live = {i.index for i in self.all_instances() if i.state not in ENDED}
        if not live:
            log.info("%s: nothing runs; closing %s", self.name,
                     ", ".join(self.sockets.bound_addresses()) or "its sockets")
            self._close_sockets()
        elif self.sockets.reuse_port:
            self.sockets.release_slots_except(live)

    def _close_sockets(self) -> None:
        if self._served_check is not None:
            self._served_check.cancel()
        self.unserved = []
        if self.sockets is not None:
            self.sockets.close()
            self.sockets = None

    def _check_served_soon(self) -> None:
        if self.sockets is not None:
            if self._served_check is not None:
                self._served_check.cancel()
            self._served_check = self._own(self._check_served())

    async def _check_served(self) -> None:
        """Some seconds after a start or reload: the listen addresses that no online
        instance accepts on, kept in `unserved` for `describe` (sockets.find_unserved)."""
        found = await find_unserved(lambda: self.sockets, lambda: {
            i.index: i.pid for i in self.instances.values()
            if i.state is State.ONLINE and i.pid is not None}, self.unserved)
        if found is not None:
            self.unserved = found

    # ------------------------------------------------------------ logs and tasks

    def log_paths(self, index: int) -> tuple[Path, Path]:
        spec = self.spec
        merged = spec.merge_logs
        single = spec.instances == 1 and index == 0
        out = instance_log_path(spec.out_file, self._logs_dir, self.name, "out", index,
                                merged or (single and spec.out_file is not None))
        err = instance_log_path(spec.error_file, self._logs_dir, self.name, "error", index,
                                merged or (single and spec.error_file is not None))
        return out, err

    def acquire_log(self, index: int, stream: str) -> LogFile:
        out, err = self.log_paths(index)
        return self._log_files.acquire(out if stream == "out" else err,
                                       max_size=self.spec.max_log_size_bytes,
                                       retain=self.spec.retain, spec=self.spec, stream=stream)

    def _on_instance_change(self, instance: Instance) -> None:
        needs_watch = instance.state is State.STARTING and (
            self.spec.wait_ready or self.spec.ready_check)
        if needs_watch:
            self._own(self._readiness.settle_start(instance))
        if instance.state in ENDED:
            self._release_idle_sockets()  # e.g. errored by crash-looping, or exited for good

    def _own(self, coroutine: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ commands

    async def start(self, reason: str = "started") -> list[str]:
        """Bind sockets if needed, then start every instance that is not running.

        When the port must be learned from the app (drop-in cluster mode), the first
        instance starts alone and the others once it listens. Returns errors (spawn
        failures) as sentences; the instances concerned are errored."""
        if self.spec.is_cluster and self.sockets is None:
            self._bind()  # raises SpawnError: nothing started yet
        errors: list[str] = []
        waiting = []
        for index in self._slots():
            instance = self.instances.get(index)
            if instance is None:
                instance = self.instances[index] = self._new_instance(index)
            if instance.state in ENDED:
                waiting.append(instance)
        if waiting and self._readiness.must_learn_port():
            first = waiting.pop(0)
            errors.extend(self._start_one(first, reason))
            if first.pid is not None:
                await self._readiness.wait_listening(first)
        for count, instance in enumerate(waiting, 1):
            errors.extend(self._start_one(instance, reason))
            if count % SPAWNS_PER_TURN == 0:
                await asyncio.sleep(0)  # requests and exits are served during a big start
        self._check_served_soon()
        return errors

    def _start_one(self, instance: Instance, reason: str) -> list[str]:
        if instance.state is State.ERRORED:
            instance.forget_instability()
        try:
            instance.start(reason)
        except SpawnError as exc:
            return [str(exc)]
        return []

    async def stop(self, reason: str = "stopped") -> None:
        await asyncio.gather(*(inst.stop(reason) for inst in self.all_instances()))

    async def restart(self) -> list[str]:
        await self.stop("restarting")
        for instance in self.instances.values():
            instance.count_restart()
        return await self.start("restarted")

    async def delete(self) -> None:
        await self.stop("deleted")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_sockets()

    async def scale(self, count: int) -> list[str]:
        if count < 1:
            raise CommandError("bad_args", "an app needs at least 1 instance; use pmx stop")
        old = self.spec.instances
        self.spec = self.spec.with_instances(count)
        if count < old:
            kept = self._slots()
            gone = [self.instances[i] for i in sorted(self.instances) if i not in kept]
            await asyncio.gather(*(inst.stop("scaled down") for inst in gone))
            for inst in gone:
                del self.instances[inst.index]  # their reuse_port slots close after the operation
            return []
        return await self.start("scaled up")

    async def reload(self, progress: Progress, new_spec: AppSpec | None = None) -> None:
        """Replace every instance, one at a time; raise SpawnError when one fails."""
        if new_spec is not None:
            self.spec = new_spec
        spec = self.spec
        if spec.is_cluster and self.sockets is None:
            await self.start("started")
            return
        slots = self._slots()
        for index in slots:
            old = self.instances.get(index)
            if old is None or old.state not in RUNNING:
                if old is None:
                    self.instances[index] = self._new_instance(index)
                errors = await self.start("started by reload")
                if errors:
                    raise SpawnError("; ".join(errors))
                progress(f"{self.name}:{index} started (it was not running)")
                continue
            if spec.reload_mode == "restart":
                await old.restart("reloading (reload_mode restart)", started="reloaded")
                if spec.wait_ready or spec.ready_check:
                    await self._readiness.wait(old)
                progress(f"{old.name} restarted, pid {old.pid}")
                continue
            await self.replace(old, "reloaded")
            progress(f"{self.name}:{index} replaced: pid {old.pid} -> "
                     f"{self.instances[index].pid}")
        for index in [i for i in self.instances if i not in slots]:
            await self.instances.pop(index).stop("removed by reload")
        self._check_served_soon()

    async def replace(self, old: Instance, reason: str) -> Instance:
        """Start a replacement for `old`, wait until it is ready, then stop `old`."""
        new = self._new_instance(old.index, old.id)
        new.succeed(old)
        self.replacing[old.index] = new
        try:
            new.start(reason, replacement=True)
            await self._readiness.wait(new)
        except SpawnError:
            if new.state in RUNNING:
                await new.stop("replacement failed")
            raise
        except BaseException:
            await new.stop("reload interrupted")
            raise
        finally:
            self.replacing.pop(old.index, None)
        self.instances[old.index] = new
        await old.stop(f"replaced by pid {new.pid}")
        return new

    async def restart_for_memory(self, instance: Instance, reason: str) -> None:
        """A memory-limit restart: zero-downtime replacement for cluster apps."""
        if self.busy is not None or self.instances.get(instance.index) is not instance:
            return
        async with self.operation(f"memory restart of {instance.name}"):
            log.warning("%s (pid %s) restarting: %s", instance.name, instance.pid, reason)
            if self.spec.is_cluster:
                try:
                    await self.replace(instance, reason)
                except SpawnError as exc:
                    log.error("%s: memory restart failed, old instance kept: %s",
                              instance.name, exc)
                return
            with contextlib.suppress(SpawnError):
                await instance.restart(reason, started=reason)

    def restart_for_memory_nowait(self, instance: Instance, reason: str) -> None:
        self._own(self.restart_for_memory(instance, reason))
