"""`log_date_format` stamps a line once, and every reader sees that one text: the log file,
`pmx logs` reading the file back, and `pmx logs` following the live stream.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import CLI, Pmx


def today_and_tomorrow() -> tuple[str, ...]:
    """Local dates a line stamped from now on may carry (the test may cross midnight)."""
    now = time.time()
    return tuple(time.strftime("%Y-%m-%d", time.localtime(now + delta)) for delta in (0, 120))


@contextlib.contextmanager
def follow(pmx: Pmx, *args: str) -> Iterator[queue.Queue[str]]:
    """`pmx logs ARGS` running, its stdout lines arriving in a queue; stopped by its pid."""
    lines: queue.Queue[str] = queue.Queue()
    with subprocess.Popen([*CLI, "logs", *args], env=pmx.env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            yield lines
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            reader.join(timeout=10)


def first_live_line(lines: queue.Queue[str], timeout: float) -> tuple[list[dict[str, Any]],
                                                                      dict[str, Any]]:
    """(the lines read back from the file, the first line from the live stream)."""
    deadline = time.monotonic() + timeout
    tail: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            entry = json.loads(lines.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            break
        if entry["stream"] != "out":
            continue
        if entry["time"] is None:
            tail.append(entry)
        else:
            return tail, entry
    pytest.fail(f"no live line within {timeout}s; file lines seen: {tail!r}")


def test_followed_lines_carry_the_same_stamp_as_the_file(pmx: Pmx) -> None:
    dates = today_and_tomorrow()
    ticker = "n=0; while :; do n=$((n+1)); echo tick $n; sleep 0.1; done"
    eco = pmx.write("eco.toml", f'[[apps]]\nname = "stamped"\nscript = "/bin/sh"\n'
                                f'interpreter = "none"\nargs = ["-c", {ticker!r}]\n'
                                f'log_date_format = "YYYY-MM-DD"\n')
    pmx.run("start", str(eco))
    pmx.wait_status("stamped", "online", count=1)
    path = pmx.home / "logs" / "stamped-out-0.log"
    with follow(pmx, "stamped", "--json", "--lines", "3") as lines:
        tail, live = first_live_line(lines, timeout=20)
    message = live["message"]
    assert message.startswith(tuple(f"{date}: tick " for date in dates)), live
    assert (live["app"], live["instance"]) == ("stamped", 0)
    assert tail and all(entry["message"].startswith(f"{entry['message'][:10]}: tick ")
                        and entry["message"][:10] in dates for entry in tail), tail
    # The line followed live is, byte for byte, a line of the file.
    assert message in path.read_text().splitlines()
