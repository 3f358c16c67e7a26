"""How long a user waits for `pmx list` and `pmx ping`, against `python -c pass`.

A daemon runs --apps apps (default 10) in a temporary home: a 2-instance HTTP cluster, a
worker, and --apps - 2 apps of one idle `/bin/sleep` each (interpreter "none"), so
`pmx list` has --apps + 1 rows to draw. Each command is run --runs times, interleaved
round-robin so drift hits all alike; the median and p90 wall times are printed with their
ratio to the interpreter's own start-up. `pmx --version` (imports, no daemon round trip)
splits import cost from the request; `pmx list --json` splits the table drawing from the
list request. Finally `python -X importtime -m pmx.cli.main list` shows which imports
the CLI pays for.

    python bench/cli_latency.py            # 30 runs of each, 10 apps
    python bench/cli_latency.py --quick    # 10 runs
    python bench/cli_latency.py --apps 2   # only the cluster and the worker
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

from benchlib import HTTP_APP, REPO, PmxHome, cores_note, free_port, ms, percentile, ratio, table


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, timeout=60)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: "
                           f"{result.stderr.decode(errors='replace').strip()}")
    return elapsed


def import_times(pmx: PmxHome, top: int) -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "pmx.cli.main", "list"],
                            env=pmx.env, capture_output=True, text=True, timeout=60)
    rows: list[tuple[int, int, str]] = []  # (self us, cumulative us, name with indentation)
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3:
            continue
        rows.append((int(parts[0]), int(parts[1]), parts[2].rstrip()))
    if not rows:
        print("  (no importtime output)")
        return
    top_level = [r for r in rows if not r[2].startswith("  ")]
    total = sum(r[1] for r in top_level)
    print(f"\nimports of `pmx list` (python -X importtime): {len(rows)} modules, "
          f"{total / 1000:.1f} ms cumulative over top-level imports (importtime's own "
          f"overhead inflates this)")
    print(f"\n top {top} top-level imports by cumulative time:")
    table([(f"{c / 1000:.1f}", f"{s / 1000:.1f}", n.strip())
           for s, c, n in sorted(top_level, key=lambda r: -r[1])[:top]],
          ["cumul ms", "self ms", "module"])
    print(f"\n top {top} modules by self time:")
    table([(f"{s / 1000:.1f}", f"{c / 1000:.1f}", n.strip())
           for s, c, n in sorted(rows, key=lambda r: -r[0])[:top]],
          ["self ms", "cumul ms", "module"])
    names = {n.strip() for _, _, n in rows}
    heavy = ["rich", "psutil", "textual", "zmq", "click", "tomllib", "tomli_w", "asyncio", "uuid",
             "json"]
    loaded = [name for name in heavy if name in names]
    print(f"\n of {', '.join(heavy)}: loaded by `pmx list`: {', '.join(loaded) or 'none'}")
    ours = sorted(name for name in names if name.startswith("pmx."))
    print(f" pmx modules loaded by `pmx list`: {', '.join(ours)}")
    print("   (ARCHITECTURE.md: the CLI imports rich, textual and psutil lazily; "
          "list draws a table, so rich is expected)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 runs instead of 30")
    parser.add_argument("--runs", type=int, help="runs of each command (default 30)")
    parser.add_argument("--top", type=int, default=15, help="imports to show")
    parser.add_argument("--apps", type=int, default=10,
                        help="apps in the daemon, at least 2: the cluster, the worker and "
                             "APPS - 2 idle /bin/sleep apps (default 10)")
    args = parser.parse_args()
    if args.apps < 2:
        parser.error("--apps must be at least 2")
    runs = args.runs or (10 if args.quick else 30)
    cores_note()

    with PmxHome() as pmx:
        port = free_port()
        ecosystem = pmx.write("apps.toml", f"""
[[apps]]
name = "web"
script = "{HTTP_APP}"
exec_mode = "cluster"
instances = 2
listen = "127.0.0.1:{port}"

[[apps]]
name = "worker"
script = "{REPO / 'config-examples' / 'apps' / 'worker.py'}"
""" + "".join(f"""
[[apps]]
name = "idle{number}"
script = "/bin/sleep"
args = ["100000"]
interpreter = "none"
""" for number in range(1, args.apps - 1)))
        pmx.run("start", str(ecosystem))
        pmx.wait_online("web", 2)
        pmx.wait_online("worker", 1)
        for number in range(1, args.apps - 1):
            pmx.wait_online(f"idle{number}", 1)
        idle = f", idle1..idle{args.apps - 2} (/bin/sleep)" if args.apps > 2 else ""
        print(f"pmxd running {args.apps} apps (web x2 on 127.0.0.1:{port}, worker{idle}; "
              f"{args.apps + 1} instances) in {pmx.home}")

        console = shutil.which("pmx")
        cases: list[tuple[str, list[str]]] = [
            ("python -c pass (baseline)", [sys.executable, "-c", "pass"]),
            ("pmx --version (imports only)", [*_cli(console), "--version"]),
            ("pmx ping", [*_cli(console), "ping"]),
            ("pmx list", [*_cli(console), "list"]),
            ("pmx list --json", [*_cli(console), "list", "--json"]),
            ("python -m pmx.cli.main list", [sys.executable, "-m", "pmx.cli.main", "list"]),
        ]
        samples: dict[str, list[float]] = {name: [] for name, _ in cases}
        for _, argv in cases:  # warm the page cache once, not measured
            timed(argv, pmx.env)
        started = time.monotonic()
        for _ in range(runs):
            for name, argv in cases:
                samples[name].append(timed(argv, pmx.env))
        print(f"{runs} runs of each, interleaved, in {time.monotonic() - started:.1f}s "
              f"(`pmx` is {console or 'not on PATH: python -m pmx.cli.main used'})\n")
        base = statistics.median(samples[cases[0][0]])
        table([(name, ms(statistics.median(values)), ms(percentile(values, 90)),
                ms(min(values)), ratio(statistics.median(values), base))
               for name, values in samples.items()],
              ["command", "median", "p90", "min", "median / python -c pass"])
        ping = statistics.median(samples["pmx ping"])
        version = statistics.median(samples["pmx --version (imports only)"])
        listing = statistics.median(samples["pmx list"])
        print(f"\n  pmx list - python -c pass  = {ms(listing - base)} (what pmx adds over a bare "
              f"interpreter)")
        print(f"  pmx ping - pmx --version   = {ms(ping - version)} (connect + one request)")
        print(f"  pmx list - pmx ping        = {ms(listing - ping)} (list request + table drawing)")
        as_json = statistics.median(samples["pmx list --json"])
        print(f"  pmx list - pmx list --json = {ms(listing - as_json)} (drawing the table rather "
              f"than printing JSON)")
        import_times(pmx, args.top)


def _cli(console: str | None) -> list[str]:
    return [console] if console else [sys.executable, "-m", "pmx.cli.main"]


if __name__ == "__main__":
    main()
