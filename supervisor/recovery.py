"""Never losing track of a process: the live state file, crash recovery, `pmx update`.

pmxd keeps two files in its home while it runs:
- `spawned.jsonl`, the spawn journal: one line per process, appended the moment it is
  spawned (pid, the kernel's start time of that pid, how to stop it). An append is O(1),
  so a start of 1,000 instances costs 1,000 short writes, not 1,000 rewrites of
  everything; and the pid is on disk before anything else can happen to pmxd.
- `state.json`, the snapshot: which apps run (their full settings and environment) and
  every live process. It is rewritten at most once per SNAPSHOT_INTERVAL_S (0.1 s) while
  anything changes; each rewrite empties the journal.

When a pmxd dies (SIGKILL, OOM) and a new one starts on the same home, `Recovery`
reads both, stops every recorded process that is still alive *and* still the same
process (same start time, so a recycled pid is never touched), then starts the apps
again. The choice is to stop, not re-adopt: the old daemon's end closed the pipes
carrying the apps' output and the sockets' owner is gone, so a re-adopted app would log
into a broken pipe. A restart is one short gap; a re-adopted half-working app is an
outage nobody sees.

`pmx update` re-executes pmxd in place (same pid) and the new image adopts the running
processes (handover.py); recovery then leaves those, and only those, alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from .app import AppGroup
from .config import AppSpec, spec_from_table
from .errors import PmxError
from .options import Invalid, parse_duration_s
from .process import Instance
from .procfs import process_start_time
from .spawn import is_this_images_run
from .states import ENDED

log = logging.getLogger(__name__)

StartSpecs = Callable[[list[AppSpec], Mapping[str, str]], Awaitable[object]]


SNAPSHOT_INTERVAL_S = 0.1  # at most this often is state.json rewritten while busy


class StateFile:
    """home/state.json and its spawn journal, kept true while pmxd runs; both removed
    by a clean stop."""

    def __init__(self, path: Path, journal_path: Path, apps: Callable[[], Iterable[AppGroup]],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.journal_path = journal_path
        self._apps = apps
        self._loop = loop
        self._write_pending: asyncio.Handle | None = None
        self._journal_fd: int | None = None
        self._failures = _RateLimitedWarning()
        self._encoded: dict[str, tuple[AppSpec, Mapping[str, str], str]] = {}  # by app name

    def spawned(self, instance: Instance) -> None:
        """A new process: appended to the journal before anything else happens."""
        entry = _process_entry(instance)
        if entry is None:
            return
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        try:
            if self._journal_fd is None:  # opened once: never through a symlink, 0600
                fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    os.fchmod(fd, 0o600)
                except OSError:
                    os.close(fd)
                    raise
                self._journal_fd = fd
            if os.write(self._journal_fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            self._failures.warn(f"cannot append to {self.journal_path}: {exc.strerror}")
            self.changed()  # the snapshot will carry the pid instead

    def changed(self) -> None:
        """An instance or the set of apps changed: a snapshot within SNAPSHOT_INTERVAL_S
        (so deleting 1,000 apps is ten writes, not a thousand)."""
        if self._write_pending is None:
            self._write_pending = self._loop.call_later(SNAPSHOT_INTERVAL_S, self.write_now)

    def write_now(self, *, handover: Mapping[str, object] | None = None) -> None:
        """Rewrite the file. `handover`: pmxd is about to exec itself; what the new image
        takes over (handover.py)."""
        if self._write_pending is not None:
            self._write_pending.cancel()
            self._write_pending = None
        apps: list[str] = []
        processes: list[object] = []
        encoded: dict[str, tuple[AppSpec, Mapping[str, str], str]] = {}
        for app in self._apps():
            running = any(i.state not in ENDED for i in app.all_instances())
            # An app's settings and environment change rarely: encoded once, not per write
            # (1,000 apps are 1,000 to_table() calls otherwise, ten times a second).
            known = self._encoded.get(app.name)
            if known is None or known[0] is not app.spec or known[1] is not app.base_env:
                known = (app.spec, app.base_env, json.dumps(
                    {"spec": app.spec.to_table(), "base_env": app.base_env},
                    separators=(",", ":"))[:-1])
            encoded[app.name] = known
            apps.append(f'{known[2]},"running":{"true" if running else "false"}}}')
            for instance in app.all_instances():
                entry = _process_entry(instance)
                if entry is not None:
                    processes.append(entry)
        self._encoded = encoded
        document = (f'{{"pmxd_pid":{os.getpid()},"apps":[{",".join(apps)}],'
                    f'"processes":{json.dumps(processes, separators=(",", ":"))},'
                    f'"handover":{json.dumps(handover, separators=(",", ":"))}}}')
        try:
            _write_atomically(self.path, document.encode())
        except OSError as exc:
            # A full disk: keep the journal (it may still hold what the stale snapshot
            # lacks) and try again shortly; the marker scan at recovery covers the rest.
            self._failures.warn(f"cannot write {self.path}: {exc.strerror}; retrying")
            self._write_pending = self._loop.call_later(1.0, self.write_now)
            return
        if self._journal_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal_fd, 0)  # all it held is in the snapshot now

    def remove(self) -> None:
        if self._write_pending is not None:
            self._write_pending.cancel()
            self._write_pending = None
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        self.path.unlink(missing_ok=True)
        self.journal_path.unlink(missing_ok=True)


def _process_entry(instance: Instance) -> dict[str, object] | None:
    """What a later pmxd needs to stop this process if this one dies."""
    if instance.pid is None or instance.pidfd is None:
        return None
    spec = instance.spec
    return {"app": instance.app, "instance": instance.index, "pid": instance.pid,
            "start_time": instance.start_time, "run_id": instance.run_id,
            "stop_signal": spec.stop_signal, "kill_timeout_s": spec.kill_timeout_s}


class _RateLimitedWarning:
    """One warning per distinct message per minute: a full disk must not fill the log."""

    def __init__(self, every_s: float = 60.0) -> None:
        self._every_s = every_s
        self._last: dict[str, float] = {}

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(message, -self._every_s) >= self._every_s:
            self._last[message] = now
            log.warning("%s", message)


class Adopted(Protocol):
    """What the new image took over after `pmx update` (handover.Handover)."""

    apps: set[str]
    processes: set[tuple[int, int]]  # (pid, start time)
    run_ids: set[str]


class Recovery:
    """What a previous pmxd left: processes to stop, apps to start. The files are read at
    once, before this pmxd writes anything."""

    def __init__(self, state_path: Path, journal_path: Path, home: Path) -> None:
        self._state_path = state_path
        self._home = home
        self.document: dict[str, object] = _read_state(state_path) or {}
        self._journal = _read_journal(journal_path)

    async def recover(self, start_specs: StartSpecs, adopted: Adopted) -> None:
        """A previous pmxd died without stopping its apps: stop what it left, restart it.
        After `pmx update`, what the new image adopted is no leftover."""
        document = self.document
        recorded = _list(document.get("processes")) + self._journal
        # A process spawned in the instant before pmxd died may be in neither file: every
        # process of this home carries its marker in its environment.
        marked = marked_processes(self._home, _stop_settings(document))
        # The files' entries (which name the instance) go over the marker scan's.
        unique = {(entry.get("pid"), entry.get("start_time")): entry
                  for entry in marked + recorded}
        # Nor is what this image spawned: an adopted process that had ended by the time it
        # was adopted is restarted at once, before this runs.
        leftovers = [entry for key, entry in unique.items() if _still_running(entry)
                     and key not in adopted.processes and entry.get("run_id") not in adopted.run_ids
                     and not is_this_images_run(entry.get("run_id"))]
        if leftovers:
            log.warning("the previous pmxd (pid %s) died; stopping the %d processes it left",
                        document.get("pmxd_pid"), len(leftovers))
        await asyncio.gather(*(_stop_leftover(entry) for entry in leftovers))
        for entry in _list(document.get("apps")):
            if not entry.get("running"):
                continue
            try:
                spec = spec_from_table(entry["spec"], source=str(self._state_path))  # type: ignore[arg-type]
                if spec.name in adopted.apps:
                    continue
                base_env = {str(k): str(v) for k, v in (entry.get("base_env") or {}).items()}  # type: ignore[attr-defined]
                await start_specs([spec], base_env)
                log.info("restarted %s after the previous pmxd's crash", spec.name)
            except (PmxError, KeyError, AttributeError, TypeError) as exc:
                log.error("cannot restart an app of the previous pmxd: %s", exc)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a 0600 temporary, then rename it over `path`. The temporary is made
    new (safe_files.create_new): a leftover or planted file or symlink there is replaced,
    never written through."""
    from .safe_files import create_new  # here: this function is the only user in the module

    temporary = path.with_name(f".{path.name}.tmp")
    fd = create_new(str(temporary))
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


