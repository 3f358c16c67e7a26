"""accepting.py: does a process tree wait for connections on a socket? Real processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pmx.supervisor.accepting import is_accepting, socket_inode

WAITS = {
    "accept": "s.accept()",
    "poll (http.server)": "import http.server as h\n"
                          "srv = h.HTTPServer(('127.0.0.1', 0), h.BaseHTTPRequestHandler, False)\n"
                          "srv.socket = s\nsrv.serve_forever()",
    "select": "import select\nselect.select([s], [], [])",
    "epoll (asyncio)": "import asyncio\n"
                       "async def main():\n"
                       "    s.setblocking(False)\n"
                       "    await asyncio.start_server(lambda r, w: None, sock=s)\n"
                       "    await asyncio.sleep(60)\n"
                       "asyncio.run(main())",
    "in a child process": "import os\nif os.fork() == 0:\n    s.accept()\nelse:\n    os.wait()",
}


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def run(code: str, fd: int) -> subprocess.Popen[bytes]:
    prologue = f"import socket, time\ns = socket.socket(fileno={fd})\n"
    return subprocess.Popen([sys.executable, "-c", prologue + code], pass_fds=[fd],
                            start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the process and whatever it forked (each runs in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def settles(pid: int, inode: int, expected: bool, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if is_accepting(pid, [inode]) == expected:
            return True
        time.sleep(0.02)  # the poll interval of a deadline loop
    return False


@pytest.mark.parametrize("way", sorted(WAITS))
def test_a_process_waiting_for_connections_is_seen(listening: socket.socket, way: str) -> None:
    process = run(WAITS[way], listening.fileno())
    try:
        assert settles(process.pid, socket_inode(listening.fileno()), True), way
    finally:
        stop(process)


def test_holding_the_socket_is_not_accepting(listening: socket.socket) -> None:
    process = run("time.sleep(60)", listening.fileno())
    try:
        inode = socket_inode(listening.fileno())
        # Give it time to start and sit in sleep: it must never count as accepting.
        assert settles(process.pid, inode, False)
        assert not settles(process.pid, inode, True, seconds=0.5)
    finally:
        stop(process)


def test_another_socket_is_not_this_one(listening: socket.socket) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        process = run("s.accept()", other.fileno())
        try:
            assert settles(process.pid, socket_inode(other.fileno()), True)
            assert not is_accepting(process.pid, [socket_inode(listening.fileno())])
        finally:
            stop(process)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_serving_on_the_socket_is_seen(listening: socket.socket) -> None:
    fd = listening.fileno()
    process = subprocess.Popen(["node", "-e", "require('http').createServer((q, r) => r.end()).listen("
                                f"{{fd: {fd}}})"], pass_fds=[fd], start_new_session=True)
    try:
        assert settles(process.pid, socket_inode(fd), True)
    finally:
        stop(process)


def test_a_gone_process_is_not_accepting() -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    assert not is_accepting(process.pid, [1])
