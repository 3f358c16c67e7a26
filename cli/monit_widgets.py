"""The widgets of `pmx monit`: the process table, the detail panel (details and charts),
the log panel, and the help and confirmation screens.

They place the text cli/monit_format.py makes and keep only what they need to redraw
cheaply (the cells on screen); MonitApp (cli/monit.py) decides what they show and when.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.table import Table
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, RichLog, Sparkline, Static

from . import render
from .monit_board import MAX_LOG_LINES, MAX_LOG_WRITES, LogLine, Row
from .monit_format import COLUMNS, chart, column_cell, column_widths, log_text, row_texts

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


class StaticText(Static):
    """A Static that is updated only when what it shows changed: an update lays the
    screen out again, and most batches change nothing in most panels."""

    def __init__(self, *, id: str) -> None:
        super().__init__(id=id)
        self.shown: object = None  # the key of what it shows

    def show(self, content: Text | Table, key: object = None) -> None:
        """Show `content` unless `key` (by default the content itself) is already shown."""
        key = content if key is None else key
        if self.shown != key:
            self.shown = key
            self.update(content)


class FilterBox(Input):
    """The filter line above the table, shown while a filter is typed."""

    def __init__(self, *, id: str) -> None:
        super().__init__(placeholder="filter by name; enter keeps it, esc clears", id=id)

    def open(self, text: str) -> None:
        self.display = True
        self.value = text
        self.app.call_after_refresh(self.focus)  # a widget cannot take focus before it is shown

    def close(self, *, clear: bool) -> None:
        if clear:
            self.value = ""
        self.display = False


class ProcessTable(DataTable[Text]):
    """One row per instance, one cell per column of monit_format.COLUMNS."""

    BINDINGS = [
        Binding("enter", "select_cursor", "logs"),
        Binding("j", "cursor_down", show=False),
        Binding("k", "cursor_up", show=False),
    ]

    def __init__(self, *, id: str) -> None:
        super().__init__(id=id, cursor_type="row", cell_padding=0)
        self.shown_keys: list[str] = []
        self.rebuilt_key: str | None = None  # the row under the cursor after a rebuild
        self._shown_cells: dict[str, tuple[tuple[str, str], ...]] = {}
        self._shown_widths: dict[str, int] = {}

    def show(self, rows: list[Row], now: float, *, force: bool = False) -> bool:
        """Show `rows`: the cells that changed are updated in place; other rows or other
        column widths rebuild the table (force: in any case). True when rebuilt."""
        widths = column_widths(rows, max(40, self.size.width or self.app.size.width))
        if force or [row.key for row in rows] != self.shown_keys or widths != self._shown_widths:
            self._rebuild(rows, widths, now)
            return True
        for row in rows:
            texts = row_texts(row, now)
            old = self._shown_cells.get(row.key)
            if texts == old:
                continue
            for index, column in enumerate(COLUMNS):
                if old is None or old[index] != texts[index]:
                    text, style = texts[index]
                    self.update_cell(row.key, column, column_cell(index, text, widths, style))
            self._shown_cells[row.key] = texts
        return False

    def _rebuild(self, rows: list[Row], widths: dict[str, int], now: float) -> None:
        """Draw every row anew, keeping the cursor on the same instance (or on the
        replacement that became it), else at the same place; sets rebuilt_key."""
        selected = self.cursor_key()
        old_index = self.cursor_row
        self.clear(columns=True)
        for index, column in enumerate(COLUMNS):
            self.add_column(column_cell(index, column, widths, "bold"),
                            width=widths[column] + (index > 0), key=column)
        self._shown_cells.clear()
        for row in rows:
            texts = row_texts(row, now)
            self._shown_cells[row.key] = texts
            self.add_row(*(column_cell(index, text, widths, style)
                           for index, (text, style) in enumerate(texts)), key=row.key)
        self.shown_keys = [row.key for row in rows]
        self._shown_widths = widths
        self.rebuilt_key = None
        if not rows:
            return
        if selected in self.shown_keys:
            index = self.shown_keys.index(selected)
        elif selected is not None and selected.endswith("+") and selected[:-1] in self.shown_keys:
            index = self.shown_keys.index(selected[:-1])  # the replacement became the instance
        else:
            index = min(max(old_index, 0), len(rows) - 1)
        self.move_cursor(row=index, animate=False)
        self.rebuilt_key = self.shown_keys[index]

    def cursor_key(self) -> str | None:
        """The key of the row under the cursor; None when there is none."""
        if not self.row_count or not self.is_valid_coordinate(self.cursor_coordinate):
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value


class DetailPanel(Horizontal):
    """The selected instance: its details on the left, CPU and memory charts on the right."""

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="details", can_focus=False):
            yield StaticText(id="detail-text")
        with Vertical(id="charts"):
            yield StaticText(id="cpu-label")
            yield Sparkline([], id="cpu-spark", summary_function=max)
            yield StaticText(id="mem-label")
            yield Sparkline([], id="mem-spark", summary_function=max)

    def show_note(self, note: Text) -> None:
        """No instance to show: say why."""
        self.query_one("#detail-text", StaticText).show(note)
        self.border_title = "details"

    def show_instance(self, row: Row, lines: list[tuple[str, str, str]]) -> None:
        """`lines` (key, value, style) from monit_format.detail_lines, as a grid."""
        self.border_title = Text(f"{row.label} (id {row.id})")
        text = self.query_one("#detail-text", StaticText)
        if text.shown == lines:
            return
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        for key, value, style in lines:
            grid.add_row(key, Text(value, style=style))
        text.show(grid, key=lines)

    def show_charts(self, row: Row | None, cpu: list[float], memory: list[float]) -> None:
        """The history of `row` (none: empty charts), its latest values and maxima."""
        self.query_one("#cpu-spark", Sparkline).data = chart(cpu)
        self.query_one("#mem-spark", Sparkline).data = chart(memory)
        now_cpu = f"{row.cpu:.1f}%" if row is not None else "-"
        now_mem = render.human_size(row.memory) if row is not None and row.memory else "-"
        self.query_one("#cpu-label", StaticText).show(Text.assemble(
            ("cpu ", "bold"), now_cpu, (f"  max {max(cpu, default=0):.1f}%", "dim")))
        self.query_one("#mem-label", StaticText).show(Text.assemble(
            ("mem ", "bold"), now_mem,
            (f"  max {render.human_size(max(memory, default=0))}", "dim")))


class LogPanel(RichLog):
    """The log lines of every app, or of the one followed, each prefixed app:instance."""

    can_focus = False

    def __init__(self, *, id: str) -> None:
        super().__init__(id=id, max_lines=MAX_LOG_LINES, min_width=20, wrap=False,
                         markup=False, highlight=False)

    def set_following(self, following: str | None) -> None:
        self.border_title = Text(f"logs: {following} (enter: all apps)" if following
                                 else "logs: all apps (enter: the selected app)")

    def add_lines(self, lines: list[LogLine], dropped: int, colour: Callable[[str], str]) -> None:
        """Append the last MAX_LOG_WRITES of `lines`, after a note of how many were not."""
        skipped = dropped + max(0, len(lines) - MAX_LOG_WRITES)
        texts = [log_text(line, colour(line.app)) for line in lines[-MAX_LOG_WRITES:]]
        if skipped:
            texts.insert(0, Text(f"… {skipped} lines not shown (pmx logs has them all)",
                                 style="dim italic"))
        self._write(texts)

    def redraw(self, lines: list[LogLine], following: str | None,
               colour: Callable[[str], str]) -> None:
        """Show only the last of `lines` (those kept of `following`)."""
        self.clear()
        texts = [log_text(line, colour(line.app)) for line in lines[-MAX_LOG_WRITES * 2:]]
        if not texts and following is not None:
            texts = [Text(f"no lines from {following} since monit started; "
                          f"pmx logs {following} shows its log files", style="dim italic")]
        self._write(texts)

    def _write(self, texts: list[Text]) -> None:
        if texts:
            self.write(Text("\n", no_wrap=True).join(texts))  # one write: far cheaper than N

    def texts(self) -> list[str]:
        """The text the panel holds."""
        return [strip.text for strip in self.lines]
