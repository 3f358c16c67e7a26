"""Memory-limit restarts: how soon after crossing its limit an app is replaced, and what
sampling idle instances costs the daemon.

Part 1. tests/apps/leak.py leaks LEAK_MB_PER_S=100 MB/s under max_memory_restart = LIMIT
(fork mode, default monitor interval of 1 s) and writes the moment its allocations pass
LIMIT_MB (= LIMIT) to $CROSSED_FILE. It starts leaking after a random 0..1 s pause
(bench/leak_jitter.py), because pmxd spawns the replacement right after a monitor tick,
so a leak that takes about a whole number of ticks to reach its limit would be caught at
the same age every run (--no-jitter shows that). The script polls the daemon's LIST (the request
behind `pmx list --json`) every 20 ms and notes when a new pid shows online. Each crossing
is matched to the process alive at that moment, and the figure is
crossing -> replacement online, split with the daemon's own events into crossing ->
"memory_restart" event (detection, bounded by the monitor interval) and event -> the new
pid online (stop + spawn). The baseline is the monitor interval: detection alone averages
half of it. Caveat: RSS includes the interpreter (~10 MB), so it passes the limit ~0.1 s
before the recorded moment; a process restarted inside that gap records no crossing and
is counted apart.

Part 2. pmxd's CPU (psutil on the pid in PMX_HOME/pmxd.pid) while it samples 200 idle
instances (/bin/sleep, interpreter "none") for 30 s, against the same daemon with no
apps for 10 s; plus one sampling round of the same pids timed in this process with
pmx.supervisor.monitor.Sampler.

    python bench/memory_limit.py           # 8 restarts; 200 instances for 30 s (about 65 s)
    python bench/memory_limit.py --quick   # 3 restarts; 50 instances for 10 s (about 30 s)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil
from benchlib import REPO, TEST_APPS, PmxHome, cores_note, ms, percentile, table, wait_for

MONITOR_INTERVAL_S = 1.0  # pmxd's default


@dataclass
class Seen:
    pid: int
    online_observed: float  # time.time() when this script's poll first saw it online
    online_daemon: float  # the row's "since": when pmxd moved it to online


def rows_of(client: Any, name: str) -> list[dict[str, Any]]:
    from pmx.supervisor.protocol import Command

    result = client.call(Command.LIST)
    return [r for r in result.get("instances", []) if r.get("name") == name]


def leak_runs(pmx: PmxHome, restarts: int, limit_mb: int, jitter: bool) -> None:
    from pmx.supervisor.protocol import event_topic

    crossed = pmx.home / "crossed.txt"
    script = REPO / "bench" / "leak_jitter.py" if jitter else TEST_APPS / "leak.py"
    ecosystem = pmx.write("leak.toml", f"""
