"""The control socket under load: many ping and list requests against a busy daemon.

pmxd runs 200 idle instances (/bin/sleep, interpreter "none"). First a baseline: one
thread sends 200 requests alternating `ping` and `list`, nothing else running. Then 4
client threads, one pmx.cli.client.Client each, send 2,500 requests apiece, alternating
the same way. Printed: answered and failed requests (failures by kind), p50/p90/p99 and
max latency for each command and both together, loaded vs the baseline, requests/s, and
pmxd's CPU time and RSS before and after. A request that is not answered within 5 s (the
client's default) is a failure. The whole load is cut off after --max-seconds.

    python bench/control_load.py           # 200 instances, 4 x 2,500 requests
    python bench/control_load.py --quick   # 50 instances, 4 x 500 requests
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil
from benchlib import PmxHome, cores_note, ms, percentile, table


@dataclass
class Samples:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"ping": [], "list": []})
    failures: Counter[str] = field(default_factory=Counter)
    rows_seen: Counter[int] = field(default_factory=Counter)


def hammer(client: Any, count: int, deadline: float, out: Samples) -> None:
    from pmx.supervisor.errors import PmxError
    from pmx.supervisor.protocol import Command

    try:
        for number in range(count):
            if time.monotonic() > deadline:
                out.failures["not sent: --max-seconds reached"] += count - number
                return
            command = Command.PING if number % 2 == 0 else Command.LIST
            started = time.perf_counter()
            try:
                result = client.call(command)
            except PmxError as exc:
                out.failures[f"{command.value}: {type(exc).__name__}: {str(exc)[:80]}"] += 1
                continue
            except Exception as exc:  # a bug in the client or the daemon: count it, go on
                out.failures[f"{command.value}: {type(exc).__name__}: {str(exc)[:80]}"] += 1
                continue
            out.latencies[command.value].append(time.perf_counter() - started)
            if command is Command.LIST:
                rows = result.get("instances")
                out.rows_seen[len(rows) if isinstance(rows, list) else -1] += 1
    finally:
        client.close()


def summary(label: str, samples: list[Samples]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for command in ("ping", "list", "both"):
        values = [v for s in samples for key, vs in s.latencies.items()
                  if command in (key, "both") for v in vs]
        rows.append((label, command, f"{len(values):,}", ms(percentile(values, 50)),
                     ms(percentile(values, 90)), ms(percentile(values, 99)),
                     ms(max(values, default=float("nan")))))
    return rows


def cpu_of(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 instances, 4 x 500 requests")
    parser.add_argument("--instances", type=int, help="idle instances (default 200)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--requests", type=int, help="requests per thread (default 2,500)")
    parser.add_argument("--max-seconds", type=float, default=150.0,
                        help="stop sending after this long (default 150)")
    args = parser.parse_args()
    count = args.instances or (50 if args.quick else 200)
    per_thread = args.requests or (500 if args.quick else 2_500)
    baseline_requests = 100 if args.quick else 200
    cores_note()
    print(f"{count} idle instances; baseline 1 thread x {baseline_requests} requests; load "
          f"{args.threads} threads x {per_thread:,} requests, alternating ping and list")

    with PmxHome() as pmx:
        ecosystem = pmx.write("idle.toml", f"""
[[apps]]
name = "idle"
script = "/bin/sleep"
args = ["100000"]
interpreter = "none"
instances = {count}
""")
        pmx.run("start", str(ecosystem), timeout=120)
        pmx.wait_online("idle", count, timeout=120)
        pid = pmx.daemon_pid()
        assert pid is not None, "no pmxd.pid"
        daemon = psutil.Process(pid)
        time.sleep(1.5)  # one monitor round, so list carries CPU/memory figures
        rss_before = daemon.memory_info().rss
        print(f"pmxd pid {pid}: RSS {rss_before / 2**20:.1f} MiB, "
              f"{daemon.num_fds()} fds, {daemon.num_threads()} threads before the load")

        baseline = Samples()
        began = time.monotonic()
        hammer(pmx.client(), baseline_requests, began + args.max_seconds, baseline)
        baseline_s = time.monotonic() - began

        loaded = [Samples() for _ in range(args.threads)]
        cpu_before = cpu_of(daemon)
        began = time.monotonic()
        deadline = began + args.max_seconds
        threads = [threading.Thread(target=hammer, args=(pmx.client(), per_thread, deadline, s),
                                    daemon=True) for s in loaded]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.max_seconds + 30)
        load_s = time.monotonic() - began
        cpu_used = cpu_of(daemon) - cpu_before
        rss_after = daemon.memory_info().rss
        stuck = sum(thread.is_alive() for thread in threads)

        answered = sum(len(v) for s in loaded for v in s.latencies.values())
        failed = sum(s.failures.total() for s in loaded)
        base_answered = sum(len(v) for v in baseline.latencies.values())
        print(f"\nbaseline: {base_answered:,} answered, {baseline.failures.total()} failed in "
              f"{baseline_s:.1f}s ({base_answered / baseline_s:,.0f} requests/s)")
        print(f"load:     {answered:,} answered, {failed:,} failed of "
              f"{args.threads * per_thread:,} in {load_s:.1f}s ({answered / load_s:,.0f} requests/s)"
              + (f"; {stuck} threads still running at the end" if stuck else ""))
        print()
        table(summary("baseline (1 thread)", [baseline]) + summary(f"load ({args.threads} threads)",
                                                                    loaded),
              ["run", "command", "answered", "p50", "p90", "p99", "max"])
        for label, source in (("p50", 50), ("p99", 99)):
            base = [v for vs in baseline.latencies.values() for v in vs]
            load = [v for s in loaded for vs in s.latencies.values() for v in vs]
            if base and load:
                print(f"  {label} loaded / baseline: "
                      f"{percentile(load, source) / percentile(base, source):.2f}x")
        failures: Counter[str] = Counter()
        for s in [baseline, *loaded]:
            failures.update(s.failures)
        if failures:
            print("\nfailed requests by kind:")
            for kind, number in failures.most_common():
                print(f"  {number:6,}  {kind}")
        rows: Counter[int] = Counter()
        for s in [baseline, *loaded]:
            rows.update(s.rows_seen)
        if set(rows) != {count}:
            print(f"pmx misbehaviour? list answers had these row counts: {dict(rows)} "
                  f"(expected {count})")
        print(f"\npmxd CPU during the load: {cpu_used:.1f} s in {load_s:.1f} s "
              f"({cpu_used / load_s * 100:.0f}% of one core), "
              f"{cpu_used / max(1, answered) * 1e6:.0f} us per answered request")
        print(f"pmxd RSS: before {rss_before / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB "
              f"({(rss_after - rss_before) / 2**20:+.1f} MiB); {daemon.num_fds()} fds, "
              f"{daemon.num_threads()} threads after")
        online = sum(1 for r in pmx.list() if r["status"] == "online")
        print(f"after the load: {online} of {count} instances online")


if __name__ == "__main__":
    main()
