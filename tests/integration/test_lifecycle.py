"""The foundation against a real daemon: start/list/stop/restart/delete, crashes, stops, logs."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import zmq

from tests.conftest import CLI, Pmx, app_path, pid_alive, wait_until


def test_start_list_stop_restart_delete(pmx: Pmx) -> None:
    # An app that ignores SIGTERM: every stop goes to SIGKILL after kill_timeout (1 s here).
    eco = pmx.write("sleepy.toml", f"""
[[apps]]
name = "sleepy"
script = "{app_path('ignore_signals.py')}"
instances = 2
kill_timeout = "1s"
""")
    started = pmx.run("start", str(eco))
    assert "started pmxd" in started.stderr  # the CLI says it started the daemon
    rows = pmx.wait_status("sleepy", "online", count=2)
    assert {row["instance"] for row in rows} == {0, 1}
    for key in ("name", "id", "instance", "pid", "status", "restarts", "cpu", "memory",
                "exec_mode", "uptime"):
        assert key in rows[0]
    first = [row["pid"] for row in rows]

    table = pmx.run("list").stdout
    assert re.search(r"sleepy:0 .* online", table)
    assert pmx.run("ls").stdout.count("sleepy:") == 2
    assert "sleepy:1" in pmx.run("status").stdout

    pmx.run("restart", "sleepy")
    rows = pmx.wait_status("sleepy", "online", count=2)
    assert not set(first) & {row["pid"] for row in rows}
    assert all(row["restarts"] == 1 for row in rows)

    pmx.run("stop", str(rows[0]["id"]))  # one instance by id
    rows = {row["id"]: row for row in pmx.instances("sleepy")}
    assert sorted(r["status"] for r in rows.values()) == ["online", "stopped"]

    pmx.run("stop", "all")
    pmx.wait_status("sleepy", "stopped")
    for pid in first:
        assert not pid_alive(pid)
    pmx.run("start", "sleepy")
    pmx.wait_status("sleepy", "online", count=2)
    pmx.run("delete", "sleepy")
    assert pmx.list() == []


def test_ping_describe_and_script_args(pmx: Pmx) -> None:
    pmx.run("start", app_path("printer.py"), "--name", "pr", "--", "3")
    pmx.wait_status("pr", "online")
    ping = pmx.run("ping").stdout
    assert re.search(r"pmxd \S+ is up: pid \d+", ping)
    described = json.loads(pmx.run("describe", "pr", "--json").stdout)
    assert described[0]["spec"]["args"] == ["3"]
    assert described[0]["instances"][0]["command"][-1] == "3"
    assert "out log" in pmx.run("describe", "pr").stdout
    missing = pmx.run("describe", "nope", check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("pmx: no app")


def test_crash_restarts_with_backoff_then_errored(pmx: Pmx) -> None:
    eco = pmx.write("eco.toml", f"""
[[apps]]
name = "crashy"
script = "{app_path('crash.py')}"
args = ["7"]
max_restarts = 3
min_uptime = "5s"
exp_backoff_restart_delay = 100
""")
    pmx.run("start", str(eco))
    rows = pmx.wait_status("crashy", "errored", timeout=30)
    assert rows[0]["restarts"] == 3
    assert "exit code 7" in rows[0]["reason"] and "gave up" in rows[0]["reason"]
    assert "errored" in pmx.run("list").stdout


def test_missing_script_is_refused_before_anything_starts(pmx: Pmx) -> None:
    # A program missing at spawn time is errored at once: test_hostile covers that through
    # an ecosystem file. A path given on the command line is checked before pmxd starts.
    result = pmx.run("start", "/nonexistent/bin/server", "--name", "ghost", check=False)
    assert result.returncode == 2
    assert "/nonexistent/bin/server: no such file" in result.stderr
    assert pmx.daemon_pid() is None


def test_stop_escalates_to_sigkill_after_kill_timeout(pmx: Pmx) -> None:
    eco = pmx.write("eco.toml", f"""
