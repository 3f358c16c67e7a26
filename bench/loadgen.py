"""HTTP load over 127.0.0.1: wrk when it is installed, else a Python thread pool.

Not a benchmark itself; cluster.py uses it. wrk comes from Debian: `apt-get install -y wrk`.
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

from benchlib import percentile


@dataclass
class LoadResult:
    tool: str
    requests: int
    seconds: float
    requests_per_s: float
    p50_s: float
    p99_s: float
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _duration(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, *, seconds: float, connections: int, threads: int) -> LoadResult:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "--timeout", "5s", url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    out = result.stdout
    requests_match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    rate_match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not requests_match or not rate_match:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    latency = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.MULTILINE))
    errors: dict[str, int] = {}
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                              out)
    if socket_errors:
        for kind, count in zip(("connect", "read", "write", "timeout"), socket_errors.groups(),
                               strict=True):
            if int(count):
                errors[kind] = int(count)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        errors["non-2xx"] = int(non_2xx.group(1))
    return LoadResult(
        tool="wrk", requests=int(requests_match.group(1)),
        seconds=float(requests_match.group(2)) * _UNITS[requests_match.group(3)],
        requests_per_s=float(rate_match.group(1)),
        p50_s=_duration(latency.get("50", "")), p99_s=_duration(latency.get("99", "")),
        errors=errors)


def run_python(host: str, port: int, *, seconds: float, connections: int,
               max_requests: int = 2_000_000) -> LoadResult:
    """`connections` threads, each with one keep-alive connection, for `seconds`."""
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    per_thread = max(1, max_requests // connections)

    def worker(slot: int) -> None:
        mine = latencies[slot]
        conn: http.client.HTTPConnection | None = None
        while time.monotonic() < deadline and len(mine) < per_thread:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=5)
            started = time.perf_counter()
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
                status = response.status
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if status != 200:
                with lock:
                    errors[f"http {status}"] = errors.get(f"http {status}", 0) + 1
                continue
            mine.append(time.perf_counter() - started)
        if conn is not None:
            conn.close()

    started = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(seconds + 30)
    elapsed = time.monotonic() - started
    merged = [value for values in latencies for value in values]
    return LoadResult(tool="python", requests=len(merged), seconds=elapsed,
                      requests_per_s=len(merged) / elapsed if elapsed else 0.0,
                      p50_s=percentile(merged, 50), p99_s=percentile(merged, 99), errors=errors)
