"""An app gets stdin, stdout, stderr (and its sockets in cluster mode) and nothing else of
pmxd's, even when whoever started pmxd left it more open files: most apps are spawned
through posix_spawn, which closes only close-on-exec fds, so pmxd marks what it
inherited so at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Pmx, wait_until

SHOW_FDS = "import os; print('FDS', sorted(int(fd) for fd in os.listdir('/proc/self/fd')))"


@pytest.mark.parametrize("cgroups", ["default", "off"])
def test_an_app_gets_no_fd_pmxd_inherited(pmx: Pmx, cgroups: str, tmp_path: Path) -> None:
    if cgroups == "off":
        pmx.env["PMX_CGROUPS"] = "0"
    with open(tmp_path / "left-open", "w") as left_open:
        fd = left_open.fileno()
        subprocess.run([sys.executable, "-m", "pmx.supervisor.pmxd", "--home", str(pmx.home)],
                       env=pmx.env, check=True, timeout=30, pass_fds=(fd,))
    eco = pmx.write("eco.toml", f"""
[[apps]]
name = "fds"
script = "{sys.executable}"
args = ["-c", {json.dumps(SHOW_FDS)}]
interpreter = "none"
autorestart = false
""")
    pmx.run("start", str(eco))
    log = pmx.home / "logs" / "fds-out-0.log"
    line = wait_until(lambda: (bool(seen := [x for x in (log.read_text() if log.exists() else "")
                                             .splitlines() if x.startswith("FDS")]), seen),
                      timeout=15, what="the app's list of fds")
    # 0-2, and the one os.listdir itself has open while it lists
    assert line == ["FDS [0, 1, 2, 3]"], (line, fd)
    assert os.path.exists(tmp_path / "left-open")
