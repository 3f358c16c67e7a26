"""`pmx update`: pmxd replaces its image in place (same pid) and every app keeps running.

The old image, at the moment it execs (`hand_over`, no await in between, so nothing
changes meanwhile), writes a handover into state.json and clears close-on-exec on every
fd the new image needs:
- per instance with a live process (online, or starting and not ready yet): its pidfd,
  the read ends of its stdout and stderr pipes, with the line each reader had begun, and
  pmxd's end of its Node IPC channel, with the message begun there;
- per cluster app: every listening socket, shared ones and each reuse_port slot's;
- what the image knew of each slot: id, state and why, counters, the stderr tail, the
  addresses the app reported listening on, its cgroup (and the image's cgroup tag), and
  for a slot waiting to restart, how long it still had to wait.
The processes stay children of the same pid, so they never notice.

The new image (`Handover.adopt`) runs before its SIGCHLD handler is installed, since
that handler would reap an adopted child as a stray. It reads the handover only if
the file names this very pid, builds the apps and their slots as they were (a stopped
slot stays stopped), watches each adopted pidfd (a process that ended during the exec
is a zombie by now: its exit is handled at once, like any exit), reads its pipes from
where the old image stopped, and closes every handed fd it does not use. A slot waiting
to restart goes on waiting for what was left of its delay; one whose process was stopping
is started again (`start_pending`), after recovery has stopped what that process left.

A handover written by an older pmx, which only passed the shared listening sockets
(top-level "sockets"), is still taken: its apps restart once, as they did then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from .app import AppGroup
from .cgroups import Cgroups
from .config import spec_from_table
from .errors import PmxError, SpawnError
from .logs import OutputRouter
from .process import Instance
from .reaper import Reaper
from .registry import Registry
from .sockets import AppSockets, ListenSocket
from .states import State

log = logging.getLogger(__name__)

VERSION = 1
ADOPTED_STATES = (State.ONLINE, State.STARTING)  # a process in these keeps running
KEPT_STATES = (State.STOPPED, State.ERRORED)  # a slot in these stays as it is


def exec_new_version(home: Path, monitor_interval_s: float, *, log_to_file: bool,
                     runtime: bool) -> None:
    """Replace this process with the installed pmxd (same pid), logging where this image
    logs (its file, or stderr under systemd or in a container), in container mode if
    this image is; returns only on failure."""
    argv = [sys.executable, "-m", "pmx.supervisor.pmxd", "--home", str(home),
            "--foreground", "--monitor-interval", str(monitor_interval_s)]
    argv += ["--log-file"] if log_to_file else []
    argv += ["--runtime"] if runtime else []
    os.execv(sys.executable, argv)


# ---------------------------------------------------------------- the old image


def hand_over(apps: Iterable[AppGroup], output: OutputRouter,
              cgroups: Cgroups | None) -> dict[str, object]:
    """Stop reading every pipe and channel, keep them and the sockets open across exec:
    the "handover" of state.json. Only a reload's replacement (there is none: `update` is
    refused while an operation runs) is not handed over."""
    return {"version": VERSION, "cgroup_tag": cgroups.tag if cgroups is not None else None,
            "apps": {app.name: {"sockets": _hand_over_sockets(app.sockets),
                                "instances": [_hand_over_instance(instance, output)
                                              for instance in app.instances.values()]}
                     for app in apps}}


def _hand_over_instance(instance: Instance, output: OutputRouter) -> dict[str, object]:
    entry: dict[str, object] = {
        "index": instance.index, "id": instance.id, "state": instance.state.value,
        "reason": instance.reason, "since": instance.since, "restarts": instance.restarts,
        "unstable_restarts": instance.unstable_restarts, "last_exit": instance.last_exit,
        "stderr_tail": list(instance.stderr_tail)}
    if instance.state in ADOPTED_STATES and instance.pid is not None \
            and instance.pidfd is not None:
        os.set_inheritable(instance.pidfd, True)
        pipes = {stream: [fd, partial.decode("latin-1")]
                 for stream, (fd, partial) in output.hand_over(instance).items()}
        channel = None
        if instance.channel is not None:
            fd, buffered = instance.channel.hand_over()
            channel = [fd, buffered.decode("latin-1")]
        entry["process"] = {
            "pid": instance.pid, "pidfd": instance.pidfd, "start_time": instance.start_time,
            "run_id": instance.run_id, "started_at": instance.started_at, "pipes": pipes,
            "channel": channel, "listening": instance.listening,
            "status_text": instance.status_text,
            "cgroup": str(instance.cgroup) if instance.cgroup is not None else None}
    elif instance.state is State.WAITING:
        entry["restart_in_s"] = instance.restart_in()
    return entry  # a slot stopping (or waiting, without a time) is started again


def _hand_over_sockets(sockets: AppSockets | None) -> dict[str, object] | None:
    if sockets is None:
        return None

    def kept(items: list[ListenSocket]) -> list[dict[str, object]]:
        for item in items:
            os.set_inheritable(item.sock.fileno(), True)
        return [{"address": item.address, "fd": item.sock.fileno(), "unix_path": item.unix_path}
                for item in items]

    return {"addresses": list(sockets.addresses), "reuse_port": sockets.reuse_port,
            "shared": kept(sockets.shared),
            "per_slot": {str(index): kept(items) for index, items in sockets.per_slot.items()}}


# ---------------------------------------------------------------- the new image


class Handover:
    """What the previous image of this very process handed over, if it did."""

    def __init__(self, document: Mapping[str, object]) -> None:
        ours = document.get("pmxd_pid") == os.getpid()
        handover = document.get("handover") if ours else None
        self._handover: Mapping[str, object] = handover if isinstance(handover, dict) \
            and handover.get("version") == VERSION else {}
        self._apps_table = _list(document.get("apps")) if ours else []
        self._handed_fds: set[int] = set()  # every fd named, to close those not taken
        self._used_fds: set[int] = set()
        self._sockets: dict[str, AppSockets] = {}
        self._pending: list[Instance] = []
        self.apps: set[str] = set()  # the apps adopted: recovery leaves them alone
        self.processes: set[tuple[int, int]] = set()  # (pid, start time) of adopted ones
        self.run_ids: set[str] = set()  # theirs: what they started is theirs too
        apps = self._handover.get("apps")
        if isinstance(apps, dict):
            for name, entry in apps.items():
                if not isinstance(entry, dict):
                    continue
                for instance in _list(entry.get("instances")):
                    self._note_process_fds(instance.get("process"))
                sockets = entry.get("sockets")
                if isinstance(sockets, dict):
                    self._take_handed_sockets(str(name), sockets)
        elif ours:
            self._take_legacy_sockets(_list(document.get("sockets")))

    def take_sockets(self, app: str) -> AppSockets | None:
        """The listening sockets the previous image held for `app`, if any."""
        return self._sockets.pop(app, None)

    def adopt(self, registry: Registry, reaper: Reaper, output: OutputRouter,
              cgroups: Cgroups | None) -> None:
        """Build the handed-over apps and take their running processes."""
        apps = self._handover.get("apps")
        if not isinstance(apps, dict):
            return
        tag = self._handover.get("cgroup_tag")
        if cgroups is not None and isinstance(tag, str):
            cgroups.continue_tag(tag)
        last_id = -1
        for table in self._apps_table:
            spec_table = table.get("spec")
            handed = apps.get(spec_table.get("name")) if isinstance(spec_table, dict) else None
            if not isinstance(handed, dict):
                continue
            try:
                spec = spec_from_table(table["spec"], source="the previous pmxd's handover")  # type: ignore[arg-type]
                base_env = {str(k): str(v) for k, v in (table.get("base_env") or {}).items()}  # type: ignore[attr-defined]
            except (PmxError, KeyError, AttributeError, TypeError) as exc:
                log.error("cannot take over an app of the previous pmxd image: %s", exc)
                continue
            app = registry.add(spec, base_env)
            self.apps.add(app.name)
            for entry in _list(handed.get("instances")):
                try:
                    instance = self._restore(app, entry, reaper, output)
                except (KeyError, TypeError, ValueError, OSError) as exc:
                    log.error("%s: cannot take over a slot of the previous image: %r", app.name, exc)
                    continue
                last_id = max(last_id, instance.id)
            app.resume()
        registry.ids_from(last_id + 1)
        log.info("took over %d apps and %d running processes from the previous pmxd image",
                 len(self.apps), len(self.processes))

    def _restore(self, app: AppGroup, entry: Mapping[str, object], reaper: Reaper,
                 output: OutputRouter) -> Instance:
        instance = app.restore_instance(_int(entry["index"]), _int(entry["id"]))
        state = State(str(entry["state"]))
        process = entry.get("process")
        if isinstance(process, dict) and state in ADOPTED_STATES:
            try:
                self._adopt_process(app, instance, process, reaper, output)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                log.error("%s: cannot take over its process: %r; starting it again",
                          instance.name, exc)
                process = None
        restart_in = entry.get("restart_in_s")
        waiting = state is State.WAITING and isinstance(restart_in, int | float)
        if state not in KEPT_STATES and not isinstance(process, dict) and not waiting:
            state = State.STOPPED  # stopping, or not taken over: started again
            self._pending.append(instance)
        last_exit = entry.get("last_exit")
        instance.restore(state, str(entry.get("reason", "")), float(entry.get("since") or 0),  # type: ignore[arg-type]
                         restarts=_int(entry.get("restarts", 0)),
                         unstable_restarts=_int(entry.get("unstable_restarts", 0)),
                         last_exit=last_exit if isinstance(last_exit, str) else None,
                         stderr_tail=[str(line) for line in _anylist(entry.get("stderr_tail"))])
        if waiting:  # its back-off goes on where it was
            instance.restart_later(float(restart_in))  # type: ignore[arg-type]
        return instance

    def _adopt_process(self, app: AppGroup, instance: Instance, process: Mapping[str, object],
                       reaper: Reaper, output: OutputRouter) -> None:
        pid, pidfd = _int(process["pid"]), self._use(process["pidfd"])
        pipes = process.get("pipes") if isinstance(process.get("pipes"), dict) else {}
        assert isinstance(pipes, dict)
        streams = {stream: (self._use(value[0]), str(value[1]).encode("latin-1"))
                   for stream, value in pipes.items() if stream in ("out", "error")}
        channel = None
        handed_channel = process.get("channel")
        if isinstance(handed_channel, list):
            channel = (socket.socket(fileno=self._use(handed_channel[0])),
                       str(handed_channel[1]).encode("latin-1"))
        started_at = process.get("started_at")
        instance.adopt(pid, pidfd, _int(process["start_time"]), str(process["run_id"]),
                       float(started_at) if isinstance(started_at, int | float) else 0.0, channel)
        instance.listening = [str(address) for address in _anylist(process.get("listening"))]
        status_text = process.get("status_text")
        instance.status_text = status_text if isinstance(status_text, str) else None
        cgroup = process.get("cgroup")
        instance.cgroup = Path(cgroup) if isinstance(cgroup, str) else None
        reaper.watch(pid, pidfd, instance.on_exit)
        output.attach(app, instance, streams.get("out", (None, b""))[0],
                      streams.get("error", (None, b""))[0],
                      {stream: partial for stream, (_, partial) in streams.items()})
        self.processes.add((pid, _int(process["start_time"])))
        self.run_ids.add(instance.run_id)

    def start_pending(self) -> None:
        """Start the slots whose process was stopping or waiting to restart."""
        for instance in self._pending:
            with contextlib.suppress(SpawnError):  # errored, with the reason
                instance.start("restarted after pmx update")
        self._pending.clear()

    def close_unused(self) -> None:
        """Close every handed fd nobody took, and the sockets of apps not taken over."""
        for sockets in self._sockets.values():
            sockets.close()
        self._sockets.clear()
        for fd in self._handed_fds - self._used_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._handed_fds.clear()

    # ------------------------------------------------------------ fds

    def _use(self, value: object) -> int:
        """A handed fd taken into use: close-on-exec again, as every fd of pmxd is (the
        apps' spawns must not inherit it)."""
        fd = _int(value)
        if fd not in self._handed_fds or fd in self._used_fds:
            raise ValueError(f"fd {fd} was not handed over")
        os.set_inheritable(fd, False)
        self._used_fds.add(fd)
        return fd

    def _note(self, value: object) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and value > 2:
            self._handed_fds.add(value)

    def _note_process_fds(self, process: object) -> None:
        if not isinstance(process, dict):
            return
        self._note(process.get("pidfd"))
        pipes = process.get("pipes")
        for value in (pipes.values() if isinstance(pipes, dict) else ()):
            self._note(_anylist(value)[0] if _anylist(value) else None)
        channel = _anylist(process.get("channel"))
        self._note(channel[0] if channel else None)

    def _take_handed_sockets(self, app: str, table: Mapping[str, object]) -> None:
        addresses = tuple(str(a) for a in _anylist(table.get("addresses")))
        group = AppSockets(app, addresses, bool(table.get("reuse_port")))
        for entry in _list(table.get("shared")):
            item = self._socket(entry)
            if item is not None:
                group.shared.append(item)
        per_slot = table.get("per_slot")
        for index, entries in (per_slot.items() if isinstance(per_slot, dict) else ()):
            items = [item for e in _list(entries) if (item := self._socket(e)) is not None]
            if items and str(index).isdigit():
                group.per_slot[int(index)] = items
        self._sockets[app] = group

    def _take_legacy_sockets(self, entries: list[dict[str, object]]) -> None:
        for entry in entries:
            item = self._socket(entry)
            if item is None:
                continue
            app = str(entry.get("app"))
            group = self._sockets.setdefault(app, AppSockets(app, (), False))
            group.shared.append(item)
            group.addresses = (*group.addresses, item.address)

    def _socket(self, entry: Mapping[str, object]) -> ListenSocket | None:
        self._note(entry.get("fd"))
        try:
            fd = self._use(entry["fd"])
            sock = socket.socket(fileno=fd)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            log.warning("cannot take over a listening socket: %s", exc)
            return None
        unix_path = entry.get("unix_path")
        return ListenSocket(str(entry.get("address")), sock,
                            unix_path if isinstance(unix_path, str) else None)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"not an integer: {value!r}")
    return value


def _anylist(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _list(value: object) -> list[dict[str, object]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
