"""watch and cron_restart against a real pmxd: a change (or a cron time) reloads the app
with no downtime; a burst gives one reload; ignored paths and pmx's own logs give none;
the watch ends with the app."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.conftest import Pmx, app_path, free_port, pid_cluster_toml, wait_until
from tests.httpload import LoadClient

RELOAD_LINE = re.compile(r"pmx\.supervisor\.commands: (\S+): reload: (.*)$")


def reload_reasons(pmx: Pmx, name: str) -> list[str]:
    """The reasons of the reloads pmxd started by itself for `name`, from its log."""
    lines = (pmx.home / "pmxd.log").read_text().splitlines()
    return [m.group(2) for line in lines if (m := RELOAD_LINE.search(line)) and m.group(1) == name]


def inotify_fds(pmx: Pmx) -> int:
    pid = pmx.daemon_pid()
    assert pid is not None
    fd_dir = Path(f"/proc/{pid}/fd")
    count = 0
    for entry in fd_dir.iterdir():
        try:
            count += os.readlink(entry) == "anon_inode:inotify"
        except OSError:
            continue
    return count


def idle_app(pmx: Pmx, name: str, site: Path, extra: str = "") -> Path:
    return pmx.write(f"{name}.toml", f"""
[[apps]]
name = "{name}"
script = "{app_path('idle.py')}"
cwd = "{site}"
listen_timeout = "200ms"
watch_delay = "300ms"
{extra}
""")


def wait_reasons(pmx: Pmx, name: str, count: int) -> list[str]:
    return wait_until(lambda: (len(r := reload_reasons(pmx, name)) >= count, r), timeout=20,
                      what=f"{count} automatic reloads of {name}")


def wait_replaced(pmx: Pmx, name: str, old: set[int]) -> None:
    wait_until(lambda: (bool(rows := pmx.instances(name)) and all(
        r["status"] == "online" and r["pid"] not in old for r in rows), rows),
        timeout=20, what=f"every instance of {name} replaced")


@pytest.mark.slow
def test_a_change_replaces_every_instance_without_a_failed_request(pmx: Pmx,
                                                                    tmp_path: Path) -> None:
    port = free_port()
    site = tmp_path / "site"
    (site / "src").mkdir(parents=True)
    (site / "src" / "app.py").write_text("version = 1\n")
    delay_s = 0.3
    # Two instances: each replacement costs its start-up (~0.2 s on a busy 2-core CI
    # machine), and the bound is about noticing the change, not about start-up time.
    eco = pmx.write("web.toml", pid_cluster_toml("web", port, instances=2, extra=f"""
cwd = "{site}"
watch = ["src"]
watch_delay = "{int(delay_s * 1000)}ms"
kill_timeout = "5s"
"""))
    pmx.run("start", str(eco))
    rows = pmx.wait_status("web", "online", count=2)
    old = {row["pid"] for row in rows}
    loader = LoadClient("127.0.0.1", port, max_seconds=60)
    loader.start()
    try:
        wait_until(lambda: (loader.result.ok > 5, loader.result.ok), timeout=15,
                   what="load running")
        changed_at = time.time()
        (site / "src" / "app.py").write_text("version = 2\n")
        wait_replaced(pmx, "web", old)
        seen = loader.result.ok
        wait_until(lambda: (loader.result.ok > seen + 5, loader.result.ok), timeout=15,
                   what="load after the reload")
    finally:
        result = loader.stop()
    assert result.failed == 0, result.errors
    described = json.loads(pmx.run("describe", "web", "--json").stdout)[0]
    online_at = max(instance["since"] for instance in described["instances"])
    # Timed with pmxd's own clock (the time each replacement went online), not by polling.
    assert online_at - changed_at <= delay_s + 1.0, online_at - changed_at
    assert reload_reasons(pmx, "web") == ["file changed: src/app.py"]
    assert described["watching"] == [str(site / "src")]


def test_fifty_files_in_a_burst_give_one_reload(pmx: Pmx, tmp_path: Path) -> None:
    pmx.run("start", str(idle_app(pmx, "burst", tmp_path, "watch = true")))
    old = set(pmx.pids("burst"))
    for number in range(50):
        (tmp_path / f"f{number:02d}.txt").write_text(f"{number}\n")
    wait_reasons(pmx, "burst", 1)
    wait_replaced(pmx, "burst", old)
    # One more change, once the burst's reload is over: had the burst given a second
    # reload, it would be logged before this one's.
    (tmp_path / "sentinel.txt").write_text("after\n")
    reasons = wait_reasons(pmx, "burst", 2)
    assert re.fullmatch(r"file changed: f00\.txt \(and \d+ more\)", reasons[0]), reasons
    assert reasons[1:] == ["file changed: sentinel.txt"]


def test_ignored_paths_and_its_own_logs_give_no_reload(pmx: Pmx, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "tmp").mkdir(parents=True)
    ticker = tmp_path / "ticker.py"
    ticker.write_text("import time\nwhile True:\n    print('tick', flush=True)\n"
                      "    time.sleep(0.05)\n")
    eco = pmx.write("ign.toml", f"""