[[apps]]
name = "leak"
script = "{script}"
max_memory_restart = "{limit_mb}M"
env = {{ LEAK_MB_PER_S = "100", LIMIT_MB = "{limit_mb}", CROSSED_FILE = "{crossed}", \
JITTER_S = "{MONITOR_INTERVAL_S}" }}
""")
    client = pmx.client()
    events: list[dict[str, Any]] = []
    stop = threading.Event()

    def listen() -> None:
        sub = client.subscribe([event_topic("leak")])
        try:
            while not stop.is_set():
                if sub.poll(100):
                    for _, body in client.stream(sub, timeout_s=0):
                        events.append(body)
        finally:
            sub.close(linger=0)

    pmx.run("start", str(ecosystem))
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    seen: list[Seen] = []
    deadline = time.monotonic() + 20 + restarts * 6
    try:
        while len(seen) < restarts + 1 and time.monotonic() < deadline:
            for row in rows_of(client, "leak"):
                pid = row.get("pid")
                if row.get("status") == "online" and isinstance(pid, int) and \
                        all(s.pid != pid for s in seen):
                    seen.append(Seen(pid, time.time(), float(row.get("since") or 0)))
            time.sleep(0.02)
        time.sleep(0.2)  # let the last events arrive
    finally:
        stop.set()
        listener.join(5)
        client.close()
    if len(seen) < restarts + 1:
        print(f"pmx misbehaviour? only {len(seen) - 1} memory restarts within the time allowed "
              f"(wanted {restarts})")
    crossings = [float(line) for line in crossed.read_text().split()] if crossed.exists() else []
    detections = [float(e["time"]) for e in events if e.get("kind") == "memory_restart"]
    reasons = [str(e.get("message")) for e in events if e.get("kind") == "memory_restart"]
    print(f"\n{len(seen)} processes seen online, {len(crossings)} crossings recorded, "
          f"{len(detections)} memory_restart events; e.g. \"{reasons[0] if reasons else '-'}\"")

    rows = []
    totals, detects, replaces, daemon_side = [], [], [], []
    skipped = 0
    for number, (old, new) in enumerate(itertools.pairwise(seen), start=1):
        # The crossing written while `old` was the running process.
        mine = [t for t in crossings if old.online_daemon - 0.05 <= t <= new.online_daemon]
        event = [t for t in detections if old.online_daemon <= t <= new.online_daemon + 0.05]
        if not mine:
            skipped += 1
            rows.append((number, old.pid, new.pid, "no crossing recorded", "", "", ""))
            continue
        total = new.online_observed - mine[0]
        totals.append(total)
        daemon_side.append(new.online_daemon - mine[0])
        detect = event[0] - mine[0] if event else float("nan")
        replace = new.online_daemon - event[0] if event else float("nan")
        if event:
            detects.append(detect)
            replaces.append(replace)
        rows.append((number, old.pid, new.pid, ms(total), ms(new.online_daemon - mine[0]),
                     ms(detect), ms(replace)))
    table(rows, ["run", "old pid", "new pid", "crossing -> seen online",
                 "-> online (daemon time)", "detect", "stop + spawn"])
    print(f"\n  crossing -> new pid online (seen by polling every 20 ms), over {len(totals)} runs: "
          f"median {ms(statistics.median(totals)) if totals else 'n/a'}, "
          f"p90 {ms(percentile(totals, 90))}, max {ms(max(totals, default=float('nan')))}")
    if detects:
        print(f"  detection (crossing -> memory_restart event): median {ms(statistics.median(detects))},"
              f" max {ms(max(detects))}; baseline: monitor interval {MONITOR_INTERVAL_S:g}s, "
              f"so a uniform 0..{MONITOR_INTERVAL_S:g}s wait averages {ms(MONITOR_INTERVAL_S / 2)}")
        print(f"  stop + spawn (event -> new pid online): median {ms(statistics.median(replaces))}, "
              f"max {ms(max(replaces))}")
    if skipped:
        print(f"  {skipped} restarts caught the app after its RSS passed the limit but before its "
              f"allocations did (RSS includes the interpreter, ~0.1 s earlier at 100 MB/s)")
        if not jitter:
            print("  without the random pause the leak is caught at the same age every run: the "
                  "replacement is spawned right after a monitor tick and reaches the limit about "
                  "one tick later")
    final = rows_of_cli(pmx)
    print(f"  after the runs: {final}")


def rows_of_cli(pmx: PmxHome) -> list[tuple[Any, ...]]:
    return [(r["name"], r["status"], r["restarts"], r.get("reason")) for r in pmx.list()]


def cpu_of(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def daemon_cpu(process: psutil.Process, seconds: float) -> tuple[float, float]:
    """(percent of one core, RSS MiB at the end) over `seconds` of wall time."""
    before, started = cpu_of(process), time.monotonic()
    time.sleep(seconds)
    used, wall = cpu_of(process) - before, time.monotonic() - started
    return used / wall * 100.0, process.memory_info().rss / 2**20


def idle_cpu(pmx: PmxHome, count: int, seconds: float, baseline_s: float) -> None:
    pid = pmx.daemon_pid()
    assert pid is not None, "no pmxd.pid"
    process = psutil.Process(pid)
    pmx.run("delete", "all", check=False)
    wait_for(lambda: not pmx.list(), timeout=30, what="no apps left")
    base_cpu, base_rss = daemon_cpu(process, baseline_s)
    print(f"\npmxd (pid {pid}) with no apps, {baseline_s:g}s: CPU {base_cpu:.2f}% of one core, "
          f"RSS {base_rss:.1f} MiB")
    ecosystem = pmx.write("idle.toml", f"""
