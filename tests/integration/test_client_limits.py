"""Clients against a real daemon (issue 16, items 8, 9 and 12): a burst of clients under a
low open-file limit, a log viewer that stops reading, several `pmx start` racing to start
the daemon.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pmx.supervisor.protocol import (
    MAX_PUBLICATION_BYTES,
    PUBLISH_HWM,
    DroppedLines,
    decode_publication,
    encode_log_block,
)

from tests.conftest import CLI, Pmx, pid_alive, wait_until
from tests.integration.hostile_helpers import (
    daemon_pid,
    ecosystem,
    fd_count,
    out_log,
    ping_ok,
    rss,
    settled,
)

MiB = 1024 * 1024


def spawn_cli(pmx: Pmx, *args: str, stdout: int | object = subprocess.DEVNULL,
              stderr: int | object = subprocess.PIPE) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, *args], env=pmx.env, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr)  # type: ignore[arg-type]


# ---------------------------------------------------------------- 8. a burst of clients


@pytest.mark.slow
def test_a_burst_of_100_clients_under_ulimit_128_leaves_pmxd_and_its_apps_running(
        pmx: Pmx) -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    subprocess.run(["prlimit", "--nofile=128:128", sys.executable, "-m",
                    "pmx.supervisor.pmxd", "--home", str(pmx.home)],
                   env=pmx.env, check=True, timeout=30)
    pid = daemon_pid(pmx)
    eco = ecosystem(pmx, *({"name": f"a{n}", "script": "/bin/sleep", "args": ["100000"],
                            "interpreter": "none"} for n in range(14)))
    started = pmx.run("start", str(eco), check=False, timeout=60)
    assert "Traceback" not in started.stderr
    running = {row["name"]: row["pid"] for row in pmx.list() if row["status"] == "online"}
    assert len(running) >= 8, started.stderr  # the rest is refused, naming the fd limit
    # 100 clients that each hold a connection for as long as they run.
    viewers = [spawn_cli(pmx, "logs", "a0", "--lines", "0") for _ in range(100)]
    try:
        def settled_viewers() -> tuple[bool, str]:
            ended = sum(viewer.poll() is not None for viewer in viewers)
            return not pid_alive(pid) or ended >= 100 - 32, f"{ended} ended"

        wait_until(settled_viewers, timeout=60, what="the viewers beyond capacity turned away")
        assert pid_alive(pid), "pmxd died during the burst of clients"
        assert ping_ok(pmx.home, timeout=5)
        assert "is up" in pmx.run("ping").stdout  # the CLI still gets through
    finally:
        for viewer in viewers:
            if viewer.poll() is None:
                viewer.terminate()
        errors = [viewer.communicate(timeout=30)[1].decode() for viewer in viewers]
    turned_away = [text for viewer, text in zip(viewers, errors, strict=True)
                   if viewer.returncode not in (0, -signal.SIGTERM)]
    assert turned_away, "every viewer was served: the burst did not reach the limit"
    assert all("pmxd is busy" in text and "Traceback" not in text for text in turned_away), \
        turned_away[0]
    assert pid_alive(pid)
    after = {row["name"]: row["pid"] for row in pmx.list() if row["status"] == "online"}
    assert after == running
    assert all(pid_alive(app_pid) for app_pid in running.values())
    assert settled(lambda: fd_count(pid), "pmxd's fd count") < 128


def hold_slots(home: Path, share: float, first: int = 0) -> list[int]:
    """flock pmxd's client slots from `first` up to `share` of them, as clients would."""
    count = int((home / "clients" / "count").read_text())
    held = []
    for number in range(first, int(count * share)):
        fd = os.open(home / "clients" / str(number), os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(fd)
    return held


def test_subscribers_cannot_take_the_slots_requests_need_and_a_full_pmxd_says_busy(
        pmxd: Pmx) -> None:
    pmxd.run("start", "/bin/sleep", "--name", "idle", "--", "100000")
    held = hold_slots(pmxd.home, 0.75)  # every slot a subscription may take
    try:
        assert "is up" in pmxd.run("ping").stdout
        viewer = pmxd.run("logs", "idle", "--lines", "0", check=False, timeout=30)
        assert viewer.returncode == 1, viewer
        assert "pmx: pmxd is busy: all the" in viewer.stderr and "ulimit -n" in viewer.stderr
        held += hold_slots(pmxd.home, 1.0, first=len(held))
        described = pmxd.run("describe", "idle", check=False, timeout=30)
        assert described.returncode == 1 and "pmxd is busy" in described.stderr, described
        # list and ping use the quick socket (supervisor/quick.py), which needs no slot:
        # asyncio's listener pauses rather than aborting pmxd when fds run short.
        assert "idle:0" in pmxd.run("list").stdout
    finally:
        for fd in held:
            os.close(fd)
    assert "is up" in pmxd.run("ping").stdout


# ---------------------------------------------------------------- 9. a stopped log viewer

WRITER = """
import os, sys, time
go = sys.argv[1]
while not os.path.exists(go):  # heartbeats: the test sees its viewer receive them
    print("waiting for go", flush=True)
    time.sleep(0.05)
line = "x" * 1000 + "\\n"
chunk = line * 1024  # 1 MiB
for _ in range({mib}):
    sys.stdout.write(chunk)
sys.stdout.write("writer done\\n")
sys.stdout.flush()
while not os.path.exists(go + "2"):
    time.sleep(0.05)
while True:  # again and again: one printed while the viewer's queue is still full is lost
    print("writer tail", flush=True)
    time.sleep(0.1)
"""


def tail_of(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            file.seek(max(0, path.stat().st_size - 200))
            return file.read()
    except FileNotFoundError:
        return b""


@pytest.mark.slow
def test_a_stopped_log_viewer_costs_pmxd_bounded_memory_and_is_told_of_dropped_lines(
        pmxd: Pmx) -> None:
    script = pmxd.write("writer.py", WRITER.format(mib=200))
    go = pmxd.home / "go"
    eco = ecosystem(pmxd, {"name": "big", "script": str(script), "args": [str(go)],
                           "interpreter": sys.executable})
    pmxd.run("start", str(eco))
    pmxd.wait_status("big", "online")
    pid = daemon_pid(pmxd)
    baseline = rss(pid)
    out_path, err_path = pmxd.home / "viewer.out", pmxd.home / "viewer.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        viewer = spawn_cli(pmxd, "logs", "big", "--lines", "0", stdout=out, stderr=err)
    try:
        wait_until(lambda: (b"waiting for go" in out_path.read_bytes(), None), timeout=20,
                   what="the viewer receiving the app's lines (its subscription is live)")
        os.kill(viewer.pid, signal.SIGSTOP)
        go.touch()
        peak = baseline
        deadline = time.monotonic() + 180
        while b"writer done" not in tail_of(out_log(pmxd, "big")):
            assert time.monotonic() < deadline, "the writer did not finish"
            peak = max(peak, rss(pid))
            time.sleep(0.05)
        peak = max(peak, rss(pid))
        assert peak - baseline < 64 * MiB, f"pmxd grew by {(peak - baseline) / MiB:.0f} MiB"
        os.kill(viewer.pid, signal.SIGCONT)
        (pmxd.home / "go2").touch()  # what pmxd had queued for it, then lines after a gap
        wait_until(lambda: (b"writer tail" in tail_of(out_path), None),
                   timeout=60, what="the viewer caught up")
        shown = out_path.read_bytes()
        assert b"lines dropped (the viewer was too slow)" in shown, shown[-300:]
    finally:
        os.kill(viewer.pid, signal.SIGCONT)
        viewer.terminate()
        viewer.wait(timeout=30)


# ---------------------------------------------------------------- 12. racing starts


def daemons_of(home: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pmx.supervisor.pmxd" in argv and str(home).encode() in argv \
                and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def test_five_racing_starts_without_a_daemon_all_succeed_with_one_daemon(pmx: Pmx) -> None:
    eco = ecosystem(pmx, {"name": "race", "script": "/bin/sleep", "args": ["100000"],
                          "interpreter": "none", "instances": 2})
    racers = [spawn_cli(pmx, "start", str(eco)) for _ in range(5)]
    outcomes = [(racer.wait(timeout=60), racer.communicate()[1].decode()) for racer in racers]
    assert [code for code, _ in outcomes] == [0] * 5, outcomes
    assert daemons_of(pmx.home) == [daemon_pid(pmx)]
    rows = pmx.wait_status("race", "online", count=2)
    assert len({row["pid"] for row in rows}) == 2


# ---------------------------------------------------------------- 9. the encoding, pure


def test_log_publications_stay_under_the_size_that_bounds_the_queue_and_number_lines() -> None:
    lines = [f"line {n} ".encode() + b"y" * (n % 3000) for n in range(2000)]
    lines.append(b"\x01\xff" * 30000)  # control bytes and invalid UTF-8: sent as they are
    block = b"\n".join(lines) + b"\n"
    messages, next_seq = encode_log_block("log.api:", {"app": "api"}, block, 7)
    assert all(len(frames[2]) <= MAX_PUBLICATION_BYTES for frames in messages)
    assert b"".join(frames[2] for frames in messages) == block  # cut between lines only
    bodies = [decode_publication(frames)[1] for frames in messages]
    assert [body["seq"] for body in bodies] == list(
        itertools.accumulate([7] + [len(body["lines"]) for body in bodies[:-1]]))
    assert next_seq == bodies[-1]["seq"] + len(bodies[-1]["lines"]) == 7 + 2001
    received = [text for body in bodies for text in body["lines"]]
    assert received[:2000] == [line.decode() for line in lines[:2000]]
    assert received[2000] == "\x01\ufffd" * 30000
    queued_at_most = PUBLISH_HWM * MAX_PUBLICATION_BYTES  # per subscriber that stops reading
    assert queued_at_most <= 32 * MiB


def test_a_subscriber_counts_the_lines_it_missed_per_app() -> None:
    dropped = DroppedLines()
    assert dropped.missed({"app": "api", "seq": 10, "lines": ["a", "b"]}) == 0  # joined late
    assert dropped.missed({"app": "api", "seq": 12, "lines": ["c"]}) == 0
    assert dropped.missed({"app": "web", "seq": 0, "lines": ["w"]}) == 0
    assert dropped.missed({"app": "api", "seq": 20, "lines": ["d"]}) == 7
    assert dropped.missed({"app": "api", "seq": 0, "lines": ["e"]}) == 0  # a new pmxd