[[apps]]
name = "ign"
script = "{ticker}"
cwd = "{site}"
watch = true
watch_delay = "300ms"
ignore_watch = ["tmp", "*.csv"]
out_file = "out.log"
listen_timeout = "200ms"
""")
    pmx.run("start", str(eco))
    wait_until(lambda: ((site / "out.log").exists() and (site / "out.log").stat().st_size > 50,
                        None), timeout=10, what="the app logging into its watched folder")
    (site / "tmp" / "cache.bin").write_text("x")
    (site / "data.csv").write_text("a,b\n")
    (site / "sentinel.txt").write_text("y")
    assert wait_reasons(pmx, "ign", 1) == ["file changed: sentinel.txt"]
    pmx.wait_status("ign", "online")
    (site / "again.txt").write_text("z")  # after everything above: nothing came between
    assert wait_reasons(pmx, "ign", 2) == ["file changed: sentinel.txt", "file changed: again.txt"]


def test_the_watch_follows_the_app_stop_start_reload_delete(pmx: Pmx, tmp_path: Path) -> None:
    eco = idle_app(pmx, "follow", tmp_path)
    pmx.run("start", str(eco))
    assert inotify_fds(pmx) == 0  # watch = false: no watch thread at all
    eco.write_text(eco.read_text() + "watch = true\n")
    pmx.run("reload", str(eco))  # new settings: the watch starts
    wait_until(lambda: (inotify_fds(pmx) == 1, inotify_fds(pmx)), timeout=10,
               what="watching after reload with watch = true")
    pmx.run("stop", "follow")
    wait_until(lambda: (inotify_fds(pmx) == 0, inotify_fds(pmx)), timeout=10,
               what="no watch once stopped")
    pmx.run("start", "follow")
    wait_until(lambda: (inotify_fds(pmx) == 1, inotify_fds(pmx)), timeout=10,
               what="watching again once started")
    old = set(pmx.pids("follow"))
    (tmp_path / "x.txt").write_text("x")
    assert wait_reasons(pmx, "follow", 1) == ["file changed: x.txt"]
    wait_replaced(pmx, "follow", old)  # meanwhile, a delete is refused as busy
    pmx.run("delete", "follow")
    wait_until(lambda: (inotify_fds(pmx) == 0, inotify_fds(pmx)), timeout=10,
               what="no watch once deleted")


def test_a_cron_of_every_second_reloads_and_describe_shows_the_next_run(
        pmx: Pmx, tmp_path: Path) -> None:
    pmx.run("start", str(idle_app(pmx, "ticking", tmp_path, 'cron_restart = "* * * * * *"')))
    reasons = wait_reasons(pmx, "ticking", 2)
    assert set(reasons) == {"cron * * * * * *"}
    described = json.loads(pmx.run("describe", "ticking", "--json").stdout)[0]
    assert described["spec"]["cron_restart"] == "* * * * * *"
    assert time.time() - 1 <= described["cron_next_run"] <= time.time() + 2
    shown = pmx.run("describe", "ticking").stdout
    assert re.search(r"cron next run\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", shown), shown
    assert any(r["restarts"] >= 2 for r in pmx.instances("ticking"))


def test_an_invalid_cron_expression_is_a_config_error_naming_the_key(pmx: Pmx,
                                                                     tmp_path: Path) -> None:
    eco = idle_app(pmx, "badcron", tmp_path, 'cron_restart = "0 25 * * *"')
    result = pmx.run("start", str(eco), check=False)
    assert result.returncode == 2
    assert re.match(r'pmx: .*badcron\.toml: app "badcron" \(apps\[0\]\): cron_restart must be '
                    r'a cron expression', result.stderr), result.stderr
    assert pmx.daemon_pid() is None  # refused before any daemon started


def test_stop_goes_before_a_reload_of_files_that_keep_changing(pmx: Pmx, tmp_path: Path) -> None:
    """A watched folder that changes more often than a reload takes must not make the
    app impossible to stop: the user's command cancels the automatic reload."""
    import threading

    site = tmp_path / "busy"
    site.mkdir()
    # Each reload takes listen_timeout (2 s); the folder changes every 0.5 s.
    eco = pmx.write("busy.toml", f"""
[[apps]]
name = "busy"
script = "{app_path('idle.py')}"
cwd = "{site}"
listen_timeout = "2s"
watch_delay = "200ms"
watch = true
""")
    pmx.run("start", str(eco))
    pmx.wait_status("busy", "online")
    stop_writing = threading.Event()

    def keep_writing() -> None:
        number = 0
        while not stop_writing.wait(0.5):
            number += 1
            (site / f"f{number % 5}.txt").write_text(str(number))

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        wait_reasons(pmx, "busy", 1)  # a reload is running or queued
        result = pmx.run("stop", "busy", check=False)
        assert result.returncode == 0, result.stderr
        pmx.wait_status("busy", "stopped")
    finally:
        stop_writing.set()
        writer.join(timeout=5)
    assert all(row["status"] == "stopped" for row in pmx.instances("busy"))
