"""pmx's Python startup hook (supervisor/preload/python/sitecustomize.py), in real processes.

`FakeDaemon` plays pmxd's side of the contract: it owns listening sockets on 127.0.0.1 (and
::1), passes them to instances at known fds with PMX_CLUSTER_SOCKETS, and reads the instances'
reports from a unix datagram NOTIFY_SOCKET, with the sender's pid from SO_PASSCRED. The apps in
tests/apps know nothing of pmx. Every process runs in its own session and is SIGKILLed by
process group when the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.httpload import LoadClient, LoadResult, get_pid

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
HOOK_DIR = ROOT / "supervisor" / "preload" / "python"
APPS = ROOT / "tests" / "apps"
IS_BIND_PATCHED = "import socket, _socket; print(socket.socket.bind is not _socket.socket.bind)"


def wait_until(probe: Callable[[], tuple[bool, T]], *, timeout: float, what: str) -> T:
    __tracebackhide__ = True
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        ok, seen = probe()
        if ok:
            return seen
        time.sleep(0.05)  # the poll interval: the only sleep in these tests
    pytest.fail(f"{what}: not true after {timeout}s; last saw {seen!r}")


def needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


class Instance:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log, self.pid = proc, log, proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, signum: int, timeout: float = 5.0) -> tuple[int, float]:
        """Send `signum`; return the exit status and how long the exit took."""
        started = time.monotonic()
        os.kill(self.pid, signum)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pid {self.pid} still running {timeout}s after signal {signum}:\n{self.output()}")
        return status, time.monotonic() - started


class FakeDaemon:
    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="pmx-", dir="/tmp"))  # unix paths stay short
        self.notify_path = str(self.home / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify.bind(self.notify_path)
        self.sockets: list[socket.socket] = []
        self.instances: list[Instance] = []
        self.received: list[tuple[int, dict[str, str]]] = []  # reports no test has claimed yet

    def listen(self, family: int = socket.AF_INET, host: str = "127.0.0.1", port: int = 0) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(4096)
        self.sockets.append(sock)
        return sock

    def free_port(self) -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])  # free a moment ago

    def env(self, *, cluster: str | None = "1", shared: Sequence[socket.socket] = (),
            port: int | None = None, path: Sequence[Path] = (), **extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("PMX_", "PYTHON")) and key != "NOTIFY_SOCKET"}
        env.update(PYTHONPATH=os.pathsep.join(map(str, [HOOK_DIR, *path])), PYTHONDONTWRITEBYTECODE="1",
                   PYTHONUNBUFFERED="1", NOTIFY_SOCKET=self.notify_path, PMX_KILL_TIMEOUT_MS="3000")
        if cluster is not None:
            env["PMX_CLUSTER"] = cluster
        if shared:
            env["PMX_CLUSTER_SOCKETS"] = ",".join(entry(sock) for sock in shared)
        if port is not None or shared:
            env["PORT"] = str(port if port is not None else shared[0].getsockname()[1])
        env.update(extra)
        return env

    def spawn(self, app: str, *, shared: Sequence[socket.socket] = (), **env_args: Any) -> Instance:
        log = self.home / f"{app}.{len(self.instances)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, str(APPS / app)], cwd=self.home,
                                    env=self.env(shared=shared, **env_args), start_new_session=True,
                                    pass_fds=[sock.fileno() for sock in shared],
                                    stdout=out, stderr=subprocess.STDOUT)
        self.instances.append(Instance(proc, log))
        return self.instances[-1]

    def python(self, code: str, **env_args: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code], env=self.env(**env_args), capture_output=True,
                              text=True, timeout=30, cwd=self.home)

    def _receive(self, timeout: float) -> bool:
        self.notify.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.notify.recvmsg(4096, socket.CMSG_SPACE(12))
        except (TimeoutError, BlockingIOError):
            return False
        pid = next(struct.unpack("3i", cmsg[2][:12])[0] for cmsg in ancillary
                   if cmsg[:2] == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS))
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append((pid, fields))
        return True

    def reports(self, pid: int, count: int = 1, timeout: float = 15.0) -> list[dict[str, str]]:
        """Wait for `count` reports from `pid` and claim them."""
        deadline = time.monotonic() + timeout
        instance = next(i for i in self.instances if i.pid == pid)
        while len(mine := [fields for sender, fields in self.received if sender == pid]) < count:
            if time.monotonic() > deadline or instance.proc.poll() is not None:
                pytest.fail(f"{count} report(s) from pid {pid}: got {mine}; exit status "
                            f"{instance.proc.returncode}; output:\n{instance.output()}")
            self._receive(0.2)
        self.received = [(sender, fields) for sender, fields in self.received if sender != pid]
        return mine

    def unclaimed(self) -> list[tuple[int, dict[str, str]]]:
        while self._receive(0.0):
            pass
        return self.received

    def close(self) -> None:
        for instance in self.instances:
            if instance.proc.returncode is None:  # not reaped yet, so the pid is still its own
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(instance.pid, signal.SIGKILL)  # the group: the app and anything it forked
                instance.proc.wait(10)
        for sock in [*self.sockets, self.notify]:
            sock.close()
        shutil.rmtree(self.home, ignore_errors=True)


def entry(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{'inet6' if sock.family == socket.AF_INET6 else 'inet'}/{host}/{port}={sock.fileno()}"


def same_socket(pid: int, fd: str, sock: socket.socket) -> bool:
    """Whether fd in pid is the daemon's `sock` (the same open file: the same socket inode)."""
    return os.readlink(f"/proc/{pid}/fd/{fd}") == os.readlink(f"/proc/self/fd/{sock.fileno()}")


