"""Failed requests and latency during repeated `pmx reload web` of an N-instance cluster.

pmxd runs config-examples/apps/http_server.py as a cluster of N instances (default 2)
on 127.0.0.1, from an ecosystem file written to the temporary home with
listen_timeout = "500ms" (a replacement counts as ready once it has stayed up that long).
Python client threads load it while the script runs `pmx reload web` again and again,
once with a fresh connection per request and once with keep-alive connections.

Every request is counted; a failure is a refused or reset connection, a connection
closed without a response, a timeout (5 s) or a status other than 200. A keep-alive
response that says "Connection: close" is not a failure: the client reconnects for the
next request, as every HTTP client does. Printed per mode: total and failed requests (by
kind), p50/p99 latency of requests started during a reload vs outside one, and the wall
time of each `pmx reload web` (the CLI's whole run, as a user waits for it). After each
reload, every instance must be online with a new pid.

    python bench/reload.py             # 10 reloads per mode (about 1 minute)
    python bench/reload.py --quick     # 3 reloads per mode (about 25 s)
    python bench/reload.py --app nodelay   # the same app with TCP_NODELAY (see http_nodelay.py)

`--dropin` measures drop-in cluster mode instead: unmodified servers that call
listen($PORT) themselves (tests/apps/node_hello.js, tests/apps/py_hello.py), run with
exec_mode = "cluster" and no `listen` key, so pmx's preloads share the port the first
instance binds and a replacement counts as ready once it reports listening. It runs the
matrix app {Node, Python} x instances {2, 4} x readiness {none, wait_ready (node_ready.js,
py_ready.py)} x load {fresh, keep-alive}, one fresh pmx home per app/instances/readiness,
prints each mode's report as above, then one summary row per combination. Node rows are
skipped, with a note, when `node` is not installed.

    python bench/reload.py --dropin --quick   # 3 reloads per combination (about 2.5 min)
    python bench/reload.py --dropin           # 5 reloads per combination (about 5 min)
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    CLI,
    HTTP_APP,
    REPO,
    TEST_APPS,
    PmxHome,
    answers,
    cores_note,
    free_port,
    ms,
    percentile,
    table,
    wait_for,
)

NODELAY_APP = REPO / "bench" / "http_nodelay.py"
TIMEOUT_S = 5.0
MAX_PER_CLIENT = 500_000


@dataclass
class Outcome:
    started: float  # time.monotonic()
    latency: float
    failure: str | None  # None: a 200 answer


@dataclass
class ModeResult:
    mode: str
    app: str = "web"  # the pmx app name that was reloaded
    outcomes: list[Outcome] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)  # pmxd.log lines of note during the mode


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "closed without a response"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"timeout ({TIMEOUT_S:g}s)"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    return type(exc).__name__


def client_loop(port: int, keep_alive: bool, stop: threading.Event, out: list[Outcome]) -> None:
    conn: http.client.HTTPConnection | None = None
    headers = {} if keep_alive else {"Connection": "close"}
    while not stop.is_set() and len(out) < MAX_PER_CLIENT:
        started = time.monotonic()
        failure: str | None = None
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failure = f"http {response.status}"
            if not keep_alive or response.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            failure = classify(exc)
            if conn is not None:
                conn.close()
            conn = None
        out.append(Outcome(started, time.monotonic() - started, failure))
    if conn is not None:
        conn.close()


def instance_pids(pmx: PmxHome, name: str = "web") -> list[tuple[str, int | None]]:
    return [(str(r["status"]), r["pid"]) for r in pmx.list() if r["name"] == name]


def run_mode(pmx: PmxHome, port: int, *, keep_alive: bool, clients: int, reloads: int,
             settle: float, gap: float, instances: int, name: str = "web",
             label: str = "") -> ModeResult:
    """Load app `name` (`instances` instances) on `port` and `pmx reload` it `reloads` times.
    `label` is put before the mode's name in its report."""
    result = ModeResult(label + ("keep-alive" if keep_alive else "fresh connection per request"),
                        app=name)
    per_client: list[list[Outcome]] = [[] for _ in range(clients)]
    stop = threading.Event()
    threads = [threading.Thread(target=client_loop, args=(port, keep_alive, stop, per_client[i]),
                                daemon=True) for i in range(clients)]
    log = pmx.home / "pmxd.log"
    log_start = log.stat().st_size if log.exists() else 0
    for thread in threads:
        thread.start()
    try:
        time.sleep(settle)
        previous = {pid for _, pid in instance_pids(pmx, name) if pid is not None}
        for number in range(reloads):
            started = time.monotonic()
            reload = subprocess.run([*CLI, "reload", name], env=pmx.env, capture_output=True,
                                    text=True, timeout=120)
            ended = time.monotonic()
            result.windows.append((started, ended))
            if reload.returncode != 0:
                result.problems.append(f"reload {number + 1}: `pmx reload {name}` exited "
                                       f"{reload.returncode}: {reload.stderr.strip()[-300:]}")
            rows = instance_pids(pmx, name)
            now = {pid for _, pid in rows if pid is not None}
            if len(rows) != instances or any(status != "online" for status, _ in rows):
                result.problems.append(f"reload {number + 1}: after it, instances were {rows}")
            if now & previous:
                result.problems.append(f"reload {number + 1}: pids {sorted(now & previous)} "
                                       f"were not replaced")
            previous = now
            time.sleep(gap)
        time.sleep(max(0.0, settle - gap))
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT_S + 5)
    if log.exists():
        with log.open("rb") as file:
            file.seek(log_start)
            text = file.read().decode(errors="replace")
        result.log_lines = [line for line in text.splitlines()
                            if "SIGKILL" in line or " ERROR " in line or "Traceback" in line]
    result.outcomes = sorted((o for outcomes in per_client for o in outcomes),
                             key=lambda o: o.started)
    return result


