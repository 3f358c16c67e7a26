"""`pmx web` against a real pmxd: the token on every read and action, actions through the
API, the live stream, /metrics against `pmx list --json`, and following pmxd through a
restart. The browser itself is driven in test_web_browser.py.

Each test starts `pmx web` as a subprocess on a free port with the test's PMX_HOME and
stops it by its pid in the fixture's finalizer, before the pmxd fixture's teardown.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import CLI, Pmx, app_path, free_port, pid_cluster_toml, wait_until

pytest.importorskip("aiohttp")
prometheus_parser = pytest.importorskip("prometheus_client.parser")


class WebServer:
    """One `pmx web` process serving the test's home on a free loopback port."""

    def __init__(self, pmx: Pmx, *extra: str, port: int | None = None) -> None:
        self.pmx = pmx
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = pmx.home / f"web-{self.port}.out"
        with self.output.open("w") as out:
            self.proc = subprocess.Popen(
                [*CLI, "web", "--listen", f"127.0.0.1:{self.port}", *extra], env=pmx.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.token = ""

    def wait_ready(self) -> None:
        def probe() -> tuple[bool, object]:
            if self.proc.poll() is not None:
                pytest.fail(f"pmx web exited {self.proc.returncode}: {self.said()}")
            try:
                return self.get("/metrics", token=None)[0] == 200, None
            except OSError as exc:
                return False, exc
        wait_until(probe, timeout=20, what="pmx web answers")
        self.token = (self.pmx.home / "web.token").read_text().strip()

    def said(self) -> str:
        return self.output.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                pytest.fail(f"pmx web (pid {self.proc.pid}) ignored SIGTERM for 10s")

    def request(self, method: str, path: str, *, token: str | None = "",
                body: object = None, headers: dict[str, str] | None = None,
                timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); token "" means the right one, None means none."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token or self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get(self, path: str, *, token: str | None = "") -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, token=token)

    def json(self, method: str, path: str, body: object = None) -> Any:
        status, _, data = self.request(method, path, body=body)
        assert status == 200, f"{method} {path}: {status} {data!r}"
        return json.loads(data)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, headers, data = self.get("/metrics", token=None)
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        found = {}
        for family in prometheus_parser.text_string_to_metric_families(data.decode()):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found


@pytest.fixture
def web(pmxd: Pmx) -> Iterator[WebServer]:
    server = WebServer(pmxd)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def start_apps(pmx: Pmx, *, web_instances: int = 2) -> None:
    toml = pid_cluster_toml("web", free_port(), instances=web_instances) + f"""
[[apps]]
name = "idler"
script = "{app_path('idle.py')}"
env = {{ API_TOKEN = "hunter2", MODE = "demo" }}
"""
    pmx.run("start", str(pmx.write("eco.toml", toml)))
    pmx.wait_status("web", "online", count=web_instances)
    pmx.wait_status("idler", "online", count=1)


# ---------------------------------------------------------------- the token


def test_reads_and_actions_need_the_token(web: WebServer) -> None:
    start_apps(web.pmx)
    pid = web.pmx.pids("idler")
    for method, path in (("GET", "/api/list"), ("GET", "/api/apps"), ("GET", "/api/state"),
                         ("GET", "/api/stream"), ("GET", "/api/logs/idler"),
                         ("POST", "/api/apps/idler/restart"), ("POST", "/api/apps/idler/stop")):
        status, headers, _ = web.request(method, path, token=None)
        assert status == 401, f"{method} {path} without a token: {status}"
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        status, _, _ = web.request(method, path, token="not-the-token-at-all")
        assert status == 403, f"{method} {path} with a wrong token: {status}"
        status, _, _ = web.request(method, path, token=None, headers={"Cookie": f"token={web.token}"})
        assert status == 401, "a cookie (what a cross-site form would carry) is no token"
    assert web.pmx.pids("idler") == pid, "a refused action still ran"
    # A cross-site page gets no CORS allowance to read anything.
    status, headers, _ = web.request("GET", "/api/list", headers={"Origin": "http://evil.example"})
    assert status == 200
    assert not [name for name in headers if name.lower().startswith("access-control-")]
    # /metrics is the one read without a token; anything unknown needs one too.
    assert web.get("/metrics", token=None)[0] == 200
    for path in ("/api", "/api/", "/nope", "//api/list", "/%61pi/list"):
        assert web.get(path, token=None)[0] == 401, path


def test_token_file_is_private_and_show_token_prints_it(pmx: Pmx) -> None:
    shown = pmx.run("web", "--show-token")
    token = shown.stdout.strip()
    path = pmx.home / "web.token"
    assert path.read_text().strip() == token and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"#token={token}" in shown.stderr
    assert pmx.run("web", "--show-token").stdout.strip() == token, "not created again"
    own = pmx.home / "service.token"
    assert pmx.run("web", "--show-token", "--token-file", str(own)).stdout.strip() != token
    os.chmod(own, 0o644)
    refused = pmx.run("web", "--show-token", "--token-file", str(own), check=False)
    assert refused.returncode == 1 and "chmod 600" in refused.stderr


def test_show_token_links_to_the_port_pmx_web_serves_on(web: WebServer) -> None:
    assert web.port != 9615
    shown = web.pmx.run("web", "--show-token")
    assert shown.stderr == f"http://127.0.0.1:{web.port}/#token={web.token}\n"
    chosen = web.pmx.run("web", "--show-token", "--listen", "[::1]:9700")
    assert chosen.stderr == f"http://[::1]:9700/#token={web.token}\n", "--listen still wins"
    web.stop()
    assert not (web.pmx.home / "web.address").exists()
    stopped = web.pmx.run("web", "--show-token")
    assert stopped.stderr == f"http://127.0.0.1:9615/#token={web.token}\n"


def test_non_loopback_needs_allow_remote_and_warns(pmx: Pmx) -> None:
    refused = pmx.run("web", "--listen", f"0.0.0.0:{free_port()}", check=False)
    assert refused.returncode == 2
    assert "--allow-remote" in refused.stderr
    assert pmx.run("web", "--listen", "nowhere", check=False).returncode == 2
    # 192.0.2.1 (TEST-NET-1) is on no interface: the warning comes, then the bind fails,
    # so the test never listens beyond loopback.
    remote = pmx.run("web", "--listen", "192.0.2.1:9615", "--allow-remote", check=False)
    assert "warning" in remote.stderr and "plain HTTP" in remote.stderr
    assert remote.returncode == 1
    assert "cannot listen on 192.0.2.1:9615 for pmx web" in remote.stderr


def test_a_port_in_use_is_one_line(web: WebServer) -> None:
    second = web.pmx.run("web", "--listen", f"127.0.0.1:{web.port}", check=False)
    assert second.returncode == 1
    assert second.stderr.strip() == (f"pmx: cannot listen on 127.0.0.1:{web.port} for pmx web: "
                                     "address already in use")
    # The one serving is still the one `pmx web --show-token` links to.
    assert f"http://127.0.0.1:{web.port}/#token=" in web.pmx.run("web", "--show-token").stderr


# ---------------------------------------------------------------- reads and actions


def test_restart_through_the_api_changes_the_pid(web: WebServer) -> None:
    start_apps(web.pmx)
    before = web.pmx.pids("idler")
    result = web.json("POST", "/api/apps/idler/restart")
    assert result["restarted"] == ["idler"] and result["errors"] == []
    after = web.pmx.wait_status("idler", "online", count=1)
    assert after[0]["pid"] not in before
    rows = {row["id"]: row for row in web.json("GET", "/api/list")}
    assert rows[after[0]["id"]]["pid"] == after[0]["pid"]


def test_actions_report_per_target_and_errors_map_to_http(web: WebServer) -> None:
    start_apps(web.pmx)
    assert web.json("POST", "/api/apps/web/scale", {"count": "+1"})["instances"] == 3
    web.pmx.wait_status("web", "online", count=3)
    assert web.json("POST", "/api/apps/idler/stop")["stopped"] == ["idler"]
    web.pmx.wait_status("idler", "stopped")
    assert web.json("POST", "/api/apps/idler/start")["started"] == ["idler"]
    web.pmx.wait_status("idler", "online")
    status, _, body = web.request("POST", "/api/apps/nope/restart")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, _, body = web.request("POST", "/api/apps/web/scale", body={"count": "lots"})
    assert status == 400 and "count" in json.loads(body)["error"]["message"]
    assert web.request("POST", "/api/apps/web/explode")[0] == 404
    assert web.request("GET", "/api/apps/web/restart")[0] == 405, "an action is never a GET"


def test_reload_counts_and_describe_masks_secrets(web: WebServer) -> None:
    start_apps(web.pmx)
    old = set(web.pmx.pids("web"))
    reloaded = web.json("POST", "/api/apps/web/reload")
    # The reply has the shape of every other action's: results per target, and errors.
    assert reloaded == {"reloaded": ["web"], "results": [{"target": "web", "ok": True}],
                        "errors": []}
    assert not old & set(web.pmx.pids("web"))
    key = ("pmx_app_reloaded_instances_total", (("app", "web"),))
    wait_until(lambda: (web.metrics().get(key) == 2, web.metrics().get(key)), timeout=10,
               what="the reload counted once per replaced instance")
    (app,) = web.json("GET", "/api/apps/idler")
    assert app["spec"]["env"]["MODE"] == "demo"
    assert app["spec"]["env"]["API_TOKEN"] != "hunter2"
    status, _, state = web.get("/api/state")
    assert status == 200 and b"hunter2" not in state


def test_stream_says_hello_then_sends_new_log_lines(web: WebServer) -> None:
    start_apps(web.pmx)
    # pmx web learns of new apps from pmxd's events a moment later: the hello is its view.
    def knows_both() -> tuple[bool, object]:
        state = web.json("GET", "/api/state")
        return {app["name"] for app in state["apps"]} == {"web", "idler"}, state
    wait_until(knows_both, timeout=15, what="pmx web knows both apps")
    req = urllib.request.Request(web.url + "/api/stream",
                                 headers={"Authorization": f"Bearer {web.token}"})
    with urllib.request.urlopen(req, timeout=20) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"

        def next_event() -> tuple[str, Any]:
            kind, data = "", ""
            while True:
                line = stream.readline().decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and data:
                    return kind, json.loads(data)

        kind, hello = next_event()
        assert kind == "hello" and hello["daemon"]["reachable"]
        assert {app["name"] for app in hello["apps"]} == {"web", "idler"}
        web.pmx.run("restart", "idler")
        (new_pid,) = web.pmx.pids("idler")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            kind, data = next_event()
            if kind == "log" and any(f"idle pid {new_pid}" in line["line"] for line in data["lines"]):
                break
        else:
            pytest.fail("the restarted app's first line never came on the stream")


# ---------------------------------------------------------------- /metrics


def test_metrics_parse_and_match_pmx_list(web: WebServer) -> None:
    start_apps(web.pmx)

    def probe() -> tuple[bool, object]:
        # pmxd samples every second: compare only while `list` stays the same around the scrape
        before = web.pmx.list()
        found = web.metrics()
        after = web.pmx.list()
        same = [(r["memory"], r["restarts"], r["status"]) for r in before] == \
               [(r["memory"], r["restarts"], r["status"]) for r in after]
        ok = same and all(r["memory"] > 0 for r in after)
        return ok, (after, found)

    rows, found = wait_until(probe, timeout=20, what="a stable list with memory figures")
    assert isinstance(rows, list) and isinstance(found, dict)
    assert found[("pmx_daemon_up", ())] == 1
    assert found[("pmx_daemon_memory_bytes", ())] > 1_000_000
    assert found[("pmx_daemon_cpu_seconds_total", ())] > 0
    for row in rows:
        labels = (("app", row["name"]), ("instance", str(row["instance"])))
        assert found[("pmx_instance_memory_bytes", labels)] == row["memory"]
        assert found[("pmx_instance_restarts_total", labels)] == row["restarts"]
        assert abs(found[("pmx_instance_uptime_seconds", labels)] - row["uptime"]) < 3
        assert found[("pmx_instance_state", (*labels, ("state", "online")))] == 1
        assert found[("pmx_instance_state", (*labels, ("state", "errored")))] == 0
        assert found[("pmx_instance_cpu_seconds_total", labels)] >= 0
    assert found[("pmx_app_instances_desired", (("app", "web"),))] == 2
    assert found[("pmx_app_instances_online", (("app", "web"),))] == 2
    assert found[("pmx_app_instances_online", (("app", "idler"),))] == 1
    assert found[("pmx_app_memory_restarts_total", (("app", "idler"),))] == 0
    web.pmx.run("stop", "idler")
    labels = (("app", "idler"), ("instance", "0"))
    wait_until(lambda: (web.metrics().get(("pmx_instance_state", (*labels, ("state", "stopped"))))
                        == 1, None), timeout=10, what="idler stopped in /metrics")
    assert web.metrics()[("pmx_app_instances_online", (("app", "idler"),))] == 0


# ---------------------------------------------------------------- pmxd going away


def test_follows_pmxd_through_a_restart(web: WebServer) -> None:
    start_apps(web.pmx)
    first = web.pmx.daemon_pid()
    web.pmx.run("kill")

    def reachable() -> object:
        return web.json("GET", "/api/state")["daemon"]["reachable"]

    wait_until(lambda: (reachable() is False, None), timeout=15, what="daemon unreachable")
    status, _, body = web.get("/api/list")
    assert status == 503 and json.loads(body)["error"]["code"] == "unreachable"
    assert web.metrics() == {("pmx_daemon_up", ()): 0}
    web.pmx.start_daemon()
    start_apps(web.pmx)
    state = wait_until(lambda: ((s := web.json("GET", "/api/state"))["daemon"]["reachable"]
                                and len(s["apps"]) == 2, s), timeout=20, what="reconnected")
    assert isinstance(state, dict) and state["daemon"]["pid"] not in (None, first)
    assert web.proc.poll() is None


def test_pmx_web_stops_on_sigterm_with_a_stream_open(web: WebServer) -> None:
    req = urllib.request.Request(web.url + "/api/stream",
                                 headers={"Authorization": f"Bearer {web.token}"})
    with urllib.request.urlopen(req, timeout=20) as stream:
        assert stream.readline().startswith(b"event: hello")
        started = time.monotonic()
        web.proc.terminate()
        assert web.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 6


def test_static_files_are_packaged(web: WebServer) -> None:
    status, headers, page = web.get("/", token=None)
    assert status == 200 and b"/static/app.js" in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for name in ("app.js", "style.css", "favicon.svg"):
        assert web.get(f"/static/{name}", token=None)[0] == 200
    assert web.get("/static/../server.py", token=None)[0] in (403, 404)


def test_a_log_flood_is_capped_not_queued(web: WebServer) -> None:
    web.pmx.run("start", app_path("flood.py"), "--name", "flood", "--", "0.2", "1000")
    web.pmx.wait_status("flood", "online")

    def probe() -> tuple[bool, object]:
        status, _, data = web.request("GET", "/api/logs/flood")
        if status == 404:  # pmx web has not heard of the new app yet
            return False, data
        lines = json.loads(data)
        notes = [line for line in lines if line["stream"] == "note"]
        return bool(notes), (len(lines), notes[-1:] if notes else lines[-1:])

    wait_until(probe, timeout=20, what="a note saying how many lines were not shown")
    lines = web.json("GET", "/api/logs/flood")
    assert len(lines) <= 300
    assert any("lines not shown (see pmx logs flood)" in line["line"] for line in lines)
    started = time.monotonic()
    web.json("GET", "/api/list")
    web.json("GET", "/api/state")
    assert time.monotonic() - started < 5, "pmx web is slow to answer during a log flood"


# ---------------------------------------------------------------- the fan-out, without pmxd


def log_batch(app: str, lines: list[str]) -> Any:
    from pmx.web.feed import Batch

    return Batch(publications=[(f"log.{app}:", {"app": app, "id": 0, "instance": 0,
                                                "stream": "out", "lines": list(lines)})])


def test_a_browser_that_lags_is_dropped_and_the_others_keep_going() -> None:
    from pmx.web.hub import CLIENT_QUEUE, Hub

    hub = Hub()
    slow, fast = hub.subscribe(), hub.subscribe()
    for number in range(CLIENT_QUEUE + 5):
        hub.apply(log_batch("api", [f"line {number}"]))
        while not fast.queue.empty():
            fast.queue.get_nowait()
    assert slow.queue.qsize() == 1 and slow.queue.get_nowait() is None  # told to end
    hub.apply(log_batch("api", ["after"]))
    assert b"after" in (fast.queue.get_nowait() or b"")
    assert len(hub.logs["api"]) == 300 and hub.logs["api"][-1]["line"] == "after"


def test_a_flood_in_one_period_keeps_the_last_lines_and_counts_the_rest() -> None:
    from pmx.web.feed import MAX_LINES_PER_BATCH, _cap_log_lines

    batch = log_batch("api", [f"a{n}" for n in range(250)])
    batch.publications += log_batch("api", [f"b{n}" for n in range(250)]).publications
    batch.publications += log_batch("db", ["quiet"]).publications
    _cap_log_lines(batch, {"api": 500, "db": 1})
    kept = [line for _, body in batch.publications for line in body["lines"]]
    assert len(kept) == MAX_LINES_PER_BATCH + 1
    assert kept[-2:] == ["b249", "quiet"] and kept[0] == "a200"
    assert batch.skipped_lines == {"api": 200}
