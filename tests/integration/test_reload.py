"""Zero-downtime reload: one instance at a time, readiness, drain, and failed reloads."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Pmx, app_path, free_port, pid_cluster_toml, wait_until
from tests.httpload import LoadClient


def start_cluster(pmx: Pmx, name: str, port: int, *, instances: int = 4, env: str = "",
                  extra: str = "", listen_timeout: str = "500ms") -> None:
    eco = pmx.write(f"{name}.toml", pid_cluster_toml(
        name, port, instances=instances,
        extra=f'listen_timeout = "{listen_timeout}"\nkill_timeout = "5s"\n{extra}\n'
              f"env = {{ {env} }}"))
    pmx.run("start", str(eco))
    pmx.wait_status(name, "online", count=instances)


def reload_under_load(pmx: Pmx, name: str, port: int, *, times: int, keep_alive: bool,
                      path: str = "/", clients: int = 2) -> None:
    loaders = [LoadClient("127.0.0.1", port, keep_alive=keep_alive, path=path,
                          max_seconds=120) for _ in range(clients)]
    for loader in loaders:
        loader.start()
    try:
        wait_until(lambda: (all(c.result.ok > 5 for c in loaders),
                            [c.result.ok for c in loaders]), timeout=15, what="load running")
        for _ in range(times):
            before = set(pmx.pids(name))
            result = pmx.run("reload", name, timeout=120)
            assert "replaced: pid" in result.stdout
            after = pmx.wait_status(name, "online")
            assert len(after) == len(before)
            assert not before & {row["pid"] for row in after}  # every pid changed
        seen = [c.result.ok for c in loaders]
        wait_until(lambda: (all(c.result.ok > s + 5 for c, s in zip(loaders, seen, strict=True)),
                            None), timeout=15, what="load after reload")
    finally:
        results = [loader.stop() for loader in loaders]
    assert sum(r.failed for r in results) == 0, [r.errors for r in results]
    assert sum(r.ok for r in results) > 0


@pytest.mark.slow
def test_reload_three_times_under_fresh_connections(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "api", port)
    reload_under_load(pmx, "api", port, times=3, keep_alive=False)


@pytest.mark.slow
def test_reload_under_keep_alive_load(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "ka", port)
    reload_under_load(pmx, "ka", port, times=2, keep_alive=True, clients=4)


@pytest.mark.slow
def test_reload_waits_for_notify_readiness(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "slowready", port, instances=2, env='READY_DELAY = "1", NOTIFY = "1"',
                  extra="wait_ready = true", listen_timeout="10s")
    rows = pmx.instances("slowready")
    described = json.loads(pmx.run("describe", "slowready", "--json").stdout)
    assert described[0]["instances"][0]["status_text"] == "serving"
    assert all(r["reason"].endswith("READY=1 received") for r in rows)
    reload_under_load(pmx, "slowready", port, times=1, keep_alive=False)


@pytest.mark.slow
def test_in_flight_slow_requests_finish_during_reload(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "slow", port, instances=2, env='SLOW_S = "0.5"')
    reload_under_load(pmx, "slow", port, times=1, keep_alive=False, path="/slow", clients=4)


def test_broken_new_version_keeps_old_instances(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "api", port, instances=2)
    old = sorted(pmx.pids("api"))
    broken = pmx.write("api-broken.toml", f"""