def wait_both_serve(port: int, pids: set[int], host: str = "127.0.0.1") -> None:
    seen: set[int] = set()

    def probe() -> tuple[bool, set[int]]:
        connection = http.client.HTTPConnection(host, port, timeout=10)  # fresh each time
        try:
            connection.request("GET", "/")
            seen.add(int(connection.getresponse().read().split()[1]))
        finally:
            connection.close()
        return seen >= pids, seen

    wait_until(probe, timeout=15, what=f"pids {pids} all answer on {host}:{port}")


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    fake = FakeDaemon()
    try:
        yield fake
    finally:
        fake.close()


# --- loading and chaining ------------------------------------------------------------------------


def test_inert_unless_pmx_cluster_is_exactly_1(daemon: FakeDaemon) -> None:
    for value in (None, "", "0", "true", " 1"):
        assert daemon.python(IS_BIND_PATCHED, cluster=value).stdout.strip() == "False", value
    assert daemon.python(IS_BIND_PATCHED).stdout.strip() == "True"
    # Without the hook a second server on the port fails, as it would outside pmx.
    sock = daemon.listen()
    instance = daemon.spawn("py_raw_accept.py", shared=[sock], cluster=None)
    assert instance.proc.wait(15) == 1
    assert "Address already in use" in instance.output()


def test_chains_to_the_next_sitecustomize(daemon: FakeDaemon) -> None:
    user = daemon.home / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE'] = __file__\n")
    code = ("import os, sitecustomize; print(os.environ.get('USER_SITECUSTOMIZE'));"
            f"print(sitecustomize.__file__); {IS_BIND_PATCHED}")
    for cluster in ("1", None):
        result = daemon.python(code, cluster=cluster, path=[user])
        ran, module, patched = result.stdout.split()
        assert ran == module == str(user / "sitecustomize.py"), result
        assert patched == str(cluster == "1")
        assert result.stderr == ""


def test_a_failing_user_sitecustomize_is_reported_like_site_does(daemon: FakeDaemon) -> None:
    user = daemon.home / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("raise RuntimeError('boom')\n")
    result = daemon.python(IS_BIND_PATCHED, path=[user])
    assert result.returncode == 0
    assert result.stdout.strip() == "True"
    assert result.stderr == "Error in sitecustomize; set PYTHONVERBOSE for traceback:\nRuntimeError: boom\n"


# --- redirecting binds, reporting ----------------------------------------------------------------


def test_instances_share_the_inherited_socket(daemon: FakeDaemon) -> None:
    sock = daemon.listen()
    port = sock.getsockname()[1]
    instances = [daemon.spawn("py_hello.py", shared=[sock]) for _ in range(2)]
    for instance in instances:
        [report] = daemon.reports(instance.pid)
        assert report["PMX_LISTENING"] == f"inet/127.0.0.1/{port}"
        assert report["PMX_ADOPTED"] == "1"
        assert same_socket(instance.pid, report["PMX_LISTEN_FD"], sock)
    wait_both_serve(port, {i.pid for i in instances})
    assert daemon.unclaimed() == []  # one report per socket
    # http.server calls listen(5); the hook must not let that shrink the shared backlog.
    if shutil.which("ss"):
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        columns = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert columns[2] == str(min(4096, somaxconn)), columns  # Send-Q of a listener: its backlog


