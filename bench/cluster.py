"""Throughput of one HTTP app as 1 instance and as N instances sharing a port (cluster mode).

The app is config-examples/apps/http_server.py (standard library, a thread per
connection, answers with its pid). Three set-ups on 127.0.0.1, each loaded the same way:

* standalone: the app binds its own port, no pmx (the baseline: what pmx costs, if anything);
* pmx cluster, 1 instance: the app serves on the socket pmxd bound and passed as fd 3;
* pmx cluster, N instances (default 2 = this machine's cores) on that one socket.

Each set-up runs twice: "example" is the app as it is, "nodelay" the same app with
TCP_NODELAY (bench/http_nodelay.py), because the example's keep-alive responses wait
~40 ms on Nagle + delayed ACK, which hides its CPU-bound throughput (--app picks one).

Load: wrk (`apt-get install -y wrk`), or, if it is missing or --loadgen python is given,
a Python thread pool with keep-alive connections (far weaker: it is itself bound by the
GIL). Requests/s and p99 latency are printed for each, then the ratios N / 1 and
1 / standalone. Each set-up is measured --rounds times, alternating, and the median round
is shown with the range.

    python bench/cluster.py            # 6 s per measurement, 3 rounds (about 2.5 minutes)
    python bench/cluster.py --quick    # 2 s, 1 round (about 25 s)
"""

from __future__ import annotations

import argparse
import functools
import http.client
import os
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
from benchlib import (
    HTTP_APP,
    REPO,
    PmxHome,
    answers,
    cores_note,
    free_port,
    ms,
    ratio,
    stop_popen,
    table,
    wait_for,
)
from loadgen import LoadResult, have_wrk, run_python, run_wrk

NODELAY_APP = REPO / "bench" / "http_nodelay.py"




def spread(port: int, count: int = 40) -> Counter[str]:
    """Answering pids over `count` requests on fresh connections."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/", headers={"Connection": "close"})
        body = conn.getresponse().read().decode()
        conn.close()
        seen[body.split("pid ")[1].split()[0] if "pid " in body else "?"] += 1
    return seen


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            out[pid] = times.user + times.system
        except psutil.Error:
            out[pid] = float("nan")
    return out


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen backlog was full."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return -1
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        names, numbers = header.split(), values.split()
        if names and names[0] == "TcpExt:" and "ListenOverflows" in names:
            return int(numbers[names.index("ListenOverflows")])
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per measurement, 1 round")
    parser.add_argument("--instances", type=int, default=len(os.sched_getaffinity(0)),
                        help="N for the cluster (default: cores)")
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 6)")
    parser.add_argument("--rounds", type=int, help="measurements of each set-up (default 3)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--app", choices=("both", "example", "nodelay"), default="both",
                        help="the example as it is, with TCP_NODELAY, or both (default)")
    args = parser.parse_args()
    duration = args.duration or (2.0 if args.quick else 6.0)
    rounds = args.rounds or (1 if args.quick else 3)
    n = args.instances

    use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and have_wrk())
    if use_wrk and not have_wrk():
        sys.exit("wrk is not installed: apt-get install -y wrk, or use --loadgen python")
    if use_wrk:
        print(f"load generator: wrk, {args.threads} thread(s), {args.connections} keep-alive "
              f"connections, {duration:g}s per measurement (+1s warm-up)")
    else:
        why = "forced by --loadgen python" if args.loadgen == "python" else \
            "wrk not found (apt-get install -y wrk)"
        print(f"load generator: Python threads ({why}), {args.connections} keep-alive "
              f"connections, {duration:g}s per measurement (+1s warm-up); it is GIL-bound and "
              f"may be the bottleneck itself")
    cores_note()

    def load(port: int, seconds: float) -> LoadResult:
        if use_wrk:
            return run_wrk(f"http://127.0.0.1:{port}/", seconds=seconds,
                           connections=args.connections, threads=args.threads)
        return run_python("127.0.0.1", port, seconds=seconds, connections=args.connections)

    results: dict[str, list[LoadResult]] = {}
    cpu_shares: dict[str, list[float]] = {}

    def measure(label: str, port: int, pids: list[int]) -> None:
        load(port, 1.0)  # warm-up
        overflows = listen_overflows()
        before = cpu_seconds(pids)
        result = load(port, duration)
        after = cpu_seconds(pids)
        overflows = listen_overflows() - overflows
        results.setdefault(label, []).append(result)
        cpu_shares[label] = [after[p] - before[p] for p in pids]
        errors = f", errors {result.errors}" if result.errors else ""
        dropped = f", {overflows} SYNs dropped on a full listen backlog" if overflows else ""
        print(f"  {label}: {result.requests_per_s:,.0f} req/s, p99 {ms(result.p99_s)}{errors}{dropped}")

    apps = {"example": HTTP_APP, "nodelay": NODELAY_APP}
    chosen = list(apps) if args.app == "both" else [args.app]
    standalones: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for variant in chosen:
            port = free_port()
            standalones[variant] = (subprocess.Popen(
                [sys.executable, str(apps[variant])], env={**os.environ, "PORT": str(port)},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)
        with PmxHome() as pmx:
            ports = {(variant, count): free_port() for variant in chosen for count in (1, n)}
            ecosystem = "".join(f"""
