"""pmxd: the wiring. Builds the parts, runs the lifecycle, handles signals.

Start-up order matters:
1. umask 077, then check the home (not a symlink, ours, not group/other-writable).
2. Take an exclusive flock on home/pmxd.lock *before* binding anything: libzmq's ipc
   bind silently unlinks an existing socket file, so a second daemon would otherwise
   steal the first one's sockets.
3. Raise RLIMIT_NOFILE to the hard limit (libzmq aborts the process on EMFILE, and
   every child costs two pipe fds), become a child subreaper, bind the sockets.
4. Take over the running apps after `pmx update` (handover.py), before installing the
   SIGCHLD handler that would reap them as strays; recover from a previous pmxd's crash.
5. `READY=1` to systemd's NOTIFY_SOCKET once the sockets answer and the apps started.

SIGTERM and SIGINT run the same code as `pmx kill`: stop every app gracefully, then exit.

The command line (arguments, detaching, `main`) is launch.py. The parts, one module
each: registry (apps, targets), commands (the handlers), app and process (lifecycle),
spawn, sockets, readiness, monitor (stats, memory limits), logs (output routing), control
(ZeroMQ), recovery (state file, crash), handover (`update`), home, dump.
The Daemon is the instances' `Runtime`: it forwards each callback to the part that owns it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import __version__, sdnotify
from .app import AppGroup
from .cgroups import Cgroups, describe_tracking
from .commands import Commands
from .config import AppSpec
from .control import ControlServer
from .dropin import ListenReport
from .dump import read_dump
from .errors import ExitCode, PmxError
from .handover import Handover, exec_new_version, hand_over
from .home import (
    DUMP_FILE,
    LOGS_DIR,
    NOTIFY_SOCKET,
    SPAWN_JOURNAL,
    STATE_FILE,
    raise_fd_limit,
)
from .logs import LogFiles, OutputRouter
from .monitor import ResourceMonitor
from .process import Instance
from .protocol import JsonObject, event_topic
from .readiness import NotifySocket
from .reaper import Reaper, become_subreaper
from .recovery import Recovery, StateFile
from .registry import Registry
from .states import ENDED, State
from .watch import AutoReload

log = logging.getLogger("pmx.supervisor")

REPLY_GRACE_S = 0.05  # lets the reply of `kill` or `update` leave before we act


class Daemon:
    """Owns the parts; implements process.Runtime for the instances."""

    def __init__(self, home: Path, *, monitor_interval_s: float, runtime_mode: bool = False,
                 log_to_file: bool = True) -> None:
        self.home = home
        self.log_to_file = log_to_file  # else to stderr (systemd's journal, a container)
        # Container mode: app output also goes to our stdout, and pmxd exits once every
        # app has ended, with 0 only when they all exited 0.
        self.runtime_mode = runtime_mode
        self.exit_status = 0
        self.startup_errors: list[str] = []
        self.started = time.time()
        self.fd_limit = raise_fd_limit()
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.state_file = StateFile(home / STATE_FILE, home / SPAWN_JOURNAL,
                                    lambda: self.registry, self.loop)
        self.registry = Registry(self._make_app, on_change=self.state_file.changed)
        self.log_files = LogFiles()
        self.reaper = Reaper(self.loop)
        self.recovery = Recovery(home / STATE_FILE, home / SPAWN_JOURNAL, home)
        self.handover = Handover(self.recovery.document)
        commands = Commands(self)
        self.control = ControlServer(home, commands.handlers())
        self.output = OutputRouter(self.loop, self.log_files,
                                   publish_lines=self.control.publish_lines, echo=runtime_mode)
        self.monitor = ResourceMonitor(lambda: self.registry, interval_s=monitor_interval_s,
                                       publish=self.control.publish, app_event=self.publish_event,
                                       wants=self.control.wants)
        self.notify = NotifySocket(self.loop, home / NOTIFY_SOCKET, self._on_notify)
        self.notify_socket_path: str | None = self.notify.path
        self.cgroups = None if os.environ.get("PMX_CGROUPS") == "0" else Cgroups.detect(home)
        self.process_tracking = describe_tracking(self.cgroups)
        if self.cgroups is not None and self.cgroups.memory:
            self.monitor.memory_of = self.cgroups.memory_of
        self.auto_reload = AutoReload(self.loop, lambda: self.registry, self.registry.get,
                                      commands.reload_because, home)
        self._stray_markers: set[bytes] = set()

    def _make_app(self, spec: AppSpec, base_env: Mapping[str, str]) -> AppGroup:
        # PMX_HOME marks every process of this home (with PMX_RUN_ID): after a crash, the
        # next pmxd finds them even where no file recorded them. An app that runs `pmx`
        # talks to its own supervisor.
        base_env = {**base_env, "PMX_HOME": str(self.home)}
        app = AppGroup(spec, base_env=base_env, runtime=self, logs_dir=self.home / LOGS_DIR,
                       log_files=self.log_files, next_id=self.registry.next_id)
        app.sockets = self.handover.take_sockets(spec.name)
        return app

    # ------------------------------------------------------------ Runtime for instances

    def publish_state(self, instance: Instance) -> None:
        self.state_file.changed()
        self.monitor.instances_changed()
        self.auto_reload.changed()  # watch and cron follow what runs
        if self.runtime_mode and instance.state in ENDED:
            self.loop.call_soon(self._exit_when_all_ended)
        self.control.publish(event_topic(instance.app), {
            "kind": "state", "app": instance.app, "id": instance.id,
            "instance": instance.index, "pid": instance.pid, "state": instance.state.value,
            "reason": instance.reason, "time": instance.since, "restarts": instance.restarts,
            "exec_mode": instance.spec.exec_mode,
        })

    def cgroup_for(self, instance: Instance) -> Path | None:
        return self.cgroups.create(instance.id) if self.cgroups is not None else None

    def before_popen(self) -> None:
        if self.cgroups is not None:
            self.cgroups.prepare()  # so that the process's move into its cgroup is quick

    def discard_cgroup(self, group: Path) -> None:
        if self.cgroups is not None:
            self.cgroups.remove(group)  # made for a process that never ran: empty

    def watch_exit(self, instance: Instance, pid: int, pidfd: int, *, in_cgroup: bool) -> None:
        """A process was just spawned: journal its pid first, move it into its cgroup if
        it did not enter it itself (spawn.py), then watch for its exit."""
        self.state_file.spawned(instance)
        group = instance.cgroup
        if group is not None and not in_cgroup and self.cgroups is not None \
                and not self.cgroups.enter(group, pid):
            instance.cgroup = None
        self.reaper.watch(pid, pidfd, instance.on_exit)

    def attach_output(self, instance: Instance, stdout_fd: int, stderr_fd: int) -> None:
        app = self.registry.get(instance.app)
        if app is None:  # pragma: no cover - an instance always belongs to an app
            os.close(stdout_fd)
            os.close(stderr_fd)
            return
        self.output.attach(app, instance, stdout_fd, stderr_fd)

    def forget(self, instance: Instance) -> None:
        """The instance's main process ended: its figures go, and whatever it left in
        its cgroup is ended (cgroup.kill) and the cgroup removed once empty."""
        if instance.pid is not None:
            self.monitor.forget(instance.pid)
        group, instance.cgroup = instance.cgroup, None
        if self.cgroups is not None and instance.state is not State.STOPPING:
            self.cgroups.warm_up_soon()  # for its replacement, if it gets one
        # Removing an empty cgroup is quick; cgroup.kill waits for the kernel's grace
        # period (1-20 ms), so it is written only when something is left to end.
        if group is not None and self.cgroups is not None and not self.cgroups.remove(group):
            self.cgroups.kill(group)
            self.cgroups.remove_soon(self.loop, group)

    def kill_strays(self, run_id: str) -> None:
        """Queue a sweep for processes of this spawn that escaped its group (one sweep per
        loop turn, however many instances ended in it: `stop all` of 1,000 is one scan)."""
        if not self._stray_markers:
            self.loop.call_soon(self._sweep_strays)
        self._stray_markers.add(f"PMX_RUN_ID={run_id}".encode())

    def _sweep_strays(self) -> None:
        markers, self._stray_markers = self._stray_markers, set()
        self.reaper.kill_escaped(markers)

    # ------------------------------------------------------------ for the commands

    def publish_event(self, app: str, kind: str, message: str) -> None:
        self.control.publish(event_topic(app), {"kind": kind, "app": app, "message": message,
                                                "time": time.time()})

    async def start_specs(self, specs: list[AppSpec], base_env: Mapping[str, str], *,
                          skip_existing: bool = False) -> JsonObject:
        return await self.registry.start_specs(specs, base_env, skip_existing=skip_existing)

    async def stop_all(self) -> None:
        """Stop every app gracefully, together, and forget them."""
        apps = list(self.registry)
        await asyncio.gather(*(app.halt() for app in apps))  # nothing new starts from here
        await asyncio.gather(*(app.stop("pmxd stopping") for app in apps), return_exceptions=True)
        for app in apps:
            await app.delete()
            self.registry.remove(app.name)

    def shut_down_soon(self) -> None:
        self.loop.call_later(REPLY_GRACE_S, self._stopping.set)

    def update_soon(self) -> None:
        self.loop.call_later(REPLY_GRACE_S, self._exec_new_version)

    def _exec_new_version(self) -> None:
        log.info("pmxd %s replacing itself with the installed version", __version__)
        self.control.close_now()
        self.notify.close()
        # From here to exec, no await: nothing changes between the handover and the exec.
        self.state_file.write_now(handover=hand_over(self.registry, self.output, self.cgroups))
        try:
            exec_new_version(self.home, self.monitor.interval_s, log_to_file=self.log_to_file,
                             runtime=self.runtime_mode)
        except OSError as exc:
            log.error("cannot exec the new pmxd: %s; stopping", exc)
            self._stopping.set()

    # ------------------------------------------------------------ events from outside

    def _on_notify(self, pid: int, fields: dict[str, str]) -> None:
        instance = self.registry.find_by_pid(pid)
        if instance is None:
            log.debug("notify message from unknown pid %d ignored", pid)
            return
        if "STATUS" in fields:
            instance.status_text = fields["STATUS"]
        if fields.get("READY") == "1":
            instance.mark_ready("READY=1 received")
        if fields.get("STOPPING") == "1":
            log.info("%s (pid %d) says it is stopping", instance.name, pid)
        if "PMX_LISTENING" in fields:
            report = ListenReport.from_notify(fields, pid)
            if report is not None:
                instance.report_listening(report)

    def _exit_when_all_ended(self) -> None:
        if self._stopping.is_set():
            return  # stopping on SIGTERM: apps ending of their stop signal is expected
        if any(app.busy is not None for app in self.registry):
            return  # a restart passes through "stopped" on purpose
        instances = list(self.registry.instances())
        if not instances or any(i.state not in ENDED for i in instances):
            return
        clean = all(i.state is State.STOPPED and i.last_exit in (None, "exit code 0")
                    for i in instances)
        self.exit_status = 0 if clean else 1
        log.info("every app has ended; pmxd exits with status %d", self.exit_status)
        self._stopping.set()

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, resurrect: bool, files: Sequence[list[AppSpec]] = (),
                  ready_fd: int | None = None) -> int:
        """Run until stopped; the exit status. `files`: the apps of each file on the command
        line, already validated. When one cannot start, pmxd stops the others and exits 1
        with the reasons in `startup_errors`, instead of idling with nothing running (a
        container that looks healthy)."""
        self.handover.adopt(self.registry, self.reaper, self.output, self.cgroups)
        self.reaper.install()
        self.reaper.reap_strays()  # children that ended while no handler was installed
        become_subreaper()
        self.control.bind()
        await self.control.start()
        await self.recovery.recover(
            lambda specs, env: self.start_specs(specs, env, skip_existing=True), self.handover)
        self.handover.start_pending()
        self.handover.close_unused()
        self.monitor.instances_changed()  # the adopted processes: sampled, watched, saved
        self.auto_reload.changed()
        self.state_file.changed()
        if self.cgroups is not None:
            self.cgroups.remove_stale()  # what recovery's graceful stop left, if anything
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: None)
        log.info("pmxd %s started (pid %d, home %s, fd limit %d)", __version__, os.getpid(),
                 self.home, self.fd_limit)
        self.startup_errors = await self._start_initial_apps(resurrect, files)
        if self.startup_errors:
            self.exit_status = int(ExitCode.FAILED)
            self._stopping.set()
        if ready_fd is not None:
            os.write(ready_fd, "; ".join(self.startup_errors).encode() or b"ok")
            os.close(ready_fd)
        if not self.startup_errors:
            sdnotify.tell_systemd(f"READY=1\nSTATUS=supervising {len(self.registry)} apps\n"
                          f"MAINPID={os.getpid()}")
        background = [self.loop.create_task(self.monitor.run()),
                      self.loop.create_task(sdnotify.watchdog_loop())]
        await self._stopping.wait()
        await self.auto_reload.close()
        sdnotify.tell_systemd("STOPPING=1")
        log.info("pmxd stopping: stopping %d apps", len(self.registry))
        await self.stop_all()
        if self.cgroups is not None:
            await self.cgroups.remove_all()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.sleep(0)  # let the last replies go out
        await self.control.close()
        self.notify.close()
        for socket_file in (self.control.rpc_path, self.control.pub_path):
            socket_file.unlink(missing_ok=True)  # so clients say "not running" at once
        self.log_files.close_all()
        self.monitor.close()
        self.state_file.remove()  # a clean stop leaves nothing to recover
        log.info("pmxd stopped")
        return self.exit_status

    async def _start_initial_apps(self, resurrect: bool,
                                  files: Sequence[list[AppSpec]]) -> list[str]:
        """Start the saved apps (leniently) and the files' apps; why the latter failed."""
        if resurrect:
            try:
                specs = read_dump(self.home / DUMP_FILE)
                await self.start_specs(specs, dict(os.environ), skip_existing=True)
                log.info("resurrected %d apps from %s", len(specs), self.home / DUMP_FILE)
            except PmxError as exc:
                # A service must come up even with a damaged dump: say why, start nothing.
                log.error("cannot resurrect: %s", exc)
        errors: list[str] = []
        for specs in files:
            try:
                started = await self.start_specs(specs, dict(os.environ))
            except PmxError as exc:
                errors.append(str(exc))
                continue
            problems = started.get("errors")
            if isinstance(problems, list):
                errors.extend(str(problem) for problem in problems)
        for error in errors:
            log.error("%s; pmxd stops", error)
        return errors


if __name__ == "__main__":  # what `pmx update` of an older pmxd executes
    from .launch import main

    sys.exit(main())
