"""Cluster mode: N instances of any app sharing daemon-owned listening sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import socket

from tests.conftest import Pmx, app_path, free_port, pid_alive, pid_cluster_toml, wait_until
from tests.httpload import LoadClient, UnixHTTPConnection, get_pid


def cluster(pmx: Pmx, name: str, port: int, instances: int = 4, extra: str = "") -> None:
    eco = pmx.write(f"{name}.toml", pid_cluster_toml(name, port, instances=instances,
                                                     extra=f'kill_timeout = "3s"\n{extra}'))
    pmx.run("start", str(eco))
    pmx.wait_status(name, "online", count=instances)
    wait_until(lambda: (_serving(pmx, name) == instances, _serving(pmx, name)), timeout=15,
               what="every instance serving")


def _serving(pmx: Pmx, name: str) -> int:
    return pmx.run("logs", name, "--nostream", "--lines", "5").stdout.count("serving pid")


def test_four_instances_share_one_port(pmx: Pmx) -> None:
    port = free_port()
    cluster(pmx, "api", port)
    client = LoadClient("127.0.0.1", port, max_requests=300)
    client.start()
    client.join(60)
    result = client.result
    assert result.failed == 0, result.errors
    assert result.ok == 300
    assert len(result.pids) >= 2
    assert result.pids <= set(pmx.pids("api"))
    listing = pmx.run("list").stdout
    assert "cluster" in listing and f"127.0.0.1:{port}" in listing
    described = json.loads(pmx.run("describe", "api", "--json").stdout)
    assert described[0]["listen"] == [f"127.0.0.1:{port}"]


def test_instances_get_socket_activation_environment(pmx: Pmx) -> None:
    port = free_port()
    cluster(pmx, "env", port, instances=2)
    logs = pmx.run("logs", "env", "--nostream").stdout
    for row in pmx.instances("env"):
        # pid_server serves on fd 3 only when LISTEN_PID equals its own pid.
        assert re.search(rf"serving pid {row['pid']} fds=\[0, 1, 2, 3(, \d+)*\]", logs), logs
    pid = pmx.pids("env")[0]
    with open(f"/proc/{pid}/environ", "rb") as file:
        environ = dict(item.split(b"=", 1) for item in file.read().split(b"\0") if b"=" in item)
    assert environ[b"LISTEN_PID"] == str(pid).encode()
    assert environ[b"LISTEN_FDS"] == b"1"
    assert environ[b"LISTEN_FDNAMES"] == b"env-0"
    assert environ[b"PMX_LISTEN_FD"] == b"3"
    assert environ[b"PORT"] == str(port).encode()
    assert environ[b"PMX_INSTANCE"] == environ[b"NODE_APP_INSTANCE"]


def test_sigkill_of_an_instance_refuses_no_request(pmx: Pmx) -> None:
    port = free_port()
    cluster(pmx, "api", port)
    victim = pmx.pids("api")[0]
    client = LoadClient("127.0.0.1", port, max_seconds=30)
    client.start()
    wait_until(lambda: (client.result.ok > 50, client.result.ok), timeout=10, what="load")
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: (victim not in pmx.pids("api") and len(pmx.pids("api")) == 4
                        and all(r["status"] == "online" for r in pmx.instances("api")),
                        pmx.instances("api")), timeout=15, what="instance came back")
    seen = client.result.ok
    wait_until(lambda: (client.result.ok > seen + 50, client.result.ok), timeout=10,
               what="more load")
    result = client.stop()
    # No connection is refused: the socket outlives the instance. The one request the
    # victim may have been answering when SIGKILL hit is lost with it, which no
    # supervisor can prevent; nothing else may fail.
    assert not any("Refused" in error for error in result.errors), result.errors
    assert result.failed <= 1, result.errors


def test_socket_survives_restart_and_delete_frees_port(pmx: Pmx) -> None:
    port = free_port()
    cluster(pmx, "api", port, instances=2)
    client = LoadClient("127.0.0.1", port, max_seconds=60)
    client.start()
    wait_until(lambda: (client.result.ok > 20, client.result.ok), timeout=10, what="load")
    pmx.run("restart", "api")
    pmx.wait_status("api", "online", count=2)
    seen = client.result.ok
    wait_until(lambda: (client.result.ok > seen + 20, client.result.ok), timeout=15,
               what="served after restart")
    result = client.stop()
    assert result.failed == 0, result.errors  # connections waited in the backlog
    pmx.run("delete", "api")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # free again


def test_unix_socket_cluster(pmx: Pmx) -> None:
    path = str(pmx.home / "api.sock")
    eco = pmx.write("unix.toml", f"""