def pidfd_getfd(pid: int, fd: int) -> int:
    """What the daemon does to keep a self-bound socket: copy it out of the instance."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd on x86_64 and arm64
        if copy < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return int(copy)
    finally:
        os.close(pidfd)


def test_a_self_bound_socket_is_reported_and_can_be_shared(daemon: FakeDaemon) -> None:
    port = daemon.free_port()
    first = daemon.spawn("py_raw_accept.py", port=port)  # no PMX_CLUSTER_SOCKETS: binds itself
    [report] = daemon.reports(first.pid)
    assert report["PMX_LISTENING"] == f"inet/127.0.0.1/{port}"
    assert report["PMX_ADOPTED"] == "0"
    assert os.readlink(f"/proc/{first.pid}/fd/{report['PMX_LISTEN_FD']}").startswith("socket:")
    try:
        copy = socket.socket(fileno=pidfd_getfd(first.pid, int(report["PMX_LISTEN_FD"])))
    except OSError as exc:
        pytest.skip(f"pidfd_getfd not permitted here ({exc}); the report itself was checked")
    daemon.sockets.append(copy)
    assert copy.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    second = daemon.spawn("py_raw_accept.py", shared=[copy])
    assert daemon.reports(second.pid)[0]["PMX_ADOPTED"] == "1"
    wait_both_serve(port, {first.pid, second.pid})


def test_an_entry_that_is_not_that_listening_socket_is_ignored(daemon: FakeDaemon) -> None:
    # A Python grandchild inherits the environment but not the fds: fd 1 is a log file there.
    port = daemon.free_port()
    instance = daemon.spawn("py_raw_accept.py", port=port,
                            PMX_CLUSTER_SOCKETS=f"inet/127.0.0.1/{port}=1,bogus")
    assert daemon.reports(instance.pid)[0]["PMX_ADOPTED"] == "0"
    assert get_pid(port) == instance.pid
    assert "pmx: ignoring malformed PMX_CLUSTER_SOCKETS entry 'bogus'" in instance.output()


def test_a_socket_detached_before_listen_is_reported(daemon: FakeDaemon) -> None:
    # uvloop's create_server binds a socket.socket, detaches it and listens in C (libuv).
    sock = daemon.listen()
    instance = daemon.spawn("py_raw_accept.py", shared=[sock], DETACH="1")
    [report] = daemon.reports(instance.pid)
    assert report["PMX_ADOPTED"] == "1"
    assert same_socket(instance.pid, report["PMX_LISTEN_FD"], sock)
    assert get_pid(sock.getsockname()[1]) == instance.pid


def run_load(port: int, *, keep_alive: int, fresh: int) -> list[LoadClient]:
    clients = [LoadClient("127.0.0.1", port, keep_alive=True, max_seconds=30) for _ in range(keep_alive)]
    clients += [LoadClient("127.0.0.1", port, max_seconds=30) for _ in range(fresh)]
    for client in clients:
        client.start()
    return clients


def total(clients: Sequence[LoadClient]) -> LoadResult:
    """The clients' results so far, summed."""
    result = LoadResult()
    for client in clients:
        result.ok += client.result.ok
        result.failed += client.result.failed
        result.errors += client.result.errors
        result.pids |= client.result.pids
    return result


def stop_all(clients: Sequence[LoadClient]) -> LoadResult:
    for client in clients:
        client.stop()
    return total(clients)


def load_probe(clients: Sequence[LoadClient], ok: int,
               pids: set[int]) -> Callable[[], tuple[bool, LoadResult]]:
    def probe() -> tuple[bool, LoadResult]:
        result = total(clients)
        return result.ok >= ok and result.pids >= pids, result
    return probe


