"""watch, ignore_watch, watch_delay, cron_restart: parsing, and the pure logic of watch.py
and cron.py (paths, ignores, next runs, the one-reload-queued rule, the one cron timer)."""

from __future__ import annotations

import asyncio
import datetime
import signal
import time
from pathlib import Path

import pytest
from pmx.supervisor.config import AppSpec, parse_app
from pmx.supervisor.cron import CronSchedule, Reloader, next_run, wants_auto_reload
from pmx.supervisor.errors import ConfigError
from pmx.supervisor.options import Invalid, signal_number
from pmx.supervisor.states import State
from pmx.supervisor.watch import WatchRule, is_ignored, outermost, watch_roots


def app(**keys: object) -> AppSpec:
    return parse_app({"name": "api", "script": "server.py", **keys}, source="eco.toml", index=0,
                     base_dir=Path("/srv/api"))


def error(**keys: object) -> str:
    with pytest.raises(ConfigError) as caught:
        app(**keys)
    return str(caught.value)


# ---------------------------------------------------------------- options


def test_defaults_watch_nothing_and_schedule_nothing() -> None:
    spec = app()
    assert (spec.watch, spec.ignore_watch, spec.watch_delay_s, spec.cron_restart) == (
        False, (), 0.5, None)
    assert watch_roots(spec) == ()


def test_watch_true_is_the_cwd_and_paths_are_relative_to_it() -> None:
    assert watch_roots(app(watch=True)) == ("/srv/api",)
    assert watch_roots(app(watch=True, cwd="web")) == ("/srv/api/web",)
    assert watch_roots(app(watch=["src", "../shared", "/etc/api"])) == (
        "/srv/api/src", "/srv/shared", "/etc/api")
    assert app(watch="src").watch == ("src",)  # PM2 takes one string too
    assert app(watch=[]).watch is False


def test_ignore_watch_and_watch_delay() -> None:
    assert app(ignore_watch="*.log").ignore_watch == ("*.log",)
    assert app(ignore_watch=["tmp", "client/img"]).ignore_watch == ("tmp", "client/img")
    assert app(watch_delay=1000).watch_delay_s == 1.0
    assert app(watch_delay="250ms").watch_delay_s == 0.25


@pytest.mark.parametrize(("keys", "expected"), [
    ({"watch": 3}, 'eco.toml: app "api" (apps[0]): watch must be true, false, a path or a list '
                   "of paths, got 3"),
    ({"watch": ["src", ""]}, "watch must be true, false, a path or a list of paths"),
    ({"ignore_watch": [1]}, 'ignore_watch must be a glob or path like "*.log" or "tmp"'),
    ({"watch_delay": "soon"}, 'watch_delay must be a duration like 1600 (ms) or "5s", '
                              'got "soon"'),
    ({"cron_restart": "61 * * * *"}, 'cron_restart must be a cron expression like "0 3 * * *" '
                                     '(or 6 fields, seconds first), got "61 * * * *"'),
    ({"cron_restart": "every day"}, 'cron_restart must be a cron expression'),
    ({"cron_restart": "0 0 30 2 *"}, 'got "0 0 30 2 *", which never matches a date'),
    ({"cron_restart": 5}, "cron_restart must be a cron expression"),
])
def test_invalid_values_name_the_key(keys: dict[str, object], expected: str) -> None:
    assert expected in error(**keys)


def test_cron_expressions() -> None:
    assert app(cron_restart="0 3 * * *").cron_restart == "0 3 * * *"
    assert app(cron_restart="*/5  *  * * * *").cron_restart == "*/5 * * * * *"
    assert app(cron_restart="@daily").cron_restart == "@daily"
    assert app(cron_restart="0").cron_restart is None  # PM2's way to turn it off
    assert app(cron_restart="").cron_restart is None


def test_settings_survive_the_table_round_trip() -> None:
    """What the CLI sends and `pmx save` writes parses back to the same spec."""
    spec = app(watch=["src"], ignore_watch=["*.log"], watch_delay="2s", cron_restart="0 3 * * *")
    table = spec.to_table()
    assert (table["watch"], table["ignore_watch"], table["watch_delay"], table["cron_restart"]) \
        == (["src"], ["*.log"], 2000, "0 3 * * *")
    assert parse_app(table, source="dump", index=0, base_dir=Path("/")) == spec


def test_signal_numbers() -> None:
    assert signal_number("SIGUSR2") == signal.SIGUSR2
    assert signal_number("usr1") == signal.SIGUSR1
    assert signal_number("12") == 12
    assert signal_number("SIGKILL") == signal.SIGKILL  # pmx signal sends any signal
    for bad in ("SIGNOPE", "0", "999", "-1", ""):
        with pytest.raises(Invalid):
            signal_number(bad)


# ---------------------------------------------------------------- watch rules


def test_ignore_patterns() -> None:
    cwd = "/srv/api"
    assert is_ignored("/srv/api/logs/a.log", cwd, ["*.log"])
    assert is_ignored("/srv/api/tmp/x/y.js", cwd, ["tmp"])
    assert is_ignored("/srv/api/client/img/a.png", cwd, ["client/img"])
    assert is_ignored("/srv/api/client/img/a.png", cwd, ["./client/img/"])
    assert is_ignored("/srv/api/data/a.csv", cwd, ["/srv/api/data"])
    assert not is_ignored("/srv/api/client/app.js", cwd, ["client/img", "*.log", "tmp"])
    assert not is_ignored("/srv/api/tmpfile.js", cwd, ["tmp"])


