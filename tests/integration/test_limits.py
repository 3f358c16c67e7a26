"""Resource limits against a real daemon (issue 9): file descriptors, a burst of clients,
spawns refused near the fd limit, logs on a full disk, size-based log rotation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from pmx.supervisor.home import MIN_FD_RESERVE

from tests.conftest import Pmx, app_path, wait_until
from tests.integration.hostile_helpers import (
    daemon_pid,
    ecosystem,
    fd_count,
    log_text,
    needs_root,
    nofile_limits,
    out_log,
    ping_ok,
    settled,
    wait_log_match,
)
from tests.mounts import fill, mount, umount

# ---------------------------------------------------------------- 5. file descriptors


def test_pmxd_raises_its_soft_fd_limit_to_the_hard_limit(pmx: Pmx) -> None:
    # Started with a low soft limit, as a login shell often gives (ulimit -Sn 1024).
    subprocess.run(["sh", "-c", 'ulimit -Sn 1024 && exec "$@"', "sh", sys.executable, "-m",
                    "pmx.supervisor.pmxd", "--home", str(pmx.home)],
                   env=pmx.env, check=True, timeout=30)
    soft, hard = nofile_limits(daemon_pid(pmx))
    assert soft == hard, (soft, hard)


def test_200_instances_and_a_burst_of_300_clients_leak_no_fd(pmxd: Pmx) -> None:
    pid = daemon_pid(pmxd)
    eco = ecosystem(pmxd, {"name": "idle200", "script": "/bin/sleep", "args": ["100000"],
                           "interpreter": "none", "instances": 200})
    pmxd.run("start", str(eco), timeout=120)
    pmxd.wait_status("idle200", "online", count=200, timeout=60)
    # The sampler keeps each instance's /proc files open once it has read them
    # (monitor.ProcFiles): the baseline counts them.
    def sampled() -> tuple[bool, object]:
        rows = pmxd.instances("idle200")
        return all(row["memory"] for row in rows), rows
    wait_until(sampled, timeout=30, what="every instance sampled")
    baseline = settled(lambda: fd_count(pid), "pmxd's fd count")

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sockets = []
    try:
        for number in range(300):  # all open at once
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{pmxd.home / 'rpc.sock'}")
            sock.send(f'{{"v":1,"id":"burst-{number}","cmd":"ping"}}'.encode())
            sockets.append(sock)
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        answered: set[str] = set()

        def all_answered() -> tuple[bool, int]:
            for sock, _ in poller.poll(50):
                reply = sock.recv()
                if b'"ok":true' in reply:
                    answered.add(re.search(rb'"id":"([^"]+)"', reply).group(1).decode())  # type: ignore[union-attr]
            return len(answered) == 300, len(answered)

        wait_until(all_answered, timeout=30, what="300 clients answered")
        during = fd_count(pid)
        assert during >= baseline + 250, f"the clients were not connected at once ({during})"
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()
    assert ping_ok(pmxd.home)
    wait_until(lambda: (fd_count(pid) <= baseline + 3, (baseline, fd_count(pid))), timeout=10,
               what="pmxd's fd count back to its baseline after the burst")


def test_spawn_near_the_fd_limit_is_refused_naming_file_descriptors(pmxd: Pmx) -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    pid = daemon_pid(pmxd)
    in_use = settled(lambda: fd_count(pid), "pmxd's fd count")
    limit = in_use + MIN_FD_RESERVE + 40  # room for about ten instances
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True,
                   timeout=30)
    assert nofile_limits(pid) == (str(limit), str(limit))
    eco = ecosystem(pmxd, {"name": "many", "script": "/bin/sleep", "args": ["100000"],
                           "interpreter": "none", "instances": 50})
    result = pmxd.run("start", str(eco), check=False, timeout=60)
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    refusals = [line for line in result.stderr.splitlines() if "file descriptor" in line]
    rows = pmxd.instances("many")
    online = [row for row in rows if row["status"] == "online"]
    errored = [row for row in rows if row["status"] == "errored"]
    assert 0 < len(online) < 50, [row["status"] for row in rows]
    assert len(errored) == 50 - len(online) == len(refusals), result.stderr
    assert all("file descriptor" in row["reason"] for row in errored), errored[0]
    assert ping_ok(pmxd.home)
    assert "is up" in pmxd.run("ping").stdout


# ---------------------------------------------------------------- 9. disk full, rotation


def warnings_about(home: Path, path: str) -> list[str]:
    return [line for line in log_text(home / "pmxd.log").splitlines()
            if "cannot write log" in line and path in line]


def test_log_on_a_full_device_stops_neither_the_app_nor_the_daemon(pmxd: Pmx) -> None:
    eco = ecosystem(pmxd, {"name": "full", "script": app_path("flood.py"),
                           "out_file": "/dev/full"})
    pmxd.run("start", str(eco))
    pid = pmxd.wait_status("full", "online")[0]["pid"]
    wait_until(lambda: (bool(warnings_about(pmxd.home, "/dev/full")), None), timeout=10,
               what="pmxd warned that /dev/full cannot be written")

    slowest = 0.0
    until = time.monotonic() + 3.0

    def pinging() -> tuple[bool, float]:
        nonlocal slowest
        began = time.monotonic()
        assert ping_ok(pmxd.home, timeout=1.0), "pmxd did not answer ping within 1 s"
        slowest = max(slowest, time.monotonic() - began)
        return time.monotonic() >= until, slowest

    wait_until(pinging, timeout=10, what="3 s of pings answered")
    assert pmxd.wait_status("full", "online")[0]["pid"] == pid
    assert len(warnings_about(pmxd.home, "/dev/full")) <= 3, warnings_about(pmxd.home,
                                                                          "/dev/full")








def last_number(path: Path) -> int:
    numbers = re.findall(r"^flood (\d+) x+$", log_text(path), re.M)
    return int(numbers[-1]) if numbers else -1


@needs_root
@pytest.mark.slow
def test_log_directory_that_fills_up_then_frees_resumes_logging(pmx: Pmx) -> None:
    logs = pmx.home / "logs"
    logs.mkdir(mode=0o700)
    mount("-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(logs))
    try:
        pmx.start_daemon()
        # One line every 50 ms: the tiny file system fills by the filler, not by the app.
        pmx.run("start", app_path("flood.py"), "--name", "slow", "--", "0.05", "1")
        pid = pmx.wait_status("slow", "online")[0]["pid"]
        path = out_log(pmx, "slow")
        wait_until(lambda: (last_number(path) >= 3, last_number(path)), timeout=10,
                   what="the first lines logged")
        filler = fill(logs)
        try:
            wait_log_match(pmx.home / "pmxd.log", r"cannot write log .*slow-out-0\.log",
                           timeout=20)
            assert pmx.wait_status("slow", "online")[0]["pid"] == pid
            before = last_number(path)
        finally:
            filler.unlink()
        wait_until(lambda: (last_number(path) > before + 3, (before, last_number(path))),
                   timeout=15, what="new lines logged once there is room again")
        assert pmx.wait_status("slow", "online")[0]["pid"] == pid
    finally:
        problems = pmx.cleanup()
        umount(logs)
    assert not problems, problems


def test_size_rotation_keeps_retain_files_none_much_over_the_limit(pmx: Pmx) -> None:
    path = pmx.home / "logs" / "rot.log"
    eco = ecosystem(pmx, {"name": "rot", "script": app_path("chunked_printer.py"),
                          "args": ["102400", "2048"], "out_file": str(path),
                          "max_log_size": "10K", "retain": 2})
    pmx.run("start", str(eco))
    wait_until(lambda: ("done" in log_text(path), None), timeout=30, what="~100 KB printed")
    files = {file.name: file.stat().st_size for file in path.parent.glob("rot.log*")}
    assert sorted(files) == ["rot.log", "rot.log.1", "rot.log.2"], files
    chunk = 8 * 1024  # what pmxd may read at once beyond the limit
    assert all(size <= 10 * 1024 + chunk for size in files.values()), files
    assert files["rot.log.1"] > 5 * 1024 and files["rot.log.2"] > 5 * 1024, files
