"""`pmx monit`: headless with Textual's run_test against a real pmxd, one end-to-end run in
a real terminal (tmux), and the `--once` snapshot. The model and the text it is shown as
are tested without a daemon in tests/unit/test_monit_board.py and test_monit_format.py.

Every wait polls with a deadline (pilot.pause in a loop, or wait_until), never a bare sleep.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from tests.conftest import Pmx, app_path, free_port, wait_until

pytest.importorskip("textual")

from pmx.cli.monit import MonitApp
from pmx.cli.monit_widgets import ConfirmScreen
from textual.pilot import Pilot
from textual.widgets import DataTable, Input

T = TypeVar("T")
Scenario = Callable[[MonitApp, Pilot[int]], Awaitable[None]]


def run_monit(pmx: Pmx, scenario: Scenario, *, size: tuple[int, int] = (80, 24)) -> None:
    async def main() -> None:
        app = MonitApp(pmx.home)
        async with app.run_test(size=size, notifications=True) as pilot:
            await scenario(app, pilot)

    asyncio.run(main())


async def until(pilot: Pilot[int], probe: Callable[[], tuple[bool, T]], *, timeout: float,
                what: str) -> T:
    __tracebackhide__ = True
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        ok, seen = probe()
        if ok:
            return seen
        await pilot.pause(0.05)
    pytest.fail(f"{what}: not true after {timeout}s; last saw {seen!r}")


def table_lines(app: MonitApp) -> list[str]:
    """The process table as text, one string per row, in screen order."""
    table = app.query_one("#table", DataTable)
    return ["".join(cell.plain for cell in table.get_row(row.key)).strip()
            for row in table.ordered_rows]


def start_web(pmx: Pmx, instances: int = 2) -> None:
    pmx.run("start", app_path("pid_server.py"), "--name", "web", "--listen",
            f"127.0.0.1:{free_port()}", "-i", str(instances))
    pmx.wait_status("web", "online", count=instances)


async def wait_table(app: MonitApp, pilot: Pilot[int], count: int,
                     status: str = "online") -> list[str]:
    def probe() -> tuple[bool, list[str]]:
        lines = table_lines(app)
        return len(lines) == count and all(f" {status} " in line for line in lines), lines

    return await until(pilot, probe, timeout=15, what=f"{count} rows {status}")


@pytest.mark.timeout(60)
def test_table_shows_every_instance_with_its_status(pmxd: Pmx) -> None:
    start_web(pmxd)
    pids = {str(pid) for pid in pmxd.pids("web")}

    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        lines = await wait_table(app, pilot, 2)
        assert all(line.startswith("web ") for line in lines)
        assert {line.split()[5] for line in lines} == pids  # name id # mode status pid
        assert "cluster" in lines[0]

    run_monit(pmxd, scenario)


@pytest.mark.timeout(60)
def test_r_restarts_the_selected_instance_only(pmxd: Pmx) -> None:
    start_web(pmxd)
    before = {row["instance"]: row["pid"] for row in pmxd.instances("web")}

    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        await wait_table(app, pilot, 2)
        await pilot.press("j")  # the second row: web:1
        await until(pilot, lambda: (app.selected_row() is not None
                                    and app.selected_row().instance == 1,  # type: ignore[union-attr]
                                    app.selected_key), timeout=5, what="web:1 selected")
        await pilot.press("r")

        def restarted() -> tuple[bool, object]:
            rows = {r.instance: r for r in app.board.rows.values()}
            second = rows.get(1)
            ok = (second is not None and second.pid != before[1] and second.status == "online"
                  and second.restarts == 1)
            return ok, (app.outcomes, [(r.pid, r.status, r.restarts) for r in rows.values()])

        await until(pilot, restarted, timeout=20, what="web:1 has a new pid")
        first = next(r for r in app.board.rows.values() if r.instance == 0)
        assert first.pid == before[0] and first.restarts == 0
        await until(pilot, lambda: (any(o.startswith("restarted web:1") for o in app.outcomes),
                                    app.outcomes), timeout=10, what="outcome shown")
        assert str(first.pid) in table_lines(app)[0]

    run_monit(pmxd, scenario)
    assert pmxd.pids("web")[1] != before[1]


@pytest.mark.timeout(60)
def test_slash_filters_rows_by_name_and_escape_clears(pmxd: Pmx) -> None:
    start_web(pmxd)
    pmxd.run("start", app_path("printer.py"), "--name", "printer", "--", "3")
    pmxd.wait_status("printer", "online")

    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        await wait_table(app, pilot, 3)
        await pilot.press("slash")
        await until(pilot, lambda: (app.focused is app.query_one("#filter", Input), app.focused),
                    timeout=5, what="filter box focused")
        await pilot.press("p", "r", "i")  # "r" is typed, it does not restart anything
        lines = await until(pilot, lambda: (len(table_lines(app)) == 1, table_lines(app)),
                            timeout=5, what="filtered to printer")
        assert lines[0].startswith("printer ")
        await pilot.press("enter")
        assert app.focused is app.query_one("#table", DataTable)
        assert len(table_lines(app)) == 1  # enter keeps the filter
        await pilot.press("escape")
        await until(pilot, lambda: (len(table_lines(app)) == 3, table_lines(app)), timeout=5,
                    what="filter cleared")

    run_monit(pmxd, scenario)
    assert all(row["restarts"] == 0 for row in pmxd.list())


@pytest.mark.timeout(60)
def test_log_lines_of_a_new_app_appear_neutralised(pmxd: Pmx) -> None:
    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        await until(pilot, lambda: (app.is_connected, None), timeout=10, what="connected")
        # Started once monit is up: its lines and its row arrive on the stream.
        await asyncio.to_thread(pmxd.run, "start", app_path("printer.py"), "--name", "loud",
                                "--", "3")
        lines = await until(pilot, lambda: (any("done" in line for line in app.log_lines()),
                                            app.log_lines()), timeout=15, what="log lines")
        assert any(line.startswith("loud:0 | line 0 of 3") for line in lines)
        await wait_table(app, pilot, 1)
        # The mode comes from one describe: state events do not carry it.
        await until(pilot, lambda: (" fork " in table_lines(app)[0], table_lines(app)),
                    timeout=10, what="mode known")

    run_monit(pmxd, scenario)


@pytest.mark.timeout(60)
def test_control_characters_in_logs_are_shown_not_sent(pmxd: Pmx) -> None:
    script = pmxd.write("escape.py", "import time\nprint('red \\x1b[31mX\\x1b[0m bell \\x07', "
                                     "flush=True)\ntime.sleep(60)\n")

    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        await until(pilot, lambda: (app.is_connected, None), timeout=10, what="connected")
        await asyncio.to_thread(pmxd.run, "start", str(script), "--name", "esc")
        lines = await until(pilot, lambda: (any("bell" in line for line in app.log_lines()),
                                            app.log_lines()), timeout=15, what="log line")
        line = next(line for line in lines if "bell" in line)
        assert "\\x1b[31mX\\x1b[0m bell \\x07" in line
        assert "\x1b" not in line and "\x07" not in line

    run_monit(pmxd, scenario)


@pytest.mark.timeout(60)
def test_stats_fill_memory_and_the_charts(pmxd: Pmx) -> None:
    start_web(pmxd, instances=1)

    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        await wait_table(app, pilot, 1)
        row = await until(pilot, lambda: (next(iter(app.board.rows.values())).memory > 0,
                                          next(iter(app.board.rows.values()))),
                          timeout=10, what="memory from stats")
        assert "mb" in table_lines(app)[0]
        await until(pilot, lambda: (len(app.board.memory_history.get(row.id, ())) >= 2,
                                    app.board.memory_history.get(row.id)), timeout=10,
                    what="two points of history")

    run_monit(pmxd, scenario)


@pytest.mark.timeout(60)
def test_enter_follows_the_selected_app_and_again_all_apps(pmxd: Pmx) -> None:
    start_web(pmxd, instances=1)

    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        await wait_table(app, pilot, 1)
        await pilot.press("enter")
        assert app.following == "web"
        assert "logs: web" in str(app.query_one("#log").border_title)
        await pilot.press("enter")
        assert app.following is None

    run_monit(pmxd, scenario)


@pytest.mark.timeout(60)
def test_d_asks_before_deleting_the_app(pmxd: Pmx) -> None:
    start_web(pmxd, instances=1)
    pmxd.run("start", app_path("printer.py"), "--name", "printer", "--", "3")

    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        await wait_table(app, pilot, 2)
        await pilot.press("j", "d")  # the row under the cursor at once, typed ahead
        screen = await until(pilot, lambda: (isinstance(app.screen, ConfirmScreen), app.screen),
                             timeout=5, what="confirmation asked")
        assert isinstance(screen, ConfirmScreen) and '"printer"' in screen.question
        await pilot.press("n")
        await until(pilot, lambda: (not isinstance(app.screen, ConfirmScreen), app.screen),
                    timeout=5, what="confirmation closed")
        assert len(table_lines(app)) == 2
        await pilot.press("k", "d", "y")
        lines = await until(pilot, lambda: (len(table_lines(app)) == 1, table_lines(app)),
                            timeout=20, what="web deleted")
        assert lines[0].startswith("printer ")

    run_monit(pmxd, scenario)
    assert [row["name"] for row in pmxd.list()] == ["printer"]


@pytest.mark.timeout(90)
def test_reload_replaces_rows_without_leaving_stale_ones(pmxd: Pmx) -> None:
    eco = pmxd.write("web.toml", f"""
