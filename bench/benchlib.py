"""Shared pieces of the benchmarks: a pmx home in /tmp, percentiles, cleanup by pid.

Not a benchmark itself. Every script imports it as `benchlib` (the scripts' own folder
is first on sys.path when they are run as `python bench/NAME.py`).
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HTTP_APP = REPO / "config-examples" / "apps" / "http_server.py"
TEST_APPS = REPO / "tests" / "apps"
CLI = [sys.executable, "-m", "pmx.cli.entry"]


def cores_note() -> None:
    cores = len(os.sched_getaffinity(0))
    print(f"note: this machine has {cores} cores; the load generator (and this script) run on "
          f"them too and compete with pmxd and the apps for them, so figures are lower "
          f"than on a machine with separate client and server cores.")


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile, p in 0..100; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "n/a"
    return f"{seconds * 1000:.1f} ms"


def ratio(a: float, b: float) -> str:
    if not b or a != a or b != b:
        return "n/a"
    return f"{a / b:.2f}x"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def processes_with_env(marker: bytes) -> list[int]:
    """Pids (not zombies) whose environment holds `marker`, e.g. b"PMX_HOME=/tmp/pmx-x"."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as file:
                environ = file.read().split(b"\0")
        except OSError:
            continue
        if marker in environ and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM one process we started, then SIGKILL it after `timeout`."""
    for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not pid_alive(pid):
            return


def stop_popen(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()  # by its pid
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_for(probe: Callable[[], bool], *, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(poll)
    raise RuntimeError(f"{what}: not true after {timeout}s")


class PmxHome:
    """One temporary PMX_HOME and the CLI pointed at it. Use as a context manager:
    leaving it runs `pmx kill`, SIGKILLs by pid anything left with this home in its
    environment (and says so), and removes the directory."""

    def __init__(self) -> None:
        # Unix socket paths are limited to ~107 bytes: keep homes short.
        self.home = Path(tempfile.mkdtemp(prefix="pmx-", dir="/tmp"))
        self.env = {**os.environ, "PMX_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                    "COLUMNS": "200"}
        self.env.pop("NOTIFY_SOCKET", None)
        self.problems: builtins.list[str] = []

    def __enter__(self) -> PmxHome:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def run(self, *args: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"pmx {' '.join(args)} exited {result.returncode}:\n"
                               f"{result.stdout}\n{result.stderr}")
        return result

    def client(self) -> Any:
        from pmx.cli.client import Client

        return Client(self.home)

    def list(self) -> list[dict[str, Any]]:
        rows = json.loads(self.run("list", "--json").stdout)
        assert isinstance(rows, list)
        return rows

    # (builtins.list below: inside this class, `list` is the method above)
    def wait_online(self, name: str, count: int, timeout: float = 60
                    ) -> builtins.list[dict[str, Any]]:
        seen: builtins.list[dict[str, Any]] = []

        def probe() -> bool:
            nonlocal seen
            seen = [r for r in self.list() if r["name"] == name]
            return len(seen) == count and all(r["status"] == "online" for r in seen)

        try:
            wait_for(probe, timeout=timeout, what=f"{name}: {count} instances online", poll=0.2)
        except RuntimeError as exc:
            states = sorted({str(r["status"]) for r in seen})
            raise RuntimeError(f"{exc}; last saw {len(seen)} instances, states {states}") from None
        return seen

    def write(self, name: str, text: str) -> Path:
        path = self.home / name
        path.write_text(text)
        return path

    def daemon_pid(self) -> int | None:
        try:
            return int((self.home / "pmxd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def cleanup(self) -> None:
        pid = self.daemon_pid()
        try:
            if pid is not None and not pid_alive(pid):
                # Do not ask a dead daemon: its socket files may remain and the call would
                # wait for its whole timeout.
                self.problems.append(f"pmxd (pid {pid}) had exited before pmx kill (crashed?)")
            elif (self.home / "rpc.sock").exists():
                result = subprocess.run([*CLI, "kill"], env=self.env, capture_output=True,
                                        text=True, timeout=120)
                if result.returncode != 0:
                    self.problems.append(f"pmx kill exited {result.returncode}: "
                                         f"{result.stderr.strip()}")
        except subprocess.TimeoutExpired:
            self.problems.append("pmx kill did not return within 120s")
        finally:
            if pid is not None:
                deadline = time.monotonic() + 15
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if pid_alive(pid):
                    self.problems.append(f"pmxd pid {pid} survived pmx kill; SIGKILLed")
                    stop_pid(pid, timeout=0)
            marker = f"PMX_HOME={self.home}".encode()
            deadline = time.monotonic() + 5
            left = processes_with_env(marker)
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = processes_with_env(marker)
            for stray in left:
                self.problems.append(f"process {stray} outlived pmx kill; SIGKILLed")
                try:
                    os.kill(stray, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(self.home, ignore_errors=True)
            for problem in self.problems:
                print(f"pmx misbehaviour at cleanup: {problem}", file=sys.stderr)


def table(rows: Iterable[Sequence[object]], header: Sequence[str]) -> None:
    """Print a plain left-aligned table."""
    text_rows = [[str(cell) for cell in header]] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in text_rows) for i in range(len(header))]
    for number, row in enumerate(text_rows):
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
        if number == 0:
            print("  " + "  ".join("-" * width for width in widths))


def answers(port: int) -> bool:
    """One GET on 127.0.0.1:PORT with Connection: close (no idle keep-alive connection is
    left behind in an instance); True on a 200."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()
