"""Hostile apps against a real daemon (issue 9): process trees that resist stopping,
crash loops that leave orphans, fast crash loops, missing programs, hostile output.

Every process a test starts belongs to an app of the test's daemon, so the fixture's
teardown (pmx kill, then SIGKILL by pid of anything carrying the test's PMX_HOME) stops it.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import subprocess
import time
from typing import Any

import psutil
import pytest
import zmq

from tests.conftest import CLI, Pmx, app_path, free_port, processes_with_env, wait_until
from tests.integration.hostile_helpers import (
    daemon_pid,
    ecosystem,
    fd_count,
    fds_of,
    log_text,
    out_log,
    proc_state,
    read_pty,
    rss,
    settled,
    thread_count,
    wait_log_match,
    zombie_children,
)

# ---------------------------------------------------------------- 6. the whole tree, on time


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_stop_ends_workers_and_a_setsid_escapee_within_kill_timeout(pmx: Pmx) -> None:
    port = free_port()
    kill_timeout_s = 1.0
    eco = ecosystem(pmx, {"name": "tree", "script": app_path("tree.py"), "args": [str(port)],
                          "kill_timeout": "1s"})
    pmx.run("start", str(eco))
    pmx.wait_status("tree", "online")
    match = wait_log_match(out_log(pmx, "tree"),
                           r"tree main (\d+) workers (\d+) (\d+) (\d+) escapee (\d+)")
    pids = [int(pid) for pid in match.groups()]
    assert all(proc_state(pid) is not None for pid in pids)
    assert not port_free(port)

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"event.tree:")
    sub.connect(f"ipc://{pmx.home / 'pub.sock'}")
    stopper = subprocess.Popen([*CLI, "stop", "tree"], env=pmx.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        def stopping() -> tuple[bool, Any]:
            while sub.poll(50):
                event = json.loads(sub.recv_multipart()[1])
                if event.get("state") == "stopping":
                    return True, event
            return False, None

        # From the moment pmxd starts stopping (the CLI's own start-up does not count).
        since = wait_until(stopping, timeout=15, what="tree stopping")["time"]

        def gone() -> tuple[bool, dict[int, Any]]:
            states = {pid: proc_state(pid) for pid in pids}
            return all(state is None for state in states.values()), states

        # None = reaped; a zombie would show as ("Z", ppid) in the failure message.
        wait_until(gone, timeout=since + kill_timeout_s + 1.0 - time.time(),
                   what="main, three workers and the setsid escapee gone and reaped within "
                        "kill_timeout + 1 s of the stop")
    finally:
        sub.close(linger=0)
        context.term()
        _, stderr = stopper.communicate(timeout=30)
    assert stopper.returncode == 0, stderr
    assert port_free(port), f"port {port} still taken after the stop"
    assert zombie_children(daemon_pid(pmx)) == []


# ---------------------------------------------------------------- 7. no zombies, threads or fds


def restarts(pmx: Pmx, name: str) -> int:
    rows = pmx.instances(name)
    return int(rows[0]["restarts"]) if rows else -1


def test_crash_loop_leaving_orphans_leaks_no_zombie_thread_or_fd(pmx: Pmx) -> None:
    eco = ecosystem(pmx, {"name": "orphans", "script": app_path("orphan_and_exit.sh"),
                          "interpreter": "/bin/sh", "restart_delay": 0, "min_uptime": 0,
                          "max_restarts": 100_000})
    pmx.run("start", str(eco))
    wait_until(lambda: (restarts(pmx, "orphans") >= 5, restarts(pmx, "orphans")), timeout=20,
               what="the first restarts")
    pmx.run("stop", "orphans")
    pid = daemon_pid(pmx)
    fds = settled(lambda: fd_count(pid), "pmxd's fd count")
    threads = settled(lambda: thread_count(pid), "pmxd's thread count")

    pmx.run("start", "orphans")
    wait_until(lambda: (restarts(pmx, "orphans") >= 200, restarts(pmx, "orphans")), timeout=60,
               what="200 restarts")
    pmx.run("stop", "orphans")
    pmx.wait_status("orphans", "stopped")

    wait_until(lambda: (zombie_children(pid) == [], zombie_children(pid)), timeout=5,
               what="no zombie child of pmxd")
    marker = f"PMX_HOME={pmx.home}".encode()
    wait_until(lambda: (processes_with_env(marker) == [pid], processes_with_env(marker)),
               timeout=5, what="no orphan left running (only pmxd carries the home)")
    wait_until(lambda: (abs(fd_count(pid) - fds) <= 2, (fds, fd_count(pid))), timeout=10,
               what="pmxd's fd count back within 2 of its baseline")
    wait_until(lambda: (abs(thread_count(pid) - threads) <= 2, (threads, thread_count(pid))),
               timeout=10, what="pmxd's thread count back within 2 of its baseline")


def test_children_get_only_stdio_in_fork_mode_and_one_socket_in_cluster_mode(pmx: Pmx) -> None:
    eco = ecosystem(pmx, {"name": "forked", "script": app_path("idle.py")},
                    {"name": "clustered", "script": app_path("idle.py"), "exec_mode": "cluster",
                     "listen": f"127.0.0.1:{free_port()}"})
    pmx.run("start", str(eco))
    for name in ("forked", "clustered"):
        pmx.wait_status(name, "online")
        wait_log_match(out_log(pmx, name), r"idle pid \d+")
    assert fds_of(pmx.pids("forked")[0]) == [0, 1, 2]
    assert fds_of(pmx.pids("clustered")[0]) == [0, 1, 2, 3]


# ---------------------------------------------------------------- 8. crash loops


def test_crash_loop_backs_off_growing_then_errors_with_little_daemon_cpu(pmxd: Pmx) -> None:
    eco = ecosystem(pmxd, {"name": "crashy", "script": app_path("crash.py"), "args": ["5"],
                           "exp_backoff_restart_delay": 100, "max_restarts": 5})
    daemon = psutil.Process(daemon_pid(pmxd))
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"event.crashy:")
    sub.connect(f"ipc://{pmxd.home / 'pub.sock'}")
    events: list[dict[str, Any]] = []
    try:
        cpu_before, wall_before = sum(daemon.cpu_times()[:2]), time.monotonic()
        pmxd.run("start", str(eco), check=False)

        def errored() -> tuple[bool, list[str]]:
            while sub.poll(50):
                events.append(json.loads(sub.recv_multipart()[1]))
            states = [e["state"] for e in events if e.get("kind") == "state"]
            return bool(states) and states[-1] == "errored", states

        wait_until(errored, timeout=30, what="crashy errored")
        cpu = sum(daemon.cpu_times()[:2]) - cpu_before
        wall = time.monotonic() - wall_before
    finally:
        sub.close(linger=0)
        context.term()

    states = [e for e in events if e.get("kind") == "state"]
    gaps = [later["time"] - earlier["time"] for earlier, later in itertools.pairwise(states)
            if earlier["state"] == "waiting" and later["state"] == "starting"]
    assert len(gaps) == 5, [(e["state"], e["reason"]) for e in states]
    assert all(b > a for a, b in itertools.pairwise(gaps)), f"gaps do not grow: {gaps}"
    assert gaps[0] >= 0.09, gaps
    row = pmxd.instances("crashy")[0]
    assert row["status"] == "errored" and row["restarts"] == 5, row
    assert "gave up" in row["reason"], row
    assert cpu < 0.5 * wall, f"pmxd used {cpu:.2f}s of CPU in {wall:.2f}s"


@pytest.mark.parametrize("table", [
    {"script": "/nonexistent/pmx/ghost-server", "interpreter": "none"},
    {"script": app_path("idle.py"), "interpreter": "no-such-interpreter-pmx"},
], ids=["program", "interpreter"])
def test_missing_executable_is_errored_at_once_saying_not_found(pmx: Pmx,
                                                                table: dict[str, str]) -> None:
    eco = ecosystem(pmx, {"name": "ghost", **table})
    result = pmx.run("start", str(eco), check=False)
    assert result.returncode == 1, result
    assert "not found" in result.stderr
    row = pmx.instances("ghost")[0]  # at once: no waiting, no restart
    assert row["status"] == "errored" and row["restarts"] == 0, row
    assert "not found" in row["reason"], row


# ---------------------------------------------------------------- 12. hostile output


def test_hostile_output_is_kept_in_the_log_and_neutralised_on_a_terminal(pmxd: Pmx) -> None:
    pid = daemon_pid(pmxd)
    baseline = rss(pid)
    peak = [baseline]
    pmxd.run("start", app_path("hostile_output.py"), "--name", "hostile")
    path = out_log(pmxd, "hostile")

    def done() -> tuple[bool, int]:
        peak.append(rss(pid))
        return log_text(path).endswith("done\n"), path.stat().st_size if path.exists() else 0

    wait_until(done, timeout=60, what="the hostile app's output logged")
    grown = max(peak) - baseline
    assert grown < 100 * 1024 * 1024, f"pmxd's RSS grew by {grown / 2**20:.0f} MiB"

    lines = path.read_bytes().split(b"\n")
    pieces = [line for line in lines if line and line.strip(b"A") == b""]
    assert sum(map(len, pieces)) == 10_000_000
    assert max(map(len, pieces)) <= 64 * 1024, max(map(len, pieces))
    assert b"escape \x1b[2J\x1b]0;pwned\x07 end" in lines  # the log keeps the bytes
    assert b"invalid \xff\xfe\xc3\x28 utf8" in lines

    shown = read_pty([*CLI, "logs", "hostile", "--nostream", "--lines", "4"], pmxd.env)
    assert re.search(rb"escape \\x1b\[2J\\x1b\]0;pwned\\x07 end", shown), shown
    assert b"\x1b[2J" not in shown and b"\x1b]0;" not in shown and b"\x07" not in shown
    assert b"\xff" not in shown and b"\xfe" not in shown
    assert b"done" in shown
    assert pmxd.pids("hostile")  # still running
