"""Memory limits enforced within about a second, and stats on the publish stream."""

from __future__ import annotations

import itertools
import json
import statistics

import zmq

from tests.conftest import Pmx, app_path, free_port, pid_cluster_toml, wait_until
from tests.httpload import LoadClient


def leaking_app(pmx: Pmx, name: str, *, limit: str, env: str) -> None:
    eco = pmx.write(f"{name}.toml", f"""
[[apps]]
name = "{name}"
script = "{app_path('leak.py')}"
max_memory_restart = "{limit}"
kill_timeout = "500ms"
env = {{ {env} }}
""")
    pmx.run("start", str(eco))
    pmx.wait_status(name, "online")


def test_app_over_its_limit_is_restarted_with_the_reason(pmx: Pmx) -> None:
    leaking_app(pmx, "leaky", limit="80M", env='LEAK_MB_PER_S = "100"')
    first = pmx.pids("leaky")[0]
    row = wait_until(lambda: (bool((r := pmx.instances("leaky")[0])["restarts"] >= 1
                                   and r["pid"] not in (None, first)), r),
                     timeout=20, what="memory restart")
    assert row["reason"].startswith("memory: ") and "> 80M" in row["reason"]
    log = (pmx.home / "pmxd.log").read_text()
    assert f"leaky:0 (pid {first}) restarting: memory: " in log


def test_memory_held_by_a_child_process_counts(pmx: Pmx) -> None:
    leaking_app(pmx, "parent", limit="80M", env='LEAK_MB_PER_S = "100", LEAK_IN_CHILD = "1"')
    first = pmx.pids("parent")[0]
    wait_until(lambda: (pmx.instances("parent")[0]["restarts"] >= 1
                        and pmx.instances("parent")[0]["pid"] != first, pmx.instances("parent")),
               timeout=20, what="restart for the child's memory")


def test_app_below_its_limit_is_never_restarted(pmx: Pmx) -> None:
    pmx.env["PMX_MONITOR_INTERVAL"] = "0.2"
    leaking_app(pmx, "small", limit="500M", env='LEAK_MB_PER_S = "1"')
    stats = _subscribe(pmx, "stats.")
    try:
        received = 0
        while received < 10:  # ten samples, each checked against the limit
            assert stats.poll(5000), "no stats published"
            stats.recv_multipart()
            received += 1
    finally:
        stats.close(linger=0)
    row = pmx.instances("small")[0]
    assert row["restarts"] == 0 and row["status"] == "online"
    assert 0 < row["memory"] < 500 * 1024 * 1024


def test_cluster_instance_over_limit_is_replaced_without_failed_requests(pmx: Pmx) -> None:
    port = free_port()
    eco = pmx.write("api.toml", pid_cluster_toml("api", port, instances=2, extra="""
listen_timeout = "300ms"
max_memory_restart = "100M"
env = { LEAK_MB_PER_S = "60", LEAK_INSTANCE = "0" }
"""))
    pmx.run("start", str(eco))
    pmx.wait_status("api", "online", count=2)
    first = {r["instance"]: r["pid"] for r in pmx.instances("api")}
    loader = LoadClient("127.0.0.1", port, max_seconds=60)
    loader.start()
    try:
        wait_until(lambda: (any(r["instance"] == 0 and r["pid"] != first[0] and r["status"] ==
                                "online" for r in pmx.instances("api")), pmx.instances("api")),
                   timeout=30, what="leaking instance replaced")
    finally:
        result = loader.stop()
    assert result.failed == 0, result.errors
    assert result.ok > 0
    rows = {r["instance"]: r for r in pmx.instances("api")}
    assert rows[1]["pid"] == first[1]  # the healthy instance was not touched
    described = json.loads(pmx.run("describe", "api", "--json").stdout)
    assert any(i["reason"].startswith("memory: ") for i in described[0]["instances"])


def test_stats_arrive_at_the_configured_interval(pmx: Pmx) -> None:
    pmx.env["PMX_MONITOR_INTERVAL"] = "0.2"
    pmx.run("start", app_path("idle.py"), "--name", "idle", "-i", "2")
    pmx.wait_status("idle", "online", count=2)
    stats = _subscribe(pmx, "stats.")
    times: list[float] = []
    try:
        while len(times) < 8:
            assert stats.poll(5000), "no stats published"
            _, body = stats.recv_multipart()
            message = json.loads(body)
            if len(message["instances"]) == 2:
                times.append(message["time"])
                assert all(i["memory"] > 0 for i in message["instances"])
    finally:
        stats.close(linger=0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.1 < statistics.median(gaps) < 0.6, gaps


def _subscribe(pmx: Pmx, topic: str) -> zmq.Socket[bytes]:
    context = zmq.Context.instance()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sock.connect(f"ipc://{pmx.home / 'pub.sock'}")
    return sock
