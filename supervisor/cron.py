"""Reloads pmxd starts by itself: at the times of `cron_restart`, and (for watch.py) when
an app's files change. Both go through the path of `pmx reload NAME`, so they cost no
downtime, and say why in the events and pmxd's log ("reload: cron 0 3 * * *").

`Reloader` runs those reloads: one at a time per app, and at most one more queued behind
it (a change during a running reload gives exactly one reload after it). An app busy with
another operation (a `pmx reload`, a scale) is retried once that ends.

`CronSchedule` is one timer on the event loop for every app (never one per app or per
instance): it sleeps until the earliest next run, reloads the apps that are due and
computes their next runs with croniter, in the daemon's local time. Expressions have 5
fields, or 6 with seconds first, as PM2's cron library reads them. The timer never sleeps
longer than a minute, so a wall-clock jump or a suspended machine is noticed; a run
missed while suspended happens once, at wake-up.

Which apps pmxd reloads by itself (`wants_auto_reload`): those with something running,
and those that ended on their own (errored by crash-looping, or exited with autorestart
off: PM2's `--cron ... --no-autorestart` jobs); never an app the user stopped.

Wiring (daemon.py): the daemon calls `changed()` on every state change; the schedule
looks at the apps again once per loop iteration, so a thousand changes cost one pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING

from .errors import PmxError
from .states import State

if TYPE_CHECKING:
    from .app import AppGroup

log = logging.getLogger(__name__)

ReloadApp = Callable[["AppGroup", str], Awaitable[None]]
Lookup = Callable[[str], "AppGroup | None"]
BUSY_RETRY_S = 0.25  # how often a queued reload looks whether its app is free again
MAX_SLEEP_S = 60.0  # the cron timer wakes at least this often (clock jumps, suspend)
DUE_SLACK_S = 0.005  # a timer may fire a little early; count such a run as due
_AT_REST_OR_GOING = frozenset({State.STOPPED, State.STOPPING})


def next_run(expression: str, after: float) -> float | None:
    """The first time (epoch seconds) strictly after `after` at which `expression` fires,
    read in local time; None when it never does again. Seconds come first in 6 fields."""
    import datetime  # here, as croniter: pmxd loads them only when an app has cron_restart

    from croniter import CroniterError, croniter  # type: ignore[import-untyped]

    start = datetime.datetime.fromtimestamp(after)  # naive local time: what cron means
    try:
        when = croniter(expression, start, second_at_beginning=True).get_next(datetime.datetime)
    except CroniterError:
        return None
    assert isinstance(when, datetime.datetime)
    return when.timestamp()


def wants_auto_reload(app: AppGroup) -> bool:
    """Something of the app runs, or it ended by itself (see the module's docstring).
    An app whose instances are all stopping (`pmx stop`, `pmx kill`) is not reloaded."""
    for instance in app.all_instances():
        if instance.state not in _AT_REST_OR_GOING:
            return True  # starting, launching, online, waiting, errored
        # process.Instance.on_exit: "exited (exit code 0); autorestart is off"; a stop
        # by the user says "stopped".
        if instance.state is State.STOPPED and instance.reason.startswith("exited"):
            return True
    return False


class Reloader:
    """The reloads pmxd starts by itself; owns their tasks and cancels them in close()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lookup: Lookup,
                 reload_app: ReloadApp) -> None:
        self._loop = loop
        self._lookup = lookup
        self._reload_app = reload_app
        self._running: dict[str, asyncio.Task[None]] = {}
        self._queued: dict[str, str] = {}  # app -> the reason of the one reload to come
        self._retry: dict[str, asyncio.TimerHandle] = {}
        self._closed = False

    def request(self, app: AppGroup, reason: str) -> None:
        """Reload `app` now, or once its current reload or operation is over."""
        if self._closed:
            return
        name = app.name
        if name in self._running or name in self._retry:
            if name not in self._queued:
                log.info("%s: %s; reloading again after the reload that runs", name, reason)
            self._queued[name] = reason
            return
        if app.busy is not None:
            self._queued[name] = reason
            self._retry[name] = self._loop.call_later(BUSY_RETRY_S, self._try_queued, name)
            return
        self._running[name] = self._own(name, self._run(app, reason))

    def _try_queued(self, name: str) -> None:
        self._retry.pop(name, None)
        reason = self._queued.pop(name, None)
        app = self._lookup(name)
        if reason is not None and app is not None:
            self.request(app, reason)

    async def _run(self, app: AppGroup, reason: str) -> None:
        if self._lookup(app.name) is not app or not wants_auto_reload(app):
            return  # deleted or stopped by the user meanwhile
        if app.busy is not None:  # an operation began since the request: after it, then
            self._queued.setdefault(app.name, reason)
            return
        try:
            await self._reload_app(app, reason)
        except PmxError as exc:
            log.warning("%s: reload (%s) failed: %s", app.name, reason, exc)

    def _own(self, name: str, coroutine: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = self._loop.create_task(coroutine)

        def done(_: asyncio.Task[None]) -> None:
            if self._running.get(name) is task:
                del self._running[name]
            if name in self._queued and name not in self._retry and not self._closed:
                self._try_queued(name)

        task.add_done_callback(done)
        return task

    def is_pending(self, name: str) -> bool:
        return name in self._running or name in self._queued

    async def close(self) -> None:
        """Start nothing more; cancel the queued reloads and the running ones."""
        self._closed = True
        for handle in self._retry.values():
            handle.cancel()
        self._retry.clear()
        self._queued.clear()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class CronSchedule:
    """One timer for every app's `cron_restart`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, apps: Callable[[], Iterable[AppGroup]],
                 reloader: Reloader, *, clock: Callable[[], float] = time.time) -> None:
        self._loop = loop
        self._apps = apps
        self._reloader = reloader
        self._clock = clock
        self._due: dict[str, tuple[str, float]] = {}  # app -> (expression, next run)
        self._timer: asyncio.TimerHandle | None = None
        self._dirty = False
        self._closed = False

    def next_runs(self) -> dict[str, float]:
        """The next run of every scheduled app (epoch seconds)."""
        return {name: due for name, (_, due) in self._due.items()}

    def changed(self) -> None:
        """Something about the apps changed: look at them again, once, soon."""
        if not self._dirty and not self._closed:
            self._dirty = True
            self._loop.call_soon(self.sync)

    def sync(self) -> None:
        """Schedule the apps that have cron_restart and want auto-reloads; keep the next
        run of those already scheduled with the same expression."""
        self._dirty = False
        if self._closed:
            return
        now = self._clock()
        wanted: dict[str, tuple[str, float]] = {}
        for app in self._apps():
            expression = app.spec.cron_restart
            if not expression or not wants_auto_reload(app):
                continue
            known = self._due.get(app.name)
            if known is not None and known[0] == expression:
                wanted[app.name] = known
                continue
            due = next_run(expression, now)
            if due is not None:
                wanted[app.name] = (expression, due)
                log.info("%s: cron %s, next run %s", app.name, expression,
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due)))
        self._due = wanted
        self._arm(now)

    def _arm(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._due or self._closed:
            return
        earliest = min(due for _, due in self._due.values())
        self._timer = self._loop.call_later(max(0.0, min(earliest - now, MAX_SLEEP_S)),
                                            self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock()
        apps = {app.name: app for app in self._apps()}
        for name, (expression, due) in list(self._due.items()):
            if due > now + DUE_SLACK_S:
                continue
            app = apps.get(name)
            if app is not None:
                self._reloader.request(app, f"cron {expression}")
            following = next_run(expression, max(now, due))
            if following is None:
                del self._due[name]
            else:
                self._due[name] = (expression, following)
        self._arm(now)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
