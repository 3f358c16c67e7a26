"""Security against a real daemon (issue 9): private files under a hostile umask, other
users refused, one daemon per home, secrets masked, privilege drop with `user`.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from pmx.cli.main import main as cli_main

from tests.conftest import CLI, Pmx, app_path, make_home, processes_with_env, wait_until
from tests.integration.hostile_helpers import (
    daemon_pid,
    ecosystem,
    environ_of,
    needs_root,
    out_log,
    status_field,
    wait_log_match,
)

# ---------------------------------------------------------------- 1. hostile umask


def test_home_sockets_logs_and_dump_stay_private_under_umask_000() -> None:
    outer = make_home()
    pmx = Pmx(outer / "h")  # does not exist yet: the autostarted pmxd creates it
    try:
        def hostile(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*CLI, *args], env=pmx.env, capture_output=True, text=True,
                                  timeout=60, umask=0)

        started = hostile("start", app_path("idle.py"), "--name", "idle")
        assert started.returncode == 0, started.stderr
        assert "started pmxd" in started.stderr
        wait_log_match(out_log(pmx, "idle"), r"idle pid \d+")
        saved = hostile("save")
        assert saved.returncode == 0, saved.stderr

        home = pmx.home
        uid = int(status_field(daemon_pid(pmx), "Uid")[0])
        expected = {
            home: 0o700, home / "rpc.sock": 0o600, home / "pub.sock": 0o600,
            home / "logs": 0o700, out_log(pmx, "idle"): 0o600, home / "dump.toml": 0o600,
            home / "pmxd.log": 0o600, home / "pmxd.pid": 0o600, home / "notify.sock": 0o600,
        }
        found = {str(path): (oct(stat.S_IMODE(os.lstat(path).st_mode)), os.lstat(path).st_uid)
                 for path in expected}
        assert found == {str(path): (oct(mode), uid) for path, mode in expected.items()}
        # And nothing else in the home is open to group or others, or someone else's.
        loose = {str(path): oct(stat.S_IMODE(os.lstat(path).st_mode))
                 for path in home.rglob("*")
                 if os.lstat(path).st_mode & 0o077 or os.lstat(path).st_uid != uid}
        assert loose == {}
    finally:
        problems = pmx.cleanup()
        shutil.rmtree(outer, ignore_errors=True)
    assert not problems, problems


# ---------------------------------------------------------------- 2. other users refused


def as_nobody(action: Callable[[], dict[str, Any]], *, timeout: float = 20) -> dict[str, Any]:
    """Run `action` in a forked child that has become nobody (no groups); its result.

    The child cannot exec this Python (it lives under root's 0700 home), so it runs
    code already imported here. stdout and stderr of the child are returned too."""
    nobody = pwd.getpwnam("nobody")
    result_r, result_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            result = action()
        except BaseException as exc:
            result = {"crash": repr(exc)}
        try:
            os.write(result_w, json.dumps(result).encode())
        finally:
            os._exit(0)
    for fd in (result_w, out_w, err_w):
        os.close(fd)
    chunks: dict[int, bytes] = {result_r: b"", out_r: b"", err_r: b""}
    open_fds = set(chunks)
    deadline = time.monotonic() + timeout
    try:
        while open_fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_fds), [], [], 0.05)
            for fd in ready:
                data = os.read(fd, 65536)
                if data:
                    chunks[fd] += data
                else:
                    open_fds.discard(fd)
    finally:
        if open_fds:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in chunks:
            os.close(fd)
    assert not open_fds, f"the child running as nobody did not finish within {timeout}s"
    result = json.loads(chunks[result_r] or b"{}")
    assert isinstance(result, dict)
    result["stdout"] = chunks[out_r].decode(errors="replace")
    result["stderr"] = chunks[err_r].decode(errors="replace")
    return result


def open_up(home: Path) -> None:
    """What a careless admin might do: let others reach the socket at all."""
    os.chmod(home, 0o711)
    os.chmod(home / "rpc.sock", 0o666)


@needs_root
def test_dealer_of_another_user_gets_no_successful_reply(pmxd: Pmx) -> None:
    home = pmxd.home
    open_up(home)

    def ping_as_nobody() -> dict[str, Any]:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{home / 'rpc.sock'}")
        sock.send(json.dumps({"v": 1, "id": "intruder", "cmd": "ping"}).encode())
        reply = json.loads(sock.recv()) if sock.poll(2000) else None
        sock.close(linger=0)
        context.term()
        return {"reply": reply}

    seen = as_nobody(ping_as_nobody)
    assert "crash" not in seen, seen
    reply = seen["reply"]
    if reply is not None:  # it got through libzmq's uid filter: refused by the daemon
        assert reply["ok"] is False, reply
        assert reply["error"]["message"] == "permission denied", reply
        assert re.search(r"refused .* another user", (home / "pmxd.log").read_text())
    assert "is up" in pmxd.run("ping").stdout


@needs_root
def test_cli_of_another_user_says_permission_denied(pmxd: Pmx) -> None:
    home = pmxd.home
    open_up(home)

    def cli_ping_as_nobody() -> dict[str, Any]:
        os.environ["PMX_HOME"] = str(home)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child's own fds
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        sys.argv = ["pmx", "ping"]
        code: object = 0
        try:
            cli_main()
        except SystemExit as exc:
            code = exc.code
        sys.stdout.flush()
        sys.stderr.flush()
        return {"code": code}

    began = time.monotonic()
    seen = as_nobody(cli_ping_as_nobody)
    took = time.monotonic() - began
    assert "crash" not in seen, seen
    assert seen["code"] not in (0, None), seen
    output = (seen["stdout"] + seen["stderr"]).strip()
    assert len(output.splitlines()) == 1, seen
    assert "permission denied" in output, seen
    assert took < 5, f"took {took:.1f}s: timed out instead of refusing at once"
    assert "is up" in pmxd.run("ping").stdout


# ---------------------------------------------------------------- 3. one daemon per home


def test_three_daemons_started_at_once_leave_exactly_one() -> None:
    for _ in range(3):  # the race is short: run it a few times
        home = make_home()
        pmx = Pmx(home)
        try:
            starters = [subprocess.Popen(
                [sys.executable, "-m", "pmx.supervisor.pmxd", "--home", str(home)],
                env=pmx.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
            outcomes = [(starter.wait(30), starter.communicate()[1]) for starter in starters]
            assert sorted(code for code, _ in outcomes) == [0, 1, 1], outcomes
            survivor = daemon_pid(pmx)
            for code, stderr in outcomes:
                if code == 1:
                    assert f"already running (pid {survivor})" in stderr, outcomes
            assert processes_with_env(f"PMX_HOME={home}".encode()) == [survivor]
            assert f"pid {survivor}" in pmx.run("ping").stdout
        finally:
            problems = pmx.cleanup()
            shutil.rmtree(home, ignore_errors=True)
        assert not problems, problems


def test_second_foreground_daemon_exits_1_and_first_stays(pmxd: Pmx) -> None:
    first = daemon_pid(pmxd)
    result = subprocess.run([sys.executable, "-m", "pmx.supervisor.pmxd", "--home",
                             str(pmxd.home), "--foreground"], env=pmxd.env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"already running (pid {first})" in result.stderr
    assert (pmxd.home / "rpc.sock").exists()
    assert f"pid {first}" in pmxd.run("ping").stdout


# ---------------------------------------------------------------- 10. secrets


SECRETS = {"API_TOKEN": "tok-5f1d9a77", "DB_PASSWORD": "pw-83b0c2e1", "SECRET_KEY": "key-c47e11f0"}


def test_secret_env_values_are_masked_everywhere_but_show_secrets(pmx: Pmx) -> None:
    eco = ecosystem(pmx, {"name": "vault", "script": app_path("idle.py"),
                          "env": {**SECRETS, "GREETING": "hello-visible"}})
    pmx.run("start", str(eco))
    pid = pmx.wait_status("vault", "online")[0]["pid"]
    wait_log_match(out_log(pmx, "vault"), r"idle pid \d+")
    assert {k: environ_of(pid).get(k) for k in SECRETS} == SECRETS  # the app does get them

    env = pmx.run("env", "vault", check=False)
    assert env.returncode == 0, f"pmx env: {env.stderr}"
    assert "GREETING=hello-visible" in env.stdout
    assert all(f"{name}=" in env.stdout for name in SECRETS), env.stdout
    shown = {
        "describe": pmx.run("describe", "vault").stdout,
        "describe --json": pmx.run("describe", "vault", "--json").stdout,
        "list --json": pmx.run("list", "--json").stdout,
        "env": env.stdout,
        "pmxd.log": (pmx.home / "pmxd.log").read_text(),
    }
    leaks = {where: [v for v in SECRETS.values() if v in text] for where, text in shown.items()}
    assert leaks == {where: [] for where in shown}
    assert "hello-visible" in shown["describe"]

    revealed = json.loads(pmx.run("describe", "vault", "--json", "--show-secrets").stdout)
    assert {k: revealed[0]["spec"]["env"][k] for k in SECRETS} == SECRETS
    text = pmx.run("describe", "vault", "--show-secrets").stdout
    assert all(value in text for value in SECRETS.values()), text


# ---------------------------------------------------------------- 11. privilege drop


@needs_root
def test_app_with_user_nobody_runs_with_nobodys_ids_groups_and_home(pmx: Pmx) -> None:
    nobody = pwd.getpwnam("nobody")
    eco = ecosystem(pmx, {"name": "dropped", "script": "/bin/sleep", "args": ["100000"],
                          "interpreter": "none", "user": "nobody", "cwd": "/tmp"})
    started = pmx.run("start", str(eco), check=False)
    assert started.returncode == 0, started.stderr
    pid = pmx.wait_status("dropped", "online")[0]["pid"]
    ids = {"Uid": status_field(pid, "Uid"), "Gid": status_field(pid, "Gid"),
           "Groups": sorted(status_field(pid, "Groups"))}
    groups = sorted(str(g) for g in os.getgrouplist("nobody", nobody.pw_gid))
    assert ids == {"Uid": [str(nobody.pw_uid)] * 4, "Gid": [str(nobody.pw_gid)] * 4,
                   "Groups": groups}
    assert "0" not in ids["Groups"]
    env = environ_of(pid)
    assert (env.get("HOME"), env.get("USER")) == (nobody.pw_dir, "nobody")


def test_user_option_is_refused_clearly_when_not_root(pmx: Pmx) -> None:
    if os.geteuid() == 0:
        pytest.skip("checks the refusal an unprivileged pmxd gives")
    eco = ecosystem(pmx, {"name": "dropped", "script": "/bin/sleep", "args": ["100000"],
                          "interpreter": "none", "user": "nobody"})
    result = pmx.run("start", str(eco), check=False)
    assert result.returncode != 0
    assert "does not run as root" in result.stderr
    wait_until(lambda: (pmx.instances("dropped")[0]["status"] == "errored", pmx.list()),
               timeout=5, what="errored")
