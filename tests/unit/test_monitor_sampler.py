"""The /proc sampler (monitor.py): figures of a process tree, and the shortcut that skips
the stat of a single-threaded process that has not run since the last sample."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pmx.supervisor.monitor import ProcFiles, Sampler, _tree_from_proc

IDLE_THEN_FORK = """
import os, signal, sys, time
def fork_child(*_):
    if os.fork() == 0:
        data = bytearray(64 * 1024 * 1024)  # touched: resident
        for i in range(0, len(data), 4096):
            data[i] = 1
        time.sleep(60)
        os._exit(0)
signal.signal(signal.SIGUSR1, fork_child)
print("ready", flush=True)
while True:
    signal.pause()
"""


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-c", IDLE_THEN_FORK], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()


def test_an_idle_process_is_read_once_and_its_fork_is_seen(sleeper: subprocess.Popen[str]) -> None:
    files = ProcFiles()
    cpu, memory, processes = _tree_from_proc(sleeper.pid, files)
    assert processes == 1 and memory > 0
    assert _tree_from_proc(sleeper.pid, files) == (cpu, memory, 1)  # nothing moved
    os.kill(sleeper.pid, signal.SIGUSR1)  # it runs: forks a child that takes 64 MiB
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, grown, processes = _tree_from_proc(sleeper.pid, files)
        if processes == 2 and grown > memory + 60 * 1024 * 1024:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the child was not counted: {processes} processes, {grown} bytes")


def test_a_busy_process_shows_cpu() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        sampler = Sampler()
        sampler.sample([(1, busy.pid)])
        time.sleep(0.5)
        [stats] = sampler.sample([(1, busy.pid)])
        assert stats.cpu > 20, stats
    finally:
        busy.kill()
        busy.wait()


def test_a_process_that_ended_is_left_out() -> None:
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    assert Sampler().sample([(1, gone.pid)]) == []


def test_a_sampler_sees_an_idle_instance_fork_and_grow(sleeper: subprocess.Popen[str]) -> None:
    """The Sampler's own shortcut (an instance at rest keeps its last figures) must let go
    as soon as the process runs."""
    sampler = Sampler()
    [first] = sampler.sample([(1, sleeper.pid)])
    [again] = sampler.sample([(1, sleeper.pid)])
    assert (again.memory, again.processes, again.cpu) == (first.memory, 1, 0.0)
    os.kill(sleeper.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [stats] = sampler.sample([(1, sleeper.pid)])
        if stats.processes == 2 and stats.memory > first.memory + 60 * 1024 * 1024:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the child was not counted: {stats}")
