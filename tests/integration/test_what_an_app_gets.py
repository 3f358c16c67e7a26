"""What an app's process gets, whichever way pmxd spawns it (the sh shim through
posix_spawn, or subprocess; spawn.py): stdin, stdout, stderr and its sockets and nothing
else of pmxd's, even files whoever started pmxd left open; its environment exactly, names
a shell would drop included; PWD naming its directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Pmx, free_port, wait_until

REPORT = ("import json, os; print('REPORT', json.dumps({'fds': sorted(int(fd) for fd in "
          "os.listdir('/proc/self/fd')), 'dotted': os.environ.get('spring.profiles.active'), "
          "'pwd': os.environ.get('PWD'), 'oldpwd': os.environ.get('OLDPWD'), "
          "'cwd': os.getcwd()}))")


def _report(pmx: Pmx, name: str) -> dict[str, Any]:
    log = pmx.home / "logs" / f"{name}-out-0.log"

    def probe() -> tuple[bool, list[str]]:
        text = log.read_text() if log.exists() else ""
        lines = [line for line in text.splitlines() if line.startswith("REPORT ")]
        return bool(lines), lines
    line = wait_until(probe, timeout=15, what=f"{name}'s report")[0]
    report: dict[str, Any] = json.loads(line[len("REPORT "):])
    return report


@pytest.mark.parametrize("shape", ["fork", "cluster", "fork, no cgroups"])
def test_an_app_gets_its_own_files_and_environment_and_nothing_of_pmxds(
        pmx: Pmx, shape: str, tmp_path: Path) -> None:
    if shape == "fork, no cgroups":
        pmx.env["PMX_CGROUPS"] = "0"
    with open(tmp_path / "left-open", "w") as left_open:  # as a careless parent would
        subprocess.run([sys.executable, "-m", "pmx.supervisor.pmxd", "--home", str(pmx.home)],
                       env=pmx.env, check=True, timeout=30, pass_fds=(left_open.fileno(),))
    cluster = f'exec_mode = "cluster"\nlisten = "127.0.0.1:{free_port()}"\n' \
        if shape == "cluster" else ""
    eco = pmx.write("eco.toml", f"""
[[apps]]
name = "app"
script = "{sys.executable}"
args = ["-c", {json.dumps(REPORT)}]
interpreter = "none"
cwd = "{tmp_path}"
autorestart = false
env = {{ "spring.profiles.active" = "prod" }}
{cluster}""")
    pmx.run("start", str(eco))
    report = _report(pmx, "app")
    # 0-2, the listening socket in cluster mode, and the fd os.listdir itself has open
    assert report["fds"] == ([0, 1, 2, 3, 4] if shape == "cluster" else [0, 1, 2, 3]), report
    assert report["dotted"] == "prod", report
    assert report["pwd"] == report["cwd"] == str(tmp_path), report
    assert report["oldpwd"] is None, report
