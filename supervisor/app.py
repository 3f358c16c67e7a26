"""AppGroup: the N instances of one app: start, stop, restart, scale, reload, memory restarts.

One operation at a time per app: `operation()` marks the app busy, and the control
server refuses a conflicting command at once with the name of what is running.

Reload replaces instances one at a time: start the replacement on the same sockets
(state launching), wait until it is ready, then stop the old one gracefully. If a
replacement exits or is not ready within listen_timeout, the reload stops there, the
replacement is stopped and every old instance that has not been replaced keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from pathlib import Path

from .accepting import is_accepting, socket_inode
from .config import AppSpec
from .dropin import FAMILIES, ListenReport, preload_env, runtime_of, take_socket, uses_preload
from .errors import CommandError, SpawnError
from .logs import LogFile, LogFiles, instance_log_path
from .process import Instance, NotReadyInTime, Runtime
from .readiness import wait_probe
from .sockets import BACKLOG, AppSockets, ListenSocket
from .spawn import Inheritance
from .states import ENDED, RUNNING, State

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
ACCEPT_POLL_S = 0.02  # how often a starting instance is checked for accepting
LISTEN_SETTLE_S = 0.1  # quiet time after a listen report before the other instances start


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int]:
    fd = os.pidfd_open(pid)
    try:
        yield fd
    finally:
        os.close(fd)


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
        self._tasks: set[asyncio.Task[None]] = set()
        self._heard_listening = asyncio.Event()  # a preload reported a listen (dropin.py)

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
    async def operation(self, what: str) -> AsyncIterator[None]:
        self.check_idle()
        self.busy = what
        try:
            yield
        finally:
            self.busy = None

    # ------------------------------------------------------------ instances

    def _inheritance(self, index: int) -> Inheritance | None:
        node = runtime_of(self.spec) == "node"  # Node apps get the IPC channel Node expects
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
            inheritance=self._inheritance, on_change=self._on_instance_change,
            on_listening=self._on_listening,
        )

    @property
    def mode(self) -> str:
        """How the app runs, in words, for `describe`."""
        spec = self.spec
        if not spec.is_cluster:
            return "fork: each instance on its own"
        how = "one SO_REUSEPORT socket per instance" if spec.reuse_port else "shared sockets"
        if uses_preload(spec):
            declared = "declared in listen" if spec.listen else "learned from the app"
            return (f"cluster: {how} owned by pmxd ({declared}); {runtime_of(spec)} preload "
                    "routes the app's own listen() to them")
        return f"cluster: {how} owned by pmxd, passed as fd 3 on (LISTEN_FDS)"

    # ------------------------------------------------------------ drop-in cluster mode

    def _on_listening(self, instance: Instance, report: ListenReport) -> None:
        """A preload says `instance` listens. A port the app bound itself becomes the
        app's: pmxd takes a copy of that socket and every other instance shares it."""
        log.info("%s (pid %s) listens on %s%s", instance.name, instance.pid, report.address,
                 " (the shared socket)" if report.adopted else "")
        # Only a port learned from the app: with `listen` declared, the cluster's
        # addresses are those, and the app's other ports stay its own business.
        if not report.adopted and self.sockets is not None and uses_preload(self.spec) \
                and not self.spec.listen and instance.pidfd is not None:
            if report.pid in (None, instance.pid):
                self._adopt(instance.pidfd, report)
            else:  # a process of the instance's group, not its main one
                with contextlib.suppress(OSError), _pidfd(report.pid) as pidfd:
                    self._adopt(pidfd, report)
        self._heard_listening.set()
        if not self.spec.wait_ready and not self.spec.ready_check:
            instance.mark_ready(f"listening on {report.address}")

    def _adopt(self, pidfd: int, report: ListenReport) -> None:
        assert self.sockets is not None
        for held in self.sockets.shared:
            if held.unix_path is None and held.sock.getsockname()[1] == report.port \
                    and FAMILIES.get(held.sock.family) == report.family:
                return  # already ours (another instance reported it first)
        try:
            sock = take_socket(pidfd, report.fd)
            sock.listen(BACKLOG)  # the app may have asked for a small backlog
        except OSError as exc:
            log.warning("%s: cannot take the socket of %s from the app (%s); other "
                        "instances cannot share that port", self.name, report.address, exc)
            return
        self.sockets.shared.append(ListenSocket(report.address, sock))
        self.sockets.addresses = (*self.sockets.addresses, report.address)
        log.info("%s: pmxd now holds %s; every instance shares it", self.name, report.address)

    def _must_learn_port(self) -> bool:
        return (uses_preload(self.spec) and not self.spec.listen and self.sockets is not None
                and not self.sockets.shared)

    async def _wait_listening(self, instance: Instance) -> None:
        """The first instance of an app whose port is not known yet: wait until it listens
        (or exits, or listen_timeout passes) before starting the others on its socket."""
        self._heard_listening.clear()
        heard = asyncio.ensure_future(self._heard_listening.wait())
        exited = asyncio.ensure_future(instance.wait_exit())
        try:
            await asyncio.wait({heard, exited}, timeout=self.spec.listen_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            heard.cancel()
            exited.cancel()
        # An app may listen on several sockets one after the other (aiohttp binds IPv4,
        # then IPv6): the others start once the reports have stopped coming.
        while self._heard_listening.is_set() and instance.pid is not None:
            self._heard_listening.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heard_listening.wait(), LISTEN_SETTLE_S)

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
                                       retain=self.spec.retain)

    def _on_instance_change(self, instance: Instance) -> None:
        needs_watch = instance.state is State.STARTING and (
            self.spec.wait_ready or self.spec.ready_check)
        if needs_watch:
            self._own(self._settle_start(instance))

    def _own(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_start(self, instance: Instance) -> None:
        """A plain start with a readiness check: online when ready, or after listen_timeout."""
        try:
            await self.wait_instance_ready(instance)
        except SpawnError as exc:
            if instance.state is State.STARTING:
                log.warning("%s: %s; counting it online as PM2 does", instance.name, exc)
                instance.mark_ready(f"assumed ready: {exc}")

    async def wait_instance_ready(self, instance: Instance) -> None:
        spec = self.spec
        if spec.ready_check:
            check = spec.ready_check.replace("{instance}", str(instance.index))
            inheritance = self._inheritance(instance.index)
            if inheritance is not None and inheritance.port is not None:
                check = check.replace("{port}", str(inheritance.port))
            probe = wait_probe(check, lambda: instance.state in RUNNING)
            try:
                async with asyncio.timeout(spec.listen_timeout_s):
                    passed = await probe
            except TimeoutError:
                raise SpawnError(f"{instance.name} (pid {instance.pid}): {check} did not "
                                 f"answer within listen_timeout ({spec.listen_timeout_s:g}s)") from None
            if not passed:
                raise SpawnError(f"{instance.name} exited before it was ready "
                                 f"({instance.last_exit}){instance.stderr_excerpt()}")
            instance.mark_ready(f"ready: {check} answered")
        elif spec.wait_ready:
            await instance.wait_ready(spec.listen_timeout_s)
        else:
            # No setting: ready when the app listens (its preload says so) or is seen
            # accepting on its sockets; a program pmx cannot see (a worker) is ready once it
            # has stayed up for listen_timeout.
            watcher = asyncio.ensure_future(self._watch_accepting(instance))
            try:
                await instance.wait_ready(spec.listen_timeout_s)
            except NotReadyInTime:
                instance.mark_ready(f"up for listen_timeout ({spec.listen_timeout_s:g}s)")
            finally:
                watcher.cancel()

    async def _watch_accepting(self, instance: Instance) -> None:
        """Mark `instance` ready once its process tree waits for connections on one of the
        app's sockets (accepting.py)."""
        if self.sockets is None or instance.pid is None:
            return
        sockets = self.sockets.ensure_slot(instance.index)
        inodes = [socket_inode(item.sock.fileno()) for item in sockets]
        while inodes and instance.state in (State.STARTING, State.LAUNCHING):
            if is_accepting(instance.pid, inodes):
                instance.mark_ready("accepting connections")
                return
            await asyncio.sleep(ACCEPT_POLL_S)

    # ------------------------------------------------------------ commands

    async def start(self, reason: str = "started") -> list[str]:
        """Bind sockets if needed, then start every instance that is not running.

        When the port must be learned from the app (drop-in cluster mode), the first
        instance starts alone and the others once it listens. Returns errors (spawn
        failures) as sentences; the instances concerned are errored."""
        if self.spec.is_cluster and self.sockets is None:
            sockets = AppSockets(self.name, self.spec.listen, self.spec.reuse_port)
            sockets.bind()  # raises SpawnError: nothing started yet
            self.sockets = sockets
        errors: list[str] = []
        waiting = []
        for index in range(self.spec.instances):
            instance = self.instances.get(index)
            if instance is None:
                instance = self.instances[index] = self._new_instance(index)
            if instance.state in ENDED:
                waiting.append(instance)
        if waiting and self._must_learn_port():
            first = waiting.pop(0)
            errors.extend(self._start_one(first, reason))
            if first.pid is not None:
                await self._wait_listening(first)
        for instance in waiting:
            errors.extend(self._start_one(instance, reason))
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
        if self.sockets is not None:
            self.sockets.close()
            self.sockets = None

    async def scale(self, count: int) -> list[str]:
        if count < 1:
            raise CommandError("bad_args", "an app needs at least 1 instance; use pmx stop")
        old = self.spec.instances
        self.spec = self.spec.with_instances(count)
        if count < old:
            gone = [self.instances[i] for i in sorted(self.instances) if i >= count]
            await asyncio.gather(*(inst.stop("scaled down") for inst in gone))
            for inst in gone:
                del self.instances[inst.index]
                if self.sockets is not None:
                    self.sockets.release_slot(inst.index)
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
        for index in range(spec.instances):
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
                    await self.wait_instance_ready(old)
                progress(f"{old.name} restarted, pid {old.pid}")
                continue
            await self.replace(old, "reloaded")
            progress(f"{self.name}:{index} replaced: pid {old.pid} -> "
                     f"{self.instances[index].pid}")
        for index in [i for i in self.instances if i >= spec.instances]:
            await self.instances.pop(index).stop("removed by reload")

    async def replace(self, old: Instance, reason: str) -> Instance:
        """Start a replacement for `old`, wait until it is ready, then stop `old`."""
        new = self._new_instance(old.index, old.id)
        new.succeed(old)
        self.replacing[old.index] = new
        try:
            new.start(reason, replacement=True)
            await self.wait_instance_ready(new)
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