[[apps]]
name = "api"
script = "{app_path('pid_server.py')}"
exec_mode = "cluster"
instances = 2
listen = "127.0.0.1:{port}"
listen_timeout = "500ms"
kill_timeout = "5s"
env = {{ FAIL_AT_START = "4" }}
""")
    loader = LoadClient("127.0.0.1", port, max_seconds=60)
    loader.start()
    try:
        result = pmx.run("reload", str(broken), check=False, timeout=60)
    finally:
        outcome = loader.stop()
    assert result.returncode == 1
    assert "api:0" in result.stderr and "exit code 4" in result.stderr
    assert "failing at start on purpose" in result.stderr
    assert "old instances keep serving" in result.stderr
    rows = pmx.instances("api")
    assert sorted(r["pid"] for r in rows) == old
    assert all(r["status"] == "online" for r in rows)  # nothing left half-way
    assert outcome.failed == 0, outcome.errors
    described = json.loads(pmx.run("describe", "api", "--json").stdout)
    assert "FAIL_AT_START" not in described[0]["spec"]["env"]  # the old settings are kept


def test_replacement_never_ready_keeps_old_instances(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "api", port, instances=2,
                  extra="wait_ready = true", listen_timeout="1s", env='NOTIFY = "1"')
    old = sorted(pmx.pids("api"))
    eco = pmx.home / "api.toml"
    eco.write_text(eco.read_text().replace('NOTIFY = "1"', 'NOTIFY = ""'))
    result = pmx.run("reload", str(eco), check=False, timeout=60)
    assert result.returncode == 1
    assert "was not ready within 1s" in result.stderr
    rows = pmx.instances("api")
    assert sorted(r["pid"] for r in rows) == old
    assert {r["status"] for r in rows} == {"online"}


def test_second_reload_is_refused_while_one_runs(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "api", port, instances=2,
                  extra="wait_ready = true", listen_timeout="10s",
                  env='READY_DELAY = "1.5", NOTIFY = "1"')
    import subprocess

    from tests.conftest import CLI

    first = subprocess.Popen([*CLI, "reload", "api"], env=pmx.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (any(r["status"] == "launching" for r in pmx.instances("api")),
                            pmx.instances("api")), timeout=10, what="reload running")
        second = pmx.run("reload", "api", check=False)
        assert second.returncode != 0
        assert 'app "api" is busy: reload is running' in second.stderr
        pmx.list()  # list keeps answering during a reload
    finally:
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err


def test_reload_file_applies_changed_settings(pmx: Pmx) -> None:
    port = free_port()
    start_cluster(pmx, "api", port, instances=2, env='COLOR = "blue"')
    eco = pmx.home / "api.toml"
    eco.write_text(eco.read_text().replace('"blue"', '"green"').replace(
        "instances = 2", "instances = 3"))
    pmx.run("reload", str(eco), timeout=60)
    rows = pmx.wait_status("api", "online", count=3)
    with open(f"/proc/{rows[0]['pid']}/environ", "rb") as file:
        assert b"COLOR=green" in file.read().split(b"\0")


def test_reload_file_says_why_a_new_app_of_the_file_did_not_start(pmx: Pmx) -> None:
    app = '[[apps]]\nname = "a"\nscript = "/bin/sleep"\nargs = ["1000"]\ninterpreter = "none"\n'
    pmx.run("start", str(pmx.write("one.toml", app)))
    two = pmx.write("two.toml", app + '[[apps]]\nname = "b"\nscript = "no-such-program-xyz"\n'
                    'interpreter = "none"\n')
    result = pmx.run("reload", str(two), check=False)
    assert result.returncode == 1, result
    assert 'cannot start app "b": no-such-program-xyz: not found' in result.stderr
    assert "reloaded: a" in result.stdout
    pmx.wait_status("a", "online", count=1)


def test_fork_app_reload_overlaps_and_restart_mode(pmx: Pmx) -> None:
    eco = pmx.write("fork.toml", f"""
[[apps]]
name = "w"
script = "{app_path('ignore_signals.py')}"
listen_timeout = "300ms"
kill_timeout = "300ms"

[[apps]]
name = "r"
script = "{app_path('ignore_signals.py')}"
reload_mode = "restart"
kill_timeout = "300ms"
""")
    pmx.run("start", str(eco))
    pmx.wait_status("w", "online")
    before = pmx.pids("w") + pmx.pids("r")
    pmx.run("reload", "all", timeout=60)
    after = pmx.wait_status("w", "online") + pmx.wait_status("r", "online")
    assert not set(before) & {row["pid"] for row in after}


def test_a_replacement_is_ready_once_it_accepts_connections(pmx: Pmx) -> None:
    # pid_server serves on fd 3 and says nothing: pmxd sees it polling on the socket, so a
    # reload does not wait out listen_timeout (30s here) for each instance.
    port = free_port()
    start_cluster(pmx, "acc", port, instances=2, listen_timeout="30s")
    pmx.run("reload", "acc", timeout=50)
    rows = pmx.wait_status("acc", "online", count=2)
    assert all(row["reason"] == "reloaded; accepting connections" for row in rows), rows
