"""pmxd: the wiring. Home, lock and pid file, signals, reaper, the command table.

Start-up order matters:
1. umask 077, then check the home (not a symlink, ours, not group/other-writable).
2. Take an exclusive flock on home/pmxd.lock *before* binding anything: libzmq's ipc
   bind silently unlinks an existing socket file, so a second daemon would otherwise
   steal the first one's sockets.
3. Raise RLIMIT_NOFILE to the hard limit (libzmq aborts the process on EMFILE, and
   every child costs two pipe fds), become a child subreaper, bind the sockets.
4. `READY=1` to systemd's NOTIFY_SOCKET once the sockets answer and the apps started.

SIGTERM and SIGINT run the same code as `pmx kill`: stop every app gracefully, then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import resource
import signal
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from . import __version__
from .app import AppGroup
from .config import AppSpec, format_size, mask_env, parse_ecosystem, spec_from_table
from .control import ControlServer
from .errors import CommandError, ConfigError, ExitCode, HomeError, PmxError, SpawnError
from .logs import LogFiles, PipeReader
from .monitor import InstanceStats, Sampler
from .process import Instance, State
from .protocol import (
    STATS_TOPIC,
    Command,
    Json,
    JsonObject,
    Request,
    event_topic,
    log_topic,
)
from .readiness import NotifySocket
from .reaper import Reaper, become_subreaper
from .sockets import AppSockets, ListenSocket
from .state import (
    DUMP_NAME,
    STATE_NAME,
    process_start_time,
    read_dump,
    read_state,
    write_dump,
    write_state,
)

log = logging.getLogger("pmx.supervisor")

DEFAULT_MONITOR_INTERVAL_S = 1.0
FD_RESERVE = 64  # fds kept free for the control socket and log files
SHUTDOWN_REPLY_GRACE_S = 1.0


def default_home() -> Path:
    return Path(os.environ.get("PMX_HOME") or Path.home() / ".pmx")


def prepare_home(home: Path) -> None:
    """Create the home 0700, or refuse one that another user could tamper with."""
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(home)
    except OSError as exc:
        raise HomeError(f"cannot use home {home}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise HomeError(f"refusing home {home}: it is a symlink or not a directory")
    if info.st_uid != os.getuid():
        raise HomeError(f"refusing home {home}: it belongs to uid {info.st_uid}, not to you "
                        f"(uid {os.getuid()})")
    if info.st_mode & 0o022:
        raise HomeError(f"refusing home {home}: it is writable by group or others "
                        f"(mode {stat.S_IMODE(info.st_mode):o}); chmod 700 it")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(home, 0o700)
    (home / "logs").mkdir(mode=0o700, exist_ok=True)


class HomeLock:
    """An exclusive flock on home/pmxd.lock plus the pid file, held for the daemon's life."""

    def __init__(self, home: Path) -> None:
        self.path = home / "pmxd.lock"
        self.pid_path = home / "pmxd.pid"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise HomeError(f"pmxd is already running (pid {self.holder()}) in "
                                f"{self.path.parent}") from None
            raise
        self._fd = fd
        self.pid_path.write_text(f"{os.getpid()}\n")
        os.chmod(self.pid_path, 0o600)

    def holder(self) -> str:
        try:
            return self.pid_path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            self.pid_path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)