def in_window(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(start <= t <= end for start, end in windows)


def report(result: ModeResult) -> None:
    outcomes, windows = result.outcomes, result.windows
    failures = [o for o in outcomes if o.failure]
    during = [o.latency for o in outcomes if not o.failure and in_window(o.started, windows)]
    outside = [o.latency for o in outcomes if not o.failure and not in_window(o.started, windows)]
    reload_times = [end - start for start, end in windows]
    span = outcomes[-1].started - outcomes[0].started if outcomes else 0.0
    print(f"\n{result.mode}: {len(outcomes):,} requests in {span:.1f}s, "
          f"{len(failures)} failed, {len(windows)} reloads")
    table([("during a reload", f"{len(during):,}", ms(percentile(during, 50)),
            ms(percentile(during, 99)), ms(max(during, default=float('nan')))),
           ("outside reloads", f"{len(outside):,}", ms(percentile(outside, 50)),
            ms(percentile(outside, 99)), ms(max(outside, default=float('nan'))))],
          ["requests started", "answered 200", "p50", "p99", "max"])
    if during and outside:
        print(f"  p99 during / outside = {percentile(during, 99) / percentile(outside, 99):.2f}x")
    if reload_times:
        print(f"  `pmx reload {result.app}` wall time: median {ms(statistics.median(reload_times))}, "
              f"min {ms(min(reload_times))}, max {ms(max(reload_times))}")
        print(f"    each: {', '.join(f'{t:.2f}s' for t in reload_times)}")
    if failures:
        kinds = Counter(str(o.failure) for o in failures)
        print(f"  failed requests by kind: {dict(kinds)}")
        inside = sum(1 for o in failures if in_window(o.started, windows))
        print(f"  {inside} of them started during a reload")
        base = windows[0][0] if windows else outcomes[0].started
        for o in failures[:5]:
            print(f"    at +{o.started - base:.3f}s (after {o.latency * 1000:.1f} ms): {o.failure}")
    for problem in result.problems:
        print(f"  pmx misbehaviour: {problem}")
    if result.log_lines:
        print(f"  pmxd.log during this mode: {len(result.log_lines)} lines about SIGKILL or errors, e.g.")
        for line in result.log_lines[:3]:
            print(f"    {line[:220]}")


# Drop-in cluster mode: (runtime, label, plain app, the same app with wait_ready)
DROPIN_APPS = (
    ("node", "Node hello", TEST_APPS / "node_hello.js", TEST_APPS / "node_ready.js"),
    ("python", "Python hello", TEST_APPS / "py_hello.py", TEST_APPS / "py_ready.py"),
)
DROPIN_INSTANCES = (2, 4)
DROPIN_READINESS = ("none", "wait_ready")


def time_wait_note(port: int) -> str:
    """Connections to `port` in TIME_WAIT vs the ephemeral port range: near the range's
    size, connect() reuses TIME_WAIT tuples and the kernel can reset fresh connections pmx
    never saw (README). On loopback both ends may hold one: a connection counts once."""
    suffix = f":{port:04X}"
    connections: set[tuple[str, ...]] = set()
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table_path) as file:
                for line in file:
                    fields = line.split()
                    if fields[3:4] == ["06"] and (fields[1].endswith(suffix)
                                                  or fields[2].endswith(suffix)):
                        connections.add(tuple(sorted(fields[1:3])))
        except OSError:
            pass
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return f"{len(connections):,} of its connections in TIME_WAIT after"
    return (f"{len(connections):,} of its connections in TIME_WAIT after "
            f"({high - low + 1:,} ephemeral ports)")