[[apps]]
name = "uapi"
script = "{app_path('pid_server.py')}"
exec_mode = "cluster"
instances = 2
listen = "unix:{path}"
""")
    pmx.run("start", str(eco))
    pmx.wait_status("uapi", "online", count=2)

    def answer() -> tuple[bool, object]:
        connection = UnixHTTPConnection(path)
        try:
            connection.request("GET", "/")
            return True, connection.getresponse().read()
        except OSError as exc:
            return False, exc
        finally:
            connection.close()

    body = wait_until(answer, timeout=10, what="unix socket answers")
    assert isinstance(body, bytes) and body.startswith(b"pid ")
    assert oct(os.stat(path).st_mode & 0o777) == "0o660"
    pmx.run("delete", "uapi")
    assert not os.path.exists(path)


def test_port_in_use_is_a_clear_error_with_nothing_started(pmx: Pmx) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        eco = pmx.write("busy.toml", f"""
[[apps]]
name = "clash"
script = "{app_path('pid_server.py')}"
exec_mode = "cluster"
instances = 2
listen = "127.0.0.1:{port}"
""")
        result = pmx.run("start", str(eco), check=False)
    assert result.returncode == 1
    assert f'cannot bind 127.0.0.1:{port} for app "clash": address already in use' in result.stderr
    assert pmx.list() == []


def test_scale_up_and_down_keeps_the_instances_that_stay(pmx: Pmx) -> None:
    port = free_port()
    cluster(pmx, "api", port, instances=2)
    before = {row["instance"]: row["pid"] for row in pmx.instances("api")}
    pmx.run("scale", "api", "4")
    rows = pmx.wait_status("api", "online", count=4)
    assert {r["instance"]: r["pid"] for r in rows if r["instance"] < 2} == before
    pmx.run("scale", "api", "+2")
    pmx.wait_status("api", "online", count=6)
    gone = [r["pid"] for r in pmx.instances("api") if r["instance"] > 0]
    pmx.run("scale", "api", "1")
    rows = pmx.wait_status("api", "online", count=1)
    assert rows[0]["pid"] == before[0]
    assert not any(pid_alive(pid) for pid in gone)
    assert get_pid(port) == before[0]
    bad = pmx.run("scale", "api", "0", check=False)
    assert bad.returncode != 0 and "1 to 1024" in bad.stderr


def test_reuse_port_gives_each_slot_its_own_socket(pmx: Pmx) -> None:
    port = free_port()
    cluster(pmx, "rp", port, instances=2, extra="reuse_port = true")
    client = LoadClient("127.0.0.1", port, max_requests=200)
    client.start()
    client.join(60)
    assert client.result.failed == 0, client.result.errors
    assert len(client.result.pids) == 2


def test_cluster_and_fork_instances_get_the_signals_at_their_defaults(pmx: Pmx) -> None:
    """pmxd (Python) ignores SIGPIPE and SIGXFSZ; an app, whichever way it was spawned
    (the sh shim that moves sockets, or a plain spawn), gets them at their defaults."""
    sleep = 'script = "/bin/sleep"\nargs = ["1000"]\ninterpreter = "none"\n'  # not Python,
    # which ignores SIGPIPE by itself
    eco = pmx.write("sig.toml", f"""
[[apps]]
name = "c"
{sleep}exec_mode = "cluster"
listen = "127.0.0.1:{free_port()}"

[[apps]]
name = "f"
{sleep}""")
    pmx.run("start", str(eco))
    for name in ("c", "f"):
        [pid] = [row["pid"] for row in pmx.wait_status(name, "online", count=1)]
        with open(f"/proc/{pid}/status") as status:
            ignored = int(next(line for line in status if line.startswith("SigIgn:")).split()[1],
                          16)
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):
            assert not ignored & (1 << (signum - 1)), (name, signum.name, hex(ignored))