def test_blocking_accept_loops_share_and_die_by_sigterm(daemon: FakeDaemon) -> None:
    # The shared socket is non-blocking for everyone; the hook makes accept() block again.
    sock = daemon.listen()
    instances = [daemon.spawn("py_raw_accept.py", shared=[sock]) for _ in range(2)]
    for instance in instances:
        daemon.reports(instance.pid)
    clients = run_load(sock.getsockname()[1], keep_alive=0, fresh=3)
    try:
        wait_until(load_probe(clients, 300, {i.pid for i in instances}), timeout=15,
                   what="both blocking accept loops answer")
    finally:
        result = stop_all(clients)
    assert result.failed == 0, result.errors
    assert [i.proc.poll() for i in instances] == [None, None]
    # A listening app with no server to drain dies by the signal, as without the hook.
    assert instances[0].stop(signal.SIGTERM)[0] == -signal.SIGTERM
    assert daemon.spawn("idle.py").stop(signal.SIGTERM)[0] == -signal.SIGTERM


# --- frameworks ----------------------------------------------------------------------------------


def test_flask_instances_share_the_socket(daemon: FakeDaemon) -> None:
    needs("flask")
    sock = daemon.listen()  # app.run() binds 127.0.0.1 by default
    instances = [daemon.spawn("flask_hello.py", shared=[sock]) for _ in range(2)]
    for instance in instances:
        assert daemon.reports(instance.pid)[0]["PMX_ADOPTED"] == "1"
    wait_both_serve(sock.getsockname()[1], {i.pid for i in instances})


def test_aiohttp_dual_stack_uses_each_family_own_socket(daemon: FakeDaemon) -> None:
    needs("aiohttp")
    v4 = daemon.listen()
    port = v4.getsockname()[1]
    try:
        v6 = daemon.listen(socket.AF_INET6, "::1", port)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    # v6 first: entries are matched by family and port, not by position.
    instances = [daemon.spawn("aiohttp_hello.py", shared=[v6, v4], HOST="127.0.0.1,::1") for _ in range(2)]
    for instance in instances:
        reports = {r["PMX_LISTENING"]: r for r in daemon.reports(instance.pid, count=2)}
        assert same_socket(instance.pid, reports[f"inet/127.0.0.1/{port}"]["PMX_LISTEN_FD"], v4)
        assert same_socket(instance.pid, reports[f"inet6/::1/{port}"]["PMX_LISTEN_FD"], v6)
    wait_both_serve(port, {i.pid for i in instances})
    wait_both_serve(port, {i.pid for i in instances}, host="::1")
    # run_app installs its own SIGTERM handler: the hook leaves it alone (it would die by -15).
    assert instances[0].stop(signal.SIGTERM)[0] == 0


def test_uvicorn_instances_share_and_keep_their_own_signal_handling(daemon: FakeDaemon) -> None:
    needs("uvicorn")
    sock = daemon.listen()
    instances = [daemon.spawn("py_uvicorn_hello.py", shared=[sock]) for _ in range(2)]
    for instance in instances:
        assert daemon.reports(instance.pid)[0]["PMX_ADOPTED"] == "1"
    wait_both_serve(sock.getsockname()[1], {i.pid for i in instances})
    # uvicorn installs its handlers before it listens, so the hook leaves them alone; after its
    # graceful shutdown it restores the default and re-raises the signal it caught.
    assert instances[0].stop(signal.SIGTERM)[0] == -signal.SIGTERM
    assert f"Finished server process [{instances[0].pid}]" in instances[0].output()


# --- draining --------------------------------------------------------------------------------------


@pytest.mark.parametrize("app", ["py_hello.py", "flask_hello.py"])
def test_sigterm_drains_a_socketserver_without_failed_requests(daemon: FakeDaemon, app: str) -> None:
    if app == "flask_hello.py":
        needs("flask")
    sock = daemon.listen()
    port = sock.getsockname()[1]
    instances = {i.pid: i for i in [daemon.spawn(app, shared=[sock]) for _ in range(2)]}
    for pid in instances:
        daemon.reports(pid)
    clients = run_load(port, keep_alive=4, fresh=2)
    try:
        wait_until(load_probe(clients, 200, set(instances)), timeout=15, what="both instances answer")
        # Stop the instance holding the most keep-alive connections.
        victim = max(instances.values(), key=lambda i: sum(i.pid in c.result.pids for c in clients[:4]))
        survivor = next(i for i in instances.values() if i is not victim)
        status, took = victim.stop(signal.SIGTERM)
        wait_until(load_probe(clients, total(clients).ok + 100, set()), timeout=15,
                   what="the other instance keeps serving")
    finally:
        result = stop_all(clients)
    assert result.failed == 0, result.errors
    assert (status, "Traceback" in victim.output()) == (0, False), victim.output()
    assert took < 2.0
    assert get_pid(port) == survivor.pid


