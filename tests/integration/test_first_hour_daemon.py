"""What a new user trips on in pmxd during the first hour (issue 14).

A container that idles with nothing running, `pmx-runtime --help` naming another
program, ports that stopped or errored cluster apps keep bound (clients hang instead of
being refused), listen addresses that no instance serves, a reload after deleting one
instance that stopped the last live one at once, and the gunicorn example's two masters
fighting over one control socket.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Pmx, app_path, free_port, pid_alive, pid_cluster_toml, wait_until
from tests.httpload import get_pid

RUNTIME = str(Path(sys.executable).with_name("pmx-runtime"))
DAEMON = [sys.executable, "-m", "pmx.supervisor.pmxd"]
EXAMPLES = Path(__file__).parents[2] / "config-examples"


def run_entry_point(pmx: Pmx, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a pmxd entry point as a container runs it; failing the test if it keeps running."""
    try:
        return subprocess.run(argv, env=pmx.env, capture_output=True, text=True,
                              timeout=timeout, cwd=pmx.home, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{argv} still running after {timeout}s (killed); stderr: {exc.stderr!r}")


def connection_refused(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:PORT; False when a connection is accepted
    (by the kernel into a listening socket's backlog, even if no process ever serves it)."""
    with socket.socket() as sock:
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


def answers(port: int) -> tuple[bool, object]:
    try:
        return True, get_pid(port)
    except OSError as exc:
        return False, exc


def http_ok(port: int) -> tuple[bool, object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        return response.status == 200, response.read()
    except OSError as exc:
        return False, exc
    finally:
        connection.close()


def describe(pmx: Pmx, name: str) -> dict[str, object]:
    described = json.loads(pmx.run("describe", name, "--json").stdout)
    assert isinstance(described, list) and isinstance(described[0], dict)
    return described[0]


# ---------------------------------------------------------------- containers (#1, #13)


def test_runtime_with_a_missing_file_exits_at_once_with_one_line(pmx: Pmx) -> None:
    result = run_entry_point(pmx, [RUNTIME, "nosuch.toml"])
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["pmx-runtime: nosuch.toml: no such file"]
    assert not (pmx.home / "rpc.sock").exists()  # checked before anything started


def test_foreground_daemon_with_an_invalid_file_exits_at_once(pmx: Pmx) -> None:
    eco = pmx.write("eco.toml", f'[[apps]]\nname = "web"\nscript = "{app_path("idle.py")}"\n'
                    "instnaces = 2\n")
    result = run_entry_point(pmx, [*DAEMON, "--home", str(pmx.home), "--foreground", str(eco)])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"pmxd: {eco}: ") and '"instnaces"' in lines[0], lines


@pytest.mark.parametrize("problem", ["port in use", "missing executable"])
def test_runtime_whose_app_cannot_start_exits_non_zero(pmx: Pmx, problem: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if problem == "port in use":
            eco = pmx.write("eco.toml", pid_cluster_toml("clash", port, instances=2))
            expected = f'cannot bind 127.0.0.1:{port} for app "clash": address already in use'
        else:
            eco = pmx.write("eco.toml", '[[apps]]\nname = "ghost"\nscript = "/nonexistent/prog"\n')
            expected = "/nonexistent/prog"
        result = run_entry_point(pmx, [RUNTIME, str(eco)])
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("pmx-runtime: ") and expected in last, result.stderr


def test_runtime_help_names_pmx_runtime() -> None:
    result = subprocess.run([RUNTIME, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: pmx-runtime"), result.stdout


# ---------------------------------------------------------------- ports of stopped apps (#2)


def start_cluster(pmx: Pmx, name: str, port: int, *, instances: int = 2, extra: str = "") -> None:
    eco = pmx.write(f"{name}.toml", pid_cluster_toml(name, port, instances=instances,
                                                     extra=f'kill_timeout = "3s"\n{extra}'))
    pmx.run("start", str(eco))
    pmx.wait_status(name, "online", count=instances)
    wait_until(lambda: answers(port), timeout=15, what=f"{name} answering")


def test_stopped_cluster_app_refuses_connections_and_start_binds_again(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "api", port)
    pmx.run("stop", "api")
    assert connection_refused(port)
    assert describe(pmx, "api")["listen"] == []
    pmx.run("start", "api")
    pmx.wait_status("api", "online", count=2)
    wait_until(lambda: answers(port), timeout=15, what="api answering again after start")
    pmx.run("restart", "api")  # a restart keeps the socket (connections wait in its backlog)
    assert not connection_refused(port)
    pmx.wait_status("api", "online", count=2)
    assert describe(pmx, "api")["listen"] == [f"127.0.0.1:{port}"]


def test_stopping_every_instance_by_id_closes_the_port(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "api", port)
    first, second = sorted(pmx.instances("api"), key=lambda row: row["instance"])
    pmx.run("stop", str(first["id"]))
    assert wait_until(lambda: answers(port), timeout=10, what="the other instance serves") \
        == second["pid"]
    pmx.run("stop", str(second["id"]))
    assert connection_refused(port)
    pmx.run("start", str(first["id"]))  # one instance started again binds the port again
    wait_until(lambda: answers(port), timeout=15, what="the restarted instance serves")


def test_crash_back_off_keeps_the_port_and_errored_closes_it(pmx: Pmx) -> None:
    port, other = free_port(), free_port()
    eco = pmx.write("crashy.toml", f"""
[[apps]]
name = "crashy"
script = "{app_path('crash.py')}"
exec_mode = "cluster"
listen = "127.0.0.1:{port}"
restart_delay = "60s"

[[apps]]
name = "looper"
script = "{app_path('crash.py')}"
exec_mode = "cluster"
instances = 2
listen = "127.0.0.1:{other}"
max_restarts = 1
""")
    pmx.run("start", str(eco))
    pmx.wait_status("crashy", "waiting")
    assert not connection_refused(port)  # back-off: connections wait for the restart
    pmx.run("stop", "crashy")
    assert connection_refused(port)
    pmx.wait_status("looper", "errored", count=2)
    wait_until(lambda: (connection_refused(other), None), timeout=10,
               what="the crash-looping app's port refuses connections")


def test_dropin_app_forgets_its_learned_port_when_stopped_and_learns_it_again(pmx: Pmx) -> None:
    port = free_port()
    pmx.env["PORT"] = str(port)
    pmx.run("start", app_path("py_hello.py"), "-i", "2", "--listen-timeout", "20s")
    pmx.wait_status("py_hello", "online", count=2)
    wait_until(lambda: answers(port), timeout=15, what="py_hello answering")
    pmx.run("stop", "py_hello")
    assert connection_refused(port)
    pmx.run("start", "py_hello")
    pmx.wait_status("py_hello", "online", count=2)
    wait_until(lambda: answers(port), timeout=15, what="py_hello answering after start")
    assert describe(pmx, "py_hello")["listen"] == [f"0.0.0.0:{port}"]
    logs = pmx.run("logs", "py_hello", "--nostream", "--err", "--lines", "50").stdout
    assert "Address already in use" not in logs, logs  # the second instance shared the port


def test_listen_address_no_instance_serves_is_reported(pmx: Pmx) -> None:
    served, unserved = free_port(), free_port()
    eco = pmx.write("two.toml", f"""
[[apps]]
name = "two"
script = "{app_path('pid_server.py')}"
exec_mode = "cluster"
instances = 2
listen = ["127.0.0.1:{served}", "127.0.0.1:{unserved}"]
""")
    pmx.run("start", str(eco))
    pmx.wait_status("two", "online", count=2)
    wait_until(lambda: (describe(pmx, "two").get("unserved") == [f"127.0.0.1:{unserved}"],
                        describe(pmx, "two").get("unserved")),
               timeout=30, what="the second address reported as unserved")
    log = (pmx.home / "pmxd.log").read_text()
    reports = [line for line in log.splitlines() if f"127.0.0.1:{unserved}" in line
               and "no instance accepts" in line]
    assert len(reports) == 1, reports
    assert f"127.0.0.1:{served}" not in reports[0]


# ---------------------------------------------------------------- reload after delete (#3)


def test_reload_after_deleting_an_instance_replaces_the_survivor_when_ready(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "api", port, extra='wait_ready = true\nlisten_timeout = "20s"\n'
                                          'env = { NOTIFY = "1", READY_DELAY = "1" }')
    first, survivor = sorted(pmx.instances("api"), key=lambda row: row["instance"])
    pmx.run("delete", str(first["id"]))
    pmx.wait_status("api", "online", count=1)
    result = pmx.run("reload", "api", timeout=120)
    assert f"replaced: pid {survivor['pid']} -> " in result.stdout, result.stdout
    rows = pmx.wait_status("api", "online", count=1)
    new_pid = rows[0]["pid"]
    assert new_pid != survivor["pid"] and not pid_alive(survivor["pid"])
    # The survivor was stopped only once its replacement was online.
    log = (pmx.home / "pmxd.log").read_text()
    online = log.find(f"(pid {new_pid}) -> online")
    stopping = log.find(f"(pid {survivor['pid']}) -> stopping")
    assert 0 <= online < stopping, log[-3000:]
    assert wait_until(lambda: answers(port), timeout=10, what="api answering") == new_pid


# ---------------------------------------------------------------- the gunicorn example (#14)


@pytest.mark.skipif(importlib.util.find_spec("gunicorn") is None,
                    reason="gunicorn is not installed")
def test_gunicorn_example_masters_do_not_share_a_control_socket(pmx: Pmx) -> None:
    port = free_port()
    text = (EXAMPLES / "gunicorn.toml").read_text()
    text = text.replace("127.0.0.1:8200", f"127.0.0.1:{port}")
    text = text.replace('cwd = "apps"', f'cwd = "{EXAMPLES / "apps"}"')
    eco = pmx.write("gunicorn.toml", text)
    pmx.env["HOME"] = str(pmx.home)  # gunicorn's default: ~/.gunicorn/gunicorn.ctl
    pmx.env.pop("XDG_RUNTIME_DIR", None)
    pmx.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    pmx.run("start", str(eco))
    pmx.wait_status("gunicorn-web", "online", count=2)
    wait_until(lambda: http_ok(port), timeout=20, what="gunicorn answering")
    result = pmx.run("reload", "gunicorn-web", timeout=120)
    assert result.stdout.count("replaced: pid") == 2, result.stdout
    pmx.wait_status("gunicorn-web", "online", count=2)
    wait_until(lambda: http_ok(port), timeout=20, what="gunicorn answering after reload")
    # Each slot's masters (the first and its replacement) may reuse one path; two slots
    # sharing one are two live masters unlinking each other's socket.
    claimed: dict[int, set[str]] = {}
    for path in (pmx.home / "logs").glob("gunicorn-web-*.log"):
        slot = int(path.stem.rsplit("-", 1)[1])
        found = re.findall(r"Control socket listening at (\S+)", path.read_text())
        claimed.setdefault(slot, set()).update(found)
    assert sorted(claimed) == [0, 1]
    assert not claimed[0] & claimed[1], claimed
    assert not (pmx.home / ".gunicorn" / "gunicorn.ctl").exists()
