"""`pmx monit`: a live, keyboard-driven terminal monitor fed by pmxd's publish stream.

What it owns: the Textual app, `Board` (the monitor's model of every instance: state,
CPU and memory history, recent events), and the threads that talk to pmxd. It leaves
the wire format to `protocol`, requests to `client.Client` and the one-shot snapshot
(`--once`, or stdout not a terminal) to `render.instance_table`.

Data flow: one `list` at start (and after a reconnect) seeds the board; afterwards it
changes only with publications: state events (`event.*`), stats (`stats.`, every second:
cpu and memory per pid) and log lines (`log.*`). A state event carries no
restart count, exec mode or listen address, and nothing is published when an app is
deleted, so an app whose instances started or stopped is refreshed with one `describe`
(coalesced: at most one per app per half second). Nothing polls `list`.

Threads: the feed thread owns the SUB socket (ZeroMQ sockets belong to one thread) and
hands the app one batch at a time with `post_message`, the next only once the app has
consumed the last one, so a flood of log lines is coalesced instead of queued without
bound. Requests run in two call threads (queries, and the user's actions), each with its
own Client, so a 30-second reload never freezes the screen or the detail panel. All three
are daemon threads: quitting never waits for pmxd.

If pmxd goes away (no stats for STATS_SILENCE_S and ping fails) a banner says so and the
feed retries every RECONNECT_S; when pmxd answers again the board is seeded anew.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path

import zmq
from pmx.supervisor.errors import CommandError, PmxError
from pmx.supervisor.protocol import (
    EVENT_PREFIX,
    LOG_PREFIX,
    STATS_TOPIC,
    Command,
    Json,
    JsonObject,
    decode_publication,
)

from . import render
from .client import Client, _shown
from .monit_board import (
    HISTORY_POINTS,
    MAX_LOG_LINES,
    MAX_LOG_WRITES,
    Batch,
    Board,
    LogLine,
    Row,
    _float,
    _int,
    _objects,
    _str,
)

try:
    from rich.table import Table
    from rich.text import Text
    from textual import events
    from textual.app import App, ComposeResult
    from textual.binding import Binding
    from textual.containers import Horizontal, Vertical, VerticalScroll
    from textual.message import Message
    from textual.screen import ModalScreen
    from textual.timer import Timer
    from textual.widgets import DataTable, Footer, Input, RichLog, Sparkline, Static
except ImportError as exc:  # pragma: no cover - a broken install
    raise PmxError("pmx monit needs textual, a dependency of pmx: pip install textual") from exc

BATCH_S = 0.2  # at most five screen updates a second from the stream
STATS_SILENCE_S = 3.0
PING_TIMEOUT_S = 1.5
RECONNECT_S = 1.0
REFRESH_DELAY_S = 0.5
SELECT_DELAY_S = 0.15
ACTION_TIMEOUT_S = 120.0
RELOAD_TIMEOUT_S = 600.0

class FeedBatch(Message):
    def __init__(self, batch: Batch) -> None:
        super().__init__()
        self.batch = batch


class Seeded(Message):
    def __init__(self, rows: list[JsonObject], asked_at: float) -> None:
        super().__init__()
        self.rows = rows
        self.asked_at = asked_at


class Disconnected(Message):
    def __init__(self, why: str, crash: str | None = None) -> None:
        super().__init__()
        self.why = why
        self.crash = crash  # a traceback: the feed thread hit a bug and stopped


class CallDone(Message):
    def __init__(self, done: Callable[[JsonObject | PmxError], None],
                 result: JsonObject | PmxError) -> None:
        super().__init__()
        self.done = done
        self.result = result


def _post(app: App[int], message: Message) -> bool:
    """post_message from another thread; False once the app is closing or gone."""
    try:
        return app.post_message(message)
    except RuntimeError:  # the event loop is already closed
        return False


# ---------------------------------------------------------------- threads


class Feed:
    """The SUB socket, in a thread of its own: seeds, batches, notices pmxd going away."""

    def __init__(self, home: Path, app: App[int]) -> None:
        self._home = home
        self._app = app
        self._stop = threading.Event()
        self.consumed = threading.Event()
        self.consumed.set()
        self._batch = Batch()
        self._last_stats = time.monotonic()
        self._is_down = False
        self._thread = threading.Thread(target=self._run, name="pmx-monit-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        client = Client(self._home)
        sock: zmq.Socket[bytes] | None = None
        try:
            while not self._stop.is_set():
                if sock is None:
                    sock = self._connect(client)
                    if sock is None:
                        self._stop.wait(RECONNECT_S)
                    continue
                if not self._pump(client, sock):
                    sock.close(linger=0)
                    sock = None
                    self._down(f"pmxd is not running (home {_shown(self._home)})")
        except Exception as exc:
            # A bug. Say so on screen; the traceback is printed once the terminal is back.
            self._is_down = False
            self._down(f"pmx monit stopped following pmxd: bug: {type(exc).__name__}: {exc}",
                       traceback.format_exc())
        finally:
            if sock is not None:
                sock.close(linger=0)
            client.close()

    def _down(self, why: str, crash: str | None = None) -> None:
        if not self._is_down:
            self._is_down = True
            _post(self._app, Disconnected(why, crash))

    def _connect(self, client: Client) -> zmq.Socket[bytes] | None:
        sock = None
        try:
            sock = client.subscribe([EVENT_PREFIX, STATS_TOPIC, LOG_PREFIX])
            # ZeroMQ's slow joiner: give the subscription a moment to reach the PUB, so
            # that nothing published after the list reply is missed.
            self._stop.wait(0.05)
            asked_at = time.time()
            rows = _objects(client.call(Command.LIST).get("instances"))
        except PmxError as exc:
            if sock is not None:
                sock.close(linger=0)
            shown = _shown(self._home)
            self._down(str(exc) if isinstance(exc, CommandError)
                       else f"pmxd is not running (home {shown})")
            return None
        self._is_down = False
        self._batch = Batch()
        self.consumed.set()
        self._last_stats = time.monotonic()
        _post(self._app, Seeded(rows, asked_at))
        return sock

    def _pump(self, client: Client, sock: zmq.Socket[bytes]) -> bool:
        """Read for one batch period; False when pmxd is gone."""
        deadline = time.monotonic() + BATCH_S
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not sock.poll(max(1, int(remaining * 1000))):
                continue
            for _ in range(10000):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    topic, body = decode_publication(frames)
                except PmxError:
                    continue
                if topic == STATS_TOPIC:
                    self._last_stats = time.monotonic()
                self._batch.add(topic, body)
        if self._batch and self.consumed.is_set():
            self.consumed.clear()
            batch, self._batch = self._batch, Batch()
            if not _post(self._app, FeedBatch(batch)):
                return True
        if time.monotonic() - self._last_stats > STATS_SILENCE_S:
            # No stats: pmxd is gone, or simply has no running process. Ask.
            try:
                client.call(Command.PING, timeout_s=PING_TIMEOUT_S)
            except PmxError:
                return False
            self._last_stats = time.monotonic()
        return True


class Calls:
    """Runs requests one at a time in a daemon thread with its own Client."""

    def __init__(self, home: Path, app: App[int], name: str) -> None:
        self._home = home
        self._app = app
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[Client], JsonObject], Callable[[JsonObject | PmxError], None]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"pmx-monit-{name}", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[Client], JsonObject],
               done: Callable[[JsonObject | PmxError], None]) -> None:
        self._jobs.put((call, done))

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        client = Client(self._home)
        try:
            while (job := self._jobs.get()) is not None:
                call, done = job
                result: JsonObject | PmxError
                try:
                    result = call(client)
                except PmxError as exc:
                    result = exc
                except Exception as exc:  # a bug, or ZeroMQ failing: shown as the outcome
                    result = PmxError(f"{type(exc).__name__}: {exc}")
                _post(self._app, CallDone(done, result))
        finally:
            client.close()


# ---------------------------------------------------------------- cells


def _cell(text: str, width: int, *, right: bool = False, first: bool = False,
          style: str = "") -> Text:
    """One cell: a space before it (the column gap, but for the first), then the text
    justified in `width` and cut with an ellipsis when longer."""
    if len(text) > width:
        text = text[: max(0, width - 1)] + "…"
    padded = text.rjust(width) if right else text.ljust(width)
    return Text(padded if first else " " + padded, style=style, no_wrap=True)


def _cpu_style(cpu: float) -> str:
    return "bold red" if cpu >= 90 else "yellow" if cpu >= 50 else ""


COLUMNS = ("name", "id", "#", "mode", "status", "pid", "cpu", "mem", "↺", "uptime")
RIGHT = frozenset({"id", "#", "pid", "cpu", "mem", "↺", "uptime"})
FIXED_WIDTHS = {"mode": 7, "status": 9, "pid": 7, "cpu": 6, "mem": 8, "↺": 3, "uptime": 6}


def _row_texts(row: Row, now: float) -> tuple[tuple[str, str], ...]:
    """(text, style) per column."""
    running = row.is_running
    name = f"{row.app}{' (new)' if row.is_replacement else ''}"
    return (
        (name, ""),
        (str(row.id), "dim"),
        (str(row.instance), "dim"),
        (row.exec_mode, "dim"),
        (row.status, render.STATUS_STYLE.get(row.status, "")),
        (str(row.pid) if running and row.pid else "-", ""),
        (f"{row.cpu:.0f}%" if row.cpu >= 100 else f"{row.cpu:.1f}%",
         _cpu_style(row.cpu) if running else "dim"),
        (render.human_size(row.memory) if running and row.memory else "-",
         "" if running else "dim"),
        (str(row.restarts), "yellow" if row.restarts else ""),
        (render.human_duration(row.uptime_s(now)) if running else "-", ""),
    )


def _chart(history: list[float]) -> list[float]:
    """A fixed five-minute window for Sparkline, which scales from the smallest value to
    the largest: the leading zero keeps the scale at zero (a steady 30mb is a full bar,
    not noise blown up), and time not seen yet is empty on the left."""
    return [0.0] * (HISTORY_POINTS + 1 - len(history)) + history


def _home_relative(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home):] if path.startswith(home + os.sep) else path


def _ms(value: Json | None) -> str:
    seconds = _float(value) / 1000
    return f"{seconds:g}s"


# ---------------------------------------------------------------- screens


HELP = """\
[b]pmx monit[/b]: pmxd's processes, live from its publish stream

