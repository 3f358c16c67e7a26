"""The model behind `pmx monit`: rows built from `list` and the publish stream.

Pure: no I/O, no Textual, so it is tested without a daemon. cli/monit.py draws it and
feeds it from the daemon's sockets.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pmx.supervisor.protocol import EVENT_PREFIX, LOG_PREFIX, STATS_TOPIC, Json, JsonObject

APP_COLOURS = ("cyan", "magenta", "green", "yellow", "bright_blue", "bright_magenta",
               "bright_cyan", "bright_green")
RUNNING = frozenset({"starting", "online", "launching", "stopping"})
HISTORY_POINTS = 300  # one per stats message: the last five minutes at 1/s
MAX_LOG_LINES = 2000  # per view (all apps, and each app)
MAX_LOG_WRITES = 300  # lines drawn per batch; more than that cannot be read anyway
MAX_BATCH_EVENTS = 20000
EVENTS_PER_APP = 50


# ---------------------------------------------------------------- JSON helpers


def _int(value: Json | None, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _opt_int(value: Json | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Json | None, default: float = 0.0) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _str(value: Json | None, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _objects(value: Json | None) -> list[JsonObject]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


# ---------------------------------------------------------------- the model


@dataclass(slots=True)
class Row:
    """One instance as the monitor knows it. `pid` is the last known pid, kept after an
    exit so that late events about that process are recognised."""

    id: int
    app: str
    instance: int
    status: str
    pid: int | None
    reason: str = ""
    since: float = 0.0  # daemon wall time of the last state change
    started: float | None = None  # wall time the process started; None when not running
    exec_mode: str = "?"
    restarts: int = 0
    cpu: float = 0.0
    memory: int = 0
    listen: tuple[str, ...] = ()
    is_replacement: bool = False  # a reload's new process, not yet ready

    @property
    def key(self) -> str:
        return f"{self.id}+" if self.is_replacement else str(self.id)

    @property
    def label(self) -> str:
        return f"{self.app}:{self.instance}"

    @property
    def is_running(self) -> bool:
        return self.status in RUNNING

    def uptime_s(self, now: float) -> float:
        return max(0.0, now - self.started) if self.started is not None and self.is_running \
            else 0.0


def row_from_json(data: JsonObject, *, replacement: bool, now: float) -> Row:
    """A row of `list` or an instance of `describe` -> Row."""
    status = _str(data.get("status"), "?")
    uptime = _float(data.get("uptime"))
    since = _float(data.get("since"), now)
    listen = data.get("listen")
    row = Row(id=_int(data.get("id")), app=_str(data.get("name")),
              instance=_int(data.get("instance")), status=status, pid=_opt_int(data.get("pid")),
              reason=_str(data.get("reason")), since=since,
              exec_mode=_str(data.get("exec_mode"), "?"), restarts=_int(data.get("restarts")),
              cpu=_float(data.get("cpu")), memory=_int(data.get("memory")),
              listen=tuple(str(a) for a in listen) if isinstance(listen, list) else (),
              is_replacement=replacement)
    if row.is_running:
        row.started = now - uptime if uptime > 0 else since
    return row


def _split_replacements(rows: Iterable[JsonObject], now: float) -> list[Row]:
    """During a reload an id has two processes: the serving one first, then its
    replacement (the daemon lists `instances` before `replacing`)."""
    seen: set[int] = set()
    result = []
    for data in rows:
        ident = _int(data.get("id"), -1)
        result.append(row_from_json(data, replacement=ident in seen, now=now))
        seen.add(ident)
    return result


class Board:
    """Every instance the monitor shows, updated from list/describe replies and the
    publish stream. Pure: no I/O, no Textual, so it is tested without a daemon."""

    def __init__(self, history_points: int = HISTORY_POINTS) -> None:
        self.rows: dict[str, Row] = {}
        self.app_order: dict[str, int] = {}
        self.cpu_history: dict[int, deque[float]] = {}
        self.memory_history: dict[int, deque[float]] = {}
        self.events: dict[str, deque[str]] = {}
        self.dirty: set[str] = set()  # apps to refresh with one describe
        self._history_points = history_points
        self._retired: dict[int, float] = {}  # pid of a replaced process -> when

    # ------------------------------------------------------------ snapshots

    def seed(self, rows: list[JsonObject], now: float, *, reset_history: bool) -> None:
        """Replace everything with one `list` reply."""
        self.rows.clear()
        self.dirty.clear()
        if reset_history:
            self.cpu_history.clear()
            self.memory_history.clear()
            self._retired.clear()
        for row in _split_replacements(rows, now):
            self._add(row)
        self._drop_orphans()

    def merge_described(self, app: str, instances: list[JsonObject], *, whole_app: bool,
                        asked_at: float, now: float) -> None:
        """Take a `describe` reply. Rows that changed after the question was asked (an
        event newer than it) keep their state; with whole_app, rows the reply does not
        name and that did not change since are gone (scaled down or deleted)."""
        described = _split_replacements(instances, now)
        keys = {row.key for row in described}
        for fresh in described:
            current = self.rows.get(fresh.key)
            if current is None:
                # Unless the reply is older than what the stream said since: a replacement
                # already promoted, or the old process of one.
                known = {row.pid for row in self.rows.values()} | set(self._retired)
                if fresh.pid is None or fresh.pid not in known:
                    self._add(fresh)
                continue
            current.exec_mode, current.listen = fresh.exec_mode, fresh.listen
            current.restarts = max(current.restarts, fresh.restarts)
            if current.since <= fresh.since:
                current.status, current.pid, current.reason = fresh.status, fresh.pid, fresh.reason
                current.since, current.started = fresh.since, fresh.started
                current.restarts = fresh.restarts
        if whole_app:
            for key, row in list(self.rows.items()):
                if row.app == app and key not in keys and row.since < asked_at:
                    self._remove(key)
        self._drop_orphans()

    def forget_app(self, app: str, asked_at: float) -> None:
        """describe said the app does not exist (deleted)."""
        for key, row in list(self.rows.items()):
            if row.app == app and row.since < asked_at:
                self._remove(key)
        self._drop_orphans()

    # ------------------------------------------------------------ the stream

    def apply_event(self, body: JsonObject) -> None:
        app = _str(body.get("app"))
        when = _float(body.get("time"), time.time())
        kind = _str(body.get("kind"))
        if kind != "state":
            self._note(app, when, f"{kind.replace('_', ' ')}: {_str(body.get('message'))}")
            return
        ident, pid = _int(body.get("id")), _opt_int(body.get("pid"))
        state, reason = _str(body.get("state"), "?"), _str(body.get("reason"))
        instance = _int(body.get("instance"))
        shown_pid = f" (pid {pid})" if pid is not None else ""
        self._note(app, when, f"{app}:{instance}{shown_pid} {state}: {reason}")
        if pid is not None and pid in self._retired:
            return  # the old process of a finished replacement, stopping
        main, spare = self.rows.get(str(ident)), self.rows.get(f"{ident}+")
        if main is None:
            row = Row(ident, app, instance, state, pid, since=when, exec_mode=self._mode_of(app),
                      listen=self._listen_of(app))
            self._move(row, state, pid, reason, when)
            self._add(row)
            self.dirty.add(app)
            return
        if spare is not None and (pid is None or pid != main.pid):
            self._move(spare, state, pid, reason, when)
            if state == "online":
                self._promote(main, spare)
            elif state in ("stopped", "errored"):
                self._remove(spare.key)  # the reload failed; the old process keeps serving
            return
        if state == "launching" and main.is_running and main.pid is not None and pid != main.pid:
            spare = Row(ident, app, instance, state, pid, since=when, exec_mode=main.exec_mode,
                        restarts=main.restarts + 1, listen=main.listen, is_replacement=True)
            self._move(spare, state, pid, reason, when)
            self._add(spare)
            return
        if when < main.since:
            return  # older than what a list or describe already told us
        self._move(main, state, pid, reason, when)
        if state in ("starting", "stopped", "errored", "waiting"):
            self.dirty.add(app)

    def apply_stats(self, body: JsonObject) -> None:
        by_pid = {row.pid: row for row in self.rows.values() if row.pid is not None}
        sampled: set[str] = set()
        for sample in _objects(body.get("instances")):
            pid, ident = _opt_int(sample.get("pid")), _int(sample.get("id"), -1)
            if pid is None or pid in self._retired:
                continue
            row = by_pid.get(pid)
            if row is None:
                # A process the events have not named yet (its "online" is still to come).
                main, spare = self.rows.get(str(ident)), self.rows.get(f"{ident}+")
                if spare is not None and main is not None and pid != main.pid:
                    row = spare
                elif main is not None and spare is None and main.is_running:
                    row = main
                else:
                    continue
                row.pid = pid
            row.cpu, row.memory = _float(sample.get("cpu")), _int(sample.get("memory"))
            sampled.add(row.key)
        for row in self.rows.values():
            if row.is_replacement:
                continue
            if not row.is_running:
                row.cpu, row.memory = 0.0, 0
            cpu = self.cpu_history.setdefault(row.id, deque(maxlen=self._history_points))
            memory = self.memory_history.setdefault(row.id, deque(maxlen=self._history_points))
            cpu.append(row.cpu if row.key in sampled or row.is_running else 0.0)
            memory.append(float(row.memory))
        cutoff = time.monotonic() - 120
        for pid, when in list(self._retired.items()):
            if when < cutoff:
                del self._retired[pid]  # pids are reused eventually

    # ------------------------------------------------------------ queries

    def ordered(self) -> list[Row]:
        return sorted(self.rows.values(), key=lambda r: (self.app_order.get(r.app, 1 << 30),
                                                         r.instance, r.is_replacement, r.id))

    def apps(self) -> list[str]:
        return sorted({row.app for row in self.rows.values()},
                      key=lambda a: self.app_order.get(a, 1 << 30))

    def colour(self, app: str) -> str:
        return APP_COLOURS[self.app_order.get(app, 0) % len(APP_COLOURS)]

    # ------------------------------------------------------------ inside

    def _add(self, row: Row) -> None:
        self.app_order.setdefault(row.app, len(self.app_order))
        self.rows[row.key] = row

    def _remove(self, key: str) -> None:
        row = self.rows.pop(key, None)
        if row is not None and not row.is_replacement and str(row.id) not in self.rows:
            self.cpu_history.pop(row.id, None)
            self.memory_history.pop(row.id, None)

    def _drop_orphans(self) -> None:
        live = {row.app for row in self.rows.values()}
        for app in [a for a in self.events if a not in live and a not in self.dirty]:
            del self.events[app]

    def _promote(self, main: Row, spare: Row) -> None:
        """The replacement is ready: it becomes the instance; events about the old
        process (stopping, stopped) are ignored from now on."""
        if main.pid is not None:
            self._retired[main.pid] = time.monotonic()
        del self.rows[spare.key]
        spare.is_replacement = False
        self.rows[spare.key] = spare

    @staticmethod
    def _move(row: Row, state: str, pid: int | None, reason: str, when: float) -> None:
        old_pid = row.pid
        row.status, row.reason, row.since = state, reason, when
        if pid is not None:
            row.pid = pid
        new_process = state == "online" and (row.started is None or pid not in (None, old_pid))
        if state in ("starting", "launching") or new_process:
            row.started = when
        elif state not in RUNNING:
            row.started, row.cpu, row.memory = None, 0.0, 0

    def _note(self, app: str, when: float, text: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(when))
        self.events.setdefault(app, deque(maxlen=EVENTS_PER_APP)).append(f"{stamp} {text}")

    def _mode_of(self, app: str) -> str:
        return next((r.exec_mode for r in self.rows.values() if r.app == app), "?")

    def _listen_of(self, app: str) -> tuple[str, ...]:
        return next((r.listen for r in self.rows.values() if r.app == app), ())


# ---------------------------------------------------------------- messages from threads


@dataclass(frozen=True, slots=True)
class LogLine:
    app: str
    instance: int
    stream: str
    text: str


@dataclass(slots=True)
class Batch:
    events: list[JsonObject] = field(default_factory=list)
    stats: list[JsonObject] = field(default_factory=list)
    logs: deque[LogLine] = field(default_factory=lambda: deque(maxlen=MAX_LOG_LINES))
    dropped_logs: int = 0
    lost_events: bool = False

    def __bool__(self) -> bool:
        return bool(self.events or self.stats or self.logs)

    def add(self, topic: str, body: JsonObject) -> None:
        if topic == STATS_TOPIC:
            self.stats.append(body)
            del self.stats[:-5]
        elif topic.startswith(EVENT_PREFIX):
            self.events.append(body)
            if len(self.events) > MAX_BATCH_EVENTS:
                del self.events[: len(self.events) - MAX_BATCH_EVENTS]
                self.lost_events = True
        elif topic.startswith(LOG_PREFIX):
            app, instance, stream = _str(body.get("app")), _int(body.get("instance")), \
                _str(body.get("stream"), "out")
            lines = body.get("lines")
            for text in lines if isinstance(lines, list) else []:
                if len(self.logs) == self.logs.maxlen:
                    self.dropped_logs += 1
                self.logs.append(LogLine(app, instance, stream, str(text)))