class Daemon:
    """Owns the apps and implements process.Runtime for their instances."""

    def __init__(self, home: Path, *, monitor_interval_s: float, runtime_mode: bool = False) -> None:
        self.home = home
        # Container mode: app output also goes to our stdout, and pmxd exits once every
        # app has ended, with 0 only when they all exited 0.
        self.runtime_mode = runtime_mode
        self.exit_status = 0
        self._state_write_pending = False
        self._adopted_sockets: dict[str, AppSockets] = {}  # from our own pre-exec image
        self.loop = asyncio.get_running_loop()
        self.apps: dict[str, AppGroup] = {}
        self.log_files = LogFiles()
        self.reaper = Reaper(self.loop)
        self.readers: dict[int, list[PipeReader]] = {}  # by id(instance)
        self.stats: dict[int, InstanceStats] = {}  # by pid
        self.over_limit: dict[int, int] = {}  # pid -> samples in a row over max memory
        self.monitor_interval_s = monitor_interval_s
        self.started = time.time()
        self._next_instance_id = 0
        self._stopping = asyncio.Event()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pmx-sampler")
        self._sampler = Sampler()
        self.fd_limit = raise_fd_limit()
        handlers: dict[Command, Callable[[Request], Awaitable[JsonObject]]] = {
            Command.PING: self.cmd_ping,
            Command.LIST: self.cmd_list,
            Command.DESCRIBE: self.cmd_describe,
            Command.START: self.cmd_start,
            Command.STOP: self.cmd_stop,
            Command.RESTART: self.cmd_restart,
            Command.RELOAD: self.cmd_reload,
            Command.DELETE: self.cmd_delete,
            Command.SCALE: self.cmd_scale,
            Command.FLUSH: self.cmd_flush,
            Command.SAVE: self.cmd_save,
            Command.RESURRECT: self.cmd_resurrect,
            Command.KILL: self.cmd_kill,
            Command.UPDATE: self.cmd_update,
        }
        self.control = ControlServer(home, handlers)
        self.notify = NotifySocket(self.loop, home / "notify.sock", self._on_notify)
        self.notify_socket_path: str | None = self.notify.path

    # ------------------------------------------------------------ Runtime for instances

    def publish_state(self, instance: Instance) -> None:
        if instance.state in (State.STARTING, State.LAUNCHING):
            self._write_state_now()  # a new pid: on disk before anything else can happen
        elif not self._state_write_pending:
            self._state_write_pending = True
            self.loop.call_soon(self._write_state_now)
        if self.runtime_mode and instance.state in (State.STOPPED, State.ERRORED):
            self.loop.call_soon(self._exit_when_all_ended)
        self.control.publish(event_topic(instance.app), {
            "kind": "state", "app": instance.app, "id": instance.id,
            "instance": instance.index, "pid": instance.pid, "state": instance.state.value,
            "reason": instance.reason, "time": instance.since, "restarts": instance.restarts,
            "exec_mode": instance.spec.exec_mode,
        })

    def publish_event(self, app: str, kind: str, message: str) -> None:
        self.control.publish(event_topic(app), {"kind": kind, "app": app, "message": message,
                                                "time": time.time()})

    def watch_exit(self, instance: Instance, pid: int, pidfd: int) -> None:
        self.reaper.watch(pid, pidfd, instance.on_exit)

    def kill_strays(self, run_id: str) -> None:
        import psutil

        marker = f"PMX_RUN_ID={run_id}".encode()
        watched = self.reaper.watched_pids()
        for child in psutil.Process().children():
            if child.pid in watched:
                continue
            try:
                with open(f"/proc/{child.pid}/environ", "rb") as file:
                    if marker not in file.read().split(b"\0"):
                        continue
                os.kill(child.pid, signal.SIGKILL)
                log.warning("killed pid %d, which escaped its app's process group (%s)",
                            child.pid, run_id)
            except OSError:
                continue

    def forget(self, instance: Instance) -> None:
        if instance.pid is not None:
            self.stats.pop(instance.pid, None)
            self.over_limit.pop(instance.pid, None)

    def attach_output(self, instance: Instance, stdout_fd: int, stderr_fd: int) -> None:
        app = self.apps.get(instance.app)
        if app is None:  # pragma: no cover - an instance always belongs to an app
            os.close(stdout_fd)
            os.close(stderr_fd)
            return
        spec = app.spec
        topic = log_topic(instance.app)
        readers = self.readers.setdefault(id(instance), [])

        echo_prefix = f"{instance.app}:{instance.index} | ".encode()

        def sink(stream: str, lines: list[bytes]) -> None:
            if self.runtime_mode:
                _echo(echo_prefix, lines)
            texts = [line.decode("utf-8", "replace") for line in lines]
            if stream == "error":
                instance.stderr_tail.extend(texts[-20:])
            self.control.publish(topic, {"app": instance.app, "id": instance.id,
                                         "instance": instance.index, "stream": stream,
                                         "lines": texts})

        def closed(reader: PipeReader) -> None:
            self.log_files.release(reader.file)
            if reader in readers:
                readers.remove(reader)

        for fd, stream in ((stdout_fd, "out"), (stderr_fd, "error")):
            readers.append(PipeReader(self.loop, fd, stream=stream,
                                      file=app.acquire_log(instance.index, stream),
                                      date_format=spec.log_date_format, sink=sink,
                                      on_close=closed))

    def _write_state_now(self, *, handing_over_sockets: bool = False) -> None:
        """Rewrite state.json. `handing_over_sockets`: pmxd is about to exec itself, and the
        listening sockets' fds (made inheritable) go into the file for the new image."""
        self._state_write_pending = False
        sockets: list[object] = []
        if handing_over_sockets:
            for app in self.apps.values():
                if app.sockets is None or app.sockets.reuse_port:
                    continue  # reuse_port slots are bound again; only shared sockets pass
                for item in app.sockets.shared:
                    os.set_inheritable(item.sock.fileno(), True)
                    sockets.append({"app": app.name, "address": item.address,
                                    "fd": item.sock.fileno(), "unix_path": item.unix_path})
        apps: list[object] = []
        processes: list[object] = []
        for app in self.apps.values():
            running = any(i.state not in (State.STOPPED, State.ERRORED)
                          for i in app.all_instances())
            apps.append({"spec": app.spec.to_table(), "base_env": app.base_env,
                         "running": running})
            for instance in app.all_instances():
                if instance.pid is None or instance.pidfd is None:
                    continue
                processes.append({
                    "app": app.name, "instance": instance.index, "pid": instance.pid,
                    "start_time": process_start_time(instance.pid),
                    "stop_signal": app.spec.stop_signal,
                    "kill_timeout_s": app.spec.kill_timeout_s,
                })
        try:
            write_state(self.home / STATE_NAME, {"pmxd_pid": os.getpid(), "apps": apps,
                                                 "processes": processes, "sockets": sockets})
        except OSError as exc:
            log.warning("cannot write %s: %s", self.home / STATE_NAME, exc.strerror)

    async def _recover_from_crash(self) -> None:
        """A previous pmxd died without stopping its apps: stop what it left, restart it."""
        document = read_state(self.home / STATE_NAME)
        if document is None:
            return
        leftovers = []
        for entry in document.get("processes") or []:  # type: ignore[attr-defined]
            if not isinstance(entry, dict) or not isinstance(entry.get("pid"), int):
                continue
            pid = entry["pid"]
            if entry.get("start_time") is None or process_start_time(pid) != entry["start_time"]:
                continue  # gone, or the pid now belongs to another process
            leftovers.append(entry)
        if leftovers:
            log.warning("the previous pmxd (pid %s) died; stopping the %d processes it left",
                        document.get("pmxd_pid"), len(leftovers))
        self._adopt_sockets(document)
        await asyncio.gather(*(_stop_leftover(entry) for entry in leftovers))
        for entry in document.get("apps") or []:  # type: ignore[attr-defined]
            if not isinstance(entry, dict) or not entry.get("running"):
                continue
            try:
                spec = spec_from_table(entry["spec"], source=str(self.home / STATE_NAME))
                base_env = {str(k): str(v) for k, v in (entry.get("base_env") or {}).items()}
                await self._start_specs([spec], base_env, skip_existing=True)
                log.info("restarted %s after the previous pmxd's crash", spec.name)
            except (PmxError, KeyError, AttributeError) as exc:
                log.error("cannot restart an app of the previous pmxd: %s", exc)
        for unused in self._adopted_sockets.values():
            unused.close()  # sockets of apps that were not running
        self._adopted_sockets.clear()

    def _adopt_sockets(self, document: Mapping[str, object]) -> None:
        """After `pmx update` exec'd this process, take over the listening sockets the
        previous image left open, so connections wait in the backlog instead of being
        refused while the apps restart. Only fds of this very process are meaningful."""
        if document.get("pmxd_pid") != os.getpid():
            return
        for entry in document.get("sockets") or []:  # type: ignore[attr-defined]
            try:
                fd = int(entry["fd"])
                sock = socket.socket(fileno=fd)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                log.warning("cannot take over a listening socket: %s", exc)
                continue
            os.set_inheritable(fd, False)
            app = str(entry.get("app"))
            group = self._adopted_sockets.get(app)
            if group is None:
                group = self._adopted_sockets[app] = AppSockets(app, (), False)
            group.shared.append(ListenSocket(str(entry.get("address")), sock,
                                             entry.get("unix_path")))
        for app, group in self._adopted_sockets.items():
            group.addresses = tuple(item.address for item in group.shared)
            log.info("took over %s for app %s", ", ".join(group.addresses), app)

    def _exit_when_all_ended(self) -> None:
        if self._stopping.is_set():
            return  # stopping on SIGTERM: apps ending of their stop signal is expected
        if any(app.busy is not None for app in self.apps.values()):
            return  # a restart passes through "stopped" on purpose
        instances = [i for app in self.apps.values() for i in app.all_instances()]
        if not instances or any(i.state not in (State.STOPPED, State.ERRORED) for i in instances):
            return
        clean = all(i.state is State.STOPPED and i.last_exit in (None, "exit code 0")
                    for i in instances)
        self.exit_status = 0 if clean else 1
        log.info("every app has ended; pmxd exits with status %d", self.exit_status)
        self._stopping.set()

    def next_id(self) -> int:
        value = self._next_instance_id
        self._next_instance_id += 1
        return value

    def _on_notify(self, pid: int, fields: dict[str, str]) -> None:
        try:
            group = os.getpgid(pid)
        except OSError:
            group = -1
        for app in self.apps.values():
            for instance in app.all_instances():
                if instance.pid is not None and instance.pid in (pid, group):
                    if "STATUS" in fields:
                        instance.status_text = fields["STATUS"]
                    if fields.get("READY") == "1":
                        instance.mark_ready("READY=1 received")
                    if fields.get("STOPPING") == "1":
                        log.info("%s (pid %d) says it is stopping", instance.name, pid)
                    return
        log.debug("notify message from unknown pid %d ignored", pid)

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, resurrect: bool, files: list[str], env_name: str | None,
                  ready_fd: int | None = None) -> int:
        self.reaper.install()
        become_subreaper()
        self.control.bind()
        self.control.start()
        await self._recover_from_crash()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: None)
        log.info("pmxd %s started (pid %d, home %s, fd limit %d)", __version__, os.getpid(),
                 self.home, self.fd_limit)
        if resurrect:
            try:
                await self._resurrect()
            except PmxError as exc:
                # A service must come up even with a damaged dump: say why, start nothing.
                log.error("cannot resurrect: %s", exc)
        for file in files:
            try:
                specs = parse_ecosystem(file, env_name=env_name)
                await self._start_specs(specs, dict(os.environ))
            except PmxError as exc:
                log.error("%s", exc)
        if ready_fd is not None:
            os.write(ready_fd, b"ok")
            os.close(ready_fd)
        sd_notify(f"READY=1\nSTATUS=supervising {len(self.apps)} apps\nMAINPID={os.getpid()}")
        monitor = self.loop.create_task(self._monitor_loop())
        watchdog = self.loop.create_task(self._watchdog_loop())
        await self._stopping.wait()
        sd_notify("STOPPING=1")
        log.info("pmxd stopping: stopping %d apps", len(self.apps))
        await self._stop_all()
        for task in (monitor, watchdog):
            task.cancel()
        await asyncio.gather(monitor, watchdog, return_exceptions=True)
        await asyncio.sleep(0)  # let the last replies go out
        await self.control.close()
        self.notify.close()
        for socket_file in (self.control.rpc_path, self.control.pub_path):
            socket_file.unlink(missing_ok=True)  # so clients say "not running" at once
        self.log_files.close_all()
        self._worker.shutdown(wait=True)
        (self.home / STATE_NAME).unlink(missing_ok=True)  # a clean stop leaves nothing to recover
        log.info("pmxd stopped")
        return self.exit_status

    async def _stop_all(self) -> None:
        await asyncio.gather(*(app.stop("pmxd stopping") for app in self.apps.values()),
                             return_exceptions=True)
        for app in self.apps.values():
            await app.delete()

    async def _watchdog_loop(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        watchdog_pid = os.environ.get("WATCHDOG_PID")
        if not usec or not usec.isdigit() or (watchdog_pid and watchdog_pid != str(os.getpid())):
            return
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(int(usec) / 2e6)

    async def _monitor_loop(self) -> None:
        while True:
            started = time.monotonic()
            roots = [(inst.id, inst.pid) for app in self.apps.values()
                     for inst in app.all_instances() if inst.pid is not None]
            try:
                samples = await self.loop.run_in_executor(self._worker, self._sampler.sample,
                                                          roots)
            except Exception:
                log.exception("bug: sampling failed")
                samples = []
            self.stats = {sample.pid: sample for sample in samples}
            # Published even when nothing runs, so subscribers can tell pmxd is alive.
            self.control.publish(STATS_TOPIC, {"time": time.time(), "instances": [
                {"id": s.id, "pid": s.pid, "cpu": s.cpu, "memory": s.memory,
                 "processes": s.processes} for s in samples]})
            self._enforce_memory_limits()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.01, self.monitor_interval_s - elapsed))

    def _enforce_memory_limits(self) -> None:
        for app in self.apps.values():
            limit = app.spec.max_memory_restart_bytes
            if limit is None:
                continue
            for instance in list(app.instances.values()):
                sample = self.stats.get(instance.pid or -1)
                if sample is None or instance.state is not State.ONLINE:
                    continue
                if sample.memory <= limit:
                    self.over_limit.pop(sample.pid, None)
                    continue
                count = self.over_limit[sample.pid] = self.over_limit.get(sample.pid, 0) + 1
                if count >= max(1, app.spec.memory_limit_samples) and app.busy is None:
                    reason = f"memory: {format_size_short(sample.memory)} > {format_size(limit)}"
                    self.publish_event(app.name, "memory_restart", f"{instance.name}: {reason}")
                    app.restart_for_memory_nowait(instance, reason)

    async def _resurrect(self) -> int:
        specs = read_dump(self.home / DUMP_NAME)
        await self._start_specs(specs, dict(os.environ), skip_existing=True)
        log.info("resurrected %d apps from %s", len(specs), self.home / DUMP_NAME)
        return len(specs)

    # ------------------------------------------------------------ targets

    def _resolve(self, target: object) -> list[tuple[AppGroup, list[Instance] | None]]:
        """"all", an app name or an instance id -> (app, None for all its instances | some)."""
        if not isinstance(target, str) or not target:
            raise CommandError("bad_args", '"target" must be an app name, an id or "all"')
        if target == "all":
            return [(app, None) for app in self.apps.values()]
        if target in self.apps:
            return [(self.apps[target], None)]
        if target.isascii() and target.isdigit():
            wanted = int(target)
            for app in self.apps.values():
                for instance in app.instances.values():
                    if instance.id == wanted:
                        return [(app, [instance])]
        shown = target if len(target) <= 64 else target[:61] + "..."
        raise CommandError("not_found", f'no app or instance id "{shown}"')

    # ------------------------------------------------------------ commands

    async def cmd_ping(self, request: Request) -> JsonObject:
        return {"version": __version__, "pid": os.getpid(), "home": str(self.home),
                "started": self.started,
                "uptime": round(time.time() - self.started, 1), "apps": len(self.apps)}

    def _instance_row(self, app: AppGroup, instance: Instance) -> JsonObject:
        sample = self.stats.get(instance.pid or -1)
        running = instance.state not in (State.STOPPED, State.ERRORED, State.WAITING)
        return {
            "name": app.name, "id": instance.id, "instance": instance.index,
            "pid": instance.pid if running else None, "status": instance.state.value,
            "reason": instance.reason, "restarts": instance.restarts,
            "cpu": sample.cpu if sample and running else 0.0,
            "memory": sample.memory if sample and running else 0,
            "exec_mode": app.spec.exec_mode, "uptime": round(instance.uptime_s(), 1),
            "since": instance.since,
            "listen": list(app.sockets.bound_addresses()) if app.sockets else [],
        }

    async def cmd_list(self, request: Request) -> JsonObject:
        rows: list[Json] = []
        for app in self.apps.values():
            for instance in sorted(app.all_instances(), key=lambda i: (i.index, i.id)):
                rows.append(self._instance_row(app, instance))
        return {"instances": rows}

    async def cmd_describe(self, request: Request) -> JsonObject:
        show_secrets = request.args.get("show_secrets") is True
        described: list[Json] = []
        for app, chosen in self._resolve(request.args.get("target")):
            table = app.spec.to_table()
            env = dict(app.spec.env)
            table["env"] = dict(env if show_secrets else mask_env(env))
            instances: list[Json] = []
            for instance in chosen or app.all_instances():
                row = self._instance_row(app, instance)
                out, err = app.log_paths(instance.index)
                row.update({"out_log": str(out), "error_log": str(err),
                            "last_exit": instance.last_exit,
                            "unstable_restarts": instance.unstable_restarts,
                            "status_text": instance.status_text,
                            "command": list[Json](app.spec.command())})
                instances.append(row)
            described.append({"name": app.name, "spec": _json_table(table),
                              "listen": list[Json](app.sockets.bound_addresses()
                                                   if app.sockets else []),
                              "busy": app.busy, "instances": instances})
        return {"apps": described}

    async def _start_specs(self, specs: list[AppSpec], base_env: Mapping[str, str], *,
                           skip_existing: bool = False) -> JsonObject:
        for spec in specs:
            existing = self.apps.get(spec.name)
            if existing is not None and existing.spec != spec and not skip_existing:
                raise CommandError(
                    "bad_args", f'app "{spec.name}" already exists with other settings; '
                    f"use `pmx reload FILE` to apply them, or `pmx delete {spec.name}` first")
            if existing is not None and existing.busy is not None:
                raise CommandError("busy", f'app "{spec.name}" is busy: {existing.busy} is running')
        started: list[Json] = []
        errors: list[Json] = []
        for spec in specs:
            app = self.apps.get(spec.name)
            created = app is None
            if app is None:
                app = AppGroup(spec, base_env=base_env, runtime=self, logs_dir=self.home / "logs",
                               log_files=self.log_files, next_id=self.next_id)
                app.sockets = self._adopted_sockets.pop(spec.name, None)
                self.apps[spec.name] = app
            async with app.operation("start"):
                try:
                    problems = app.start()
                except SpawnError as exc:
                    if created:
                        del self.apps[spec.name]
                    errors.append(str(exc))
                    continue
            errors.extend(problems)
            started.append(spec.name)
        return {"started": started, "errors": errors}

    async def cmd_start(self, request: Request) -> JsonObject:
        if "target" in request.args:
            started: list[Json] = []
            errors: list[Json] = []
            for app, chosen in self._resolve(request.args["target"]):
                async with app.operation("start"):
                    if chosen is None:
                        errors.extend(app.start())
                    else:
                        for instance in chosen:
                            if instance.state in (State.STOPPED, State.ERRORED):
                                try:
                                    instance.start("started")
                                except SpawnError as exc:
                                    errors.append(str(exc))
                started.append(app.name)
            return {"started": started, "errors": errors}
        tables = request.args.get("apps")
        base_env = request.args.get("base_env", {})
        if not isinstance(tables, list) or not tables or not isinstance(base_env, dict):
            raise CommandError("bad_args", '"apps" must be a non-empty list of app tables')
        specs = _specs_from_request(tables)
        return await self._start_specs(specs, _env_from_request(base_env))

    async def cmd_stop(self, request: Request) -> JsonObject:
        targets = self._resolve(request.args.get("target"))
        stopped: list[Json] = []

        async def stop_one(app: AppGroup, chosen: list[Instance] | None) -> None:
            async with app.operation("stop"):
                if chosen is None:
                    await app.stop()
                else:
                    await asyncio.gather(*(inst.stop() for inst in chosen))
            stopped.append(app.name)

        await _gather_reporting([stop_one(app, chosen) for app, chosen in targets])
        return {"stopped": stopped}

    async def cmd_restart(self, request: Request) -> JsonObject:
        targets = self._resolve(request.args.get("target"))
        errors: list[Json] = []

        async def restart_one(app: AppGroup, chosen: list[Instance] | None) -> None:
            async with app.operation("restart"):
                if chosen is None:
                    errors.extend(await app.restart())
                    return
                for instance in chosen:
                    await instance.stop("restarting")
                    instance.restarts += 1
                    try:
                        instance.start("restarted")
                    except SpawnError as exc:
                        errors.append(str(exc))

        await _gather_reporting([restart_one(app, chosen) for app, chosen in targets])
        return {"restarted": [app.name for app, _ in targets], "errors": errors}

    async def cmd_reload(self, request: Request) -> JsonObject:
        tables = request.args.get("apps")
        if isinstance(tables, list):
            return await self._reload_specs(tables, request.args.get("base_env"),
                                            request.args.get("update_env") is True)
        targets = self._resolve(request.args.get("target"))
        return await self._reload_apps([(app, None) for app, _ in targets])

    async def _reload_specs(self, tables: list[Json], base_env: Json,
                            update_env: bool) -> JsonObject:
        specs = _specs_from_request(tables)
        new_apps = [spec for spec in specs if spec.name not in self.apps]
        changed = [(self.apps[s.name], s) for s in specs if s.name in self.apps]
        for app, spec in changed:
            if app.spec.is_cluster and (spec.listen != app.spec.listen
                                        or spec.reuse_port != app.spec.reuse_port):
                raise CommandError("bad_args", f'app "{app.name}": changing listen addresses '
                                   "needs `pmx delete` then `pmx start`")
        if update_env and isinstance(base_env, dict):
            for app, _ in changed:
                app.base_env = _env_from_request(base_env)
        result = await self._reload_apps(changed)
        if new_apps:
            started = await self._start_specs(new_apps, _env_from_request(base_env))
            result["started"] = started["started"]
        return result

    async def _reload_apps(self, targets: Sequence[tuple[AppGroup, AppSpec | None]]) -> JsonObject:
        for app, _ in targets:
            if app.busy is not None:
                raise CommandError("busy", f'app "{app.name}" is busy: {app.busy} is running')
        reloaded: list[Json] = []
        for app, new_spec in targets:
            def progress(message: str, app_name: str = app.name) -> None:
                log.info("reload: %s", message)
                self.publish_event(app_name, "reload", message)

            async with app.operation("reload"):
                previous = app.spec
                try:
                    await app.reload(progress, new_spec)
                except SpawnError as exc:
                    # A failed reload keeps the last working settings: the instances not
                    # yet replaced, and any later crash restart, use the old spec.
                    app.spec = previous
                    self.publish_event(app.name, "reload_failed", str(exc))
                    raise CommandError("failed", f'reload of "{app.name}" stopped: {exc}; '
                                       "the old instances keep serving") from None
            reloaded.append(app.name)
        return {"reloaded": reloaded}

    async def cmd_delete(self, request: Request) -> JsonObject:
        targets = self._resolve(request.args.get("target"))
        deleted: list[Json] = []

        async def delete_one(app: AppGroup, chosen: list[Instance] | None) -> None:
            async with app.operation("delete"):
                if chosen is None or len(chosen) == len(app.instances):
                    await app.delete()
                    self.apps.pop(app.name, None)
                    deleted.append(app.name)
                    self.publish_event(app.name, "removed", f'app "{app.name}" deleted')
                else:
                    for instance in chosen:
                        await instance.stop("deleted")
                        app.instances.pop(instance.index, None)
                    app.spec = app.spec.with_instances(max(1, len(app.instances)))
                    deleted.extend(f"{app.name}:{i.index}" for i in chosen)

        await _gather_reporting([delete_one(app, chosen) for app, chosen in targets])
        return {"deleted": deleted}

    async def cmd_scale(self, request: Request) -> JsonObject:
        name, count = request.args.get("target"), request.args.get("count")
        if not isinstance(name, str) or name not in self.apps:
            raise CommandError("not_found", f"no app named {name!r}")
        digits = count.lstrip("+-") if isinstance(count, str) else ""
        if not isinstance(count, str) or not (digits.isascii() and digits.isdigit()):
            raise CommandError("bad_args", 'count must be a number like 4, "+2" or "-1"')
        app = self.apps[name]
        wanted = app.spec.instances + int(count) if count[0] in "+-" else int(count)
        if not 1 <= wanted <= 1024:
            raise CommandError("bad_args", f"cannot scale {name} to {wanted} instances "
                                           "(1 to 1024)")
        async with app.operation("scale"):
            errors = await app.scale(wanted)
        return {"app": name, "instances": wanted, "errors": list(errors)}

    async def cmd_flush(self, request: Request) -> JsonObject:
        target = request.args.get("target", "all")
        targets = self._resolve(target)
        flushed: list[Json] = []
        for app, _ in targets:
            paths: set[Path] = set()
            for index in range(max(app.spec.instances, len(app.instances))):
                paths.update(app.log_paths(index))
            self.log_files.flush(paths)
            flushed.extend(str(p) for p in sorted(paths))
        return {"flushed": flushed}

    async def cmd_save(self, request: Request) -> JsonObject:
        path = self.home / DUMP_NAME
        specs = [app.spec for app in self.apps.values()]
        if not specs and request.args.get("force") is not True:
            try:
                previous = read_dump(path)
            except PmxError:
                previous = []
            if previous:
                raise CommandError("bad_args", f"no app is running, and {path} holds "
                                   f"{len(previous)} apps; use --force to save an empty list")
        write_dump(path, specs)
        return {"path": str(path), "apps": len(specs)}

    async def cmd_resurrect(self, request: Request) -> JsonObject:
        path = self.home / DUMP_NAME
        try:
            specs = read_dump(path)
        except ConfigError as exc:
            raise CommandError("failed", str(exc)) from None
        base_env = request.args.get("base_env")
        env = _env_from_request(base_env) if isinstance(base_env, dict) else dict(os.environ)
        result = await self._start_specs(specs, env, skip_existing=True)
        result["path"] = str(path)
        return result

    async def cmd_kill(self, request: Request) -> JsonObject:
        await self._stop_all()
        self.apps.clear()
        # Stop after this reply has gone out.
        self.loop.call_later(0.05, self._stopping.set)
        return {"pid": os.getpid(), "stopped": True}

    async def cmd_update(self, request: Request) -> JsonObject:
        """Replace this pmxd with the installed version, in place (same pid).

        The new image finds state.json, takes over the listening sockets (so no
        connection is refused), stops the apps the old one ran and starts them again:
        apps restart once. Keeping the processes themselves across the exec would need
        every pipe and pidfd handed over too, which pmx does not do."""
        for app in self.apps.values():
            if app.busy is not None:
                raise CommandError("busy", f'app "{app.name}" is busy: {app.busy} is running')
        self._write_state_now(handing_over_sockets=True)
        self.loop.call_later(0.05, self._exec_new_version)
        return {"pid": os.getpid(), "apps": len(self.apps)}

    def _exec_new_version(self) -> None:
        log.info("pmxd %s replacing itself with the installed version", __version__)
        self.control.close_now()
        self.notify.close()
        argv = [sys.executable, "-m", "pmx.supervisor.daemon", "--home", str(self.home),
                "--foreground", "--log-file", "--monitor-interval", str(self.monitor_interval_s)]
        try:
            os.execv(sys.executable, argv)
        except OSError as exc:
            log.error("cannot exec the new pmxd: %s; stopping", exc)
            self._stopping.set()


