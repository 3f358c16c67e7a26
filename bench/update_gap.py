"""What `pmx update` (pmxd replacing itself with the installed version) costs the apps.

A 2-instance HTTP cluster is loaded with fresh connections on 127.0.0.1 while pmxd is
updated several times. pmxd re-executes itself in place and the new image adopts the
running processes (see the README), so no request should fail and no pid change. This
prints the failed-request count, the gap (first to last failed request), how many app
pids survived, and the command's own wall time, against a plain `pmx restart web` of the
same cluster in the same run as the baseline.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import PmxHome, cores_note, free_port, ms

EXAMPLE = Path(__file__).resolve().parent.parent / "config-examples" / "apps" / "http_server.py"


class Probe(threading.Thread):
    """GETs over fresh connections until stopped; records when each failure happened."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.failures: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while not self.stopping.is_set() and time.monotonic() < deadline:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                connection.request("GET", "/")
                if connection.getresponse().status == 200:
                    self.ok += 1
                else:
                    self.failures.append(time.monotonic())
            except OSError:
                self.failures.append(time.monotonic())
                time.sleep(0.005)
            finally:
                connection.close()


def measure(home: PmxHome, port: int, command: list[str], runs: int) -> None:
    gaps, failed, walls = [], 0, []
    kept = total = 0
    for _ in range(runs):
        probe = Probe(port)
        probe.start()
        time.sleep(0.5)
        before = {row["pid"] for row in home.list()}
        began = time.monotonic()
        home.run(*command)
        home.wait_online("web", 2)
        walls.append(time.monotonic() - began)
        kept += len(before & {row["pid"] for row in home.list()})
        total += len(before)
        time.sleep(0.5)
        probe.stopping.set()
        probe.join(10)
        failed += len(probe.failures)
        gaps.append(probe.failures[-1] - probe.failures[0] if probe.failures else 0.0)
    print(f"  pmx {' '.join(command):<12} failed requests {failed:>5} over {runs} runs; "
          f"gap median {ms(sorted(gaps)[len(gaps) // 2])}, max {ms(max(gaps))}; "
          f"pids kept {kept}/{total}; command wall median {ms(sorted(walls)[len(walls) // 2])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 runs each")
    args = parser.parse_args()
    runs = 2 if args.quick else args.runs
    cores_note()
    with PmxHome() as home:
        port = free_port()
        home.write("eco.toml", f"""
[[apps]]
name = "web"
script = "{EXAMPLE}"
exec_mode = "cluster"
instances = 2
listen = "127.0.0.1:{port}"
""")
        home.run("start", str(home.home / "eco.toml"))
        home.wait_online("web", 2)
        print(f"2-instance cluster on 127.0.0.1:{port}, fresh connection per request")
        measure(home, port, ["restart", "web"], runs)
        measure(home, port, ["update"], runs)


if __name__ == "__main__":
    main()
