"""Each instance in its own cgroup where pmxd may create them (issue 16, item 7): a
descendant that both calls setsid() and clears its environment still goes with the app.
Skips with the reason where no cgroup v2 is delegated to pmxd."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pmx.supervisor.cgroups import Cgroups

from tests.conftest import Pmx, app_path, pid_alive, wait_until


def _escaped_sleep(before: set[int]) -> int | None:
    """The `sleep 1000` with an empty environment that appeared since `before`."""
    with os.scandir("/proc") as entries:
        names = [e.name for e in entries if e.name.isdigit() and int(e.name) not in before]
    for name in names:
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if cmdline == b"sleep\x001000\x00" and environ == b"":
            return int(name)
    return None


def _pids() -> set[int]:
    with os.scandir("/proc") as entries:
        return {int(e.name) for e in entries if e.name.isdigit()}


def _home_cgroups(home: Path) -> Cgroups:
    groups = Cgroups.detect(home, setup=False)
    if groups is None:
        pytest.skip("no cgroup v2 is delegated to this process here (pmxd falls back to "
                    "process groups and the PMX_RUN_ID marker)")
    return groups


@pytest.mark.parametrize("how", ["delete", "kill"])
def test_a_setsid_descendant_without_environment_goes_with_its_app(pmx: Pmx, how: str) -> None:
    _home_cgroups(pmx.home)
    before = _pids()
    pmx.run("start", app_path("escape_clean.py"), "--name", "esc")
    pmx.wait_status("esc", "online")
    escaped = wait_until(lambda: (bool(p := _escaped_sleep(before)), p), timeout=10,
                         what="the escaped sleep")
    assert escaped is not None
    described = pmx.run("describe", "esc", "--json").stdout
    assert "cgroup v2" in described, described
    try:
        pmx.run("kill") if how == "kill" else pmx.run("delete", "esc")
        wait_until(lambda: (not pid_alive(escaped), escaped), timeout=10,
                   what=f"the escaped descendant ended by pmx {how}")
    finally:
        if pid_alive(escaped):
            os.kill(escaped, 9)


def test_without_cgroups_pmx_says_so(pmx: Pmx) -> None:
    pmx.env["PMX_CGROUPS"] = "0"
    pmx.run("start", app_path("idle.py"), "--name", "idle")
    described = pmx.run("describe", "idle", "--json").stdout
    assert "process group and PMX_RUN_ID marker" in described, described


def test_no_cgroup_of_the_home_is_left_after_pmx_kill(pmx: Pmx) -> None:
    groups = _home_cgroups(pmx.home)  # sees pmxd's cgroups as another pmxd's of the home
    pmx.run("start", app_path("grandchild.py"), "--name", "gc", "-i", "3")
    pmx.wait_status("gc", "online", count=3)
    assert len(groups.tagged(previous=True)) == 3
    pmx.run("delete", "gc")  # the cgroups of ended instances are removed as they end
    wait_until(lambda: (not groups.tagged(previous=True), groups.tagged(previous=True)), timeout=5,
               what="the instances' cgroups removed after delete")
    pmx.run("start", app_path("grandchild.py"), "--name", "gc2", "-i", "2")
    pmx.wait_status("gc2", "online", count=2)
    pmx.run("kill")
    deadline = time.monotonic() + 5
    while groups.tagged(previous=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not groups.tagged(previous=True)


@pytest.mark.parametrize("program", ["/bin/cat", "shebang", "as nobody"])
def test_a_program_runs_in_its_own_cgroup_from_its_first_instruction(pmx: Pmx, program: str,
                                                                      tmp_path: Path) -> None:
    """cat reads /proc/self/cgroup the moment it runs, faster than any move after the
    spawn: it must name the instance's cgroup, not pmxd's (whatever it forks at once
    would be left there, outside cgroup.kill). Moving it after its spawn lost that race
    about one time in six here; so four starts, each after a quiet spell."""
    groups = _home_cgroups(pmx.home)
    user = ""
    if program == "as nobody":  # the shim enters the cgroup as root, then setpriv drops
        if os.getuid() != 0 or not any(os.access(p, os.X_OK) for p in ("/usr/bin/setpriv",
                                                                         "/bin/setpriv")):
            pytest.skip("needs root and util-linux's setpriv (else pmxd moves it after)")
        program, user = "/bin/cat", 'user = "nobody"'
    if program == "shebang":
        script = tmp_path / "cat-cgroup"
        script.write_text("#!/bin/cat\n")  # cat, given the script's path, reads it: see args
        script.chmod(0o755)
        program, args = str(script), '"/proc/self/cgroup"'
    else:
        args = '"/proc/self/cgroup"'
    eco = pmx.write("eco.toml", f"""
[[apps]]
name = "cg"
script = "{program}"
args = [{args}]
interpreter = "none"
autorestart = false
cwd = "/tmp"
{user}
""")
    log = pmx.home / "logs" / "cg-out-0.log"

    def cgroup_lines() -> list[str]:
        text = log.read_text() if log.exists() else ""
        return [line for line in text.splitlines() if line.startswith("0::")]

    for attempt in range(4):
        pmx.run("start", str(eco)) if attempt == 0 else pmx.run("restart", "cg")
        lines = wait_until(lambda n=attempt: (len(seen := cgroup_lines()) > n, seen),
                           timeout=10, what="cat's line")
        assert f"/{groups.tag.rsplit('-', 2)[0]}-" in lines[attempt], lines  # pmx-HOME-...
        pmx.wait_status("cg", "stopped")
        time.sleep(0.2)  # a quiet spell: the next cgroup move is a slow one
