"""A small HTTP load client for tests: bounded in count, rate and time, counts every failure.

Fresh-connection load is paced (at most ~500 connections a second per client): every
closed connection holds a loopback port in TIME_WAIT for 60 s, and an unpaced client
exhausts the 28k ephemeral ports within a test run, after which the kernel reuses
TIME_WAIT tuples and resets connections that pmx never saw.

A failure is anything but a 200 answer: refused, reset, timeout, bad status. With
keep-alive, a request is retried once on a fresh connection only when the server had
closed the idle connection before the request was sent (what every HTTP client does for
idempotent requests); a reset after the request was accepted still counts as failed.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)


class LoadClient(threading.Thread):
    def __init__(self, host: str, port: int, *, keep_alive: bool = False, path: str = "/",
                 max_requests: int = 100_000, max_seconds: float = 60.0,
                 unix_path: str | None = None, pace_s: float | None = None) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.keep_alive, self.path = host, port, keep_alive, path
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.unix_path = unix_path
        self.pace_s = pace_s if pace_s is not None else (0.0 if keep_alive else 0.002)
        self.result = LoadResult()
        self._stop_event = threading.Event()
        self._connection: http.client.HTTPConnection | None = None

    def stop(self) -> LoadResult:
        self._stop_event.set()
        self.join(30)
        return self.result

    def _connect(self) -> http.client.HTTPConnection:
        if self.unix_path is not None:
            return UnixHTTPConnection(self.unix_path)
        return http.client.HTTPConnection(self.host, self.port, timeout=10)

    def request_once(self) -> int:
        """One GET; returns the answering pid. Raises on any failure."""
        fresh = self._connection is None or not self.keep_alive
        if self._connection is None or not self.keep_alive:
            if self._connection is not None:
                self._connection.close()
            self._connection = self._connect()
        connection = self._connection
        try:
            connection.request("GET", self.path)
            response = connection.getresponse()
            body = response.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            connection.close()
            self._connection = None
            if fresh:
                raise
            return self.request_once()  # the idle keep-alive connection had been closed
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        if response.will_close or not self.keep_alive:
            connection.close()
            self._connection = None
        return int(body.split()[1])

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        count = 0
        while not self._stop_event.is_set() and count < self.max_requests \
                and time.monotonic() < deadline:
            count += 1
            if self.pace_s:
                self._stop_event.wait(self.pace_s)
            try:
                self.result.pids.add(self.request_once())
                self.result.ok += 1
            except Exception as exc:  # every failure is counted, whatever it is
                self.result.failed += 1
                if len(self.result.errors) < 20:
                    self.result.errors.append(f"{type(exc).__name__}: {exc}")
                if self._connection is not None:
                    self._connection.close()
                    self._connection = None
        if self._connection is not None:
            self._connection.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.unix_path)
        self.sock = sock


def get_pid(port: int, path: str = "/") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return int(response.read().split()[1])
    finally:
        connection.close()
