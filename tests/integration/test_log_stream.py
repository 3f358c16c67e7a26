"""The live log stream: pmxd encodes an app's lines only while someone follows them (its
XPUB counts subscriptions), so followers that come, go and die must never miss lines."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

from tests.conftest import CLI, Pmx, app_path

TICKER = ("import itertools, time\n"
          "for n in itertools.count():\n"
          "    print(f'tick {n}', flush=True)\n"
          "    time.sleep(0.02)\n")


def _follow(pmx: Pmx, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, "logs", name, "--lines", "0"], env=pmx.env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def _ticks(follower: subprocess.Popen[bytes], count: int, timeout: float = 15) -> list[int]:
    """The numbers of the next `count` tick lines the follower prints."""
    assert follower.stdout is not None
    seen: list[int] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {seen} within {timeout}s"
        if not select.select([follower.stdout], [], [], left)[0]:
            continue
        chunk = os.read(follower.stdout.fileno(), 65536)
        assert chunk, "the follower ended"
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        seen += [int(line.rsplit(b"tick ", 1)[1]) for line in lines if b"tick " in line]
    return seen


def _end(follower: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> None:
    if follower.poll() is None:
        follower.send_signal(signum)
    follower.wait(10)
    if follower.stdout is not None:
        follower.stdout.close()


def test_followers_that_come_go_and_die_each_get_every_line(pmx: Pmx) -> None:
    script = pmx.write("ticker.py", TICKER)
    pmx.run("start", str(script), "--name", "t")
    pmx.wait_status("t", "online", count=1)
    pmx.run("logs", "t", "--nostream")  # pmxd runs; nobody follows for a while
    for signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        follower = _follow(pmx, "t")
        try:
            seen = _ticks(follower, 20)
        finally:
            _end(follower, signum)  # SIGKILL: no unsubscribe, only the connection's end
        assert seen == list(range(seen[0], seen[0] + 20)), seen  # none missed
    # Two followers; one leaves; the other goes on receiving every line.
    first, second = _follow(pmx, "t"), _follow(pmx, "t")
    try:
        _ticks(first, 3)
        _ticks(second, 3)
        _end(first, signal.SIGKILL)
        later = _ticks(second, 30)
        assert later == list(range(later[0], later[0] + 30)), later
    finally:
        _end(first)
        _end(second)


def test_a_burst_nobody_follows_is_all_in_the_file(pmx: Pmx) -> None:
    pmx.run("start", app_path("printer.py"), "--name", "burst", "--", "200000")
    log = pmx.home / "logs" / "burst-out-0.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_bytes().endswith(b"done\n")):
        assert time.monotonic() < deadline, "the burst never reached the file"
        time.sleep(0.05)
    lines = log.read_bytes().split(b"\n")
    assert len(lines) == 200_002 and lines[199_999].startswith(b"line 199999 of 200000")
