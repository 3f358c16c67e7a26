"""Drop-in cluster mode: unmodified Node and Python servers that listen on a port themselves.

Each app here is written the way its framework's docs show it, and reads only PORT (as
`process.env.PORT || 3000` does): pmx learns the port from the first instance, holds the
socket, and every other instance, restart and reload shares it through the preloads.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import time

import pytest

from tests.conftest import Pmx, app_path, free_port, wait_until
from tests.httpload import LoadClient, get_pid

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")

NODE_HELLO = "node_hello.js"
PY_HELLO = "py_hello.py"


def start_dropin(pmx: Pmx, script: str, instances: int, *extra: str) -> int:
    """`PORT=N pmx start SCRIPT -i INSTANCES`: the app picks its own port from PORT."""
    port = free_port()
    pmx.env["PORT"] = str(port)
    # A generous listen_timeout: a loaded machine may take seconds to import a framework,
    # and the first instance must listen before the others start on its socket.
    pmx.run("start", app_path(script), "-i", str(instances), "--listen-timeout", "20s", *extra)
    name = os.path.splitext(script)[0]
    pmx.wait_status(name, "online", count=instances)
    wait_until(lambda: (_answers(port), None), timeout=15, what=f"{script} answering")
    return port


def _answers(port: int) -> bool:
    try:
        get_pid(port)
    except OSError:
        return False
    return True


def load(port: int, *, clients: int = 4, keep_alive: bool = False,
         max_seconds: float = 60) -> list[LoadClient]:
    loaders = [LoadClient("127.0.0.1", port, keep_alive=keep_alive, max_seconds=max_seconds)
               for _ in range(clients)]
    for loader in loaders:
        loader.start()
    wait_until(lambda: (all(c.result.ok > 5 for c in loaders), [c.result.ok for c in loaders]),
               timeout=15, what="load running")
    return loaders


def finish(loaders: list[LoadClient]) -> tuple[int, int, set[int]]:
    results = [loader.stop() for loader in loaders]
    failed = sum(r.failed for r in results)
    assert failed == 0, [r.errors for r in results]
    return sum(r.ok for r in results), failed, set().union(*(r.pids for r in results))


def serve_for(loaders: list[LoadClient], seconds: float) -> None:
    """Let the load run until every client made progress for `seconds` more."""
    deadline = time.monotonic() + seconds
    wait_until(lambda: (time.monotonic() >= deadline, None), timeout=seconds + 5,
               what="load period")


@needs_node
@pytest.mark.parametrize("instances", [2, 4])
def test_node_hello_runs_as_a_cluster_on_its_own_port(pmx: Pmx, instances: int) -> None:
    port = start_dropin(pmx, NODE_HELLO, instances)
    loaders = load(port)
    serve_for(loaders, 3)
    _, _, pids = finish(loaders)
    rows = pmx.instances("node_hello")
    assert {r["pid"] for r in rows} == pids, "every instance answers, and only they do"
    assert all(r["restarts"] == 0 and r["status"] == "online" for r in rows)
    assert all(r["exec_mode"] == "cluster" for r in rows)
    described = pmx.run("describe", "node_hello").stdout
    assert f":{port}" in described and "learned from the app" in described


@pytest.mark.parametrize("script,instances", [(PY_HELLO, 4), ("flask_hello.py", 2),
                                              ("aiohttp_hello.py", 2)])
def test_python_servers_run_as_a_cluster_on_their_own_port(pmx: Pmx, script: str,
                                                           instances: int) -> None:
    module = {"flask_hello.py": "flask", "aiohttp_hello.py": "aiohttp"}.get(script)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install '.[test]')")
    port = start_dropin(pmx, script, instances)
    loaders = load(port)
    serve_for(loaders, 3)
    _, _, pids = finish(loaders)
    rows = pmx.instances(os.path.splitext(script)[0])
    log = (pmx.home / "pmxd.log").read_text()
    assert {r["pid"] for r in rows} == pids, log[-3000:]
    assert all(r["restarts"] == 0 and r["status"] == "online" for r in rows), (rows, log[-3000:])


@needs_node
def test_sigkill_of_an_instance_under_load_refuses_nothing(pmx: Pmx) -> None:
    port = start_dropin(pmx, NODE_HELLO, 2)
    loaders = load(port)
    victim = pmx.pids("node_hello")[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: (victim not in pmx.pids("node_hello")
                        and len(pmx.wait_status("node_hello", "online")) == 2, None),
               timeout=15, what="the instance replaced")
    serve_for(loaders, 1)
    results = [loader.stop() for loader in loaders]
    errors = [error for r in results for error in r.errors]
    # The socket outlives the instance: no connection is refused. A request the killed
    # process had already accepted dies with it (at most one per client).
    assert not [e for e in errors if "Refused" in e], errors
    assert sum(r.failed for r in results) <= len(loaders), errors
    assert sum(r.ok for r in results) > 0


@pytest.mark.parametrize("script", [NODE_HELLO, PY_HELLO])
@pytest.mark.parametrize("keep_alive", [False, True])
def test_reload_without_readiness_settings_loses_nothing(pmx: Pmx, script: str,
                                                         keep_alive: bool) -> None:
    if script.endswith(".js") and shutil.which("node") is None:
        pytest.skip("node is not installed")
    name = os.path.splitext(script)[0]
    port = start_dropin(pmx, script, 2)
    loaders = load(port, keep_alive=keep_alive)
    try:
        for _ in range(2):
            before = set(pmx.pids(name))
            started = time.monotonic()
            result = pmx.run("reload", name, timeout=60)
            took = time.monotonic() - started
            assert "replaced: pid" in result.stdout
            after = {r["pid"] for r in pmx.wait_status(name, "online", count=2)}
            assert not before & after, "every pid changed"
            # The replacement is ready once it listens: no listen_timeout (3s) wait per
            # instance. Generous bound: this checks the mechanism, not the machine's speed.
            assert took < 2 * 3.0, f"reload took {took:.2f}s"
        serve_for(loaders, 0.5)
    finally:
        finish(loaders)
    log = (pmx.home / "pmxd.log").read_text()
    assert "listening on" in log


@needs_node
def test_wait_ready_waits_for_process_send_ready(pmx: Pmx) -> None:
    port = start_dropin(pmx, "node_ready.js", 2, "--wait-ready")
    pmx.env["READY_DELAY_MS"] = "1000"
    before = set(pmx.pids("node_ready"))
    # The new environment reaches the replacements with --update-env.
    started = time.monotonic()
    result = pmx.run("reload", "node_ready", "--update-env", timeout=60)
    took = time.monotonic() - started
    assert took >= 2.0, f"each replacement is waited for (1s each), took {took:.2f}s"
    assert "replaced: pid" in result.stdout
    after = {r["pid"] for r in pmx.wait_status("node_ready", "online", count=2)}
    assert not before & after
    assert get_pid(port) in after


@needs_node
def test_shutdown_with_message_sends_pm2s_message(pmx: Pmx) -> None:
    port = free_port()
    eco = pmx.write("msg.toml", f"""