[[apps]]
name = "idle"
script = "/bin/sleep"
args = ["100000"]
interpreter = "none"
instances = {count}
""")
    started = time.monotonic()
    pmx.run("start", str(ecosystem), timeout=120)
    pmx.wait_online("idle", count, timeout=120)
    print(f"started {count} idle instances (/bin/sleep) in {time.monotonic() - started:.1f}s")
    time.sleep(2 * MONITOR_INTERVAL_S)  # let sampling settle (the first round primes the CPU rates)
    load_cpu, load_rss = daemon_cpu(process, seconds)
    print(f"pmxd sampling {count} idle instances, {seconds:g}s: CPU {load_cpu:.2f}% of one core, "
          f"RSS {load_rss:.1f} MiB")
    rounds = seconds / MONITOR_INTERVAL_S
    extra = (load_cpu - base_cpu) / 100.0 * seconds  # CPU seconds above the no-app baseline
    print(f"  above the no-app baseline: {load_cpu - base_cpu:.2f} percentage points = "
          f"{extra / rounds * 1000:.1f} ms CPU per 1 s monitor round = "
          f"{extra / rounds / count * 1e6:.0f} us per instance per round")

    from pmx.supervisor.monitor import Sampler

    roots = [(int(r["id"]), int(r["pid"])) for r in pmx.list() if r["name"] == "idle" and r["pid"]]
    sampler = Sampler()
    timings = []
    for _ in range(5):
        began = time.perf_counter()
        sampler.sample(roots)
        timings.append(time.perf_counter() - began)
    print(f"  reference: Sampler.sample() of the same {len(roots)} pids in this process: "
          f"median {ms(statistics.median(timings))} per round (5 rounds)")
    if base_cpu > 0:
        print(f"  ratio CPU with {count} instances / no apps: {load_cpu / base_cpu:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 restarts; 50 instances for 10 s")
    parser.add_argument("--restarts", type=int, help="memory restarts to time (default 8)")
    parser.add_argument("--limit-mb", type=int, default=100, help="max_memory_restart in MiB")
    parser.add_argument("--no-jitter", action="store_true",
                        help="run tests/apps/leak.py directly, without bench/leak_jitter.py's "
                             "random 0..1 s pause before it leaks")
    parser.add_argument("--instances", type=int, help="idle instances (default 200)")
    parser.add_argument("--seconds", type=float, help="CPU measurement with them (default 30)")
    args = parser.parse_args()
    restarts = args.restarts or (3 if args.quick else 8)
    count = args.instances or (50 if args.quick else 200)
    seconds = args.seconds or (10.0 if args.quick else 30.0)
    baseline_s = 3.0 if args.quick else 10.0
    cores_note()
    how = "directly" if args.no_jitter else "after a random 0..1 s pause (bench/leak_jitter.py)"
    print(f"part 1: {restarts} memory restarts of tests/apps/leak.py at 100 MB/s, limit "
          f"{args.limit_mb}M, monitor interval {MONITOR_INTERVAL_S:g}s (pmxd's default), "
          f"leaking {how}")
    with PmxHome() as pmx:
        leak_runs(pmx, restarts, args.limit_mb, jitter=not args.no_jitter)
        print(f"\npart 2: pmxd CPU with {count} idle instances for {seconds:g}s vs no apps for "
              f"{baseline_s:g}s")
        idle_cpu(pmx, count, seconds, baseline_s)


if __name__ == "__main__":
    main()