def summary_cells(result: ModeResult, extra: str = "") -> list[object]:
    """requests, failed, reload median, reload max, notes (failure kinds, problems, extra)."""
    failures = Counter(str(o.failure) for o in result.outcomes if o.failure)
    reload_times = [end - start for start, end in result.windows]
    notes = [f"{kind}: {count}" for kind, count in failures.most_common()]
    if result.problems:
        notes.append(f"{len(result.problems)} pmx misbehaviour lines")
    if result.log_lines:
        notes.append(f"{len(result.log_lines)} pmxd.log SIGKILL/error lines")
    if extra:
        notes.append(extra)
    return [f"{len(result.outcomes):,}", sum(failures.values()),
            ms(statistics.median(reload_times)) if reload_times else "n/a",
            ms(max(reload_times, default=float("nan"))), "; ".join(notes)]


def dropin_combination(title: str, script: Path, instances: int, readiness: str, *,
                       loads: list[bool], clients: int, reloads: int, settle: float,
                       gap: float) -> list[list[object]]:
    """One fresh pmx home running `script` as a drop-in cluster; each load mode in it.
    Returns one summary row per load mode."""
    cells: list[object] = [title, instances, readiness]
    load_names = ["keep-alive" if keep_alive else "fresh" for keep_alive in loads]
    print(f"\n=== {script.relative_to(REPO)}, {instances} instances, readiness {readiness}")
    rows: list[list[object]] = []
    with PmxHome() as pmx:
        port = free_port()
        wait_line = "wait_ready = true\n" if readiness == "wait_ready" else ""
        ecosystem = pmx.write("dropin.toml", f"""
[[apps]]
name = "web"
script = "{script}"
exec_mode = "cluster"
instances = {instances}
env = {{ PORT = "{port}" }}
kill_timeout = "5s"
{wait_line}""")
        try:
            pmx.run("start", str(ecosystem))
            pmx.wait_online("web", instances)
            wait_for(lambda: answers(port), timeout=20, what=f"HTTP answer on 127.0.0.1:{port}")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"  pmx misbehaviour: the app did not start: {exc}")
            return [[*cells, name, "-", "-", "-", "-", "did not start"] for name in load_names]
        for keep_alive, name in zip(loads, load_names, strict=True):
            result = run_mode(pmx, port, keep_alive=keep_alive, clients=clients,
                              reloads=reloads, settle=settle, gap=gap, instances=instances,
                              label=f"{script.name} x{instances}, readiness {readiness}: ")
            report(result)
            extra = "" if keep_alive else time_wait_note(port)
            rows.append([*cells, name, *summary_cells(result, extra)])
    return rows