[[apps]]
name = "msg"
script = "{app_path('node_shutdown_message.js')}"
shutdown_with_message = true
kill_timeout = "10s"
env = {{ PORT = "{port}" }}
""")
    pmx.run("start", str(eco))
    pmx.wait_status("msg", "online")
    wait_until(lambda: (_answers(port), None), timeout=15, what="msg answering")
    started = time.monotonic()
    pmx.run("stop", "msg")
    assert time.monotonic() - started < 5, "stopped by the message, not by the kill timeout"
    logs = pmx.run("logs", "msg", "--nostream").stdout
    assert "got the shutdown message" in logs
    row = pmx.instances("msg")[0]
    assert row["status"] == "stopped" and "exit code 0" in row["reason"]


@needs_node
def test_declared_listen_leaves_the_apps_other_port_alone(pmx: Pmx) -> None:
    port, other = free_port(), free_port()
    eco = pmx.write("two.toml", f"""
[[apps]]
name = "two"
script = "{app_path('node_two_ports.js')}"
exec_mode = "cluster"
listen = "127.0.0.1:{port}"
env = {{ PORT2 = "{other}" }}
""")
    pmx.run("start", str(eco))
    pmx.wait_status("two", "online")
    wait_until(lambda: (_answers(port) and _answers(other), None), timeout=15,
               what="both ports answering")
    (pid,) = pmx.pids("two")
    assert get_pid(port) == pid and get_pid(other) == pid
    described = pmx.run("describe", "two", "--json").stdout
    assert f"127.0.0.1:{port}" in described and f":{other}" not in described
    pmx.run("stop", "two")
    # pmxd holds the declared port, never the app's own one: that one is gone with the app.
    wait_until(lambda: (not _answers(other), None), timeout=10, what="the other port closed")


def test_preload_false_keeps_the_old_way(pmx: Pmx) -> None:
    port = free_port()
    pmx.env["PORT"] = str(port)
    pmx.run("start", app_path(PY_HELLO), "-i", "2", "--no-preload")
    rows = pmx.instances("py_hello")
    assert all(r["exec_mode"] == "fork" for r in rows)


def test_a_program_that_cannot_share_its_port_gets_one_clear_error(pmx: Pmx) -> None:
    port = free_port()
    pmx.env["PORT"] = str(port)
    pmx.run("start", app_path(PY_HELLO), "-i", "2", "--no-preload")
    def errored_yet() -> tuple[bool, list[dict[str, object]]]:
        rows = pmx.instances("py_hello")
        return any(r["status"] == "errored" for r in rows), rows

    rows = wait_until(errored_yet, timeout=20, what="the second instance errored")
    errored = [r for r in rows if r["status"] == "errored"]
    assert len(errored) == 1 and "port is already in use" in errored[0]["reason"]
    assert all(r["restarts"] < 5 for r in rows), "no crash loop"


def test_a_lying_listen_report_is_not_believed(pmx: Pmx) -> None:
    # A report comes from the app, which may be hostile: pmxd checks the socket it takes.
    real, claimed = free_port(), free_port()
    app = pmx.write("liar.py", f"""
import _socket, os, socket, time
s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)  # below the preload's reach
s.bind(("127.0.0.1", {real}))
s.listen(5)
lie = f"PMX_LISTENING=inet/0.0.0.0/{claimed}\\nPMX_LISTEN_FD={{s.fileno()}}\\nPMX_ADOPTED=0"
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
    notify.sendto(lie.encode(), os.environ["NOTIFY_SOCKET"])
time.sleep(60)
""")
    eco = pmx.write("liar.toml", f"""
[[apps]]
name = "liar"
script = "{app}"
exec_mode = "cluster"
""")
    pmx.run("start", str(eco))
    log = pmx.home / "pmxd.log"
    wait_until(lambda: ("is not a socket listening on" in log.read_text(), None), timeout=15,
               what="the lie refused")
    described = pmx.run("describe", "liar", "--json").stdout
    assert f":{claimed}" not in described and f":{real}" not in described
