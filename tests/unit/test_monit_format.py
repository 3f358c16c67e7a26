"""What `pmx monit` writes on screen (cli/monit_format.py), and the size and duration
formatters it shares with `pmx list` (cli/render.py), without a terminal or a daemon."""

from __future__ import annotations

import pytest
from pmx.cli import render
from pmx.cli.monit_board import HISTORY_POINTS, Board, LogLine, Row
from pmx.cli.monit_format import (
    COLUMNS,
    FIXED_WIDTHS,
    action_outcome,
    cell,
    chart,
    column_cell,
    column_widths,
    cpu_style,
    detail_lines,
    header_text,
    limits_text,
    log_text,
    row_texts,
)
from pmx.supervisor.errors import CommandError
from pmx.supervisor.protocol import JsonObject


def make_row(**changes: object) -> Row:
    row = Row(id=3, app="api", instance=1, status="online", pid=4242, reason="started",
              since=0.0, started=100.0, exec_mode="cluster", restarts=2, cpu=12.34,
              memory=31457280, listen=("127.0.0.1:8000",))
    for key, value in changes.items():
        setattr(row, key, value)
    return row


# ---------------------------------------------------------------- render's formatters


@pytest.mark.parametrize(("size", "shown"), [
    (0, "0b"), (None, "0b"), (-5, "0b"), ("12", "0b"), (512, "512b"), (2048, "2.0kb"),
    (31457280, "30.0mb"), (3 * 1024**3 // 2, "1.5gb"),
])
def test_human_size(size: object, shown: str) -> None:
    assert render.human_size(size) == shown


@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0s"), (None, "0s"), (-1, "0s"), (59.9, "59s"), (61, "1m"), (7200, "2h"),
    (3 * 86400 + 5, "3d"),
])
def test_human_duration_shows_the_largest_whole_unit(seconds: object, shown: str) -> None:
    assert render.human_duration(seconds) == shown


@pytest.mark.parametrize(("seconds", "shown"), [
    (1.6, "1.6s"), (60.0, "60s"), (0.5, "0.5s"), (0, "0s"), (None, "0s"),
])
def test_human_duration_exact_shows_seconds_as_they_are(seconds: object, shown: str) -> None:
    assert render.human_duration(seconds, exact=True) == shown


def test_home_relative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/u")
    assert render.home_relative("/home/u/apps/x.py") == "~/apps/x.py"
    assert render.home_relative("/home/user2/x.py") == "/home/user2/x.py"  # not a prefix
    assert render.home_relative("/srv/x.py") == "/srv/x.py"


# ---------------------------------------------------------------- the table


def test_cell_pads_justifies_and_cuts_with_an_ellipsis() -> None:
    assert cell("ab", 4, first=True).plain == "ab  "
    assert cell("ab", 4).plain == " ab  "  # the column gap first
    assert cell("ab", 4, right=True).plain == "   ab"
    assert cell("abcdef", 4, first=True).plain == "abc…"
    assert cell("x", 2, style="bold").style == "bold"


def test_column_cell_justifies_as_its_column_does() -> None:
    widths = {column: 6 for column in COLUMNS}
    assert column_cell(0, "web", widths).plain == "web   "
    assert column_cell(COLUMNS.index("pid"), "42", widths).plain == "     42"
    assert column_cell(COLUMNS.index("mode"), "fork", widths).plain == " fork  "


def test_cpu_style() -> None:
    assert (cpu_style(10), cpu_style(50), cpu_style(95)) == ("", "yellow", "bold red")


def test_row_texts_of_a_running_instance() -> None:
    texts = dict(zip(COLUMNS, row_texts(make_row(), now=160.0), strict=True))
    assert texts["name"] == ("api", "")
    assert texts["status"] == ("online", "green")
    assert texts["pid"] == ("4242", "")
    assert texts["cpu"] == ("12.3%", "")
    assert texts["mem"] == ("30.0mb", "")
    assert texts["↺"] == ("2", "yellow")
    assert texts["uptime"] == ("1m", "")


def test_row_texts_of_a_stopped_instance_and_of_a_replacement() -> None:
    stopped = dict(zip(COLUMNS, row_texts(make_row(status="errored", cpu=0.0, restarts=0),
                                          now=160.0), strict=True))
    assert stopped["status"] == ("errored", "bold red")
    assert (stopped["pid"], stopped["mem"], stopped["uptime"]) == (("-", ""), ("-", "dim"),
                                                                   ("-", ""))
    assert stopped["cpu"] == ("0.0%", "dim")
    busy = row_texts(make_row(is_replacement=True, cpu=250.0), now=160.0)
    assert busy[0][0] == "api (new)"
    assert busy[COLUMNS.index("cpu")] == ("250%", "bold red")


