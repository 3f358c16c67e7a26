"""What `pmx monit` costs: pmxd's CPU with one monit attached vs none, and monit's own
CPU and memory.

pmxd runs N instances (default 200, --quick 50) in apps of 20; each instance is a
`/bin/sh` loop printing one line a second (interpreter "none"), so the publish stream
carries N log lines/s plus one stats message a second with N entries, and monit has a
realistic amount to read and draw. `--idle` runs `/bin/sleep` instead (stats only).

Phases, each --seconds long (default 60, --quick 10), after all instances are online:
  1. no monit attached: pmxd's CPU;
  2. `pmx monit` running in a real terminal (a private tmux server, 120x40; without
     tmux, headless with Textual's run_test in a subprocess), after a warm-up until the
     table shows every instance: pmxd's CPU, monit's CPU, its RSS at the end and its
     peak RSS.
CPU is process CPU time (user + system) over wall time, in percent of one core.

    python bench/monit_cpu.py            # 200 instances, 60 s per phase
    python bench/monit_cpu.py --quick    # 50 instances, 10 s per phase
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import psutil
from benchlib import CLI, PmxHome, cores_note, wait_for

APP_SIZE = 20
LOOP = "while :; do echo \"beat $$\"; sleep 1; done"


def ecosystem(count: int, idle: bool) -> str:
    apps = []
    for number, start in enumerate(range(0, count, APP_SIZE)):
        size = min(APP_SIZE, count - start)
        script, argv = ("/bin/sleep", ["100000"]) if idle else ("/bin/sh", ["-c", LOOP])
        args = json.dumps(argv)  # a JSON array of strings is a TOML array too
        apps.append(textwrap.dedent(f"""
            [[apps]]
            name = "app{number:02d}"
            script = "{script}"
            interpreter = "none"
            args = {args}
            instances = {size}
            kill_timeout = "1s"
            """))
    return "".join(apps)


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def measure(procs: dict[str, psutil.Process], seconds: float) -> dict[str, float]:
    """Percent of one core each process used over `seconds` of wall time."""
    before = {name: cpu_seconds(proc) for name, proc in procs.items()}
    started = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    return {name: 100 * (cpu_seconds(proc) - before[name]) / wall for name, proc in procs.items()}


class TmuxMonit:
    """pmx monit in a private tmux server; its pid is the pane's (exec'd) process."""

    def __init__(self, home: PmxHome) -> None:
        self.tmux = ["tmux", "-L", f"pmx-bench-{os.getpid()}"]
        command = (f"exec env PMX_HOME={home.home} TERM=xterm-256color "
                   f"{' '.join(CLI)} monit")
        subprocess.run([*self.tmux, "new-session", "-d", "-x", "120", "-y", "40", "-s", "m",
                        command], check=True, timeout=10, env={**home.env, "TMUX": ""})
        pane = subprocess.run([*self.tmux, "list-panes", "-t", "m", "-F", "#{pane_pid}"],
                              capture_output=True, text=True, check=True, timeout=10)
        self.pid = int(pane.stdout.split()[0])

    def screen(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-t", "m"],
                              capture_output=True, text=True, timeout=10).stdout

    def wait_ready(self, count: int) -> None:
        # The table shows as many rows as fit; "N/N online" in the header counts them all.
        wait_for(lambda: f"{count}/{count} online" in self.screen(), timeout=60,
                 what="monit shows every instance online", poll=0.2)

    def stop(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True, timeout=10)


HEADLESS = """
import asyncio, sys, time
from pathlib import Path
from pmx.cli.monit import MonitApp

async def main() -> None:
    app = MonitApp(Path(sys.argv[1]))
    async with app.run_test(size=(120, 40)) as pilot:
        while True:
            rows = [r for r in app.board.rows.values() if r.status == "online"]
            if len(rows) >= int(sys.argv[2]):
                print("ready", flush=True)
                break
            await pilot.pause(0.2)
        await asyncio.sleep(float(sys.argv[3]))

asyncio.run(main())
"""


class HeadlessMonit:
    def __init__(self, home: PmxHome, count: int, seconds: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HEADLESS, str(home.home),
                                      str(count), str(seconds + 60)], env=home.env,
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def wait_ready(self, count: int) -> None:
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("headless monit did not get ready")

    def stop(self) -> None:
        self.proc.terminate()  # by its pid
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 instances, 10 s per phase")
    parser.add_argument("--instances", type=int, help="default 200 (--quick 50)")
    parser.add_argument("--seconds", type=float, help="per phase; default 60 (--quick 10)")
    parser.add_argument("--idle", action="store_true", help="/bin/sleep instances: no logs")
    parser.add_argument("--headless", action="store_true", help="run_test even with tmux")
    args = parser.parse_args()
    count = args.instances or (50 if args.quick else 200)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    cores_note()
    use_tmux = shutil.which("tmux") is not None and not args.headless
    with PmxHome() as home:
        eco = home.write("bench.toml", ecosystem(count, args.idle))
        home.run("start", str(eco), timeout=300)
        wait_for(lambda: sum(r["status"] == "online" for r in home.list()) == count,
                 timeout=120, what=f"{count} instances online", poll=0.5)
        daemon_pid = home.daemon_pid()
        assert daemon_pid is not None
        daemon = psutil.Process(daemon_pid)
        lines = "stats only" if args.idle else f"{count} log lines/s"
        print(f"{count} instances in {(count + APP_SIZE - 1) // APP_SIZE} apps ({lines}); "
              f"{seconds:g} s per phase")
        time.sleep(2)  # let the start-up settle before the baseline
        idle = measure({"pmxd": daemon}, seconds)["pmxd"]
        print(f"  pmxd, no monit attached:      {idle:6.2f}% of one core")
        monit: TmuxMonit | HeadlessMonit = (TmuxMonit(home) if use_tmux
                                            else HeadlessMonit(home, count, seconds))
        try:
            started = time.monotonic()
            monit.wait_ready(count)
            ready_s = time.monotonic() - started
            time.sleep(2)
            proc = psutil.Process(monit.pid)
            attached = measure({"pmxd": daemon, "monit": proc}, seconds)
            memory = proc.memory_info().rss
            with open(f"/proc/{monit.pid}/status") as status:
                peak_kb = next(int(line.split()[1]) for line in status
                               if line.startswith("VmHWM:"))
        finally:
            monit.stop()
        how = "in tmux 120x40" if use_tmux else "headless (run_test)"
        print(f"  pmxd, one monit attached:     {attached['pmxd']:6.2f}% of one core "
              f"({attached['pmxd'] - idle:+.2f})")
        print(f"  monit itself ({how}): {attached['monit']:6.2f}% of one core, "
              f"RSS {memory / 2**20:.1f} MiB (peak {peak_kb / 1024:.1f} MiB); "
              f"table full {ready_s:.1f} s after start")


if __name__ == "__main__":
    main()