def _specs_from_request(tables: list[Json]) -> list[AppSpec]:
    """Validate the app tables a client sent; a bad one refuses the whole request."""
    specs: list[AppSpec] = []
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            raise CommandError("bad_args", f"apps[{index}] must be an object")
        try:
            specs.append(spec_from_table(table, source=f"request apps[{index}]"))
        except ConfigError as exc:
            raise CommandError("bad_args", str(exc)) from None
    return specs


def _env_from_request(value: Json) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


def _echo(prefix: bytes, lines: list[bytes]) -> None:
    try:
        sys.stdout.buffer.write(b"".join(prefix + line + b"\n" for line in lines))
        sys.stdout.buffer.flush()
    except (OSError, ValueError):
        pass  # a closed stdout must not stop the apps


async def _stop_leftover(entry: dict[str, object]) -> None:
    """Stop a process group a dead pmxd left: stop signal, kill_timeout, SIGKILL."""
    pid = entry["pid"]
    assert isinstance(pid, int)
    start_time = entry.get("start_time")
    name = f"{entry.get('app')}:{entry.get('instance')}"
    stop_signal = signal.Signals.__members__.get(str(entry.get("stop_signal")), signal.SIGTERM)
    timeout = entry.get("kill_timeout_s")
    timeout_s = float(timeout) if isinstance(timeout, int | float) else 5.0
    log.info("%s (pid %d) left by the previous pmxd: %s", name, pid, stop_signal.name)
    try:
        os.kill(pid, stop_signal)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while process_start_time(pid) == start_time and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)  # and whatever else it left in its group
    except (ProcessLookupError, PermissionError):
        pass
    while process_start_time(pid) == start_time and time.monotonic() < deadline + 5:
        await asyncio.sleep(0.05)


