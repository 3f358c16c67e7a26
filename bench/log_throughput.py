"""Log throughput: how long an app that prints a lot takes to write its output under pmx,
and how soon after it finishes the last line is in its log file.

The app (written into the temporary home) writes N lines (default 200,000; "line 000123 "
plus 60 characters of filler, 73 bytes each) to stdout with sys.stdout.buffer.write(), one
line per call with Python's normal buffering, flushes, and writes its own wall time (from
before the first write to after the flush, time.perf_counter()) to a result file named by
its argument. That time is the figure, measured under:

  pmx     `pmx start` of a fork-mode app (autorestart = false); pmxd reads its stdout pipe
          and writes PMX_HOME/logs/NAME-out-0.log; nobody follows the live stream
  pmx+f   the same while `pmx logs` follows every app's lines live (pmxd then also encodes
          each line for the stream; it does not when nobody follows)
  A       app | cat > FILE       (the issue's "pipe to cat")
  B       app | cat > /dev/null
  C       app > FILE             (no pipe)

Runs are interleaved (pmx, A, B, C, pmx, ...); each pmx run is a new app name, deleted and
its logs removed afterwards. Also for pmx: the drain lag (the log file's mtime minus the
result file's: kernel file times, good to a clock tick of 1-4 ms), whether each log file
holds exactly the N lines written, and pmxd's CPU time (schedstat) from `pmx start` to the
log complete. The issue's goal: pmx <= 1.1x A. pmxd enlarges the app's
pipe to 1 MiB; the baselines' pipes keep the kernel's 64 KiB. `pmx start` returns about when
the app starts writing, so the CLI's exit overlaps the first ~10-20 ms of the pmx runs.

    python bench/log_throughput.py           # 5 runs of each (about 5 s)
    python bench/log_throughput.py --quick   # 2 runs of each (about 2.5 s)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import CLI, PmxHome, cores_note, ms, ratio, run_seconds, start_daemon, table, wait_for

FILLER = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWX"  # 60 characters
APP = f"""\
import io, os, sys, time
n, result = int(sys.argv[1]), sys.argv[2]
out = sys.stdout.buffer
if not isinstance(out, io.BufferedWriter):
    sys.exit("stdout is not buffered (PYTHONUNBUFFERED?)")
started = time.perf_counter()
for i in range(n):
    out.write(b"line %06d {FILLER}\\n" % i)
out.flush()
elapsed = time.perf_counter() - started
with open(result + ".tmp", "w") as file:
    file.write(repr(elapsed))
os.rename(result + ".tmp", result)
"""
MODES = ("pmx", "pmx+f", "A", "B", "C")
LABELS = {"pmx": "pmx (log file)", "pmx+f": "pmx, pmx logs following", "A": "A: | cat > file",
          "B": "B: | cat > /dev/null", "C": "C: > file (no pipe)"}
FOLLOWER_SETTLE_S = 0.5  # for `pmx logs` to connect and subscribe before the app starts


def expected_output(n: int) -> bytes:
    return b"".join(b"line %06d %s\n" % (i, FILLER.encode()) for i in range(n))


def run_pmx(pmx: PmxHome, app: Path, n: int, number: int, expected: bytes,
            timeout: float) -> tuple[float, float, float, str]:
    """(write time, drain lag, pmxd's CPU seconds, log check) of one pmx run."""
    name = f"logs-{number}"
    result = pmx.home / f"result-{name}"
    ecosystem = pmx.write(f"{name}.toml", f"""
[[apps]]
name = "{name}"
script = "{app}"
interpreter = "{sys.executable}"
args = ["{n}", "{result}"]
autorestart = false
""")
    out_log = pmx.home / "logs" / f"{name}-out-0.log"
    err_log = pmx.home / "logs" / f"{name}-error-0.log"
    daemon = pmx.daemon_pid() or 0
    cpu = run_seconds(daemon)
    try:
        pmx.run("start", str(ecosystem))
        wait_for(result.exists, timeout=timeout, what=f"{name}: result file", poll=0.01)
        wait_for(lambda: out_log.exists() and out_log.stat().st_size >= len(expected),
                 timeout=timeout, what=f"{name}: {len(expected)} bytes in {out_log.name}",
                 poll=0.01)
        cpu = run_seconds(daemon) - cpu
        lag = out_log.stat().st_mtime - result.stat().st_mtime
        written = out_log.read_bytes()
        lines = written.count(b"\n")
        if written == expected:
            check = f"{lines} lines, as written"
        else:
            check = f"{lines} lines (wanted {n}), {len(written)} bytes (wanted {len(expected)})" \
                    f"{', content differs' if lines == n else ''}"
        errors = err_log.read_bytes() if err_log.exists() else b""
        if errors:
            check += f"; stderr: {errors[-200:]!r}"
        return float(result.read_text()), lag, cpu, check
    except RuntimeError as exc:
        errors = err_log.read_bytes()[-300:] if err_log.exists() else b""
        return float("nan"), float("nan"), float("nan"), f"failed: {exc}; stderr: {errors!r}"
    finally:
        pmx.run("delete", name, check=False)
        for path in (out_log, err_log, result, ecosystem):
            path.unlink(missing_ok=True)


def run_baseline(mode: str, home: Path, app: Path, n: int, number: int, expected: bytes,
                 env: dict[str, str], timeout: float) -> tuple[float, str]:
    """(write time, output check) of one run of baseline A, B or C."""
    result = home / f"result-{mode}-{number}"
    target = home / f"out-{mode}-{number}"
    argv = [sys.executable, str(app), str(n), str(result)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(os.devnull if mode == "B" else target, "wb") as sink:
            if mode == "C":
                procs.append(subprocess.Popen(argv, env=env, stdout=sink))
            else:
                procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE))
                procs.append(subprocess.Popen(["cat"], stdin=procs[0].stdout, stdout=sink))
                assert procs[0].stdout is not None
                procs[0].stdout.close()  # cat holds the read end now
            codes = [proc.wait(timeout) for proc in procs]
        if codes != [0] * len(procs):
            return float("nan"), f"exit codes {codes}"
        check = "ok"
        if mode != "B" and target.stat().st_size != len(expected):
            check = f"{target.stat().st_size} bytes, wanted {len(expected)}"
        return float(result.read_text()), check
    except subprocess.TimeoutExpired:
        return float("nan"), f"killed after {timeout:g}s"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # by its pid
                proc.wait(5)
        result.unlink(missing_ok=True)
        target.unlink(missing_ok=True)