def test_column_widths_give_the_name_what_is_left() -> None:
    rows = [make_row(id=12345, app="a-rather-long-app-name")]
    widths = column_widths(rows, total=200)
    assert widths["id"] == 5 and widths["#"] == 1
    assert widths["name"] == len("a-rather-long-app-name")
    narrow = column_widths(rows, total=40)
    assert narrow["name"] == 8  # never narrower than 8
    assert column_widths([], total=80) == {**FIXED_WIDTHS, "id": 2, "#": 1, "name": 8}


def test_header_text() -> None:
    board = Board()
    board.seed([{"name": "api", "id": 0, "instance": 0, "pid": 1, "status": "online",
                 "uptime": 1.0, "memory": 2048},
                {"name": "api", "id": 1, "instance": 1, "pid": None, "status": "stopped"}],
               now=10.0, reset_history=True)
    text = header_text(board, "~/.pmx", is_connected=True, filter_text="a[b]").plain
    assert text.startswith(" pmx monit  ~/.pmx ")
    assert "1 apps  1/2 online" in text and "mem 2.0kb" in text and "filter: a[b]" in text
    assert "disconnected" in header_text(board, "~/.pmx", is_connected=False,
                                         filter_text="").plain


def test_chart_is_a_fixed_window_starting_at_zero() -> None:
    data = chart([5.0, 6.0])
    assert len(data) == HISTORY_POINTS + 1 and data[0] == 0.0 and data[-2:] == [5.0, 6.0]


# ---------------------------------------------------------------- details, logs, outcomes


def test_detail_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/u")
    app: JsonObject = {"spec": {"cwd": "/home/u/srv", "script": "/home/u/srv/bin/api.py",
                                "kill_timeout": 1600, "max_restarts": 16, "min_uptime": 1000,
                                "max_memory_restart": 200 * 1024**2, "autorestart": False},
                       "listen": ["127.0.0.1:8000"]}
    info: JsonObject = {"last_exit": "exit code 1", "status_text": "warming \x1b[31mup",
                        "command": ["/usr/bin/python3", "bin/api.py"]}
    lines = {key: (value, style) for key, value, style in detail_lines(
        make_row(), app, info, [f"event {n}" for n in range(10)])}
    assert lines["status"][1] == "green"
    assert lines["last exit"][0] == "exit code 1"
    assert lines["app says"][0] == "warming \\x1b[31mup"  # neutralised
    assert lines["script"][0] == "bin/api.py"  # relative to cwd
    assert lines["command"][0] == "python3 bin/api.py"
    assert lines["cwd"][0] == "~/srv"
    assert lines["listen"][0] == "127.0.0.1:8000"
    assert lines["limits"][0] == ("memory 200.0mb, kill after 1.6s, gives up after 16 restarts "
                                  "under 1s, no autorestart")
    assert lines["events"] == ("\n".join(f"event {n}" for n in range(9, 1, -1)), "dim")


def test_detail_lines_before_the_first_describe() -> None:
    lines = detail_lines(make_row(), {}, {}, [])
    assert [key for key, _, _ in lines] == ["status", "listen"]  # listen from the row


def test_limits_text_without_a_memory_limit() -> None:
    assert limits_text({"kill_timeout": 60000, "max_restarts": 3, "min_uptime": 500}) == \
        "kill after 60s, gives up after 3 restarts under 0.5s"


def test_log_text_marks_stderr_and_neutralises() -> None:
    out = log_text(LogLine("api", 1, "out", "hello"), "cyan")
    assert out.plain == "api:1 | hello"
    error = log_text(LogLine("api", 1, "error", "bad \x07"), "cyan")
    assert error.plain == "api:1 ! bad \\x07"


def test_action_outcome() -> None:
    assert action_outcome("restart", "restarted", "api:0 (id 0)", {"restarted": [0]}) == \
        ("restarted api:0 (id 0)", False)
    assert action_outcome("stop", "stopped", "api", {"errors": ["api:1: gone"]}) == \
        ("stopped api; api:1: gone", True)
    assert action_outcome("reload", "reloaded", "api", CommandError("busy", "api is busy")) == \
        ("reload api failed: api is busy", True)
