"""Shared fixtures: a real pmxd in a short temporary home, driven through the real CLI.

Teardown always runs: `pmx kill`, wait for the daemon's pid with a deadline, then look
for any process that still carries the test's PMX_HOME in its environment (every app
inherits it from the CLI), SIGKILL it and fail the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pmx.supervisor.procfs import process_start_time

T = TypeVar("T")
APPS = Path(__file__).parent / "apps"
CLI = [sys.executable, "-m", "pmx.cli.entry"]


def wait_until(probe: Callable[[], tuple[bool, T]], *, timeout: float, what: str) -> T:
    __tracebackhide__ = True  # failures point at the test, not here
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        ok, seen = probe()
        if ok:
            return seen  # type: ignore[return-value]
        time.sleep(0.05)  # the poll interval: the only sleep in tests
    pytest.fail(f"{what}: not true after {timeout}s; last saw {seen!r}")


def processes_with_env(marker: bytes) -> list[int]:
    """Pids whose environment contains `marker` (e.g. b"PMX_HOME=/tmp/pmx-x")."""
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


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return process_start_time(pid) is not None


class Pmx:
    """One temporary PMX_HOME and the CLI pointed at it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "PMX_HOME": str(home), "PYTHONUNBUFFERED": "1",
                    "COLUMNS": "200"}
        self.env.pop("NOTIFY_SOCKET", None)

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, cwd=cwd)
        if check and result.returncode != 0:
            pytest.fail(f"pmx {' '.join(args)} exited {result.returncode}:\n"
                        f"{result.stdout}\n{result.stderr}")
        return result

    def list(self) -> list[dict[str, Any]]:
        rows = json.loads(self.run("list", "--json").stdout)
        assert isinstance(rows, list)
        return rows

    def instances(self, name: str) -> list[dict[str, Any]]:
        return [row for row in self.list() if row["name"] == name]

    def pids(self, name: str) -> list[int]:
        return [row["pid"] for row in self.instances(name) if row["pid"]]

    def wait_status(self, name: str, status: str, count: int | None = None,
                    timeout: float = 20) -> list[dict[str, Any]]:
        def probe() -> tuple[bool, list[dict[str, Any]]]:
            rows = self.instances(name)
            ok = bool(rows) and all(r["status"] == status for r in rows)
            if count is not None:
                ok = ok and len(rows) == count
            return ok, rows
        return wait_until(probe, timeout=timeout, what=f"{name} all {status}")

    def daemon_pid(self) -> int | None:
        try:
            return int((self.home / "pmxd.pid").read_text())
        except (OSError, ValueError):
            return None

    def write(self, name: str, text: str) -> Path:
        path = self.home / name
        path.write_text(text)
        return path

    def start_daemon(self, *extra: str) -> None:
        subprocess.run([sys.executable, "-m", "pmx.supervisor.pmxd", "--home",
                        str(self.home), *extra], env=self.env, check=True, timeout=30)

    def cleanup(self) -> list[str]:
        """Stop everything; return descriptions of what had to be killed."""
        problems: list[str] = []
        pid = self.daemon_pid()
        if pid is not None and pid_alive(pid):
            try:
                subprocess.run([*CLI, "kill"], env=self.env, capture_output=True, timeout=60)
            except subprocess.TimeoutExpired:
                problems.append(f"pmx kill did not return within 60 s (pmxd pid {pid})")
            deadline = time.monotonic() + 15
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                problems.append(f"pmxd pid {pid} survived pmx kill")
                os.kill(pid, signal.SIGKILL)
        marker = f"PMX_HOME={self.home}".encode()
        deadline = time.monotonic() + 5
        left = processes_with_env(marker)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = processes_with_env(marker)
        for stray in left:
            problems.append(f"process {stray} outlived the daemon")
            try:
                os.kill(stray, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return problems


def make_home() -> Path:
    # Unix socket paths are limited to ~107 bytes: keep homes short.
    return Path(tempfile.mkdtemp(prefix="pmx-", dir="/tmp"))


@pytest.fixture
def pmx() -> Iterator[Pmx]:
    """A real pmxd in a temporary home (started by the first command that needs it)."""
    home = make_home()
    instance = Pmx(home)
    try:
        yield instance
    finally:
        problems = instance.cleanup()
        shutil.rmtree(home, ignore_errors=True)
        if problems:
            pytest.fail("teardown: " + "; ".join(problems))


@pytest.fixture
def pmxd(pmx: Pmx) -> Pmx:
    """Like pmx, with the daemon already running."""
    pmx.start_daemon()
    return pmx


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app_path(name: str) -> str:
    return str(APPS / name)


def pid_cluster_toml(name: str, port: int, *, instances: int, extra: str = "") -> str:
    """An ecosystem file for a cluster of tests/apps/pid_server.py on 127.0.0.1:PORT."""
    return f"""
[[apps]]
name = "{name}"
script = "{app_path('pid_server.py')}"
exec_mode = "cluster"
instances = {instances}
listen = "127.0.0.1:{port}"
{extra}
"""
