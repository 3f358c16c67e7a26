"""Scale (issue 15, table 2): what each step costs at N = 100, 300, 1000 processes, and how it
grows with N, in two shapes: one app x N instances, and N apps x 1 instance.

Every size runs in a fresh home with pmxd started first (as `pmx start` would start it),
so the start figures are the start's own. The apps are `/bin/sleep 100000`
(interpreter "none"), which exits on SIGTERM at once. Per size:

- `pmx start ecosystem.toml`: the command's own wall time (it prints the N-row table too);
  when N `sleep` processes run below pmxd (/proc: only the pids allocated since the launch
  are looked at, every 20 ms, so polling costs pmxd nothing); when LIST (the request behind
  `pmx list --json`, asked at most every 0.5 s once /proc shows all N) shows N online.
- PING during the start: a thread sends a PING request every 100 ms on one socket without
  waiting for the answers, from the launch until all N are online; printed: median and max
  round trip (a ping left unanswered counts as its wait so far) and how many took more
  than 5 s, where `pmx ping` gives up. These are requests from this process: the CLI adds
  its own start-up (~0.1 s, see cli_latency.py).
- `pmx list` and `pmx list --json`: median of 5 runs each, after the start.
- pmxd's CPU over 10 s once all are online and 3 s have passed (monitor interval 1 s),
  as % of one core (the scheduler's run time of its threads, /proc/PID/task/*/schedstat:
  utime + stime count 1/100 s ticks, 0.2 % steps over 5 s); its VmRSS and open fds.
- `pmx stop all` wall time; then `pmx start all` (its wall time and time to N online, as
  above), then `pmx kill` wall time: kill is measured on this second start.

Each command is killed and reported (`killed after 120s`) when it runs longer than
--timeout seconds; waiting for N online gives up after the same time. Then one table
per shape, one row per N, and the growth between sizes: time(300)/time(100) is 3.00x for
linear growth, more for worse (the "linear" column says what linear would be).

    python bench/scale.py                   # 100, 300, 1000, both shapes (~2 min; ~10 when slow)
    python bench/scale.py --quick           # 100, 300 (~1 min)
    python bench/scale.py --sizes 100,200 --shape one
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

from benchlib import (
    CLI,
    PmxHome,
    cores_note,
    descendants,
    exit_on_sigterm,
    fd_count,
    mib,
    ms,
    open_files_limit,
    rss_bytes,
    run_seconds,
    run_timed,
    start_daemon,
    table,
    watch_start,
)

PING_EVERY_S = 0.1
SCAN_EVERY_S = 0.02  # /proc: only the new pids are read, so this costs pmxd nothing
LIST_EVERY_S = 0.5  # LIST, once /proc shows all N: at most this often
PMX_PING_TIMEOUT_S = 5.0  # `pmx ping` gives up after this
NAN = float("nan")


class Pinger(threading.Thread):
    """Sends PING every `every` seconds on one DEALER socket without waiting for answers,
    and notes each round trip."""

    def __init__(self, pmx: PmxHome, every: float) -> None:
        super().__init__(daemon=True)
        self.path = pmx.home / "rpc.sock"
        self.every = every
        self.sent: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.send_failures = 0
        self.sending = threading.Event()
        self.sending.set()
        self.finished = threading.Event()
        self.stopped_at = NAN

    def run(self) -> None:
        import zmq
        from pmx.supervisor.errors import ProtocolError
        from pmx.supervisor.protocol import Command, Request, decode_reply, encode_request

        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.connect(f"ipc://{self.path}")
        try:
            next_send = time.perf_counter()
            while not self.finished.is_set():
                now = time.perf_counter()
                if self.sending.is_set() and now >= next_send:
                    request = Request(Command.PING)
                    try:
                        sock.send(encode_request(request), zmq.NOBLOCK)
                        self.sent[request.id] = now
                    except zmq.Again:
                        self.send_failures += 1
                    next_send = max(next_send + self.every, now)
                wait = max(0.0, next_send - now) if self.sending.is_set() else 0.05
                if sock.poll(int(wait * 1000) + 1):
                    frames = sock.recv_multipart()
                    try:
                        reply = decode_reply(frames[-1])
                    except ProtocolError:
                        continue
                    if reply.id in self.sent:
                        self.answered[reply.id] = time.perf_counter() - self.sent[reply.id]
                if not self.sending.is_set() and len(self.answered) == len(self.sent):
                    return
        finally:
            sock.close(linger=0)
            context.term()

    def stop(self, grace: float) -> None:
        """Stop sending; wait up to `grace` s for the answers still due."""
        self.stopped_at = time.perf_counter()
        self.sending.clear()
        self.join(grace)
        self.finished.set()
        self.join(5)

    def latencies(self) -> tuple[list[float], int]:
        """Round trips, unanswered pings counted as their wait so far; and how many those are."""
        end = time.perf_counter()
        values = [self.answered.get(key, end - sent) for key, sent in self.sent.items()]
        return values, len(self.sent) - len(self.answered)


@dataclass
class Row:
    n: int
    start: str = "-"  # the command's outcome as text
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, key: str) -> float:
        return self.values.get(key, NAN)


COLUMNS: list[tuple[str, str, str]] = [  # key, header, kind
    ("start", "pmx start", "s"),
    ("running", "N running", "s"),
    ("online", "N online", "s"),
    ("ping_median", "ping med", "s"),
    ("ping_max", "ping max", "s"),
    ("list", "list", "s"),
    ("list_json", "list --json", "s"),
    ("cpu", "idle CPU", "%"),
    ("rss", "RSS", "b"),
    ("fds", "fds", "n"),
    ("stop", "stop all", "s"),
    ("restart_online", "start all->online", "s"),
    ("kill", "kill", "s"),
]


def show(value: float, kind: str) -> str:
    if value != value:
        return "-"
    if kind == "s":
        return ms(value) if value < 1 else f"{value:.2f} s"
    if kind == "%":
        return f"{value:.1f}%"
    if kind == "b":
        return mib(value)
    return f"{value:.0f}"


def ecosystem(shape: str, n: int) -> str:
    app = """