[b]↑ ↓ j k[/b]  select an instance     [b]enter[/b]  follow its app's logs (again: all)
[b]/[/b]        filter by name         [b]esc[/b]    clear the filter
[b]r[/b]        restart the instance   [b]R[/b]      reload its app, no downtime
[b]s[/b]        stop the instance      [b]S[/b]      start the instance
[b]d[/b]        delete its app (asks)  [b]q[/b]      quit (also ctrl+c)

Columns: [b]#[/b] instance number, [b]↺[/b] restarts, [b]cpu[/b] percent of one core over
the last second, [b]mem[/b] resident memory of the whole process tree. The
charts show the selected instance over the last five minutes.

[dim]any key closes this help[/dim]"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: 78; max-width: 100%; height: auto; max-height: 100%;
                          border: round $accent; background: $surface; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP)

    def on_key(self, event: events.Key) -> None:
        event.stop()
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Static { width: 60; max-width: 100%; height: auto;
                             border: round $error; background: $surface; padding: 0 1; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(self.question, "\n\n", ("y", "bold"), " yes   ",
                                   ("n", "bold"), " / ", ("esc", "bold"), " no"))

    def on_key(self, event: events.Key) -> None:
        event.stop()
        self.dismiss(event.key in ("y", "Y"))


class ProcessTable(DataTable[Text]):
    BINDINGS = [
        Binding("enter", "select_cursor", "logs"),
        Binding("j", "cursor_down", show=False),
        Binding("k", "cursor_up", show=False),
    ]