def marked_processes(home: Path, settings: Mapping[str, tuple[str, float]]
                     ) -> list[dict[str, object]]:
    """Every process (but this one) whose environment carries this home's marker: the
    PMX_HOME=home and PMX_RUN_ID=... that pmxd gives each app process and that its
    children inherit. `settings`: app name -> (stop signal, kill timeout)."""
    marker = f"PMX_HOME={home}".encode()
    found: list[dict[str, object]] = []
    with os.scandir("/proc") as entries:
        pids = [int(e.name) for e in entries if e.name.isdigit() and int(e.name) != os.getpid()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                variables = file.read().split(b"\0")
        except OSError:
            continue  # gone, or a kernel thread
        if marker not in variables or not any(v.startswith(b"PMX_RUN_ID=") for v in variables):
            continue
        app = next((v[13:].decode(errors="replace") for v in variables
                    if v.startswith(b"PMX_APP_NAME=")), "?")
        stop_signal, timeout_s = settings.get(app, ("SIGTERM", 5.0))
        run_id = next((v[11:].decode(errors="replace") for v in variables
                       if v.startswith(b"PMX_RUN_ID=")), None)
        found.append({"app": app, "instance": "?", "pid": pid, "run_id": run_id,
                      "start_time": process_start_time(pid), "stop_signal": stop_signal,
                      "kill_timeout_s": timeout_s})
    return found


def _stop_settings(document: Mapping[str, object]) -> dict[str, tuple[str, float]]:
    """app name -> (stop signal, kill timeout) from the state file's apps."""
    settings: dict[str, tuple[str, float]] = {}
    for entry in _list(document.get("apps")):
        spec = entry.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            signal_name = spec.get("stop_signal")
            try:
                timeout_s = parse_duration_s(spec.get("kill_timeout", 5000))
            except Invalid:
                timeout_s = 5.0
            settings[spec["name"]] = (
                signal_name if isinstance(signal_name, str) else "SIGTERM", timeout_s)
    return settings


def _read_journal(path: Path) -> list[dict[str, object]]:
    """The spawn journal's entries; a torn last line (pmxd died mid-write) is skipped."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return []
    entries: list[object] = []
    for line in lines:
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return _list(entries)


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