[[apps]]
name = "web"
script = "{app_path('pid_server.py')}"
exec_mode = "cluster"
instances = 2
listen = "127.0.0.1:{free_port()}"
listen_timeout = "300ms"
""")
    pmxd.run("start", str(eco))
    before = set(pmxd.pids("web"))

    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        await wait_table(app, pilot, 2)
        await pilot.press("R")

        def replaced() -> tuple[bool, object]:
            rows = list(app.board.rows.values())
            ok = (len(rows) == 2 and all(r.status == "online" and r.pid not in before
                                         and r.restarts == 1 for r in rows)
                  and len(table_lines(app)) == 2)
            return ok, [(r.key, r.pid, r.status, r.restarts) for r in rows]

        await until(pilot, replaced, timeout=30, what="both instances replaced")
        await until(pilot, lambda: (any(o.startswith("reloaded web") for o in app.outcomes),
                                    app.outcomes), timeout=10, what="outcome shown")

    run_monit(pmxd, scenario)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_banner_when_pmxd_goes_away_and_reconnect_when_it_is_back(pmxd: Pmx) -> None:
    start_web(pmxd, instances=1)

    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        await wait_table(app, pilot, 1)
        await asyncio.to_thread(pmxd.run, "kill")
        banner = app.query_one("#banner")
        text = await until(pilot, lambda: (banner.display, str(banner.render())), timeout=15,
                           what="banner shown")
        assert f"pmxd is not running (home {pmxd.home})" in text
        await asyncio.to_thread(pmxd.start_daemon)
        await asyncio.to_thread(pmxd.run, "start", app_path("printer.py"), "--name", "again",
                                "--", "1")
        await until(pilot, lambda: (not banner.display and app.is_connected, None), timeout=15,
                    what="banner gone")
        lines = await wait_table(app, pilot, 1)
        assert lines[0].startswith("again ")

    run_monit(pmxd, scenario)


@pytest.mark.timeout(30)
def test_without_pmxd_a_banner_says_so_and_a_filter_with_brackets_is_text(pmx: Pmx) -> None:
    async def scenario(app: MonitApp, pilot: Pilot[int]) -> None:
        banner = app.query_one("#banner")
        text = await until(pilot, lambda: (banner.display, str(banner.render())), timeout=10,
                           what="banner shown")
        assert f"pmxd is not running (home {pmx.home})" in text
        await pilot.press("slash")
        await until(pilot, lambda: (app.focused is app.query_one("#filter", Input), app.focused),
                    timeout=5, what="filter box focused")
        await pilot.press("[", "b", "]", "[", "/", "x", "]")  # markup, were it parsed
        await until(pilot, lambda: (app.filter_text == "[b][/x]", app.filter_text), timeout=5,
                    what="filter typed")
        assert "[b][/x]" in str(app.query_one("#header").render())

    run_monit(pmx, scenario)


def test_once_prints_one_snapshot_and_exits(pmxd: Pmx) -> None:
    start_web(pmxd, instances=1)
    result = pmxd.run("monit", "--once")
    assert "web:0" in result.stdout and "online" in result.stdout
    piped = pmxd.run("monit")  # stdout is a pipe here, not a terminal: the same snapshot
    assert "web:0" in piped.stdout


def test_once_without_a_daemon_says_so(pmx: Pmx) -> None:
    result = pmx.run("monit", "--once", check=False)
    assert result.returncode == 3
    assert "pmxd is not running" in result.stderr


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_monit_in_a_real_80x24_terminal(pmxd: Pmx) -> None:
    start_web(pmxd)
    server = f"pmx-test-{os.getpid()}-{time.monotonic_ns()}"  # a private tmux server
    tmux = ["tmux", "-L", server]
    command = (f"env PMX_HOME={pmxd.home} TERM=xterm-256color {sys.executable} -m "
               f"pmx.cli.main monit; echo monit exited $?; sleep 60")
    try:
        subprocess.run([*tmux, "new-session", "-d", "-x", "80", "-y", "24", "-s", "monit",
                        command], check=True, timeout=10, env={**pmxd.env, "TMUX": ""})

        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", "monit"],
                                  capture_output=True, text=True, timeout=10).stdout

        def shows_table() -> tuple[bool, str]:
            text = screen()
            rows = [line for line in text.splitlines() if line.startswith("web ")]
            return len(rows) == 2 and all(" online " in r for r in rows) and "q quit" in text, \
                text

        text = wait_until(shows_table, timeout=30, what="monit shows web online")
        lines = text.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        assert "pmxd is not running" not in text
        subprocess.run([*tmux, "send-keys", "-t", "monit", "q"], check=True, timeout=10)
        text = wait_until(lambda: ("monit exited 0" in (s := screen()), s), timeout=15,
                          what="monit quit on q")
        assert "processes" not in text  # the alternate screen is gone: the terminal is back
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