# ---------------------------------------------------------------- the app


class MonitApp(App[int]):
    """The live monitor. `board` is its model; the widgets show it."""

    TITLE = "pmx monit"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    Screen { layout: vertical; }
    #header { height: 1; background: $panel; color: $text; }
    #banner { height: 1; background: $error; color: $text; text-style: bold; display: none; }
    #processes { height: 1fr; min-height: 5; border-top: solid $primary;
                 border-title-color: $text; }
    #filter { height: 1; border: none; padding: 0 1; display: none; background: $boost; }
    #table { height: 1fr; scrollbar-size-vertical: 1; }
    #table.stale { opacity: 50%; }
    #middle { height: 8; border-top: solid $primary; border-title-color: $text; }
    #details { width: 1fr; scrollbar-size-vertical: 1; padding: 0 1 0 0; }
    #charts { width: 30; padding: 0 0 0 1; border-left: vkey $primary-darken-2; }
    #charts Static { height: 1; }
    #charts Sparkline { height: 2; margin: 0 0 0 0; }
    #log { height: 1fr; min-height: 3; border-top: solid $primary; border-title-color: $text;
           scrollbar-size-vertical: 1; }
    """
    BINDINGS = [
        Binding("slash", "filter", "filter"),
        Binding("r", "restart", "restart"),
        Binding("R", "reload", "reload"),
        Binding("s", "stop", "stop"),
        Binding("S", "start", "start"),
        Binding("d", "delete", "delete"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", show=False, priority=True),
        Binding("escape", "clear_filter", show=False),
    ]

    def __init__(self, home: Path) -> None:
        super().__init__()
        self.home = home
        self.board = Board()
        self.following: str | None = None  # app whose logs are shown; None: all apps
        self.filter_text = ""
        self.selected_key: str | None = None
        self.is_connected = False
        self.outcomes: list[str] = []  # what the actions reported, newest last
        self.crash_report: str | None = None
        self._logs_all: deque[LogLine] = deque(maxlen=MAX_LOG_LINES)
        self._logs_by_app: dict[str, deque[LogLine]] = {}
        self._described: dict[str, JsonObject] = {}  # app -> describe's app object
        self._instance_info: dict[int, JsonObject] = {}  # id -> describe's instance object
        self._shown_keys: list[str] = []
        self._cells: dict[str, tuple[tuple[str, str], ...]] = {}
        self._widths: dict[str, int] = {}
        self._shown_content: dict[str, object] = {}  # selector -> what it shows
        self._refresh_timer: Timer | None = None
        self._select_timer: Timer | None = None
        self._feed: Feed | None = None
        self._queries: Calls | None = None
        self._actions: Calls | None = None

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        yield Static(id="banner")
        with Vertical(id="processes"):
            yield Input(placeholder="filter by name; enter keeps it, esc clears", id="filter")
            yield ProcessTable(id="table", cursor_type="row", cell_padding=0)
        with Horizontal(id="middle"):
            with VerticalScroll(id="details", can_focus=False):
                yield Static(id="detail-text")
            with Vertical(id="charts"):
                yield Static(id="cpu-label")
                yield Sparkline([], id="cpu-spark", summary_function=max)
                yield Static(id="mem-label")
                yield Sparkline([], id="mem-spark", summary_function=max)
        yield RichLog(id="log", max_lines=MAX_LOG_LINES, min_width=20, wrap=False,
                      markup=False, highlight=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        log = self.query_one("#log", RichLog)
        log.can_focus = False
        self.query_one("#processes").border_title = "processes"
        self.query_one("#middle").border_title = "details"
        self._title_log()
        self.query_one("#table", ProcessTable).focus()
        self._show_header()
        self._show_details()
        self.set_interval(1.0, self._tick)
        self._queries = Calls(self.home, self, "queries")
        self._actions = Calls(self.home, self, "actions")
        self._feed = Feed(self.home, self)
        self._feed.start()

    def on_unmount(self) -> None:
        for calls in (self._queries, self._actions):
            if calls is not None:
                calls.close()
        if self._feed is not None:
            self._feed.stop()

    def on_resize(self, event: events.Resize) -> None:
        middle = self.query_one("#middle")
        middle.styles.height = 8 if event.size.height < 34 else 12
        self._sync_table(force=True)

    # ------------------------------------------------------------ feed messages

    def on_seeded(self, message: Seeded) -> None:
        reconnect = not self.is_connected and bool(self.board.rows)
        if reconnect:  # maybe another pmxd: ids start again from 0
            self._described.clear()
            self._instance_info.clear()
        self.board.seed(message.rows, time.time(), reset_history=reconnect)
        self.is_connected = True
        self.query_one("#banner").display = False
        self.query_one("#table").remove_class("stale")
        self._sync_table()
        self._show_header()
        self._selection_changed()

    def on_disconnected(self, message: Disconnected) -> None:
        self.is_connected = False
        self.crash_report = self.crash_report or message.crash
        banner = self.query_one("#banner", Static)
        banner.update(Text(f" {message.why}; waiting for it to come back (q quits)"))
        banner.display = True
        self.query_one("#table").add_class("stale")
        self._show_header()

    def on_feed_batch(self, message: FeedBatch) -> None:
        batch = message.batch
        try:
            selected = self.selected_row()
            before = (selected.status, selected.pid) if selected else None
            touched = {_str(body.get("app")) for body in batch.events}
            for body in batch.events:
                self.board.apply_event(body)
            for body in batch.stats:
                self.board.apply_stats(body)
            if batch.lost_events:
                self.board.dirty.update(self.board.apps())
            if batch.logs:
                self._add_logs(batch.logs, batch.dropped_logs)
            if batch.events or batch.stats:
                self._sync_table()
                self._show_header()
                self._show_charts()
                after = self.selected_row()
                if after is None or after.app in touched or (after.status, after.pid) != before:
                    self._show_details()
            if self.board.dirty and self._refresh_timer is None:
                self._refresh_timer = self.set_timer(REFRESH_DELAY_S, self._refresh_dirty)
        finally:
            if self._feed is not None:
                self._feed.consumed.set()

    def on_call_done(self, message: CallDone) -> None:
        message.done(message.result)

    def _tick(self) -> None:
        self._sync_table()
        self._show_header()

    # ------------------------------------------------------------ describe

    def _refresh_dirty(self) -> None:
        self._refresh_timer = None
        apps, self.board.dirty = self.board.dirty, set()
        for app in apps:
            self._describe(app, whole_app=True)

    def _describe(self, target: str, *, whole_app: bool, app: str | None = None) -> None:
        if self._queries is None:
            return
        asked_at = time.time()
        name = app or target

        def done(result: JsonObject | PmxError) -> None:
            if isinstance(result, CommandError) and result.code == "not_found":
                if whole_app:
                    self.board.forget_app(name, asked_at)
                    self._described.pop(name, None)
                else:
                    self.board.dirty.add(name)
                    self._refresh_dirty()
            elif isinstance(result, dict):
                for described in _objects(result.get("apps")):
                    app_name = _str(described.get("name"))
                    instances = _objects(described.get("instances"))
                    self._described[app_name] = described
                    for instance in instances:
                        self._instance_info[_int(instance.get("id"))] = instance
                    self.board.merge_described(app_name, instances, whole_app=whole_app,
                                               asked_at=asked_at, now=time.time())
                    if any(_str(i.get("status")) == "stopping" for i in instances):
                        self.board.dirty.add(app_name)  # a delete may be under way
            else:
                return  # pmxd is gone: the feed says so
            self._sync_table()
            self._show_details()
            if self.board.dirty and self._refresh_timer is None:
                self._refresh_timer = self.set_timer(REFRESH_DELAY_S * 2, self._refresh_dirty)

        self._queries.submit(lambda c: c.call(Command.DESCRIBE, {"target": target}), done)

    # ------------------------------------------------------------ the table

    def _visible_rows(self) -> list[Row]:
        rows = self.board.ordered()
        if self.filter_text:
            needle = self.filter_text.lower()
            rows = [r for r in rows if needle in r.app.lower() or needle in r.label.lower()]
        return rows

    def _column_widths(self, rows: list[Row], total: int) -> dict[str, int]:
        widths = dict(FIXED_WIDTHS)
        widths["id"] = max(2, *(len(str(r.id)) for r in rows)) if rows else 2
        widths["#"] = max(1, *(len(str(r.instance)) for r in rows)) if rows else 1
        used = sum(widths.values()) + len(widths) + 1  # one space after each, and the name's
        longest = max((len(r.app) + (6 if r.is_replacement else 0) for r in rows), default=8)
        widths["name"] = max(8, min(longest, total - used - 1))
        return widths

    def _sync_table(self, *, force: bool = False) -> None:
        table = self.query_one("#table", ProcessTable)
        rows = self._visible_rows()
        keys = [row.key for row in rows]
        widths = self._column_widths(rows, max(40, table.size.width or self.size.width))
        now = time.time()
        if force or keys != self._shown_keys or widths != self._widths:
            self._rebuild_table(table, rows, widths, now)
            return
        for row in rows:
            texts = _row_texts(row, now)
            old = self._cells.get(row.key)
            if texts == old:
                continue
            for index, column in enumerate(COLUMNS):
                if old is None or old[index] != texts[index]:
                    text, style = texts[index]
                    table.update_cell(row.key, column, _cell(
                        text, widths[column], right=column in RIGHT, first=index == 0,
                        style=style))
            self._cells[row.key] = texts

    def _rebuild_table(self, table: ProcessTable, rows: list[Row], widths: dict[str, int],
                       now: float) -> None:
        selected = self._cursor_key()
        old_index = table.cursor_row
        table.clear(columns=True)
        for index, column in enumerate(COLUMNS):
            table.add_column(_cell(column, widths[column], right=column in RIGHT,
                                   first=index == 0, style="bold"),
                             width=widths[column] + (index > 0), key=column)
        self._cells.clear()
        for row in rows:
            texts = _row_texts(row, now)
            self._cells[row.key] = texts
            table.add_row(*(_cell(text, widths[column], right=column in RIGHT, first=index == 0,
                                  style=style)
                            for index, (column, (text, style)) in enumerate(
                                zip(COLUMNS, texts, strict=True))),
                          key=row.key)
        self._shown_keys = [row.key for row in rows]
        self._widths = widths
        if not rows:
            self.selected_key = None
            self._show_details()
            self._show_charts()
            return
        if selected in self._shown_keys:
            index = self._shown_keys.index(selected)
        elif selected is not None and selected.endswith("+") and selected[:-1] in self._shown_keys:
            index = self._shown_keys.index(selected[:-1])  # the replacement became the instance
        else:
            index = min(max(old_index, 0), len(rows) - 1)
        table.move_cursor(row=index, animate=False)
        if self.selected_key != self._shown_keys[index]:
            self.selected_key = self._shown_keys[index]
            self._selection_changed()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key is None or key == self.selected_key or key not in self.board.rows:
            return
        self.selected_key = key
        self._selection_changed()

    def _selection_changed(self) -> None:
        self._show_details()
        self._show_charts()
        if self._select_timer is not None:
            self._select_timer.stop()
        self._select_timer = self.set_timer(SELECT_DELAY_S, self._describe_selected)

    def _describe_selected(self) -> None:
        self._select_timer = None
        row = self.selected_row()
        if row is not None and self.is_connected:
            self._describe(str(row.id), whole_app=False, app=row.app)

    def selected_row(self) -> Row | None:
        """The row under the cursor. Read from the table, not from the last RowHighlighted
        message: keys typed quickly ("j j d") run before those messages arrive."""
        return self.board.rows.get(self._cursor_key() or "")

    def _cursor_key(self) -> str | None:
        table = self.query_one("#table", ProcessTable)
        if not table.row_count or not table.is_valid_coordinate(table.cursor_coordinate):
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        row = self.board.rows.get(key or "")
        if row is None:
            return
        self.following = None if self.following == row.app else row.app
        self._title_log()
        self._redraw_log()

    # ------------------------------------------------------------ panels

    def _show_header(self) -> None:
        rows = [r for r in self.board.rows.values() if not r.is_replacement]
        online = sum(1 for r in rows if r.status == "online")
        cpu = sum(r.cpu for r in rows)
        memory = sum(r.memory for r in rows if r.is_running)
        header = Text(no_wrap=True, overflow="ellipsis")
        header.append(" pmx monit ", style="bold")
        header.append(f" {_shown(self.home)} ", style="dim")
        if not self.is_connected:
            header.append(" disconnected", style="bold red")
        else:
            header.append(f" {len(self.board.apps())} apps  ")
            header.append(f"{online}/{len(rows)} online", style="green" if online == len(rows)
                          else "yellow")
            header.append(f"  cpu {cpu:.1f}%  mem {render.human_size(memory) if memory else '-'}")
        if self.filter_text:
            header.append(f"  filter: {self.filter_text}", style="bold cyan")
        self._update("#header", header)
        title = "processes" + (f" (filter: {self.filter_text})" if self.filter_text else "")
        self.query_one("#processes").border_title = Text(title)  # Text: never markup

    def _update(self, selector: str, content: Text, key: object = None) -> None:
        """Static.update only when the content changed: an update lays the screen out
        again, and most batches change nothing in most panels."""
        key = content if key is None else key
        if self._shown_content.get(selector) != key:
            self._shown_content[selector] = key
            self.query_one(selector, Static).update(content)

    def _show_details(self) -> None:
        row = self.selected_row()
        if row is None:
            if not self.is_connected:
                self._update("#detail-text", Text("waiting for pmxd…", style="dim"))
            elif not self.board.rows:
                self._update("#detail-text", Text.from_markup(
                    "[dim]no apps; start one with[/] pmx start ecosystem.toml"))
            else:
                self._update("#detail-text", Text("no instance matches the filter", style="dim"))
            self.query_one("#middle").border_title = "details"
            return
        self.query_one("#middle").border_title = Text(f"{row.label} (id {row.id})")
        lines = self._detail_lines(row)
        if self._shown_content.get("#detail-text") != lines:
            self._shown_content["#detail-text"] = lines
            grid = Table.grid(padding=(0, 1))
            grid.add_column(style="bold", no_wrap=True)
            grid.add_column(overflow="fold")
            for key, value, style in lines:
                grid.add_row(key, Text(value, style=style))
            self.query_one("#detail-text", Static).update(grid)

    def _detail_lines(self, row: Row) -> list[tuple[str, str, str]]:
        """The selected instance as (key, value, style): state first (what a small screen
        shows), then how it runs, then the app's recent events."""
        app = self._described.get(row.app, {})
        spec = app.get("spec")
        spec = spec if isinstance(spec, dict) else {}
        info = self._instance_info.get(row.id, {})
        lines: list[tuple[str, str, str]] = []

        def line(key: str, value: str, style: str = "") -> None:
            lines.append((key, render.neutralise(value), style))

        since = time.strftime("%H:%M:%S", time.localtime(row.since)) if row.since else "?"
        line("status", f"{row.status} since {since}: {row.reason}",
             render.STATUS_STYLE.get(row.status, ""))
        for key, label in (("last_exit", "last exit"), ("status_text", "app says")):
            value = info.get(key)
            if isinstance(value, str) and value:
                line(label, value)
        cwd = _str(spec.get("cwd"))
        script = _str(spec.get("script"))
        if script:
            inside = cwd and script.startswith(cwd.rstrip(os.sep) + os.sep)
            line("script", script[len(cwd.rstrip(os.sep)) + 1:] if inside else
                 _home_relative(script))
        command = info.get("command")
        if isinstance(command, list) and command:
            line("command", " ".join(os.path.basename(str(c)) if str(c).startswith("/")
                                     else str(c) for c in command))
        if cwd:
            line("cwd", _home_relative(cwd))
        listen = app.get("listen") or list(row.listen)
        if isinstance(listen, list) and listen:
            line("listen", ", ".join(map(str, listen)))
        if spec:
            limits = []
            if _int(spec.get("max_memory_restart")):
                limits.append(f"memory {render.human_size(spec.get('max_memory_restart'))}")
            limits.append(f"kill after {_ms(spec.get('kill_timeout'))}")
            limits.append(f"gives up after {_int(spec.get('max_restarts'))} restarts under "
                          f"{_ms(spec.get('min_uptime'))}")
            if spec.get("autorestart") is False:
                limits.append("no autorestart")
            line("limits", ", ".join(limits))
        recent = list(self.board.events.get(row.app, ()))[-8:]
        if recent:
            line("events", "\n".join(reversed(recent)), "dim")
        return lines

    def _show_charts(self) -> None:
        row = self.selected_row()
        ident = row.id if row is not None else -1
        cpu = list(self.board.cpu_history.get(ident, ()))
        memory = list(self.board.memory_history.get(ident, ()))
        self.query_one("#cpu-spark", Sparkline).data = _chart(cpu)
        self.query_one("#mem-spark", Sparkline).data = _chart(memory)
        now_cpu = f"{row.cpu:.1f}%" if row is not None else "-"
        now_mem = render.human_size(row.memory) if row is not None and row.memory else "-"
        self._update("#cpu-label", Text.assemble(
            ("cpu ", "bold"), now_cpu, (f"  max {max(cpu, default=0):.1f}%", "dim")))
        self._update("#mem-label", Text.assemble(
            ("mem ", "bold"), now_mem,
            (f"  max {render.human_size(max(memory, default=0))}", "dim")))

    # ------------------------------------------------------------ logs

    def _title_log(self) -> None:
        log = self.query_one("#log", RichLog)
        log.border_title = Text(f"logs: {self.following} (enter: all apps)" if self.following
                                else "logs: all apps (enter: the selected app)")

    def _log_text(self, line: LogLine) -> Text:
        is_error = line.stream == "error"
        return Text.assemble((f"{line.app}:{line.instance}", self.board.colour(line.app)),
                             (" ! " if is_error else " | ", "red" if is_error else "dim"),
                             render.neutralise(line.text), no_wrap=True)

    def _add_logs(self, lines: deque[LogLine], dropped: int) -> None:
        shown: list[LogLine] = []
        for line in lines:
            self._logs_all.append(line)
            self._logs_by_app.setdefault(line.app, deque(maxlen=MAX_LOG_LINES)).append(line)
            if self.following is None or line.app == self.following:
                shown.append(line)
        log = self.query_one("#log", RichLog)
        skipped = dropped + max(0, len(shown) - MAX_LOG_WRITES)
        texts = [self._log_text(line) for line in shown[-MAX_LOG_WRITES:]]
        if skipped:
            texts.insert(0, Text(f"… {skipped} lines not shown (pmx logs has them all)",
                                 style="dim italic"))
        if texts:
            log.write(Text("\n", no_wrap=True).join(texts))  # one write: far cheaper than N

    def _redraw_log(self) -> None:
        log = self.query_one("#log", RichLog)
        log.clear()
        source = self._logs_all if self.following is None else \
            self._logs_by_app.get(self.following, deque())
        texts = [self._log_text(line) for line in list(source)[-MAX_LOG_WRITES * 2:]]
        if not texts and self.following is not None:
            texts = [Text(f"no lines from {self.following} since monit started; "
                          f"pmx logs {self.following} shows its log files", style="dim italic")]
        if texts:
            log.write(Text("\n", no_wrap=True).join(texts))

    def log_lines(self) -> list[str]:
        """The text the log panel holds (for tests)."""
        return [strip.text for strip in self.query_one("#log", RichLog).lines]

    # ------------------------------------------------------------ filter

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.value = self.filter_text
        self.call_after_refresh(box.focus)  # a widget cannot take focus before it is shown

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._sync_table()
        self._show_header()
        if self.selected_row() is None:
            self._show_details()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        box = self.query_one("#filter", Input)
        box.display = False
        self.query_one("#table").focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.display = False
        self.filter_text = ""
        self.query_one("#table").focus()
        self._sync_table()
        self._show_header()

    # ------------------------------------------------------------ actions

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_restart(self) -> None:
        self._act(Command.RESTART, "restart", "restarted", by_app=False)

    def action_reload(self) -> None:
        self._act(Command.RELOAD, "reload", "reloaded", by_app=True)

    def action_stop(self) -> None:
        self._act(Command.STOP, "stop", "stopped", by_app=False)

    def action_start(self) -> None:
        self._act(Command.START, "start", "started", by_app=False)

    def action_delete(self) -> None:
        row = self.selected_row()
        if row is None:
            self.notify("no instance selected", severity="warning")
            return
        count = sum(1 for r in self.board.rows.values() if r.app == row.app
                    and not r.is_replacement)
        question = f'Delete app "{row.app}" and stop its {count} instance(s)?'

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._act(Command.DELETE, "delete", "deleted", by_app=True, row=row)

        self.push_screen(ConfirmScreen(question), confirmed)

    def _act(self, command: Command, verb: str, done_verb: str, *, by_app: bool,
             row: Row | None = None) -> None:
        row = row or self.selected_row()
        if row is None:
            self.notify("no instance selected", severity="warning")
            return
        if self._actions is None or not self.is_connected:
            self.notify("pmxd is not running", severity="error")
            return
        target = row.app if by_app else str(row.id)
        shown = row.app if by_app else f"{row.label} (id {row.id})"
        timeout = RELOAD_TIMEOUT_S if command is Command.RELOAD else ACTION_TIMEOUT_S
        self.notify(f"{verb} {shown}…", timeout=2, markup=False)

        def done(result: JsonObject | PmxError) -> None:
            if isinstance(result, PmxError):
                outcome = f"{verb} {shown} failed: {result}"
                self.notify(outcome, severity="error", timeout=12, markup=False)
            else:
                reported = result.get("errors")
                errors = [str(e) for e in reported] if isinstance(reported, list) else []
                outcome = f"{done_verb} {shown}" + (f"; {'; '.join(errors)}" if errors else "")
                self.notify(outcome, severity="error" if errors else "information",
                            timeout=12 if errors else 4, markup=False)
                if command is Command.DELETE:
                    self.board.forget_app(row.app, asked_at=time.time() + 1)
                    self._sync_table()
                    self._show_details()
            self.outcomes.append(outcome)
            self.board.dirty.add(row.app)
            if self._refresh_timer is None:
                self._refresh_timer = self.set_timer(REFRESH_DELAY_S, self._refresh_dirty)

        self._actions.submit(lambda c: c.call(command, {"target": target}, timeout_s=timeout),
                             done)


# ---------------------------------------------------------------- entry point


def snapshot(client: Client) -> None:
    rows = _objects(client.call(Command.LIST).get("instances"))
    render.instance_table(rows)


def run(client: Client, *, once: bool) -> int:
    """`pmx monit`: the live monitor, or with once one snapshot of the table."""
    if once:
        snapshot(client)
        return 0
    app = MonitApp(client.home)
    app.run()
    if app.crash_report:
        print(app.crash_report, file=sys.stderr)
        return 1
    return 0