def test_rule_matches_its_roots_and_never_its_own_logs() -> None:
    rule = WatchRule("api", "/srv/api", ("/srv/api/src", "/srv/api/main.py"), ("*.tmp",),
                     ("/home/u/.pmx", "/srv/api/src/out.log"))
    assert rule.match("/srv/api/src/app.py") == "src/app.py"
    assert rule.match("/srv/api/main.py") == "main.py"
    assert rule.match("/srv/api/other.py") is None  # not under a root
    assert rule.match("/srv/api/src/x.tmp") is None  # ignore_watch
    assert rule.match("/srv/api/src/out.log") is None  # its own log file
    assert rule.match("/srv/api/src/out.log.1") is None  # and the log's rotations
    assert rule.match("/srv/api/src-old/app.py") is None


def test_outermost_folders() -> None:
    assert outermost(["/a/b", "/a", "/c", "/a/b/c", "/ab"]) == ("/a", "/ab", "/c")


# ---------------------------------------------------------------- cron


def local(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()  # naive: local time


def test_next_run_is_in_local_time_with_seconds_first() -> None:
    assert next_run("0 3 * * *", local("2026-11-30 13:00:00")) == local("2026-12-01 03:00:00")
    assert next_run("0 3 * * *", local("2026-11-30 02:59:59")) == local("2026-11-30 03:00:00")
    assert next_run("*/15 * * * * *", local("2026-11-30 13:00:00")) == local("2026-11-30 13:00:15")
    assert next_run("* * * * * *", local("2026-11-30 13:00:00.5")) == local("2026-11-30 13:00:01")
    assert next_run("0 0 30 2 *", time.time()) is None


class FakeApp:
    """What cron.py and the Reloader read of an AppGroup."""

    def __init__(self, name: str, cron: str | None = None, state: State = State.ONLINE) -> None:
        self.name = name
        self.busy: str | None = None
        self.spec = app(cron_restart=cron) if cron else app()
        self.state = state
        self.reason = "started"

    def all_instances(self) -> list[FakeApp]:
        return [self]  # one instance: itself


def test_which_apps_pmxd_reloads_by_itself() -> None:
    def wants(state: State, reason: str = "started") -> bool:
        instance = FakeApp("api", state=state)
        instance.reason = reason
        return wants_auto_reload(instance)  # type: ignore[arg-type]

    assert wants(State.ONLINE) and wants(State.WAITING) and wants(State.STARTING)
    assert wants(State.ERRORED)  # crash-looped: a fixed file brings it back
    assert wants(State.STOPPED, "exited (exit code 0); autorestart is off")  # a cron job
    assert not wants(State.STOPPED, "stopped")  # the user stopped it
    assert not wants(State.STOPPING, "stopped")  # pmx stop or pmx kill under way


def test_reloader_runs_one_reload_and_queues_at_most_one_more() -> None:
    async def scenario() -> list[str]:
        done: list[str] = []
        gate = asyncio.Event()
        api = FakeApp("api")

        async def reload_app(target: object, reason: str) -> None:
            done.append(reason)
            await gate.wait()

        reloader = Reloader(asyncio.get_running_loop(), lambda name: api,
                            reload_app)  # type: ignore[arg-type]
        reloader.request(api, "first")  # type: ignore[arg-type]
        await asyncio.sleep(0)
        for reason in ("second", "third", "fourth"):  # during the first: one more, the last
            reloader.request(api, reason)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        gate.set()
        while reloader.is_pending("api"):
            await asyncio.sleep(0.01)
        await reloader.close()
        return done

    assert asyncio.run(scenario()) == ["first", "fourth"]


def test_reloader_skips_an_app_the_user_stopped() -> None:
    async def scenario() -> list[str]:
        done: list[str] = []
        stopped = FakeApp("api", state=State.STOPPED)

        async def reload_app(target: object, reason: str) -> None:
            done.append(reason)

        reloader = Reloader(asyncio.get_running_loop(), lambda name: stopped,
                            reload_app)  # type: ignore[arg-type]
        reloader.request(stopped, "file changed")  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        await reloader.close()
        return done

    assert asyncio.run(scenario()) == []


def test_one_cron_timer_fires_the_due_apps_at_an_injected_time() -> None:
    now = [local("2026-11-30 02:59:59.9")]
    apps = [FakeApp("nightly", "0 3 * * *"), FakeApp("often", "*/10 * * * * *"), FakeApp("none")]

    async def scenario() -> tuple[dict[str, float], list[str], dict[str, float]]:
        requested: list[str] = []

        class Recorder(Reloader):
            def request(self, target: object, reason: str) -> None:
                requested.append(f"{getattr(target, 'name', '')}: {reason}")

        loop = asyncio.get_running_loop()
        recorder = Recorder(loop, lambda name: None, lambda a, r: asyncio.sleep(0))
        schedule = CronSchedule(loop, lambda: apps, recorder,  # type: ignore[arg-type]
                                clock=lambda: now[0])
        schedule.sync()
        before = schedule.next_runs()
        now[0] = local("2026-11-30 03:00:00")  # the timer wakes within 0.1 s
        while not requested:
            await asyncio.sleep(0.01)
        after = schedule.next_runs()
        schedule.close()
        return before, sorted(requested), after

    before, requested, after = asyncio.run(scenario())
    assert before == {"nightly": local("2026-11-30 03:00:00"),
                      "often": local("2026-11-30 03:00:00")}
    assert requested == ["nightly: cron 0 3 * * *", "often: cron */10 * * * * *"]
    assert after == {"nightly": local("2026-12-01 03:00:00"),
                     "often": local("2026-11-30 03:00:10")}
