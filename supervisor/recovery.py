"""Never losing track of a process: the live state file, crash recovery, `pmx update`.

pmxd rewrites home/state.json whenever an instance starts or stops: which apps run
(their full settings and environment) and, per instance, the pid and the kernel's start
time of that pid. A new pid is written at once (before anything else can happen to
pmxd); other changes are coalesced to one write per loop turn.

When a pmxd dies (SIGKILL, OOM) and a new one starts on the same home, `Recovery`
reads the file, stops every recorded process that is still alive *and* still the same
process (same start time, so a recycled pid is never touched), then starts the apps
again. The choice is to stop, not re-adopt: the old daemon's end closed the pipes
carrying the apps' output and the sockets' owner is gone, so a re-adopted app would log
into a broken pipe. A restart is one short gap; a re-adopted half-working app is an
outage nobody sees.

`pmx update` re-executes pmxd in place (same pid). The listening sockets of cluster apps
are made inheritable and their fd numbers written into the state file, so the new
image takes them over and connections wait in the backlog instead of being refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from .app import AppGroup
from .config import AppSpec, spec_from_table
from .errors import PmxError
from .process import Instance
from .procfs import process_start_time
from .sockets import AppSockets, ListenSocket
from .states import ENDED, State

log = logging.getLogger(__name__)

StartSpecs = Callable[[list[AppSpec], Mapping[str, str]], Awaitable[object]]


class StateFile:
    """home/state.json, kept true while pmxd runs; removed by a clean stop."""

    def __init__(self, path: Path, apps: Callable[[], Iterable[AppGroup]],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self._apps = apps
        self._loop = loop
        self._write_pending = False

    def changed(self, instance: Instance) -> None:
        if instance.state in (State.STARTING, State.LAUNCHING):
            self.write_now()  # a new pid: on disk before anything else can happen
        elif not self._write_pending:
            self._write_pending = True
            self._loop.call_soon(self.write_now)

    def write_now(self, *, handing_over_sockets: bool = False) -> None:
        """Rewrite the file. `handing_over_sockets`: pmxd is about to exec itself, and the
        listening sockets' fds (made inheritable) go into the file for the new image."""
        self._write_pending = False
        apps: list[object] = []
        processes: list[object] = []
        sockets: list[object] = []
        for app in self._apps():
            running = any(i.state not in ENDED for i in app.all_instances())
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
            if handing_over_sockets and app.sockets is not None and not app.sockets.reuse_port:
                # reuse_port slots are bound again; only shared sockets pass
                for item in app.sockets.shared:
                    os.set_inheritable(item.sock.fileno(), True)
                    sockets.append({"app": app.name, "address": item.address,
                                    "fd": item.sock.fileno(), "unix_path": item.unix_path})
        document = {"pmxd_pid": os.getpid(), "apps": apps, "processes": processes,
                    "sockets": sockets}
        try:
            _write_atomically(self.path, json.dumps(document, separators=(",", ":")).encode())
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc.strerror)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Recovery:
    """What a previous pmxd left: processes to stop, apps to start, sockets to take over."""

    def __init__(self, state_path: Path) -> None:
        self._state_path = state_path
        self._adopted: dict[str, AppSockets] = {}  # from our own pre-exec image

    def take_sockets(self, app: str) -> AppSockets | None:
        """The listening sockets the previous image held for `app`, if any."""
        return self._adopted.pop(app, None)

    async def recover(self, start_specs: StartSpecs) -> None:
        """A previous pmxd died without stopping its apps: stop what it left, restart it."""
        document = _read_state(self._state_path)
        if document is None:
            return
        leftovers = [entry for entry in _list(document.get("processes"))
                     if _still_running(entry)]
        if leftovers:
            log.warning("the previous pmxd (pid %s) died; stopping the %d processes it left",
                        document.get("pmxd_pid"), len(leftovers))
        self._adopt_sockets(document)
        await asyncio.gather(*(_stop_leftover(entry) for entry in leftovers))
        for entry in _list(document.get("apps")):
            if not entry.get("running"):
                continue
            try:
                spec = spec_from_table(entry["spec"], source=str(self._state_path))  # type: ignore[arg-type]
                base_env = {str(k): str(v) for k, v in (entry.get("base_env") or {}).items()}  # type: ignore[attr-defined]
                await start_specs([spec], base_env)
                log.info("restarted %s after the previous pmxd's crash", spec.name)
            except (PmxError, KeyError, AttributeError, TypeError) as exc:
                log.error("cannot restart an app of the previous pmxd: %s", exc)
        for unused in self._adopted.values():
            unused.close()  # sockets of apps that were not running
        self._adopted.clear()

    def _adopt_sockets(self, document: Mapping[str, object]) -> None:
        """After `pmx update` exec'd this process, take over the listening sockets the
        previous image left open. Only fds of this very process are meaningful."""
        if document.get("pmxd_pid") != os.getpid():
            return
        for entry in _list(document.get("sockets")):
            try:
                fd = int(entry["fd"])  # type: ignore[call-overload]
                sock = socket.socket(fileno=fd)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                log.warning("cannot take over a listening socket: %s", exc)
                continue
            os.set_inheritable(fd, False)
            app = str(entry.get("app"))
            group = self._adopted.setdefault(app, AppSockets(app, (), False))
            unix_path = entry.get("unix_path")
            group.shared.append(ListenSocket(str(entry.get("address")), sock,
                                             unix_path if isinstance(unix_path, str) else None))
        for app, group in self._adopted.items():
            group.addresses = tuple(item.address for item in group.shared)
            log.info("took over %s for app %s", ", ".join(group.addresses), app)


def exec_new_version(home: Path, monitor_interval_s: float) -> None:
    """Replace this process with the installed pmxd (same pid); returns only on failure."""
    argv = [sys.executable, "-m", "pmx.supervisor.daemon", "--home", str(home),
            "--foreground", "--log-file", "--monitor-interval", str(monitor_interval_s)]
    os.execv(sys.executable, argv)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _read_state(path: Path) -> dict[str, object] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _list(value: object) -> list[dict[str, object]]:
    """The objects of a JSON list from the state file, ignoring anything else in it."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _still_running(entry: Mapping[str, object]) -> bool:
    pid = entry.get("pid")
    if not isinstance(pid, int) or entry.get("start_time") is None:
        return False
    return process_start_time(pid) == entry["start_time"]  # else gone, or the pid was reused


async def _stop_leftover(entry: Mapping[str, object]) -> None:
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
