"""Reload an app when its files change: `watch`, `ignore_watch`, `watch_delay`.

PM2 restarts a watched app; pmx reloads it, through the path of `pmx reload NAME`
(cron.Reloader), so a change costs no downtime. A burst of changes (an editor saving many
files, a `git checkout`) gives one reload: a change schedules the reload `watch_delay`
after it, and each further change pushes it back (up to MAX_DEFER_S after the first), so
the reload comes once the tree is quiet; a change during the reload queues one more.

What is watched: `watch = true` is the app's cwd, paths are relative to it. Never a
reason to reload: watchfiles' default ignores (`.git`, `node_modules`, `__pycache__`,
`.venv`, editors' swap and backup files, `*.pyc`), the app's `ignore_watch`, PMX_HOME and
the app's own log files with their rotations (else the app's logging would reload it for
ever). An `ignore_watch` entry without "/" is a glob matched against every part of the
path ("*.log", "tmp"); one with "/" against the path from the app's cwd ("client/img",
"logs/*"), or from / when it starts with "/".

One thread per pmxd, `pmx-watch`, runs watchfiles' blocking `watch()` (inotify or FSEvents
through its native library) over the folders of every watched app, and hands the changes
that concern an app to the event loop with `call_soon_threadsafe`; everything else
happens on the loop. The thread runs only while some app is watched: it is started, and
restarted with a new set of folders, when the apps change (`changed()`, called on every
state change), and ends when no watched app runs (`pmx stop`, `pmx delete`), closing its
inotify descriptor. A watched app is one that `cron.wants_auto_reload`.

A folder that does not exist is skipped with a warning. inotify watches every folder of
the tree, ignored ones (node_modules) included; a tree larger than the kernel's
`fs.inotify.max_user_watches` fails to watch, said in pmxd's log.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import AppSpec
from .cron import CronSchedule, Reloader, wants_auto_reload

if TYPE_CHECKING:
    from .app import AppGroup

log = logging.getLogger(__name__)
logging.getLogger("watchfiles").setLevel(logging.WARNING)  # "3 changes detected" per batch

MAX_DEFER_S = 10.0  # a stream of changes that never stops still reloads after this
RETRY_AFTER_FAILURE_S = 5.0  # the watch failed (a watch limit): try again after this

Hits = dict[str, tuple[str, int]]  # app -> (first changed path, from its cwd; changes)


def watch_roots(spec: AppSpec) -> tuple[str, ...]:
    """The absolute paths an app's `watch` names: its cwd for true."""
    if spec.watch is True:
        return (spec.cwd,)
    if not spec.watch:
        return ()
    return tuple(os.path.normpath(os.path.join(spec.cwd, path)) for path in spec.watch)


def is_ignored(path: str, cwd: str, patterns: Iterable[str]) -> bool:
    """Whether an `ignore_watch` pattern covers `path` (see the module's docstring)."""
    relative = os.path.relpath(path, cwd) if is_under(path, cwd) else path
    parts = relative.strip("/").split("/")
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if pattern.startswith("./"):
            pattern = pattern[2:]
        if not pattern:
            continue
        if "/" not in pattern:
            if any(fnmatch.fnmatchcase(part, pattern) for part in parts):
                return True
            continue
        target = path if pattern.startswith("/") else relative
        if fnmatch.fnmatchcase(target, pattern) or fnmatch.fnmatchcase(target, pattern + "/*"):
            return True
    return False


def is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class WatchRule:
    """What one app watches, in absolute paths, read by the watch thread."""

    app: str
    cwd: str
    roots: tuple[str, ...]  # folders or files
    ignore: tuple[str, ...]  # the app's ignore_watch
    own_files: tuple[str, ...]  # PMX_HOME and the app's log files

    def match(self, path: str) -> str | None:
        """The changed path as the app's event shows it (from its cwd), or None when
        this app does not care."""
        if not any(is_under(path, root) for root in self.roots):
            return None
        for own in self.own_files:  # a log file, or its rotations (file.1, file.2)
            if is_under(path, own) or path.startswith(own + "."):
                return None
        if is_ignored(path, self.cwd, self.ignore):
            return None
        return os.path.relpath(path, self.cwd) if is_under(path, self.cwd) else path

    def folders(self) -> list[str]:
        """What to give watchfiles: a watched file's folder (editors replace files by
        renaming, which a watch on the file itself would not survive), else the root."""
        return [os.path.dirname(root) if os.path.isfile(root) else root for root in self.roots]