[[apps]]
name = "{variant}-x{count}"
script = "{apps[variant]}"
exec_mode = "cluster"
instances = {count}
listen = "127.0.0.1:{port}"
""" for (variant, count), port in ports.items())
            pmx.run("start", str(pmx.write("cluster.toml", ecosystem)))
            setups: list[tuple[str, int, list[int]]] = []
            for variant in chosen:
                popen, port = standalones[variant]
                setups.append((f"{variant}: standalone (no pmx)", port, [popen.pid]))
                for count in (1, n):
                    online = pmx.wait_online(f"{variant}-x{count}", count)
                    setups.append((f"{variant}: pmx cluster x{count}", ports[(variant, count)],
                                   [int(r["pid"]) for r in online]))
            for _, port, _ in setups:
                wait_for(functools.partial(answers, port), timeout=20,
                         what=f"HTTP answer on 127.0.0.1:{port}")
            many_port = ports[(chosen[0], n)]
            spread_seen = spread(many_port)
            print(f"pmx cluster of {n} on 127.0.0.1:{many_port}: 40 fresh connections answered by "
                  f"{len(spread_seen)} pids {dict(spread_seen)}")
            for number in range(rounds):
                print(f"round {number + 1}/{rounds}")
                for label, port, pids in setups:
                    measure(label, port, pids)
            restarted = [f"{r['name']}:{r['instance']}" for r in pmx.list() if r.get("restarts")]
            if restarted:
                print(f"pmx misbehaviour? instances restarted during the run: {restarted}")
    finally:
        for popen, _ in standalones.values():
            stop_popen(popen)

    def median_of(label: str, key: Callable[[LoadResult], float]) -> float:
        return statistics.median(key(r) for r in results[label])

    print(f"\nresults (median of {rounds} round(s); range in brackets)")
    rows: list[tuple[object, ...]] = []
    for label in results:
        rates = [r.requests_per_s for r in results[label]]
        p99s = [r.p99_s for r in results[label]]
        errors = sum(r.error_total for r in results[label])
        shares = cpu_shares.get(label, [])
        rows.append((label, f"{statistics.median(rates):,.0f} [{min(rates):,.0f}-{max(rates):,.0f}]",
                     f"{ms(statistics.median(p99s))} [{ms(min(p99s))}-{ms(max(p99s))}]",
                     errors, " + ".join(f"{s:.1f}" for s in shares)))
    table(rows, ["set-up", "requests/s", "p99 latency", "errors", "app CPU s (last round)"])
    for variant in chosen:
        one = f"{variant}: pmx cluster x1"
        many = f"{variant}: pmx cluster x{n}"
        alone = f"{variant}: standalone (no pmx)"
        rps = {label: median_of(label, lambda r: r.requests_per_s) for label in (one, many, alone)}
        p99 = {label: median_of(label, lambda r: r.p99_s) for label in (one, many)}
        print(f"\n  {variant}: requests/s x{n} / x1 = {ratio(rps[many], rps[one])}, "
              f"x1 / standalone = {ratio(rps[one], rps[alone])}, "
              f"p99 x{n} / x1 = {ratio(p99[many], p99[one])}")
    if "example" in chosen:
        print("\n  note: the example app writes headers and body in two send() calls; on keep-alive "
              "connections Nagle + delayed ACK hold each response ~40 ms, so its requests/s is about "
              "connections / 40 ms whatever the instance count. 'nodelay' is the same app with "
              "TCP_NODELAY (bench/http_nodelay.py): its figures show the CPU-bound throughput.")
    print("  standalone: the app binds its own socket with socketserver's listen(5); pmxd binds with a "
          "backlog of 4096 (capped by somaxconn). Connections dropped on a full backlog wait for "
          "a SYN retry (1 s), which shows in the standalone p99 and requests/s (see 'SYNs dropped').")
    print(f"  the load generator shares the {len(os.sched_getaffinity(0))} cores with the servers, "
          f"so x{n} cannot reach {n}x.")


if __name__ == "__main__":
    main()
