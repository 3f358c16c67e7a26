"""A full disk under PMX_HOME (issue 16, item 5): pmxd says why it cannot start, and a
running pmxd keeps retrying state.json, so a crash after the disk frees duplicates nothing.

Needs root (a small tmpfs is mounted as the home); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, Pmx, app_path, pid_alive, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="mounting a small tmpfs as the home needs root")


@pytest.fixture
def small_home(tmp_path: Path) -> Iterator[Path]:
    mount_point = Path(f"/tmp/pmxfull-{os.getpid()}")
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=700", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        mount_point.rmdir()


def _fill(home: Path) -> Path:
    filler = home / "filler"
    with open(filler, "wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError:
            pass
    return filler


def test_pmxd_on_a_full_home_says_why(small_home: Path) -> None:
    home = small_home / "h"
    _fill(small_home)
    env = {**os.environ, "PMX_HOME": str(home)}
    result = subprocess.run([*CLI, "start", "/bin/sleep", "--interpreter", "none", "--name", "nap",
                             "--", "1000"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 3, result
    assert "No space left on device" in result.stderr, result.stderr
    assert "did not answer" not in result.stderr


def test_state_writes_that_fail_are_retried(small_home: Path) -> None:
    pmx = Pmx(small_home / "h")
    try:
        pmx.run("start", app_path("idle.py"), "--name", "idle")
        pmx.wait_status("idle", "online")
        filler = _fill(small_home)
        old_pid = pmx.pids("idle")[0]
        pmx.run("restart", "idle")  # a new pid while the disk is full
        new_pid = pmx.wait_status("idle", "online")[0]["pid"]
        assert new_pid != old_pid
        filler.unlink()  # space again: the retry writes the new pid

        def recorded() -> tuple[bool, object]:
            try:
                state = json.loads((pmx.home / "state.json").read_text())
            except (OSError, ValueError) as exc:
                return False, exc
            return new_pid in [p.get("pid") for p in state.get("processes", [])], state
        wait_until(recorded, timeout=5, what="state.json has the new pid")
        daemon = pmx.daemon_pid()
        assert daemon is not None
        os.kill(daemon, signal.SIGKILL)
        wait_until(lambda: (not pid_alive(daemon), daemon), timeout=10, what="pmxd dead")
        subprocess.run([sys.executable, "-m", "pmx.supervisor.pmxd", "--home", str(pmx.home)],
                       env=pmx.env, check=True, timeout=30)
        rows = pmx.wait_status("idle", "online", count=1)
        assert not pid_alive(new_pid) or rows[0]["pid"] == new_pid
        wait_until(lambda: (not pid_alive(new_pid), new_pid), timeout=10,
                   what="the old instance stopped by the new pmxd")
    finally:
        problems = pmx.cleanup()
        assert not problems, problems