[[apps]]
name = "stubborn"
script = "{app_path('ignore_signals.py')}"
kill_timeout = "700ms"
""")
    pmx.run("start", str(eco))
    pmx.wait_status("stubborn", "online")
    wait_until(lambda: (pmx.run("logs", "stubborn", "--nostream").stdout.count("ignoring") == 1,
                        None), timeout=10, what="app installed its handlers")
    pid = pmx.pids("stubborn")[0]
    began = time.monotonic()
    pmx.run("stop", "stubborn")
    took = time.monotonic() - began
    assert not pid_alive(pid)
    assert took >= 0.6  # it did wait for the graceful stop first
    described = json.loads(pmx.run("describe", "stubborn", "--json").stdout)
    assert described[0]["instances"][0]["last_exit"] == "killed by SIGKILL"


def test_grandchildren_are_stopped_with_their_app(pmx: Pmx) -> None:
    pmx.run("start", app_path("grandchild.py"), "--name", "family")
    pmx.wait_status("family", "online")
    line = wait_until(lambda: (bool(m := re.search(
        r"parent (\d+) grandchild (\d+)", pmx.run("logs", "family", "--nostream").stdout)), m),
        timeout=10, what="grandchild started")
    assert line is not None
    parent, grandchild = int(line.group(1)), int(line.group(2))
    pmx.run("stop", "family")
    wait_until(lambda: (not pid_alive(parent) and not pid_alive(grandchild),
                        (pid_alive(parent), pid_alive(grandchild))),
               timeout=5, what="parent and grandchild gone")


def test_fast_printer_loses_no_line(pmx: Pmx) -> None:
    count = 100_000
    pmx.run("start", app_path("printer.py"), "--name", "fast", "--", str(count))
    out_log = pmx.home / "logs" / "fast-out-0.log"

    def done() -> tuple[bool, int]:
        text = out_log.read_text() if out_log.exists() else ""
        return text.endswith("done\n"), len(text)

    wait_until(done, timeout=60, what="printer finished")
    lines = out_log.read_text().splitlines()
    assert lines[-1] == "done"
    assert len(lines) == count + 1
    for number, line in enumerate(lines[:-1]):
        assert line.startswith(f"line {number} of {count} "), line


def test_logs_follow_one_app_only(pmx: Pmx) -> None:
    pmx.run("start", app_path("idle.py"), "--name", "quiet")
    pmx.run("start", app_path("printer.py"), "--name", "loud", "--", "5")
    pmx.wait_status("quiet", "online")
    follower = subprocess.Popen([*CLI, "logs", "quiet", "--lines", "0"], env=pmx.env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert follower.stdout is not None
    lines: list[str] = []
    try:
        def restart_and_read() -> tuple[bool, list[str]]:
            # The subscription reaches the daemon a moment after the follower starts:
            # restart both apps until quiet's start-up line arrives.
            pmx.run("restart", "loud")
            pmx.run("restart", "quiet")
            while select.select([follower.stdout], [], [], 1.0)[0]:
                lines.append(follower.stdout.readline())  # type: ignore[union-attr]
                if "idle pid" in lines[-1]:
                    return True, lines
            return False, lines

        wait_until(restart_and_read, timeout=20, what="quiet's line followed")
        assert all(line.startswith("quiet:0") for line in lines), lines
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
        follower.stdout.close()


def test_malformed_control_message_gets_error_reply(pmxd: Pmx) -> None:
    pmxd.run("start", app_path("idle.py"), "--name", "keep")
    pmxd.wait_status("keep", "online")
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{pmxd.home / 'rpc.sock'}")
    try:
        for payload in (b"not json", b"[1,2]", b'{"v":1,"id":"x","cmd":"__class__"}',
                        b'{"v":9,"id":"x","cmd":"ping"}', b"\xff\xfe", b"[" * 50000,
                        b'{"v":1,"id":"x","cmd":"stop","args":{"target":5}}'):
            sock.send(payload)
            assert sock.poll(5000), f"no reply to {payload[:30]!r}"
            reply = json.loads(sock.recv())
            assert reply["ok"] is False and reply["error"]["code"], reply
            assert "Traceback" not in reply["error"]["message"]
    finally:
        sock.close()
        context.term()
    assert pmxd.instances("keep")[0]["status"] == "online"
    assert "is up" in pmxd.run("ping").stdout


def test_bad_ecosystem_file_touches_nothing(pmx: Pmx) -> None:
    pmx.run("start", app_path("idle.py"), "--name", "keep")
    pid = pmx.pids("keep")
    bad = pmx.write("bad.toml", '[[apps]]\nname = "api"\nscript = "x.py"\ninstnaces = 2\n')
    result = pmx.run("start", str(bad), check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f'pmx: {bad}: app "api" (apps[0]): unknown key '
                                     '"instnaces"; did you mean "instances"?')
    assert pmx.pids("keep") == pid


def test_list_answers_while_a_slow_stop_runs(pmx: Pmx) -> None:
    eco = pmx.write("eco.toml", f"""
[[apps]]
name = "slowstop"
script = "{app_path('ignore_signals.py')}"
kill_timeout = "3s"
""")
    pmx.run("start", str(eco))
    pmx.wait_status("slowstop", "online")
    stopper = subprocess.Popen([*CLI, "stop", "slowstop"], env=pmx.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (pmx.instances("slowstop")[0]["status"] == "stopping", None),
                   timeout=5, what="stopping")
        began = time.monotonic()
        pmx.list()
        assert time.monotonic() - began < 2.5  # answered during the 3 s stop
        busy = pmx.run("restart", "slowstop", check=False)
        assert busy.returncode != 0 and "busy" in busy.stderr
    finally:
        stopper.wait(30)


def test_kill_leaves_no_process(pmx: Pmx) -> None:
    pmx.run("start", app_path("grandchild.py"), "--name", "a", "-i", "2")
    pmx.wait_status("a", "online", count=2)
    daemon = pmx.daemon_pid()
    assert daemon is not None
    result = pmx.run("kill")
    assert "stopped every app" in result.stdout
    assert not pid_alive(daemon)
    assert pmx.cleanup() == []


def test_flush_empties_logs(pmx: Pmx) -> None:
    pmx.run("start", app_path("printer.py"), "--name", "pr", "--", "10")
    log_file = pmx.home / "logs" / "pr-out-0.log"
    wait_until(lambda: (log_file.exists() and "done" in log_file.read_text(), None),
               timeout=10, what="printed")
    pmx.run("flush", "pr")
    assert log_file.read_text() == ""


def test_children_get_only_stdio_fds(pmx: Pmx) -> None:
    pmx.run("start", app_path("idle.py"), "--name", "fds")
    pid = pmx.pids("fds")[0]
    wait_until(lambda: ("idle pid" in pmx.run("logs", "fds", "--nostream").stdout, None),
               timeout=10, what="started")
    assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2]


def test_second_daemon_on_same_home_refuses(pmxd: Pmx) -> None:
    first = pmxd.daemon_pid()
    result = subprocess.run([sys.executable, "-m", "pmx.supervisor.pmxd", "--home",
                             str(pmxd.home), "--foreground"], env=pmxd.env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert f"already running (pid {first})" in result.stderr
    assert "is up" in pmxd.run("ping").stdout
