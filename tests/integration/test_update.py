"""`pmx update`: pmxd replaces its image in place and every app keeps running, untouched:
same pids, same ids and counters, logs that run on, sockets that keep serving."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import CLI, Pmx, app_path, free_port, pid_alive, pid_cluster_toml, wait_until
from tests.httpload import LoadClient


def _rows(pmx: Pmx) -> dict[tuple[str, int], tuple[int, int | None, str, int]]:
    return {(r["name"], r["instance"]): (r["id"], r["pid"], r["status"], r["restarts"])
            for r in pmx.list()}


def _cgroup(pid: int | None) -> str:
    """The process's cgroup v2 path ("" where there is none)."""
    with open(f"/proc/{pid}/cgroup") as file:
        return next((line[3:].strip() for line in file if line.startswith("0::")), "")


def _handover_gone(pmx: Pmx) -> tuple[bool, object]:
    document = json.loads((pmx.home / "state.json").read_text())
    return document.get("handover") is None, document.get("handover")


def test_update_keeps_every_process_its_pid_its_slot_and_its_log(pmx: Pmx) -> None:
    trigger = pmx.home / "finish-the-line"
    port = free_port()
    eco = pmx.write("eco.toml", f"""
[[apps]]
name = "printer"
script = "{app_path('half_line.py')}"
args = ["{trigger}"]

[[apps]]
name = "off"
script = "{app_path('idle.py')}"
""" + pid_cluster_toml("web", port, instances=2) + pid_cluster_toml(
        "slots", free_port(), instances=2, extra="reuse_port = true"))
    pmx.run("start", str(eco))
    for name, count in (("printer", 1), ("off", 1), ("web", 2), ("slots", 2)):
        pmx.wait_status(name, "online", count=count)
    pmx.run("stop", "off")
    pmx.wait_status("off", "stopped")
    before = _rows(pmx)
    daemon = pmx.daemon_pid()
    cgroup = _cgroup(before[("printer", 0)][1])

    result = pmx.run("update")

    assert "5 of 5 app processes kept running, same pids" in result.stdout, result.stdout
    assert pmx.daemon_pid() == daemon
    assert _rows(pmx) == before  # ids, pids, states (off stays stopped) and counters
    wait_until(lambda: _handover_gone(pmx), timeout=10, what="state.json without the handover")
    # Its own cgroup (where pmxd may make them) is the new image's too, not a stale one.
    assert _cgroup(before[("printer", 0)][1]) == cgroup
    if "/pmx-" in cgroup:
        assert any(os.path.isdir(base + cgroup) for base in ("/sys/fs/cgroup",
                                                             "/sys/fs/cgroup/unified"))
    # The line begun before the update is finished after it, in one piece; ticks follow.
    trigger.write_text("")
    out_log = pmx.home / "logs" / "printer-out-0.log"

    def logged() -> str:
        return out_log.read_text() if out_log.exists() else ""

    wait_until(lambda: ("tick 5" in logged(), logged()[-300:]), timeout=10,
               what="the log running on")
    assert logged().startswith("first half, second half\ntick 1\n")
    streamed = pmx.run("logs", "printer", "--nostream", "--lines", "5").stdout
    assert "tick" in streamed
    # The new image watches the adopted processes: a crash is seen and restarted.
    victim = before[("printer", 0)][1]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    rows = wait_until(lambda: ((r := pmx.instances("printer"))[0]["status"] == "online"
                               and r[0]["pid"] != victim, r), timeout=10, what="a new printer")
    assert rows[0]["restarts"] == 1 and rows[0]["id"] == before[("printer", 0)][0]
    # The sockets came along: both kinds still reload with zero downtime.
    for name in ("web", "slots"):
        old = set(pmx.pids(name))
        pmx.run("reload", name)
        assert not old & {r["pid"] for r in pmx.wait_status(name, "online", count=2)}
    pmx.run("start", "off")
    pmx.wait_status("off", "online")


def test_update_under_load_fails_no_request_and_keeps_the_pids(pmx: Pmx) -> None:
    port = free_port()
    eco = pmx.write("web.toml", pid_cluster_toml("web", port, instances=2))
    pmx.run("start", str(eco))
    before = {row["pid"] for row in pmx.wait_status("web", "online", count=2)}
    loader = LoadClient("127.0.0.1", port, max_seconds=60)
    loader.start()
    try:
        wait_until(lambda: (loader.result.ok > 20, loader.result.ok), timeout=10, what="load")
        for _ in range(2):
            pmx.run("update")
            seen = loader.result.ok
            wait_until(lambda seen=seen: (loader.result.ok > seen + 20, loader.result.ok),
                       timeout=10, what="served after the update")
    finally:
        result = loader.stop()
    assert {row["pid"] for row in pmx.wait_status("web", "online", count=2)} == before
    assert result.failed == 0, result.errors
    assert result.pids == before


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_update_keeps_a_dropin_node_cluster_and_its_learned_port(pmx: Pmx) -> None:
    port = free_port()
    pmx.env["PORT"] = str(port)
    pmx.run("start", app_path("node_hello.js"), "-i", "2", "--listen-timeout", "20s")
    before = {r["pid"] for r in pmx.wait_status("node_hello", "online", count=2)}
    loader = LoadClient("127.0.0.1", port, max_seconds=60)
    loader.start()
    try:
        wait_until(lambda: (loader.result.ok > 20, loader.result.ok), timeout=15, what="load")
        pmx.run("update")
        assert set(pmx.pids("node_hello")) == before
        pmx.run("reload", "node_hello")  # the port learned from the app came along
        after = {r["pid"] for r in pmx.wait_status("node_hello", "online", count=2)}
        seen = loader.result.ok
        wait_until(lambda: (loader.result.ok > seen + 20, loader.result.ok), timeout=10,
                   what="served after the reload")
    finally:
        result = loader.stop()
    assert not before & after
    assert result.failed == 0, result.errors


