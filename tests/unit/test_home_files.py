"""pmxd's own files in its home (pmxd.lock, pmxd.log, spawned.jsonl) are never opened
through a symlink planted there and are 0600 whatever was there before.

The home is checked (0700, the user's own), so this is hardening: a link there must
neither be written through nor have its target's mode changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pmx.supervisor.errors import HomeError
from pmx.supervisor.home import HomeLock, open_private_log
from pmx.supervisor.recovery import StateFile

from tests.conftest import Pmx

PRECIOUS = b"precious: must never change\n"


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    """A file outside the home that a planted link points to; checked unchanged after."""
    path = tmp_path / "elsewhere" / "precious"
    path.parent.mkdir()
    path.write_bytes(PRECIOUS)
    path.chmod(0o644)
    yield path
    assert path.read_bytes() == PRECIOUS
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir(mode=0o700)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_lock_is_never_taken_through_a_symlink(home: Path, target: Path) -> None:
    (home / "pmxd.lock").symlink_to(target)
    with pytest.raises(HomeError, match=r"pmxd\.lock: it is a symlink"):
        HomeLock(home).acquire()
    assert not (home / "pmxd.pid").exists()


def test_a_dangling_lock_link_creates_nothing(home: Path, tmp_path: Path) -> None:
    (home / "pmxd.lock").symlink_to(tmp_path / "made-by-pmxd")
    with pytest.raises(HomeError):
        HomeLock(home).acquire()
    assert not (tmp_path / "made-by-pmxd").exists()


def test_an_old_lock_file_is_made_0600(home: Path) -> None:
    (home / "pmxd.lock").touch(mode=0o644)
    os.chmod(home / "pmxd.lock", 0o644)
    lock = HomeLock(home)
    lock.acquire()
    try:
        assert mode(home / "pmxd.lock") == 0o600
    finally:
        lock.release()


def test_the_daemon_log_is_never_opened_through_a_symlink(home: Path, target: Path) -> None:
    (home / "pmxd.log").symlink_to(target)
    with pytest.raises(HomeError, match=r"pmxd\.log: it is a symlink"):
        open_private_log(home / "pmxd.log")


def test_the_daemon_log_refuses_a_fifo_without_blocking(home: Path) -> None:
    os.mkfifo(home / "pmxd.log", 0o600)
    with pytest.raises(OSError):  # ENXIO: no reader (O_NONBLOCK), or refused if one reads
        open_private_log(home / "pmxd.log")


def test_the_daemon_log_appends_and_is_made_0600(home: Path) -> None:
    path = home / "pmxd.log"
    path.write_text("earlier\n")
    path.chmod(0o644)
    with open_private_log(path) as file:
        file.write("later \udcff\n")  # a lone surrogate is escaped, never an error
    assert path.read_text() == "earlier\nlater \\udcff\n"
    assert mode(path) == 0o600


def test_pmxd_refuses_a_planted_log_in_one_line(pmx: Pmx, target: Path) -> None:
    """End to end: pmxd.log a symlink -> pmxd says so and starts nothing (it used to append
    through the link and chmod the link's target 0600). The fixture stops any pmxd."""
    (pmx.home / "pmxd.log").symlink_to(target)
    result = subprocess.run([sys.executable, "-m", "pmx.supervisor.pmxd", "--home",
                             str(pmx.home)], env=pmx.env, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (
        1, f"pmxd: refusing {pmx.home / 'pmxd.log'}: it is a symlink\n")
    assert pmx.daemon_pid() is None and not (pmx.home / "rpc.sock").exists()


def fake_instance() -> Any:
    spec = SimpleNamespace(stop_signal="SIGTERM", kill_timeout_s=1.0)
    return SimpleNamespace(pid=os.getpid(), pidfd=-1, start_time=1, run_id="1.a.1", app="a",
                           index=0, spec=spec)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_the_spawn_journal_is_never_written_through_a_symlink(
        home: Path, target: Path, loop: asyncio.AbstractEventLoop,
        caplog: pytest.LogCaptureFixture) -> None:
    (home / "spawned.jsonl").symlink_to(target)
    state = StateFile(home / "state.json", home / "spawned.jsonl", lambda: [], loop)
    with caplog.at_level(logging.WARNING):
        state.spawned(fake_instance())
    state.remove()
    assert "cannot append to" in caplog.text


def test_the_spawn_journal_is_made_0600(home: Path, loop: asyncio.AbstractEventLoop) -> None:
    (home / "spawned.jsonl").touch()
    os.chmod(home / "spawned.jsonl", 0o644)
    state = StateFile(home / "state.json", home / "spawned.jsonl", lambda: [], loop)
    state.spawned(fake_instance())
    assert mode(home / "spawned.jsonl") == 0o600
    assert b'"app":"a"' in (home / "spawned.jsonl").read_bytes()
    state.remove()
