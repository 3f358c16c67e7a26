"""What a PM2 user types every day works: reset, sendSignal/signal, start --watch, --cron,
--no-autorestart, -i max, logs --json/--timestamp, show/info, jlist/prettylist."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tests.conftest import Pmx, app_path, wait_until

SIGNAL_APP = """
import os, signal, sys, time
def said(number, frame):
    print(f"got {signal.Signals(number).name}", flush=True)
signal.signal(signal.SIGUSR2, said)
print(f"ready {os.getpid()}", flush=True)
while True:
    time.sleep(1)
"""


def logs(pmx: Pmx, name: str, *extra: str) -> str:
    return pmx.run("logs", name, "--nostream", "--lines", "50", *extra).stdout


def test_reset_sets_the_restart_counters_to_zero(pmx: Pmx) -> None:
    pmx.run("start", app_path("idle.py"), "--name", "counted")
    pmx.run("restart", "counted")
    pmx.run("restart", "counted")
    assert pmx.instances("counted")[0]["restarts"] == 2
    result = pmx.run("reset", "counted")
    assert result.stdout.strip() == "[pmx] reset: counted"
    assert pmx.instances("counted")[0]["restarts"] == 0
    assert pmx.run("reset", "all").returncode == 0
    missing = pmx.run("reset", "nope", check=False)
    assert (missing.returncode, missing.stderr) == (2, 'pmx: no app or instance id "nope"\n')


def test_send_signal_as_pm2_spells_it(pmx: Pmx, tmp_path: Path) -> None:
    script = tmp_path / "sig.py"
    script.write_text(SIGNAL_APP)
    pmx.run("start", str(script), "--name", "sig")
    wait_until(lambda: ("ready" in (out := logs(pmx, "sig")), out), timeout=10,
               what="the app ready")
    result = pmx.run("sendSignal", "SIGUSR2", "sig")
    assert result.stdout.strip() == "[pmx] sent SIGUSR2 to: sig"
    wait_until(lambda: ("got SIGUSR2" in (out := logs(pmx, "sig")), out), timeout=10,
               what="the app got SIGUSR2")
    pmx.run("signal", "usr2", "sig")  # pmx's spelling; a name without SIG, or a number
    pmx.run("signal", "12", "sig")
    wait_until(lambda: ((out := logs(pmx, "sig")).count("got SIGUSR2") == 3, out), timeout=10,
               what="three SIGUSR2")
    assert pmx.instances("sig")[0]["restarts"] == 0  # handled: nothing restarted

    unknown = pmx.run("signal", "SIGNOPE", "sig", check=False)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith('pmx: unknown signal "SIGNOPE": expected a signal name')
    pmx.run("stop", "sig")
    idle = pmx.run("signal", "SIGUSR2", "sig", check=False)
    assert (idle.returncode, idle.stderr) == (1, "pmx: nothing of sig runs: no signal sent\n")


def test_start_options_of_pm2(pmx: Pmx, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("print('job done', flush=True)\n")
    pmx.run("start", str(script), "--watch", "--ignore-watch", "tmp *.log",
            "--cron", "0 3 * * *", "--no-autorestart", "--watch-delay", "1s", cwd=tmp_path)
    described = json.loads(pmx.run("describe", "job", "--json").stdout)[0]
    spec = described["spec"]
    assert (spec["watch"], spec["ignore_watch"], spec["cron_restart"], spec["autorestart"],
            spec["watch_delay"]) == (True, ["tmp", "*.log"], "0 3 * * *", False, 1000)
    assert described["watching"] == [str(tmp_path)]
    pmx.wait_status("job", "stopped")  # ran once; waits for 3 a.m., not restarted
    assert "autorestart is off" in pmx.instances("job")[0]["reason"]

    bad = pmx.run("start", str(script), "--name", "bad", "--cron-restart", "61 * * * *",
                  check=False)
    assert bad.returncode == 2
    assert re.match(r'pmx: command line: app "bad" \(apps\[0\]\): cron_restart must be a cron '
                    r'expression', bad.stderr), bad.stderr


def test_start_watch_then_edit_reloads(pmx: Pmx, tmp_path: Path) -> None:
    """pm2 start app.js --watch, then save the file: pmx reloads it."""
    script = tmp_path / "app.py"
    script.write_text(f"exec(open({app_path('idle.py')!r}).read())\n")
    pmx.run("start", "app.py", "--watch", "--watch-delay", "200ms", cwd=tmp_path)
    old = set(pmx.pids("app"))
    script.write_text(script.read_text() + "# edited\n")
    wait_until(lambda: (bool(rows := pmx.instances("app")) and rows[0]["pid"] not in old
                        and rows[0]["status"] == "online", rows), timeout=20,
               what="app reloaded after the edit")


def test_instances_max_is_every_cpu_we_may_use(pmx: Pmx) -> None:
    pmx.run("start", app_path("idle.py"), "--name", "wide", "-i", "max")
    assert len(pmx.instances("wide")) == len(os.sched_getaffinity(0))


def test_logs_as_json_and_with_timestamps(pmx: Pmx) -> None:
    pmx.run("start", app_path("idle.py"), "--name", "talk")
    wait_until(lambda: ("idle pid" in (out := logs(pmx, "talk")), out), timeout=10,
               what="a line logged")
    lines = logs(pmx, "talk", "--json").splitlines()
    objects = [json.loads(line) for line in lines]
    assert {"app": "talk", "instance": 0, "stream": "out", "time": None} \
        .items() <= objects[0].items()
    assert objects[0]["message"].startswith("idle pid ")
    assert pmx.run("logs", "talk", "--nostream", "--timestamp").returncode == 0
    assert pmx.run("logs", "--timestamp", "talk", "--nostream").returncode == 0  # not a format


def test_pm2_listing_and_describe_names(pmx: Pmx) -> None:
    pmx.run("start", app_path("idle.py"), "--name", "seen")
    compact = pmx.run("jlist").stdout
    assert compact.count("\n") == 1 and json.loads(compact)[0]["name"] == "seen"
    assert json.loads(pmx.run("prettylist").stdout)[0]["name"] == "seen"
    for verb in ("show", "info"):
        assert json.loads(pmx.run(verb, "seen", "--json").stdout)[0]["name"] == "seen"
        assert "kill_timeout" in pmx.run(verb, "seen").stdout


def test_start_options_apply_to_every_app_of_a_file(pmx: Pmx, tmp_path: Path) -> None:
    """pm2 start ecosystem.config.js --watch watches every app of the file."""
    eco = pmx.write("two.toml", "".join(f"""
[[apps]]
name = "{name}"
script = "{app_path('idle.py')}"
cwd = "{tmp_path}"
""" for name in ("one", "two")))
    pmx.run("start", str(eco), "--watch", "--cron", "*/30 * * * *")
    for app in json.loads(pmx.run("describe", "all", "--json").stdout):
        assert (app["spec"]["watch"], app["spec"]["cron_restart"]) == (True, "*/30 * * * *")
        assert app["watching"] == [str(tmp_path)]
