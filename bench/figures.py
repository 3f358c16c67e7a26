"""Speed at 10-100 processes (issue 15, table 1), each figure against a baseline of this run.

1. `pmx start` of an ecosystem with one app of 100 instances of `/bin/sleep 1000`
   (interpreter "none") with no daemon running, in a fresh home per trial: when pmxd
   first answers PING (daemon up), when the command exits, when 100 `sleep` processes
   run below pmxd (/proc: the pids allocated since the launch, looked at every 10 ms)
   and when LIST (the request behind `pmx list --json`) shows 100 online with pids.
   Baselines: a bare loop in this process that spawns the same 100 processes with
   subprocess.Popen, and one with os.posix_spawn; for daemon up,
   `python -c "import zmq, psutil, asyncio"` (the imports pmxd cannot avoid).
2. kill -9 -> replacement: SIGKILL one instance's pid (a different instance each trial,
   all up for more than min_uptime), then look at each pid allocated since (a tight loop
   on /proc/sys/kernel/ns_last_pid and /proc/PID/stat) until a new `sleep` below pmxd
   appears. pmxd's own events (their "time" field) split it into kill -> pmxd's first
   state event (the exit seen) and kill -> the "online" event. Baseline: one bare
   os.posix_spawn of the same binary in this process, timed after each trial.
3. With 50 apps (one `/bin/sleep` instance each, monitor interval 1 s): pmxd's CPU (the
   scheduler's run time of all its threads, /proc/PID/task/*/schedstat) over a 10 s
   window as a percentage of one core, against the same window's CPU of two interpreters
   that wake once a second: `time.sleep(1)` in a loop, and an asyncio loop awaiting
   `asyncio.sleep(1)` (the floor of any asyncio daemon that samples each second); pmxd's
   VmRSS against a bare `python -c "import zmq, psutil, asyncio; import time;
   time.sleep(99)"`.

`pmx list` and `pmx list --json` with 10 apps: bench/cli_latency.py (--apps 10 is its default).

    python bench/figures.py            # 3 start trials, 20 kills, 10 s CPU window (~30 s)
    python bench/figures.py --quick    # 1 start trial, 8 kills, 5 s window (~20 s)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from benchlib import (
    CLI,
    NewDescendants,
    PmxHome,
    StartTimes,
    cores_note,
    cpu_seconds,
    exit_on_sigterm,
    mib,
    ms,
    online_count,
    open_files_limit,
    ratio,
    rss_bytes,
    run_seconds,
    stop_pid,
    table,
    wait_for,
    watch_start,
)

SLEEP = "/bin/sleep"
TIMEOUT_S = 120.0
IDLE_CODE = "import time; [time.sleep(1) for _ in range(99)]"
# The floor of any asyncio daemon that samples once a second: its loop waking each second.
ASYNC_IDLE_CODE = ("import asyncio\nasync def main():\n    for _ in range(99):\n"
                   "        await asyncio.sleep(1)\nasyncio.run(main())")
IMPORTS_CODE = "import zmq, psutil, asyncio"
RSS_CODE = "import zmq, psutil, asyncio; import time; time.sleep(99)"


def sleep_app(name: str, instances: int, seconds: int) -> str:
    return f"""