def test_sigint_drains_and_a_silent_connection_gets_a_short_grace(daemon: FakeDaemon) -> None:
    sock = daemon.listen()
    instance = daemon.spawn("py_hello.py", shared=[sock])
    daemon.reports(instance.pid)
    with socket.create_connection(sock.getsockname(), timeout=10) as silent:
        assert get_pid(sock.getsockname()[1]) == instance.pid  # the silent one was accepted before
        status, took = instance.stop(signal.SIGINT)
        assert silent.recv(1) == b""  # closed without an answer: it never asked anything
    assert status == 0
    assert 0.4 < took < 1.8  # the hook's 0.5 s grace for an idle connection, not the 2.7 s deadline


def test_a_single_threaded_server_drains_an_idle_keep_alive_connection(daemon: FakeDaemon) -> None:
    sock = daemon.listen()
    instance = daemon.spawn("py_single_hello.py", shared=[sock])
    daemon.reports(instance.pid)
    connection = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=10)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        assert (response.read(), response.will_close) == (f"hello {instance.pid}\n".encode(), False)
        # The main thread now waits for this connection's next request, inside serve_forever.
        status, took = instance.stop(signal.SIGTERM)
    finally:
        connection.close()
    assert (status, took < 1.0) == (0, True), took


def request_in_flight(port: int, pid: int) -> socket.socket:
    """A keep-alive connection to `pid` whose second request has sent only its request line, and
    the server has read it: its handler is inside parse_request, reading the headers."""
    if not shutil.which("ss"):
        pytest.skip("needs ss to see when the server has read the request line")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/")
    assert int(connection.getresponse().read().split()[1]) == pid
    assert connection.sock is not None
    sock = connection.sock
    sock.sendall(b"GET / HTTP/1.1\r\n")

    def read_by_server() -> tuple[bool, str]:
        line = subprocess.run(["ss", "-Htn", f"sport = :{port} and dport = :{sock.getsockname()[1]}"],
                              capture_output=True, text=True, check=True).stdout
        return line.split()[1:2] == ["0"], line  # Recv-Q

    wait_until(read_by_server, timeout=10, what="the server read the request line")
    return sock