def run_dropin(*, instance_counts: tuple[int, ...], loads: list[bool], clients: int,
               reloads: int, settle: float, gap: float) -> None:
    """The drop-in matrix: one pmx home per app x instances x readiness, each load mode in
    it, every mode's report, then one summary row per combination."""
    rows: list[list[object]] = []
    for runtime, title, hello, ready in DROPIN_APPS:
        if shutil.which(runtime) is None:
            print(f"\nnote: `{runtime}` is not installed: the {title} rows are skipped")
            continue
        for instances in instance_counts:
            for readiness in DROPIN_READINESS:
                script = ready if readiness == "wait_ready" else hello
                rows += dropin_combination(title, script, instances, readiness, loads=loads,
                                           clients=clients, reloads=reloads, settle=settle,
                                           gap=gap)
    print(f"\nsummary: {reloads} reloads per row under {clients} client threads; reload = "
          f"wall time of `pmx reload web` (the CLI's whole run)")
    table(rows, ["app", "instances", "readiness", "load", "requests", "failed",
                 "reload median", "reload max", "failure kinds / notes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 reloads per mode")
    parser.add_argument("--instances", type=int,
                        help="instances (default: cores; with --dropin: only this count "
                             "instead of both 2 and 4)")
    parser.add_argument("--reloads", type=int,
                        help="reloads per mode (default 10; with --dropin 5; --quick: 3)")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--app", choices=("example", "nodelay"), default="example")
    parser.add_argument("--mode", choices=("both", "fresh", "keep-alive"), default="both")
    parser.add_argument("--dropin", action="store_true",
                        help="the drop-in cluster matrix (Node/Python hello x 2/4 instances x "
                             "readiness none/wait_ready x fresh/keep-alive) instead")
    args = parser.parse_args()
    if args.dropin and args.app != "example":
        parser.error("--app does not apply to --dropin (its apps are tests/apps/*_hello)")
    reloads = args.reloads or (3 if args.quick else 5 if args.dropin else 10)
    settle, gap = (1.0, 0.5) if args.quick else (2.0, 1.0)
    modes = [False, True] if args.mode == "both" else [args.mode == "keep-alive"]
    if args.dropin:
        counts = (args.instances,) if args.instances else DROPIN_INSTANCES
        print(f"drop-in cluster mode (no `listen` key: pmx's preloads share the port the app "
              f"binds), {args.clients} Python client threads, {reloads} reloads per "
              f"combination, {gap:g}s between reloads")
        cores_note()
        run_dropin(instance_counts=counts, loads=modes, clients=args.clients, reloads=reloads,
                   settle=settle, gap=gap)
        print(f"(`pmx` here is {sys.executable} -m pmx.cli.main)")
        return
    args.instances = args.instances or len(os.sched_getaffinity(0))
    app = HTTP_APP if args.app == "example" else NODELAY_APP
    print(f"{args.instances} instances of {app.relative_to(REPO)}, {args.clients} Python client "
          f"threads, {reloads} reloads per mode, {gap:g}s between reloads")
    cores_note()

    with PmxHome() as pmx:
        port = free_port()
        ecosystem = pmx.write("reload.toml", f"""
[[apps]]
name = "web"
script = "{app}"
exec_mode = "cluster"
instances = {args.instances}
listen = "127.0.0.1:{port}"
listen_timeout = "500ms"
kill_timeout = "5s"
""")
        pmx.run("start", str(ecosystem))
        pmx.wait_online("web", args.instances)

        wait_for(lambda: answers(port), timeout=20, what=f"HTTP answer on 127.0.0.1:{port}")
        for keep_alive in modes:
            result = run_mode(pmx, port, keep_alive=keep_alive, clients=args.clients,
                              reloads=reloads, settle=settle, gap=gap, instances=args.instances)
            report(result)
        rows = pmx.list()
        print(f"\nafter the run: {[(r['instance'], r['status'], r['restarts']) for r in rows]} "
              f"(instance, status, restarts)")
        log = pmx.home / "pmxd.log"
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if " ERROR " in line or "Traceback" in line] if log.exists() else []
        if errors:
            print(f"pmxd.log has {len(errors)} ERROR lines, e.g. {errors[0][:200]}")
    print(f"(`pmx` here is {sys.executable} -m pmx.cli.main)")


if __name__ == "__main__":
    main()
