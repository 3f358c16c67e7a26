"""pmxd's own crash loses nothing: no duplicate, no orphan, the apps come back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import Pmx, app_path, free_port, pid_alive, pid_cluster_toml, wait_until
from tests.httpload import get_pid


@pytest.mark.slow
def test_sigkill_of_pmxd_then_resurrect_gives_exactly_the_configured_instances(
        pmx: Pmx) -> None:
    port = free_port()
    eco = pmx.write("eco.toml", f"""
[[apps]]
name = "fork"
script = "{app_path('ignore_signals.py')}"
kill_timeout = "500ms"

[[apps]]
name = "forking"
script = "{app_path('grandchild.py')}"

""" + pid_cluster_toml("web", port, instances=2))
    pmx.run("start", str(eco))
    for name, count in (("fork", 1), ("forking", 1), ("web", 2)):
        pmx.wait_status(name, "online", count=count)
    pmx.run("save")
    grandchild_line = wait_until(lambda: (bool(m := re.search(
        r"grandchild (\d+)", pmx.run("logs", "forking", "--nostream").stdout)), m),
        timeout=10, what="grandchild started")
    assert grandchild_line is not None
    old = [row["pid"] for row in pmx.list()] + [int(grandchild_line.group(1))]
    daemon = pmx.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: (not pid_alive(daemon), daemon), timeout=10, what="pmxd dead")
    assert all(pid_alive(pid) for pid in old)  # the apps outlived their daemon

    # Start it again the way the service unit does.
    log = open(pmx.home / "foreground.log", "wb")  # noqa: SIM115 - closed below
    service = subprocess.Popen([sys.executable, "-m", "pmx.supervisor.pmxd", "--foreground",
                                "--resurrect", "--home", str(pmx.home)], env=pmx.env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        def settled() -> tuple[bool, object]:
            if not (pmx.home / "rpc.sock").exists():
                return False, "no socket yet"
            listing = pmx.run("list", "--json", check=False)
            if listing.returncode != 0:  # the old pmxd's files, before the new one holds the lock
                return False, listing.stderr
            rows = json.loads(listing.stdout)
            counts = {name: sum(1 for r in rows if r["name"] == name and r["status"] == "online")
                      for name in ("fork", "forking", "web")}
            return counts == {"fork": 1, "forking": 1, "web": 2} and len(rows) == 4, rows

        wait_until(settled, timeout=30, what="apps back, exactly once")
        wait_until(lambda: (not any(pid_alive(pid) for pid in old),
                            [pid for pid in old if pid_alive(pid)]),
                   timeout=15, what="no process of the old generation left")
        assert get_pid(port) in pmx.pids("web")
        new = {row["pid"] for row in pmx.list()}
        assert not new & set(old)
    finally:
        pmx.run("kill", check=False)
        service.wait(30)
        log.close()
    assert service.returncode == 0
