"""Nothing unsupervised, whatever moment pmxd dies (issue 16, items 3 and 4).

pmxd is SIGKILLed at random moments of a start, a scale, a reload and a memory restart;
a new pmxd then starts on the same home. Afterwards every process of the home belongs
to an instance the new pmxd lists, no app runs more processes than it lists, and the
cluster's port serves. And `pmx kill` in the middle of a reload leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import (
    CLI,
    Pmx,
    app_path,
    free_port,
    pid_alive,
    pid_cluster_toml,
    processes_with_env,
    wait_until,
)

TRIALS = 30  # about 0.7 s each: 50 took 36 s, the longest test of the suite


def _ecosystem(pmx: Pmx, port: int) -> str:
    return str(pmx.write("eco.toml", pid_cluster_toml(
        "web", port, instances=2, extra='listen_timeout = "300ms"\nkill_timeout = "1s"') + f"""
[[apps]]
name = "worker"
script = "{app_path('idle.py')}"
kill_timeout = "1s"

[[apps]]
name = "leak"
script = "{app_path('leak.py')}"
max_memory_restart = "60M"
env = {{ LEAK_MB_PER_S = "60" }}
kill_timeout = "1s"
"""))


def _marked(pmx: Pmx) -> set[int]:
    """Every process that carries this home's marker (an app process or its child)."""
    return {pid for pid in processes_with_env(f"PMX_HOME={pmx.home}".encode())
            if _has_run_id(pid)}


def _has_run_id(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            return any(v.startswith(b"PMX_RUN_ID=") for v in file.read().split(b"\0"))
    except OSError:
        return False


def _serves(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _settled(pmx: Pmx, port: int) -> tuple[bool, object]:
    """The new pmxd runs every app and every marked process is one of its instances."""
    listing = pmx.run("list", "--json", check=False)
    if listing.returncode != 0:
        return False, listing.stderr
    rows = json.loads(listing.stdout)
    web = [row for row in rows if row["name"] == "web" and row["status"] == "online"]
    if len(web) < 2 or any(row["status"] not in ("online", "stopped") for row in rows):
        return False, rows
    listed = {row["pid"] for row in rows if row["pid"] and row["status"] == "online"}
    marked = _marked(pmx)
    if marked != listed:
        return False, f"marked {sorted(marked)} but listed {sorted(listed)}: {rows}"
    return _serves(port), rows


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_no_process_unsupervised(pmx: Pmx) -> None:
    port = free_port()
    eco = _ecosystem(pmx, port)
    pmx.run("start", eco)
    wait_until(lambda: _settled(pmx, port), timeout=30, what="first start settled")
    rng = random.Random(16)
    actions = [("reload", "web"), ("scale", "web", "3"), ("scale", "web", "2"),
               ("restart", "all"), ("reload", "all"), ("stop", "worker")]
    for trial in range(TRIALS):
        daemon = pmx.daemon_pid()
        assert daemon is not None
        action = rng.choice(actions)
        command = subprocess.Popen([*CLI, *action], env=pmx.env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        # The random moment: between 0 and 400 ms into the action (or into the leak's
        # memory restarts, which go on all the time).
        time.sleep(rng.uniform(0, 0.4))
        os.kill(daemon, signal.SIGKILL)
        wait_until(lambda d=daemon: (not pid_alive(d), d), timeout=10, what="pmxd dead")
        command.wait(timeout=30)
        pmx.start_daemon()  # a new pmxd, as the service unit starts it: recovery
        result = wait_until(lambda: _settled(pmx, port), timeout=30,
                            what=f"trial {trial} ({' '.join(action)}) settled")
        assert result


@pytest.mark.slow
def test_pmx_kill_during_a_reload_leaves_nothing_running(pmx: Pmx) -> None:
    port = free_port()
    eco = pmx.write("eco.toml", pid_cluster_toml(
        "web", port, instances=3, extra='listen_timeout = "400ms"'))
    rng = random.Random(4)
    for trial in range(8):
        pmx.run("start", str(eco))
        pmx.wait_status("web", "online", count=3)
        reload = subprocess.Popen([*CLI, "reload", "web"], env=pmx.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.9))
        daemon = pmx.daemon_pid()
        killed = pmx.run("kill", check=False)
        reload.wait(timeout=30)
        assert killed.returncode == 0, killed.stderr
        assert daemon is not None and not pid_alive(daemon)
        left = wait_until(lambda: (not _marked(pmx), _marked(pmx)), timeout=5,
                          what=f"trial {trial}: nothing of the home left after pmx kill")
        assert not left
        assert not (pmx.home / "state.json").exists()
