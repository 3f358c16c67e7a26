"""`pmx monit`: a live, keyboard-driven terminal monitor fed by pmxd's publish stream.

What it owns: MonitApp, the Textual app that lays out the widgets, routes what the feed
and the requests bring into the model, and turns keys into requests; and `run`, the
command's entry point. The model (rows, history, events, log lines, describe replies) is
`monit_board.Board`, what it looks like as text is in `monit_format`, the widgets are in
`monit_widgets`, and the threads that talk to pmxd are in `monit_feed`. The wire format
is `protocol`'s, and the one-shot snapshot (`--once`, or stdout not a terminal) is
`render.instance_table`.

Data flow: one `list` at start (and after a reconnect) seeds the board; afterwards it
changes only with publications: state events (`event.*`), stats (`stats.`, every second:
cpu and memory per pid) and log lines (`log.*`). A state event carries no
restart count, exec mode or listen address, and nothing is published when an app is
deleted, so an app whose instances started or stopped is refreshed with one `describe`
(coalesced: at most one per app per half second). Nothing polls `list`.

If pmxd goes away a banner says so and the feed retries; when pmxd answers again the
board is seeded anew.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pmx.supervisor.errors import PmxError
from pmx.supervisor.protocol import Command, JsonObject

from . import render
from .client import Client

try:
    from rich.text import Text
    from textual import events
    from textual.app import App, ComposeResult
    from textual.binding import Binding
    from textual.containers import Vertical
    from textual.css.query import NoMatches
    from textual.timer import Timer
    from textual.widgets import DataTable, Footer, Input, Static
except ImportError as exc:  # pragma: no cover - a broken install
    raise PmxError("pmx monit needs textual, a dependency of pmx: pip install textual") from exc

# After the check above: these import textual too.
from .monit_board import Board, LogBuffer, Row, json_objects
from .monit_feed import CallDone, Calls, Describer, Disconnected, Feed, FeedBatch, Seeded
from .monit_format import action_outcome, detail_lines, header_text
from .monit_widgets import (
    ConfirmScreen,
    DetailPanel,
    FilterBox,
    HelpScreen,
    LogPanel,
    ProcessTable,
    StaticText,
)

SELECT_DELAY_S = 0.15
ACTION_TIMEOUT_S = 120.0

F = TypeVar("F", bound=Callable[..., None])


def while_mounted(handler: F) -> F:
    """For timers and messages that can still arrive while the app shuts down, after its
    widgets are gone: there is nothing left to update then."""
    @functools.wraps(handler)
    def run(*args: object, **kwargs: object) -> None:
        try:
            handler(*args, **kwargs)
        except NoMatches:
            pass

    return run  # type: ignore[return-value]
RELOAD_TIMEOUT_S = 600.0
# The layout MonitApp.compose builds, by widget id.
LAYOUT_CSS = """
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


# verb -> (command, past tense, whether it acts on the app rather than the instance)
ACTIONS = {"restart": (Command.RESTART, "restarted", False),
           "reload": (Command.RELOAD, "reloaded", True),
           "stop": (Command.STOP, "stopped", False),
           "start": (Command.START, "started", False),
           "delete": (Command.DELETE, "deleted", True)}


