"""PM2's files started as they are: `pmx start ecosystem.config.js` (and .mjs, .yml, a
Procfile) against a real pmxd, with what was dropped or changed said on stderr.

The files are the corpus in tests/configs/pm2/; their apps are tests/apps programs.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from pmx.supervisor.options import cpu_count

from tests.conftest import Pmx, app_path, free_port, wait_until
from tests.httpload import get_pid

CORPUS = Path(__file__).resolve().parent.parent / "configs" / "pm2"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("python3") is None,
                                reason="needs node and python3")


def answers(port: int) -> tuple[bool, int | None]:
    try:
        return True, get_pid(port)
    except OSError:
        return False, None


def log_lines(pmx: Pmx, name: str) -> list[str]:
    path = pmx.home / "logs" / f"{name}-out-0.log"
    return path.read_text().splitlines() if path.exists() else []


def test_start_ecosystem_config_js_with_env_production(pmx: Pmx) -> None:
    port = free_port()
    pmx.env["WEB_PORT"] = str(port)  # the JS file reads process.env, as real ones do
    config = str(CORPUS / "ecosystem.config.js")
    started = pmx.run("start", config, "--env", "production")
    assert f'[pmx] {config}: stop_signal added: "SIGINT" for each app' in started.stderr
    web = pmx.wait_status("web", "online", count=cpu_count())
    assert {row["exec_mode"] for row in web} == {"cluster"}
    pmx.wait_status("queue", "online", count=1)
    wait_until(lambda: answers(port), timeout=20, what=f"web answering on {port}")
    env = pmx.run("env", "web").stdout.splitlines()
    assert "NODE_ENV=production" in env and f"PORT={port}" in env
    # PM2's day.js log_date_format, applied to each line the app prints
    line = wait_until(lambda: (bool(log_lines(pmx, "queue")), log_lines(pmx, "queue")),
                      timeout=10, what="queue's first log line")[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d\d:\d\d: idle pid \d+", line), line

    before = set(pmx.pids("web"))
    reloaded = pmx.run("reload", config, "--env", "production")
    assert "[pmx] reloaded: " in reloaded.stdout
    after = pmx.wait_status("web", "online", count=cpu_count())
    assert before.isdisjoint(row["pid"] for row in after)


def test_start_esm_config_runs_node_apps_in_cluster_mode(pmx: Pmx) -> None:
    port = free_port()
    pmx.env["PORT"] = str(port)  # node_hello.js listens on process.env.PORT
    pmx.run("start", str(CORPUS / "esm.config.mjs"))
    rows = pmx.wait_status("esm-web", "online", count=2)
    assert {row["exec_mode"] for row in rows} == {"cluster"}  # instances without exec_mode, as PM2
    pmx.wait_status("esm-worker", "online", count=1)
    wait_until(lambda: answers(port), timeout=20, what=f"esm-web answering on {port}")


def test_start_yml(pmx: Pmx) -> None:
    port = free_port()
    pmx.env["PORT"] = str(port)
    started = pmx.run("start", str(CORPUS / "process.yml"))
    notes = [line for line in started.stderr.splitlines() if "process.yml: " in line]
    assert notes and all(line.startswith(f"[pmx] {CORPUS / 'process.yml'}: ") for line in notes)
    pmx.wait_status("api", "online", count=2)
    pmx.wait_status("worker", "online", count=1)
    wait_until(lambda: answers(port), timeout=20, what=f"api answering on {port}")


def test_start_procfile(pmx: Pmx) -> None:
    procfile = pmx.write("Procfile", (
        f"worker: python3 {app_path('idle.py')} --queue default\n"
        f'shell: echo "shell on $PORT" && exec python3 {app_path("idle.py")}\n'))
    started = pmx.run("start", str(procfile))
    assert f"[pmx] {procfile}: env.PORT added:" in started.stderr
    pmx.wait_status("worker", "online", count=1)
    pmx.wait_status("shell", "online", count=1)
    assert "PORT=5000" in pmx.run("env", "worker").stdout.splitlines()
    wait_until(lambda: ("shell on 5100" in log_lines(pmx, "shell"), log_lines(pmx, "shell")),
               timeout=10, what="the shell command's output")
    stopped = pmx.run("stop", "all")
    assert stopped.returncode == 0
    pmx.wait_status("shell", "stopped")


@pytest.mark.parametrize("target", ["ecosystem.config.js", "process.json", "Procfile"])
def test_a_missing_pm2_file_is_one_line_and_starts_no_daemon(pmx: Pmx, target: str) -> None:
    result = pmx.run("start", target, check=False, cwd=pmx.home)
    assert (result.returncode, result.stderr) == (2, f"pmx: {target}: no such file\n")
    assert pmx.daemon_pid() is None


def test_a_js_file_that_throws_starts_nothing(pmx: Pmx) -> None:
    config = pmx.write("ecosystem.config.js", 'throw new Error("DATABASE_URL is not set");\n')
    result = pmx.run("start", str(config), check=False)
    assert (result.returncode, result.stderr) == (
        2, f"pmx: {config}: node could not load it: Error: DATABASE_URL is not set\n")
    assert pmx.daemon_pid() is None