def rule_for(app: AppGroup, home: Path) -> WatchRule:
    spec = app.spec
    logs = {str(path) for index in {*range(spec.instances), *app.instances}
            for path in app.log_paths(index)}
    return WatchRule(app.name, spec.cwd, watch_roots(spec), spec.ignore_watch,
                     (str(home), *sorted(logs)))


def outermost(folders: Iterable[str]) -> tuple[str, ...]:
    """The folders without those inside another one (watched recursively anyway)."""
    result: list[str] = []
    for folder in sorted(set(folders), key=len):
        if not any(is_under(folder, kept) for kept in result):
            result.append(folder)
    return tuple(sorted(result))


class WatchThread:
    """The one thread running watchfiles' blocking watch(); see the module's docstring."""

    def __init__(self, deliver: Callable[[Hits], None]) -> None:
        self._deliver = deliver
        self._lock = threading.Lock()
        self._rules: tuple[WatchRule, ...] = ()
        self._folders: tuple[str, ...] = ()
        self._restart = threading.Event()  # watchfiles' stop_event: the folders changed
        self._thread: threading.Thread | None = None
        self._closed = False

    def set_rules(self, rules: tuple[WatchRule, ...], folders: tuple[str, ...]) -> None:
        with self._lock:
            self._rules = rules  # read by the thread as one value
            if folders == self._folders and (self._thread is not None or not folders):
                return
            self._folders = folders
            self._restart.set()
            if self._thread is None and folders and not self._closed:
                self._thread = threading.Thread(target=self._run, name="pmx-watch", daemon=True)
                self._thread.start()

    def is_running(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        import watchfiles

        while True:
            with self._lock:
                folders = self._folders
                self._restart.clear()
                if not folders or self._closed:
                    self._thread = None
                    return
            log.info("watching %s", ", ".join(folders))
            try:
                for changes in watchfiles.watch(*folders, stop_event=self._restart,
                                                raise_interrupt=False):
                    self._match(sorted({path for _, path in changes}))
            except Exception as exc:  # a watch limit, a folder removed meanwhile
                log.error("cannot watch %s: %s; trying again in %gs", ", ".join(folders), exc,
                          RETRY_AFTER_FAILURE_S)
                self._restart.wait(RETRY_AFTER_FAILURE_S)

    def _match(self, paths: list[str]) -> None:
        hits: Hits = {}
        for rule in self._rules:
            for path in paths:
                shown = rule.match(path)
                if shown is not None:
                    first, count = hits.get(rule.app, (shown, 0))
                    hits[rule.app] = (first, count + 1)
        if hits:
            self._deliver(hits)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._restart.set()
            thread = self._thread
        if thread is not None:
            thread.join(2.0)  # watchfiles looks at stop_event every 50 ms


@dataclass(slots=True)
class _Pending:
    first: str
    count: int
    since: float  # loop time of the first change
    timer: asyncio.TimerHandle | None = None


class FileWatcher:
    """The watched apps, on the event loop: debounce, then a reload through `reloader`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, apps: Callable[[], Iterable[AppGroup]],
                 reloader: Reloader, home: Path) -> None:
        self._loop = loop
        self._apps = apps
        self._reloader = reloader
        self._home = home
        self._rules: dict[str, WatchRule] = {}
        self._pending: dict[str, _Pending] = {}
        self._made: dict[str, tuple[tuple[AppSpec, int], WatchRule]] = {}
        self._thread = WatchThread(self._from_thread)
        self._dirty = False
        self._closed = False

    @property
    def watching(self) -> dict[str, tuple[str, ...]]:
        """The roots of every app watched now."""
        return {name: rule.roots for name, rule in self._rules.items()}

    def is_running(self) -> bool:
        return self._thread.is_running()

    def changed(self) -> None:
        """Something about the apps changed: look at them again, once, soon."""
        if not self._dirty and not self._closed:
            self._dirty = True
            self._loop.call_soon(self.sync)

    def sync(self) -> None:
        self._dirty = False
        if self._closed:
            return
        rules = {app.name: self._rule(app) for app in self._apps()
                 if app.spec.watch and wants_auto_reload(app)}
        if rules == self._rules:
            return
        for name in set(self._made) - set(rules):
            del self._made[name]
        for name in set(self._pending) - set(rules):
            timer = self._pending.pop(name).timer
            if timer is not None:
                timer.cancel()
        folders = []
        for rule in rules.values():
            for folder in rule.folders():
                if os.path.isdir(folder):
                    folders.append(folder)
                elif self._rules.get(rule.app) != rule:  # said once per change of settings
                    log.warning("%s: cannot watch %s: no such folder", rule.app, folder)
        self._rules = rules
        self._thread.set_rules(tuple(rules.values()), outermost(folders))

    def _rule(self, app: AppGroup) -> WatchRule:
        """The app's rule, made again only when its settings or slots changed: sync runs
        on state changes, and a reload of 1,000 instances makes thousands of them."""
        key = (app.spec, max(app.instances, default=0))
        cached = self._made.get(app.name)
        if cached is not None and cached[0][0] is key[0] and cached[0][1] == key[1]:
            return cached[1]
        rule = rule_for(app, self._home)
        self._made[app.name] = (key, rule)
        return rule

    def _from_thread(self, hits: Hits) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_changes, hits)
        except RuntimeError:
            pass  # the loop is closed: pmxd is stopping

    def _on_changes(self, hits: Hits) -> None:
        now = self._loop.time()
        for name, (first, count) in hits.items():
            rule = self._rules.get(name)
            app = next((a for a in self._apps() if a.name == name), None)
            if rule is None or app is None:
                continue
            pending = self._pending.get(name)
            if pending is None:
                pending = self._pending[name] = _Pending(first, 0, now)
            pending.count += count
            if pending.timer is not None:
                pending.timer.cancel()
            delay = app.spec.watch_delay_s
            when = min(now + delay, pending.since + max(MAX_DEFER_S, delay))
            pending.timer = self._loop.call_at(when, self._fire, name)

    def _fire(self, name: str) -> None:
        pending = self._pending.pop(name, None)
        app = next((a for a in self._apps() if a.name == name), None)
        if pending is None or app is None:
            return
        more = f" (and {pending.count - 1} more)" if pending.count > 1 else ""
        self._reloader.request(app, f"file changed: {pending.first}{more}")

    def close(self) -> None:
        self._closed = True
        for pending in self._pending.values():
            if pending.timer is not None:
                pending.timer.cancel()
        self._pending.clear()
        self._thread.close()


class AutoReload:
    """The reloads pmxd starts by itself, wired once by the daemon: file changes (here)
    and cron times (cron.py), sharing one Reloader. `changed()` on every state change."""

    def __init__(self, loop: asyncio.AbstractEventLoop, apps: Callable[[], Iterable[AppGroup]],
                 lookup: Callable[[str], AppGroup | None],
                 reload_app: Callable[[AppGroup, str], Awaitable[None]], home: Path) -> None:
        self.reloader = Reloader(loop, lookup, reload_app)
        self.watcher = FileWatcher(loop, apps, self.reloader, home)
        self.cron = CronSchedule(loop, apps, self.reloader)

    def changed(self) -> None:
        self.watcher.changed()
        self.cron.changed()

    async def close(self) -> None:
        """Before the apps stop: no reload starts any more, a running one is cancelled."""
        self.watcher.close()
        self.cron.close()
        await self.reloader.close()