[[apps]]
name = "{name}"
script = "{SLEEP}"
args = ["{seconds}"]
interpreter = "none"
instances = {instances}
"""


def spread(values: list[float]) -> str:
    """median (min..max) of seconds."""
    if not values or any(v != v for v in values):
        return "n/a"
    if len(values) == 1:
        return ms(values[0])
    digits = 1 if max(values) < 0.01 else 0
    return (f"{ms(statistics.median(values))} "
            f"({min(values) * 1000:.{digits}f}..{max(values) * 1000:.{digits}f})")


def median(values: list[float]) -> float:
    good = [v for v in values if v == v]
    return statistics.median(good) if len(good) == len(values) and good else float("nan")


# --- baselines -------------------------------------------------------------------------------

def reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def popen_loop(count: int) -> float:
    """Seconds for subprocess.Popen to return `count` times (each returns once the child
    has exec'd); the children are killed and reaped afterwards, untimed."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        started = time.perf_counter()
        for _ in range(count):
            procs.append(subprocess.Popen([SLEEP, "1000"], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return time.perf_counter() - started
    finally:
        for proc in procs:
            proc.kill()  # by its pid
        for proc in procs:
            proc.wait()


def posix_spawn_loop(count: int) -> float:
    """Seconds for os.posix_spawn to return `count` times (glibc's vfork-style spawn returns
    after the exec); the children are killed and reaped afterwards, untimed."""
    pids: list[int] = []
    try:
        started = time.perf_counter()
        for _ in range(count):
            pids.append(os.posix_spawn(SLEEP, [SLEEP, "1000"], os.environ))
        return time.perf_counter() - started
    finally:
        reap(pids)


def python_imports() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS_CODE], check=True, timeout=60)
    return time.perf_counter() - started


# --- 1. start -> 100 online -----------------------------------------------------------------

def start_trials(trials: int, count: int, baselines: dict[str, list[float]]
                 ) -> tuple[list[StartTimes], PmxHome | None]:
    """`trials` starts in fresh homes, each followed by one run of each baseline (so that
    drift hits both alike); the last home is returned still running (for part 2)."""
    results: list[StartTimes] = []
    kept: PmxHome | None = None
    for trial in range(trials):
        if trial:
            run_baselines(count, baselines)
        pmx = PmxHome()
        try:
            ecosystem = pmx.write("hundred.toml", sleep_app("sleepy", count, 1000))
            times = watch_start(pmx, [*CLI, "start", str(ecosystem)], count, timeout=TIMEOUT_S,
                                scan_every=0.01, list_every=0.05, daemon_up=True)
            results.append(times)
            print(f"  trial {trial + 1}: pmxd's files {ms(times.daemon_files)}, first ping answered "
                  f"{ms(times.daemon_up)}, command exit "
                  f"{times.command()}, {count} running {ms(times.running)}, {count} online "
                  f"{ms(times.online)}" + (f"; stderr: {times.stderr[-300:]}"
                                           if times.returncode != 0 else ""))
        except BaseException:
            pmx.cleanup()
            raise
        if trial == trials - 1 and times.online == times.online:
            kept = pmx
        else:
            pmx.cleanup()
    run_baselines(count, baselines)
    return results, kept


def run_baselines(count: int, into: dict[str, list[float]]) -> None:
    into.setdefault("popen", []).append(popen_loop(count))
    into.setdefault("spawn", []).append(posix_spawn_loop(count))
    into.setdefault("imports", []).append(python_imports())


# --- 2. kill -9 -> replacement --------------------------------------------------------------

def kill_trials(pmx: PmxHome, trials: int, count: int
                ) -> tuple[list[float], list[float], list[float], list[float]]:
    """(kill -> new sleep below pmxd, kill -> first state event, kill -> online event, one
    bare posix_spawn timed right after each trial: the baseline, under the same load)."""
    from pmx.supervisor.protocol import event_topic

    daemon = pmx.daemon_pid()
    assert daemon is not None, "no pmxd.pid"
    client = pmx.client()
    sub = client.subscribe([event_topic("sleepy")])
    appeared: list[float] = []
    seen_exit: list[float] = []
    online: list[float] = []
    single: list[float] = []
    try:
        time.sleep(0.3)  # let the subscription reach pmxd
        step = max(1, count // trials)
        for trial in range(trials):
            slot = (trial * step) % count
            victim = pid_of(client, slot)
            for _ in client.stream(sub, timeout_s=0):
                pass  # drop older events
            watch = NewDescendants(daemon, b"sleep")
            wall = time.time()
            started = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            while not watch.poll() and time.perf_counter() - started < 30:
                time.sleep(0.0002)
            new = sorted(watch.matched)
            took = time.perf_counter() - started if new else float("nan")
            appeared.append(took)
            # pmxd's events for this slot, up to its online one (times are pmxd's time.time())
            first = online_at = float("nan")
            deadline = time.monotonic() + 5
            while online_at != online_at and time.monotonic() < deadline:
                for _, body in client.stream(sub, timeout_s=0.2):
                    if body.get("kind") != "state" or body.get("id") != slot:
                        continue
                    at = float(str(body.get("time") or 0)) - wall
                    if first != first:
                        first = at
                    if body.get("state") == "online" and new and body.get("pid") == new[0]:
                        online_at = at
                        break
            seen_exit.append(first)
            online.append(online_at)
            single.extend(posix_spawn_once(1))
            print(f"  kill {trial + 1:2}: instance {slot} pid {victim} -> pid "
                  f"{new[0] if new else '-'} in {ms(took)} (/proc); pmxd: exit seen at "
                  f"{ms(first)}, online at {ms(online_at)}; a bare posix_spawn {ms(single[-1])}")
            time.sleep(0.3)
    finally:
        sub.close(linger=0)
        client.close()
    return appeared, seen_exit, online, single


def pid_of(client: Any, slot: int) -> int:
    from pmx.supervisor.protocol import Command

    for row in client.call(Command.LIST)["instances"]:
        if row.get("id") == slot and isinstance(row.get("pid"), int):
            return int(row["pid"])
    raise RuntimeError(f"instance {slot} has no pid in LIST")


def posix_spawn_once(trials: int) -> list[float]:
    values = []
    for _ in range(trials):
        started = time.perf_counter()
        pid = os.posix_spawn(SLEEP, [SLEEP, "1000"], os.environ)
        values.append(time.perf_counter() - started)
        reap([pid])
    return values


# --- 3. idle CPU and RSS with 50 apps -------------------------------------------------------

def settled(pid: int, timeout: float = 15) -> None:
    """Wait until a process has stopped using CPU (its imports are done)."""
    last = cpu_seconds(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = cpu_seconds(pid)
        if now == last:
            return
        last = now


def idle_figures(apps: int, window: float) -> dict[str, Any]:
    with PmxHome() as pmx:
        pmx.env["PMX_MONITOR_INTERVAL"] = "1"
        ecosystem = pmx.write("fifty.toml", "".join(sleep_app(f"idle{i}", 1, 100000)
                                                    for i in range(apps)))
        pmx.run("start", str(ecosystem), timeout=TIMEOUT_S)
        client = pmx.client()
        try:
            wait_for(lambda: online_count(client) == apps, timeout=TIMEOUT_S,
                     what=f"{apps} apps online", poll=0.2)
        finally:
            client.close()
        daemon = pmx.daemon_pid()
        assert daemon is not None, "no pmxd.pid"
        sleeper = subprocess.Popen([sys.executable, "-c", IDLE_CODE], stdin=subprocess.DEVNULL)
        looper = subprocess.Popen([sys.executable, "-c", ASYNC_IDLE_CODE],
                                  stdin=subprocess.DEVNULL)
        bare = subprocess.Popen([sys.executable, "-c", RSS_CODE], stdin=subprocess.DEVNULL)
        others = (sleeper, looper, bare)
        try:
            for other in others:
                settled(other.pid)
            time.sleep(2)  # a couple of monitor rounds after the start
            watched = (daemon, sleeper.pid, looper.pid)
            before = {pid: run_seconds(pid) for pid in watched}
            started = time.monotonic()
            time.sleep(window)
            wall = time.monotonic() - started
            used = {pid: (run_seconds(pid) - before[pid]) / wall * 100 for pid in watched}
            return {
                "pmxd_pid": daemon, "wall": wall, "pmxd_cpu": used[daemon],
                "idle_cpu": used[sleeper.pid], "loop_cpu": used[looper.pid],
                "pmxd_rss": rss_bytes(daemon), "bare_rss": rss_bytes(bare.pid),
            }
        finally:
            for other in others:
                stop_pid(other.pid, timeout=2)
                other.wait(5)


# --- main ------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 start trial, 8 kills, a 5 s CPU window")
    parser.add_argument("--trials", type=int, help="start trials, each in a fresh home "
                                                   "(default 3)")
    parser.add_argument("--kills", type=int, help="kill -9 trials (default 20)")
    parser.add_argument("--instances", type=int, default=100, help="instances to start")
    parser.add_argument("--apps", type=int, default=50, help="apps for the idle CPU and RSS")
    parser.add_argument("--window", type=float, help="idle CPU window in s (default 10)")
    args = parser.parse_args()
    trials = args.trials or (1 if args.quick else 3)
    kills = args.kills or (8 if args.quick else 20)
    window = args.window or (5.0 if args.quick else 10.0)
    count = args.instances
    exit_on_sigterm()
    cores_note()
    print(f"open files limit of this script: {open_files_limit()}")

    print(f"\n1. pmx start: 1 app x {count} instances of {SLEEP} 1000, no daemon running "
          f"({trials} trial(s), fresh home each)")
    baselines: dict[str, list[float]] = {}
    starts, home = start_trials(trials, count, baselines)
    popen, spawn, imports = baselines["popen"], baselines["spawn"], baselines["imports"]
    print(f"  baselines: Popen x{count} {spread(popen)}, posix_spawn x{count} {spread(spawn)}, "
          f"python -c \"{IMPORTS_CODE}\" {spread(imports)}")

    kill_rows: tuple[list[float], list[float], list[float], list[float]] = ([], [], [], [])
    if home is None:
        print("\n2. kill -9: skipped, the last start did not bring every instance online")
    else:
        try:
            print(f"\n2. kill -9 -> replacement, {kills} trials (a different instance each)")
            kill_rows = kill_trials(home, kills, count)
        finally:
            home.cleanup()

    print(f"\n3. pmxd with {args.apps} apps (1 {SLEEP} each), monitor interval 1 s, idle for "
          f"{window:g}s")
    idle = idle_figures(args.apps, window)
    print(f"  pmxd pid {idle['pmxd_pid']}: CPU {idle['pmxd_cpu']:.2f}% of one core over "
          f"{idle['wall']:.1f}s, RSS {mib(idle['pmxd_rss'])}; sleeping interpreter "
          f"{idle['idle_cpu']:.3f}%, asyncio loop waking each second {idle['loop_cpu']:.3f}%, "
          f"bare python with zmq+psutil+asyncio RSS "
          f"{mib(idle['bare_rss'])}")

    def col(name: str) -> list[float]:
        return [getattr(t, name) for t in starts]

    print("\ntable 1 (medians; range in brackets, in ms)")
    rows: list[tuple[object, ...]] = []
    for label, name in (("start: pmxd.pid and rpc.sock exist", "daemon_files"),
                        ("start: pmxd answers ping", "daemon_up")):
        rows.append((label, spread(col(name)), f"python -c \"{IMPORTS_CODE}\"", spread(imports),
                     ratio(median(col(name)), median(imports))))
    for label, name in ((f"start: pmx start exits ({count} inst.)", "exited"),
                        (f"start: {count} sleep running (/proc)", "running"),
                        (f"start: {count} online in list --json", "online")):
        rows.append((label, spread(col(name)), f"Popen loop x{count}", spread(popen),
                     ratio(median(col(name)), median(popen))))
        rows.append(("", "", f"posix_spawn loop x{count}", spread(spawn),
                     ratio(median(col(name)), median(spawn))))
    spawning = [t.online - t.daemon_files for t in starts]
    rows.append(("start: pmxd's files -> all online", spread(spawning), f"Popen loop x{count}",
                 spread(popen), ratio(median(spawning), median(popen))))
    rows.append(("", "", f"posix_spawn loop x{count}", spread(spawn),
                  ratio(median(spawning), median(spawn))))
    appeared, seen_exit, online, single = kill_rows
    base_single = median(single)
    for label, values in (("kill -9 -> new pid (/proc)", appeared),
                          ("kill -9 -> pmxd sees the exit", seen_exit),
                          ("kill -9 -> pmxd says online", online)):
        rows.append((label, spread(values) if values else "n/a", "one posix_spawn",
                     spread(single) if single else "n/a",
                     ratio(median(values), base_single) if values else "n/a"))
    rows.append((f"idle CPU, {args.apps} apps, % of a core", f"{idle['pmxd_cpu']:.2f}%",
                 "python, time.sleep(1) loop", f"{idle['idle_cpu']:.3f}%",
                 ratio(idle["pmxd_cpu"], idle["idle_cpu"])))
    rows.append(("", "", "python, asyncio.sleep(1) loop", f"{idle['loop_cpu']:.3f}%",
                 ratio(idle["pmxd_cpu"], idle["loop_cpu"])))
    rows.append((f"RSS, {args.apps} apps", mib(idle["pmxd_rss"]), "python + zmq, psutil, asyncio",
                 mib(idle["bare_rss"]), ratio(idle["pmxd_rss"], idle["bare_rss"])))
    table(rows, ["figure", "pmx", "baseline", "baseline figure", "pmx / baseline"])
    print("\n  pmx list / pmx list --json with 10 apps: python bench/cli_latency.py --apps 10")
    print("  CPU is the scheduler's run time of every thread (/proc/PID/task/*/schedstat), not "
          "utime + stime: those count 1/100 s ticks, too coarse for an idle process")


if __name__ == "__main__":
    main()
