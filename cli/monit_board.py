"""The model behind `pmx monit`: rows built from `list` and the publish stream, the
recent events, CPU and memory history, log lines and `describe` replies.

Pure: no I/O, no Textual, so it is tested without a daemon (tests/unit/test_monit_board.py).
cli/monit_feed.py feeds it from the daemon's sockets, cli/monit_format.py turns it into
text, and cli/monit.py (MonitApp) shows it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pmx.supervisor.protocol import EVENT_PREFIX, LOG_PREFIX, STATS_TOPIC, Json, JsonObject
from pmx.supervisor.states import ENDED, RUNNING, State

APP_COLOURS = ("cyan", "magenta", "green", "yellow", "bright_blue", "bright_magenta",
               "bright_cyan", "bright_green")
HISTORY_POINTS = 300  # one per stats message: the last five minutes at 1/s
MAX_LOG_LINES = 2000  # per view (all apps, and each app)
MAX_LOG_WRITES = 300  # lines drawn per batch; more than that cannot be read anyway
MAX_BATCH_EVENTS = 20000
EVENTS_PER_APP = 50


# ---------------------------------------------------------------- reading replies
# A field of a reply or publication, or the default when it is missing or mistyped.


def json_int(value: Json | None, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def json_opt_int(value: Json | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def json_float(value: Json | None, default: float = 0.0) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def json_str(value: Json | None, default: str = "") -> str:
    return value if isinstance(value, str) else default


def json_objects(value: Json | None) -> list[JsonObject]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def clock_time(when: float) -> str:
    """A wall time as the monitor shows it: 14:03:27, local time."""
    return time.strftime("%H:%M:%S", time.localtime(when))


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
    status = json_str(data.get("status"), "?")
    uptime = json_float(data.get("uptime"))
    since = json_float(data.get("since"), now)
    listen = data.get("listen")
    row = Row(id=json_int(data.get("id")), app=json_str(data.get("name")),
              instance=json_int(data.get("instance")), status=status,
              pid=json_opt_int(data.get("pid")), reason=json_str(data.get("reason")), since=since,
              exec_mode=json_str(data.get("exec_mode"), "?"),
              restarts=json_int(data.get("restarts")),
              cpu=json_float(data.get("cpu")), memory=json_int(data.get("memory")),
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
        ident = json_int(data.get("id"), -1)
        result.append(row_from_json(data, replacement=ident in seen, now=now))
        seen.add(ident)
    return result


class Board:
    """Every instance the monitor shows, updated from list/describe replies and the
    publish stream, with what the last `describe` said of each app and instance (for the
    detail panel). Pure: no I/O, no Textual, so it is tested without a daemon."""

    def __init__(self, history_points: int = HISTORY_POINTS) -> None:
        self.rows: dict[str, Row] = {}
        self.app_order: dict[str, int] = {}
        self.cpu_history: dict[int, deque[float]] = {}
        self.memory_history: dict[int, deque[float]] = {}
        self.events: dict[str, deque[str]] = {}
        self.dirty: set[str] = set()  # apps to refresh with one describe
        self.described: dict[str, JsonObject] = {}  # app -> describe's app object
        self.instance_info: dict[int, JsonObject] = {}  # id -> describe's instance object
        self._history_points = history_points
        self._retired: dict[int, float] = {}  # pid of a replaced process -> when

    # ------------------------------------------------------------ snapshots

    def seed(self, rows: list[JsonObject], now: float, *, reset_history: bool) -> None:
        """Replace everything with one `list` reply. reset_history after a reconnect: maybe
        another pmxd, whose ids start again from 0."""
        self.rows.clear()
        self.dirty.clear()
        if reset_history:
            self.cpu_history.clear()
            self.memory_history.clear()
            self._retired.clear()
            self.described.clear()
            self.instance_info.clear()
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

    def take_described(self, reply: JsonObject, *, whole_app: bool, asked_at: float) -> None:
        """Keep a `describe` reply for the detail panel and merge its instances. An app with
        an instance stopping stays dirty: a delete may be under way."""
        for described in json_objects(reply.get("apps")):
            app = json_str(described.get("name"))
            instances = json_objects(described.get("instances"))
            self.described[app] = described
            for instance in instances:
                self.instance_info[json_int(instance.get("id"))] = instance
            self.merge_described(app, instances, whole_app=whole_app, asked_at=asked_at,
                                 now=time.time())
            if any(json_str(i.get("status")) == State.STOPPING for i in instances):
                self.dirty.add(app)

    def forget_app(self, app: str, asked_at: float) -> None:
        """describe said the app does not exist (deleted)."""
        for key, row in list(self.rows.items()):
            if row.app == app and row.since < asked_at:
                self._remove(key)
        self._drop_orphans()

    # ------------------------------------------------------------ the stream

    def apply_batch(self, batch: Batch) -> set[str]:
        """Take a batch's events and stats (not its log lines); the apps its events name."""
        for body in batch.events:
            self.apply_event(body)
        for body in batch.stats:
            self.apply_stats(body)
        if batch.lost_events:
            self.dirty.update(self.apps())
        return {json_str(body.get("app")) for body in batch.events}

    def apply_event(self, body: JsonObject) -> None:
        app = json_str(body.get("app"))
        when = json_float(body.get("time"), time.time())
        kind = json_str(body.get("kind"))
        if kind != "state":
            self._note(app, when, f"{kind.replace('_', ' ')}: {json_str(body.get('message'))}")
            return
        ident, pid = json_int(body.get("id")), json_opt_int(body.get("pid"))
        state, reason = json_str(body.get("state"), "?"), json_str(body.get("reason"))
        instance = json_int(body.get("instance"))
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
            if state == State.ONLINE:
                self._promote(main, spare)
            elif state in ENDED:
                self._remove(spare.key)  # the reload failed; the old process keeps serving
            return
        if (state == State.LAUNCHING and main.is_running and main.pid is not None
                and pid != main.pid):
            spare = Row(ident, app, instance, state, pid, since=when, exec_mode=main.exec_mode,
                        restarts=main.restarts + 1, listen=main.listen, is_replacement=True)
            self._move(spare, state, pid, reason, when)
            self._add(spare)
            return
        if when < main.since:
            return  # older than what a list or describe already told us
        self._move(main, state, pid, reason, when)
        if state in (State.STARTING, State.STOPPED, State.ERRORED, State.WAITING):
            self.dirty.add(app)

    def apply_stats(self, body: JsonObject) -> None:
        by_pid = {row.pid: row for row in self.rows.values() if row.pid is not None}
        sampled: set[str] = set()
        for sample in json_objects(body.get("instances")):
            pid, ident = json_opt_int(sample.get("pid")), json_int(sample.get("id"), -1)
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
            row.cpu, row.memory = json_float(sample.get("cpu")), json_int(sample.get("memory"))
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

    def matching(self, needle: str) -> list[Row]:
        """The rows in order whose app or label holds `needle` (any case); all for ""."""
        if not needle:
            return self.ordered()
        needle = needle.lower()
        return [r for r in self.ordered() if needle in r.app.lower() or needle in r.label.lower()]

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
        new_process = state == State.ONLINE and (row.started is None or pid not in (None, old_pid))
        if state in (State.STARTING, State.LAUNCHING) or new_process:
            row.started = when
        elif state not in RUNNING:
            row.started, row.cpu, row.memory = None, 0.0, 0

    def _note(self, app: str, when: float, text: str) -> None:
        self.events.setdefault(app, deque(maxlen=EVENTS_PER_APP)).append(
            f"{clock_time(when)} {text}")

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
            app, instance, stream = json_str(body.get("app")), json_int(body.get("instance")), \
                json_str(body.get("stream"), "out")
            lines = body.get("lines")
            for text in lines if isinstance(lines, list) else []:
                if len(self.logs) == self.logs.maxlen:
                    self.dropped_logs += 1
                self.logs.append(LogLine(app, instance, stream, str(text)))


class LogBuffer:
    """The log lines received since monit started: the last MAX_LOG_LINES of all apps and
    of each app, so that following an app shows its recent lines at once."""

    def __init__(self, max_lines: int = MAX_LOG_LINES) -> None:
        self._max_lines = max_lines
        self._all: deque[LogLine] = deque(maxlen=max_lines)
        self._by_app: dict[str, deque[LogLine]] = {}

    def add(self, lines: Iterable[LogLine], following: str | None) -> list[LogLine]:
        """Keep `lines`; those of `following` (every one when None), to be shown."""
        shown: list[LogLine] = []
        for line in lines:
            self._all.append(line)
            self._by_app.setdefault(line.app, deque(maxlen=self._max_lines)).append(line)
            if following is None or line.app == following:
                shown.append(line)
        return shown

    def lines(self, following: str | None) -> list[LogLine]:
        """The lines kept of `following`, or of every app when None, oldest first."""
        return list(self._all if following is None else self._by_app.get(following, ()))