def spread(values: list[float]) -> str:
    good = [v for v in values if v == v]
    return f"{ms(min(good))} .. {ms(max(good))}" if good else "n/a"


def median(values: list[float]) -> float:
    good = [v for v in values if v == v]
    return statistics.median(good) if good else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 runs of each")
    parser.add_argument("--runs", type=int, help="runs of each set-up (default 5)")
    parser.add_argument("--lines", type=int, default=200_000, help="lines the app writes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per run")
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 5)
    n = args.lines
    cores_note()
    expected = expected_output(n)
    print(f"{n} lines of {len(expected) // n} bytes ({len(expected) / 2**20:.1f} MiB) per run, "
          f"{runs} runs of each, interleaved; python {sys.version.split()[0]}")
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    extras: list[tuple[float, float, str]] = []  # pmx runs: drain lag, pmxd CPU, log check
    followed_cpu: list[float] = []  # pmxd CPU of the pmx+f runs
    with PmxHome() as pmx:
        # An ordinary app's stdout is block-buffered; PmxHome sets PYTHONUNBUFFERED=1.
        pmx.env.pop("PYTHONUNBUFFERED", None)
        env = dict(pmx.env)
        app = pmx.write("log_app.py", APP)
        start_daemon(pmx)
        for number in range(1, runs + 1):
            for mode in MODES:
                if mode == "pmx":
                    took, lag, cpu, check = run_pmx(pmx, app, n, number, expected, args.timeout)
                    extras.append((lag, cpu, check))
                elif mode == "pmx+f":
                    follower = subprocess.Popen([*CLI, "logs", "--lines", "0"], env=env,
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
                    try:
                        time.sleep(FOLLOWER_SETTLE_S)
                        took, _, cpu, check = run_pmx(pmx, app, n, 100 + number, expected,
                                                      args.timeout)
                        followed_cpu.append(cpu)
                    finally:
                        follower.terminate()  # by its pid
                        follower.wait(10)
                    if not check.endswith("as written"):
                        print(f"  run {number} {LABELS[mode]}: {check}")
                else:
                    took, check = run_baseline(mode, pmx.home, app, n, number, expected, env,
                                               args.timeout)
                    if check != "ok":
                        print(f"  run {number} {LABELS[mode]}: {check}")
                times[mode].append(took)
    pmx_median = median(times["pmx"])
    lags, cpus = [e[0] for e in extras], [e[1] for e in extras]
    print()
    table([(LABELS[mode], ms(median(times[mode])), spread(times[mode]),
            ratio(pmx_median, median(times[mode])))
           for mode in MODES], ["app writing to", "median", "min .. max", "pmx / this"])
    print(f"\n  pmx / A (pipe to cat, the issue's goal <= 1.10x): "
          f"{ratio(pmx_median, median(times['A']))}; pmx / C (straight to a file): "
          f"{ratio(pmx_median, median(times['C']))}")
    print(f"  pmx drain lag (log file's last write after the app's): median {ms(median(lags))}, "
          f"range {spread(lags)}")
    print(f"  pmxd CPU per pmx run (pmx start to the log complete): median {ms(median(cpus))}, "
          f"range {spread(cpus)}; with pmx logs following: median {ms(median(followed_cpu))}")
    for number, (took, (lag, cpu, check)) in enumerate(zip(times["pmx"], extras, strict=True), 1):
        print(f"  pmx run {number}: {ms(took)}, lag {ms(lag)}, pmxd CPU {ms(cpu)}; log file: {check}")


if __name__ == "__main__":
    main()