class MonitApp(App[int]):
    """The live monitor. `board` is its model; the widgets show it."""

    TITLE = "pmx monit"
    ENABLE_COMMAND_PALETTE = False
    CSS = LAYOUT_CSS
    BINDINGS = [
        Binding("slash", "filter", "filter"),
        Binding("r", "act('restart')", "restart"),
        Binding("R", "act('reload')", "reload"),
        Binding("s", "act('stop')", "stop"),
        Binding("S", "act('start')", "start"),
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
        self.logs = LogBuffer()
        self.following: str | None = None  # app whose logs are shown; None: all apps
        self.filter_text = ""
        self.selected_key: str | None = None
        self.is_connected = False
        self.outcomes: list[str] = []  # what the actions reported, newest last
        self.crash_report: str | None = None
        self._select_timer: Timer | None = None
        self._feed: Feed | None = None
        self._queries: Calls | None = None
        self._actions: Calls | None = None
        self._describer: Describer | None = None

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield StaticText(id="header")
        yield Static(id="banner")
        with Vertical(id="processes"):
            yield FilterBox(id="filter")
            yield ProcessTable(id="table")
        yield DetailPanel(id="middle")
        yield LogPanel(id="log")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#processes").border_title = "processes"
        self.query_one(DetailPanel).border_title = "details"
        self.query_one(LogPanel).set_following(self.following)
        self.query_one(ProcessTable).focus()
        self._show_header()
        self._show_details()
        self.set_interval(1.0, self._tick)
        self._queries = Calls(self.home, self, "queries")
        self._actions = Calls(self.home, self, "actions")
        self._describer = Describer(self, self.board, self._queries, self._described)
        self._feed = Feed(self.home, self)
        self._feed.start()

    def on_unmount(self) -> None:
        for calls in (self._queries, self._actions):
            if calls is not None:
                calls.close()
        if self._feed is not None:
            self._feed.stop()

    @while_mounted
    def on_resize(self, event: events.Resize) -> None:
        self.query_one(DetailPanel).styles.height = 8 if event.size.height < 34 else 12
        self._sync_table(force=True)

    # ------------------------------------------------------------ feed messages

    @while_mounted
    def on_seeded(self, message: Seeded) -> None:
        reconnect = not self.is_connected and bool(self.board.rows)
        self.board.seed(message.rows, time.time(), reset_history=reconnect)
        self.is_connected = True
        self.query_one("#banner").display = False
        self.query_one(ProcessTable).remove_class("stale")
        self._sync_table()
        self._show_header()
        self._selection_changed()

    @while_mounted
    def on_disconnected(self, message: Disconnected) -> None:
        self.is_connected = False
        self.crash_report = self.crash_report or message.crash
        banner = self.query_one("#banner", Static)
        banner.update(Text(f" {message.why}; waiting for it to come back (q quits)"))
        banner.display = True
        self.query_one(ProcessTable).add_class("stale")
        self._show_header()

    @while_mounted
    def on_feed_batch(self, message: FeedBatch) -> None:
        batch = message.batch
        try:
            selected = self.selected_row()
            before = (selected.status, selected.pid) if selected else None
            touched = self.board.apply_batch(batch)
            if batch.logs:
                self.query_one(LogPanel).add_lines(self.logs.add(batch.logs, self.following),
                                                   batch.dropped_logs, self.board.colour)
            if batch.events or batch.stats:
                self._sync_table()
                self._show_header()
                self._show_charts()
                after = self.selected_row()
                if after is None or after.app in touched or (after.status, after.pid) != before:
                    self._show_details()
            self._refresh_soon()
        finally:
            if self._feed is not None:
                self._feed.consumed.set()

    @while_mounted
    def on_call_done(self, message: CallDone) -> None:
        message.done(message.result)

    @while_mounted
    def _tick(self) -> None:
        self._sync_table()
        self._show_header()

    # ------------------------------------------------------------ describe

    def _refresh_soon(self) -> None:
        if self._describer is not None:
            self._describer.soon()

    @while_mounted
    def _described(self) -> None:
        self._sync_table()
        self._show_details()

    # ------------------------------------------------------------ the table

    def _sync_table(self, *, force: bool = False) -> None:
        table = self.query_one(ProcessTable)
        if not table.show(self.board.matching(self.filter_text), time.time(), force=force):
            return
        if table.rebuilt_key is None:
            self.selected_key = None
            self._show_details()
            self._show_charts()
        elif self.selected_key != table.rebuilt_key:
            self.selected_key = table.rebuilt_key
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
        if row is not None and self.is_connected and self._describer is not None:
            self._describer.describe(str(row.id), whole_app=False, app=row.app)

    def selected_row(self) -> Row | None:
        """The row under the cursor. Read from the table, not from the last RowHighlighted
        message: keys typed quickly ("j j d") run before those messages arrive."""
        return self.board.rows.get(self.query_one(ProcessTable).cursor_key() or "")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        row = self.board.rows.get(key or "")
        if row is None:
            return
        self.following = None if self.following == row.app else row.app
        log = self.query_one(LogPanel)
        log.set_following(self.following)
        log.redraw(self.logs.lines(self.following), self.following, self.board.colour)

    # ------------------------------------------------------------ panels

    def _show_header(self) -> None:
        self.query_one("#header", StaticText).show(header_text(
            self.board, render.home_relative(self.home), is_connected=self.is_connected,
            filter_text=self.filter_text))
        title = "processes" + (f" (filter: {self.filter_text})" if self.filter_text else "")
        self.query_one("#processes").border_title = Text(title)  # Text: never markup

    def _show_details(self) -> None:
        panel = self.query_one(DetailPanel)
        row = self.selected_row()
        if row is not None:
            panel.show_instance(row, detail_lines(
                row, self.board.described.get(row.app, {}),
                self.board.instance_info.get(row.id, {}), self.board.events.get(row.app, ())))
        elif not self.is_connected:
            panel.show_note(Text("waiting for pmxd…", style="dim"))
        elif not self.board.rows:
            panel.show_note(Text.from_markup(
                "[dim]no apps; start one with[/] pmx start ecosystem.toml"))
        else:
            panel.show_note(Text("no instance matches the filter", style="dim"))

    def _show_charts(self) -> None:
        row = self.selected_row()
        ident = row.id if row is not None else -1
        self.query_one(DetailPanel).show_charts(
            row, list(self.board.cpu_history.get(ident, ())),
            list(self.board.memory_history.get(ident, ())))

    def log_lines(self) -> list[str]:
        """The text the log panel holds (for tests)."""
        return self.query_one(LogPanel).texts()

    # ------------------------------------------------------------ filter

    def action_filter(self) -> None:
        self.query_one(FilterBox).open(self.filter_text)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._sync_table()
        self._show_header()
        if self.selected_row() is None:
            self._show_details()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(FilterBox).close(clear=False)
        self.query_one(ProcessTable).focus()

    def action_clear_filter(self) -> None:
        self.query_one(FilterBox).close(clear=True)
        self.filter_text = ""
        self.query_one(ProcessTable).focus()
        self._sync_table()
        self._show_header()

    # ------------------------------------------------------------ actions

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

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
                self.action_act("delete", row)

        self.push_screen(ConfirmScreen(question), confirmed)

    def action_act(self, verb: str, row: Row | None = None) -> None:
        """Send `verb` (a key of ACTIONS) about the selected instance, or its app."""
        command, done_verb, by_app = ACTIONS[verb]
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
            outcome, failed = action_outcome(verb, done_verb, shown, result)
            self.notify(outcome, severity="error" if failed else "information",
                        timeout=12 if failed else 4, markup=False)
            if command is Command.DELETE and not isinstance(result, PmxError):
                self.board.forget_app(row.app, asked_at=time.time() + 1)
                self._sync_table()
                self._show_details()
            self.outcomes.append(outcome)
            self.board.dirty.add(row.app)
            self._refresh_soon()

        self._actions.submit(lambda c: c.call(command, {"target": target}, timeout_s=timeout),
                             done)


# ---------------------------------------------------------------- entry point


def snapshot(client: Client) -> None:
    rows = json_objects(client.call(Command.LIST).get("instances"))
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