[[apps]]
name = "{name}"
script = "/bin/sleep"
args = ["100000"]
interpreter = "none"
instances = {instances}
"""
    if shape == "one":
        return app.format(name="sleepy", instances=n)
    return "".join(app.format(name=f"s{number}", instances=1) for number in range(n))


def measure(shape: str, n: int, timeout: float, first: bool) -> Row:
    row = Row(n)
    with PmxHome() as pmx:
        path = pmx.write("scale.toml", ecosystem(shape, n))
        daemon = start_daemon(pmx)
        if first:
            print(f"  pmxd's open files limit: {open_files_limit(daemon)}")
        pinger = Pinger(pmx, PING_EVERY_S)
        pinger.start()
        try:
            times = watch_start(pmx, [*CLI, "start", str(path)], n, timeout=timeout,
                                scan_every=SCAN_EVERY_S, list_every=LIST_EVERY_S)
        finally:
            pinger.stop(grace=min(timeout, 30))
        row.start = times.command()
        if times.returncode == 0 and not times.killed:
            row.values["start"] = times.exited
        elif times.stderr:
            row.notes.append(f"pmx start: {times.stderr.splitlines()[-1][:200]}")
        row.values["running"] = times.running
        row.values["online"] = times.online
        pings, unanswered = pinger.latencies()
        if pings:
            row.values["ping_median"] = statistics.median(pings)
            row.values["ping_max"] = max(pings)
        slow = sum(1 for p in pings if p > PMX_PING_TIMEOUT_S)
        row.notes.append(f"{len(pings)} pings during the start: {slow} over "
                         f"{PMX_PING_TIMEOUT_S:g}s, {unanswered} unanswered"
                         + (f", {pinger.send_failures} not sent" if pinger.send_failures else ""))
        if times.online != times.online:
            row.notes.append(f"not all {n} online within {timeout:g}s "
                             f"({len(descendants(daemon, b'sleep'))} sleep processes below pmxd)")

        for key, extra in (("list", []), ("list_json", ["--json"])):
            runs = []
            for _ in range(5):
                result = run_timed([*CLI, "list", *extra], pmx.env, timeout)
                if not result.ok:
                    row.notes.append(f"pmx list {' '.join(extra)}: {result.describe()}")
                    break
                runs.append(result.seconds)
            else:
                row.values[key] = statistics.median(runs)

        if times.online == times.online:
            time.sleep(3)  # the first monitor rounds after the start
            before, began = run_seconds(daemon), time.monotonic()
            time.sleep(10)
            row.values["cpu"] = (run_seconds(daemon) - before) / (time.monotonic() - began) * 100
        row.values["rss"] = rss_bytes(daemon)
        row.values["fds"] = fd_count(daemon)

        stop = run_timed([*CLI, "stop", "all"], pmx.env, timeout)
        row.values["stop"] = stop.value()
        if not stop.ok:
            row.notes.append(f"pmx stop all: {stop.describe()} {stop.stderr.strip()[-200:]}")
        left = len(descendants(daemon, b"sleep"))
        if left:
            row.notes.append(f"{left} sleep processes still below pmxd after pmx stop all")

        again = watch_start(pmx, [*CLI, "start", "all"], n, timeout=timeout,
                            scan_every=SCAN_EVERY_S, list_every=LIST_EVERY_S)
        row.values["restart_online"] = again.online
        row.notes.append(f"pmx start all: {again.command()}, {n} online {ms(again.online)}")
        kill = run_timed([*CLI, "kill"], pmx.env, timeout)
        row.values["kill"] = kill.value()
        if not kill.ok:
            row.notes.append(f"pmx kill: {kill.describe()} {kill.stderr.strip()[-200:]}")
    return row


def report(shape: str, rows: list[Row]) -> None:
    label = "one app x N instances" if shape == "one" else "N apps x 1 instance"
    print(f"\n{label}:")
    table([[row.n, row.start if "start" not in row.values else show(row.get("start"), "s"),
            *(show(row.get(key), kind) for key, _, kind in COLUMNS[1:])] for row in rows],
          ["N", *(header for _, header, _ in COLUMNS)])
    growth = []
    pairs = [(rows[i], rows[i + 1]) for i in range(len(rows) - 1)]
    if len(rows) > 2:
        pairs.append((rows[0], rows[-1]))
    for low, high in pairs:
        cells = []
        for key, _, _ in COLUMNS:
            a, b = low.get(key), high.get(key)
            cells.append(f"{b / a:.2f}x" if a == a and b == b and a > 0 else "-")
        growth.append([f"{high.n}/{low.n}", f"{high.n / low.n:.2f}x", *cells])
    print(f"\n  growth ({label}): value at the larger N / value at the smaller N")
    table(growth, ["N", "linear", *(header for _, header, _ in COLUMNS)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sizes 100,300")
    parser.add_argument("--sizes", help="comma-separated N (default 100,300,1000)")
    parser.add_argument("--shape", choices=["one", "many", "both"], default="both",
                        help="one app x N instances, N apps x 1 instance, or both (default)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds after which a command is killed and reported (default 120)")
    args = parser.parse_args()
    sizes = [int(n) for n in (args.sizes or ("100,300" if args.quick else "100,300,1000"))
             .split(",")]
    shapes = ["one", "many"] if args.shape == "both" else [args.shape]
    exit_on_sigterm()
    cores_note()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"open files limit of this script: soft {soft}, hard {hard} (pmxd raises its soft "
          f"limit to the hard one; 1000 instances need ~3000+ fds)")
    print(f"sizes {', '.join(map(str, sizes))}; shapes: {', '.join(shapes)}; "
          f"timeout {args.timeout:g}s per command; python {sys.version.split()[0]}")
    began = time.monotonic()
    first = True
    for shape in shapes:
        rows = []
        for n in sizes:
            print(f"\n[{time.monotonic() - began:.0f}s] {shape}: N = {n}", flush=True)
            row = measure(shape, n, args.timeout, first)
            first = False
            print("  " + ", ".join(f"{header} {show(row.get(key), kind)}"
                                   for key, header, kind in COLUMNS))
            for note in row.notes:
                print(f"  {note}")
            rows.append(row)
        report(shape, rows)
    print(f"\ntotal {time.monotonic() - began:.0f}s")


if __name__ == "__main__":
    main()