def thread_count(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Threads:")[1].split()[0])


@pytest.mark.parametrize("app", ["py_hello.py", "py_keep_alive_header.py"])
def test_a_request_in_flight_is_answered_with_connection_close(daemon: FakeDaemon, app: str) -> None:
    # py_keep_alive_header.py says "Connection: keep-alive" itself: clients read the first
    # Connection header, so the answer must carry "close" alone (getheader joins them all).
    sock = daemon.listen()
    instance = daemon.spawn(app, shared=[sock])
    daemon.reports(instance.pid)
    with request_in_flight(sock.getsockname()[1], instance.pid) as connection:
        threads = thread_count(instance.pid)
        os.kill(instance.pid, signal.SIGTERM)
        # The hook's handler has run once it has started its drain thread.
        wait_until(lambda: (thread_count(instance.pid) > threads, thread_count(instance.pid)),
                   timeout=10, what="the drain started")
        connection.sendall(b"Host: x\r\n\r\n")
        response = http.client.HTTPResponse(connection)
        response.begin()
        assert (response.status, response.getheader("Connection")) == (200, "close")
        assert response.read() == f"hello {instance.pid}\n".encode()
        assert connection.recv(1) == b""
    assert instance.proc.wait(5) == 0


class KeepAliveClient(threading.Thread):
    """A raw keep-alive client that never retries, like bench/reload.py's: it sends its next request
    as soon as it has read an answer, and stops after an answer that says "Connection: close",
    which must be followed by the server's FIN, not a reset."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.answers, self.closed_cleanly = 0, False
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with self.sock, self.sock.makefile("rb") as reader:
                while not self.closed_cleanly:
                    self.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    status, headers = reader.readline(), {}
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        name, _, value = line.decode("latin-1").partition(":")
                        headers[name.strip().lower()] = value.strip()
                    if not status.startswith(b"HTTP/1.1 200 "):
                        raise AssertionError(f"answer {self.answers + 1}: {status!r} {headers}")
                    reader.read(int(headers["content-length"]))
                    self.answers += 1
                    if headers.get("connection") == "close":
                        self.closed_cleanly = reader.read(1) == b""  # a reset raises instead
                        if not self.closed_cleanly:
                            raise AssertionError("more bytes after a Connection: close answer")
        except Exception as exc:
            self.error = exc


def test_keep_alive_clients_racing_the_drain_get_every_answer(daemon: FakeDaemon) -> None:
    # A keep-alive client sends its next request as soon as it has read an answer: a connection
    # waiting for a request is about to get one, and closing it when the drain begins loses that
    # request to a reset. Busy connections end after an answer that says Connection: close; one
    # that waited when the drain began is still answered when its request comes soon after.
    sock = daemon.listen()
    port = sock.getsockname()[1]
    instance = daemon.spawn("py_hello.py", shared=[sock])
    daemon.reports(instance.pid)
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        idle.request("GET", "/")
        assert idle.getresponse().read() == f"hello {instance.pid}\n".encode()
        busy = [KeepAliveClient(port) for _ in range(4)]
        for client in busy:
            client.start()
        wait_until(lambda: (all(c.answers >= 20 or c.error for c in busy), [c.answers for c in busy]),
                   timeout=15, what="the busy clients are answered")
        os.kill(instance.pid, signal.SIGTERM)
        for client in busy:
            client.join(10)
        assert [(c.error, c.closed_cleanly) for c in busy] == [(None, True)] * len(busy)
        # Every busy client has had its Connection: close, so the drain began a moment ago.
        idle.request("GET", "/")
        response = idle.getresponse()
        assert (response.status, response.getheader("Connection")) == (200, "close")
        assert response.read() == f"hello {instance.pid}\n".encode()
    finally:
        idle.close()
    assert instance.proc.wait(5) == 0


def test_connections_in_the_accept_queue_are_left_to_the_next_instance(daemon: FakeDaemon) -> None:
    # A draining instance stops accepting; what waits in the shared socket's accept queue is
    # answered by another instance, even one that starts after the first has exited: nothing in the
    # hook shuts the shared socket down or drops its queue.
    sock = daemon.listen()
    first = daemon.spawn("py_single_hello.py", shared=[sock])
    daemon.reports(first.pid)
    busy = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=10)
    try:
        busy.request("GET", "/")  # its only thread now waits for this connection's next request
        assert busy.getresponse().read() == f"hello {first.pid}\n".encode()
        with socket.create_connection(sock.getsockname(), timeout=10) as queued:
            queued.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert first.stop(signal.SIGTERM)[0] == 0
            second = daemon.spawn("py_hello.py", shared=[sock])
            response = http.client.HTTPResponse(queued)
            response.begin()
            assert (response.status, response.read()) == (200, f"hello {second.pid}\n".encode())
    finally:
        busy.close()


def test_the_drain_ends_at_90_percent_of_the_kill_timeout(daemon: FakeDaemon) -> None:
    sock = daemon.listen()
    instance = daemon.spawn("py_hello.py", shared=[sock], PMX_KILL_TIMEOUT_MS="1000")
    daemon.reports(instance.pid)
    with request_in_flight(sock.getsockname()[1], instance.pid):  # and its headers never come
        status, took = instance.stop(signal.SIGTERM)
    assert status == 0
    assert 0.85 < took < 2.0


def test_an_app_with_its_own_sigterm_handler_is_left_alone(daemon: FakeDaemon) -> None:
    sock = daemon.listen()
    port = sock.getsockname()[1]
    instances = [daemon.spawn("py_own_handler.py", shared=[sock]) for _ in range(2)]
    for instance in instances:
        daemon.reports(instance.pid)
    wait_both_serve(port, {i.pid for i in instances})
    assert instances[0].stop(signal.SIGTERM)[0] == 7
    # Its handler shut the listening socket down: the hook made that a no-op, or the shared
    # socket would have stopped listening for the other instance and the daemon too.
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert get_pid(port) == instances[1].pid