async def _gather_reporting(coroutines: list[Awaitable[None]]) -> None:
    """Run per-app operations together; a refusal of any is raised after all finished."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def format_size_short(size: int) -> str:
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size >= factor:
            return f"{size / factor:.0f}{unit}"
    return f"{size}B"


def _json_table(table: Mapping[str, object]) -> JsonObject:
    result: JsonObject = {}
    for key, value in table.items():
        if isinstance(value, str | int | float | bool) or value is None:
            result[key] = value
        elif isinstance(value, list):
            result[key] = [str(v) for v in value]
        elif isinstance(value, dict):
            result[key] = {str(k): str(v) for k, v in value.items()}
    return result


# ---------------------------------------------------------------- entry point


def _setup_logging(home: Path, foreground: bool) -> None:
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(home / "pmxd.log")
        os.chmod(home / "pmxd.log", 0o600)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pmxd", description="the pmx daemon")
    parser.add_argument("files", nargs="*", help="ecosystem files to start")
    parser.add_argument("--home", help="PMX_HOME (default: $PMX_HOME or ~/.pmx)")
    parser.add_argument("--foreground", action="store_true",
                        help="stay attached and log to stderr (for systemd and containers)")
    parser.add_argument("--resurrect", action="store_true",
                        help="start the apps of the last `pmx save`")
    parser.add_argument("--env", dest="env_name", help="env_NAME table of the files to use")
    parser.add_argument("--monitor-interval", type=float, default=None,
                        help="seconds between CPU/memory samples (default 1, at least 0.1)")
    parser.add_argument("--log-file", action="store_true",
                        help="with --foreground: log to PMX_HOME/pmxd.log, not stderr")
    parser.add_argument("--runtime", action="store_true",
                        help="container mode: app output to stdout, exit when every app ended")
    parser.add_argument("--version", action="version", version=f"pmxd {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    home = Path(args.home) if args.home else default_home()
    home = Path(os.path.abspath(home))
    os.umask(0o077)
    interval = args.monitor_interval or float(os.environ.get("PMX_MONITOR_INTERVAL", "0") or 0) \
        or DEFAULT_MONITOR_INTERVAL_S
    interval = max(0.1, interval)
    ready_fd: int | None = None
    if not args.foreground:
        # Detach: the parent waits until the child answers on its sockets (or says why
        # it cannot), so `pmxd` returns only once the daemon is usable.
        read_end, ready_fd = os.pipe()
        if os.fork() != 0:
            os.close(ready_fd)
            with os.fdopen(read_end, "rb") as pipe:
                message = pipe.read().decode(errors="replace")
            if message == "ok":
                return int(ExitCode.OK)
            print(f"pmxd: {message or 'the daemon exited during start-up; see its log'}",
                  file=sys.stderr)
            return int(ExitCode.FAILED)
        os.close(read_end)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
    try:
        prepare_home(home)
        lock = HomeLock(home)
        lock.acquire()
    except HomeError as exc:
        if ready_fd is not None:
            os.write(ready_fd, str(exc).encode())
            os._exit(int(ExitCode.FAILED))
        print(f"pmxd: {exc}", file=sys.stderr)
        return int(ExitCode.FAILED)
    _setup_logging(home, args.foreground and not args.log_file)
    try:
        async def amain() -> int:
            # Files on a foreground command line mean a container's entry point.
            runtime_mode = args.runtime or bool(args.foreground and args.files)
            daemon = Daemon(home, monitor_interval_s=interval, runtime_mode=runtime_mode)
            return await daemon.run(resurrect=args.resurrect, files=args.files,
                                    env_name=args.env_name, ready_fd=ready_fd)

        return asyncio.run(amain())
    except Exception as exc:
        log.exception("pmxd crashed")
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"start-up failed: {exc}".encode())
        return int(ExitCode.FAILED)
    finally:
        lock.release()


def runtime_main() -> int:
    """`pmx-runtime FILE...`: pmxd in the foreground as a container's PID 1."""
    return main(["--foreground", "--runtime", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