def test_an_instance_that_dies_during_the_update_is_restarted(pmx: Pmx) -> None:
    pmx.run("start", app_path("idle.py"), "--name", "a")
    victim = pmx.wait_status("a", "online", count=1)[0]["pid"]
    update = subprocess.Popen([*CLI, "update"], env=pmx.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: ("replacing itself" in (pmx.home / "pmxd.log").read_text(), None),
                   timeout=10, what="the update under way")
        os.kill(victim, signal.SIGKILL)
        output = update.communicate(timeout=40)[0]
    finally:
        if update.poll() is None:
            update.kill()
            update.wait()
    assert update.returncode == 0, output
    rows = wait_until(lambda: ((r := pmx.instances("a"))[0]["status"] == "online"
                               and r[0]["pid"] != victim, r), timeout=15, what="a restarted")
    assert rows[0]["restarts"] == 1
    wait_until(lambda: (not pid_alive(victim), None), timeout=5, what="the victim reaped")


def test_a_foreground_pmxd_keeps_logging_to_stderr_after_the_update(pmx: Pmx) -> None:
    """Under systemd pmxd logs to the journal (stderr); the new image must, too."""
    stderr = open(pmx.home / "journal.log", "wb")  # noqa: SIM115 - closed below
    service = subprocess.Popen([sys.executable, "-m", "pmx.supervisor.pmxd", "--foreground",
                                "--home", str(pmx.home)], env=pmx.env, stdout=stderr,
                               stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (pmx.run("ping", check=False).returncode == 0, None), timeout=15,
                   what="pmxd up")
        pmx.run("start", app_path("idle.py"), "--name", "a")
        pid = pmx.wait_status("a", "online", count=1)[0]["pid"]
        pmx.run("update")
        journal = pmx.home / "journal.log"
        wait_until(lambda: ("took over 1 apps and 1 running processes" in journal.read_text(),
                            journal.read_text()[-500:]), timeout=10, what="the new image's log")
        assert not (pmx.home / "pmxd.log").exists()
        assert pmx.pids("a") == [pid]
        pmx.run("kill")
        assert service.wait(30) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        stderr.close()


def test_the_command_an_older_pmxd_execs_on_update_still_runs_pmxd() -> None:
    """pmx before the handover exec'd `python -m pmx.supervisor.daemon`: it must stay pmxd."""
    result = subprocess.run([sys.executable, "-m", "pmx.supervisor.daemon", "--version"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("pmxd "), result


READY_ON_TRIGGER = """\
import os, socket, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
address = os.environ["NOTIFY_SOCKET"]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.sendto(b"READY=1", "\\0" + address[1:] if address.startswith("@") else address)
time.sleep(600)
"""


def test_an_instance_still_starting_is_adopted_and_goes_online_when_ready(pmx: Pmx) -> None:
    trigger = pmx.home / "ready-now"
    script = pmx.write("late.py", READY_ON_TRIGGER)
    eco = pmx.write("late.toml", f"""
[[apps]]
name = "late"
script = "{script}"
args = ["{trigger}"]
wait_ready = true
listen_timeout = "60s"
""")
    pmx.run("start", str(eco))
    pid = pmx.wait_status("late", "starting", count=1)[0]["pid"]
    assert "1 of 1 app processes kept running" in pmx.run("update").stdout
    assert [(r["status"], r["pid"]) for r in pmx.instances("late")] == [("starting", pid)]
    trigger.write_text("")
    rows = pmx.wait_status("late", "online", count=1)
    assert rows[0]["pid"] == pid and rows[0]["restarts"] == 0


def test_an_instance_waiting_to_restart_goes_on_waiting(pmx: Pmx) -> None:
    eco = pmx.write("crash.toml", f"""
[[apps]]
name = "crash"
script = "{app_path('crash.py')}"
restart_delay = "3s"
""")
    pmx.run("start", str(eco), check=False)
    before = pmx.wait_status("crash", "waiting", count=1)[0]
    pmx.run("update")
    row = pmx.instances("crash")[0]
    # Not started again by the update: the same wait, since the same moment.
    assert (row["status"], row["restarts"], row["since"]) == ("waiting", 0, before["since"]), row
    assert "restarting in 3s" in row["reason"]
    wait_until(lambda: ((r := pmx.instances("crash")[0])["restarts"] >= 1, r), timeout=20,
               what="restarted once its delay is over")
