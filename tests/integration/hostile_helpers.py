"""Helpers shared by the reliability and security tests (issue 9): /proc readings of
pmxd and its children, raw requests on the control socket, ecosystem files from dicts.

Everything here reads the real system; nothing is faked.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import zmq
from pmx.supervisor.procfs import read_stat

from tests.conftest import Pmx, wait_until

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# ---------------------------------------------------------------- /proc


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, ppid) of a process, or None when it is gone (reaped)."""
    stat = read_stat(pid)
    return None if stat is None else (stat.state, stat.ppid)


def zombie_children(parent: int) -> list[int]:
    """Pids in state Z whose parent is `parent`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            seen = proc_state(int(entry))
            if seen is not None and seen == ("Z", parent):
                found.append(int(entry))
    return found


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fds_of(pid: int) -> list[int]:
    return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


def status_field(pid: int, name: str) -> list[str]:
    """The values of one line of /proc/PID/status ("Uid", "Groups", "Threads")."""
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, value = line.partition(":")
            if key == name:
                return value.split()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def thread_count(pid: int) -> int:
    return int(status_field(pid, "Threads")[0])


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as file:
        items = file.read().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in items if item)


def nofile_limits(pid: int) -> tuple[str, str]:
    """(soft, hard) "Max open files" of a process, as /proc/PID/limits shows them."""
    with open(f"/proc/{pid}/limits") as file:
        for line in file:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError(f"no open-files limit in /proc/{pid}/limits")


def settled(read: Callable[[], int], what: str) -> int:
    """A count that has stayed the same for 5 polls in a row (connections closing, ...)."""
    history: list[int] = []

    def probe() -> tuple[bool, list[int]]:
        history.append(read())
        return len(history) >= 5 and len(set(history[-5:])) == 1, history[-5:]

    wait_until(probe, timeout=10, what=f"{what} settled")
    return history[-1]


def daemon_pid(pmx: Pmx) -> int:
    pid = pmx.daemon_pid()
    assert pid is not None, f"no pid file in {pmx.home}"
    return pid


def rss(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


# ---------------------------------------------------------------- control socket


def raw_request(home: Path, payload: bytes | dict[str, Any], *, timeout: float = 1.0,
                context: zmq.Context[zmq.Socket[bytes]] | None = None) -> dict[str, Any] | None:
    """Send one frame on a fresh DEALER; the decoded reply, or None after `timeout`."""
    own = context is None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context() if context is None else context
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{home / 'rpc.sock'}")
        sock.send(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        if not sock.poll(int(timeout * 1000)):
            return None
        reply = json.loads(sock.recv())
        assert isinstance(reply, dict)
        return reply
    finally:
        sock.close(linger=0)
        if own:
            ctx.term()


def ping_ok(home: Path, timeout: float = 1.0) -> bool:
    reply = raw_request(home, {"v": 1, "id": "ping", "cmd": "ping"}, timeout=timeout)
    return reply is not None and reply.get("ok") is True


# ---------------------------------------------------------------- apps and logs


def ecosystem(pmx: Pmx, *apps: dict[str, Any], name: str = "eco.toml") -> Path:
    """An ecosystem file in the home, written from app tables."""
    return pmx.write(name, tomli_w.dumps({"apps": list(apps)}))


def log_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def wait_log_match(path: Path, pattern: str, *, timeout: float = 10) -> re.Match[str]:
    """Poll a log file until `pattern` matches; the match."""
    def probe() -> tuple[bool, Any]:
        match = re.search(pattern, log_text(path))
        return match is not None, match or log_text(path)[-300:]

    match = wait_until(probe, timeout=timeout, what=f"{pattern!r} in {path}")
    assert isinstance(match, re.Match)
    return match


def out_log(pmx: Pmx, app: str, index: int = 0) -> Path:
    return pmx.home / "logs" / f"{app}-out-{index}.log"


# ---------------------------------------------------------------- terminals


def read_pty(argv: list[str], env: dict[str, str], timeout: float = 30) -> bytes:
    """Run a command on a pseudo-terminal; everything it wrote."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.05)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not data:
                    break
                output += data
            elif process.poll() is not None and not select.select([master], [], [], 0)[0]:
                break
    finally:
        os.close(master)
        process.wait(timeout=10)
    assert process.returncode == 0, output[-2000:]
    return output
