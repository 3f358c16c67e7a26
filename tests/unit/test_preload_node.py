"""The Node cluster preload (supervisor/preload/node/pmx_cluster.js), run in real node processes.

The test plays the daemon: it binds the listening socket, hands it to `node --require
<preload> tests/apps/node_*.js` at a known fd with PMX_CLUSTER_SOCKETS naming it, and
holds the other end of the IPC channel (NODE_CHANNEL_FD, Node's JSON lines) to read the
preload's reports and send PM2's 'shutdown'. Every node runs in its own session and is
SIGKILLed by its pid (its process group) at teardown, whatever happened.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.conftest import free_port, wait_until
from tests.httpload import LoadClient, LoadResult, get_pid

NODE = shutil.which("node")
SS = shutil.which("ss")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not on PATH; the Node preload needs node")

ROOT = Path(__file__).resolve().parents[2]
PRELOAD = ROOT / "supervisor" / "preload" / "node" / "pmx_cluster.js"
APPS = ROOT / "tests" / "apps"
KILL_TIMEOUT_MS = 5000  # the preload gives up draining at 90% of it: 4.5 s
IDLE_GRACE_S = 0.5  # the preload's IDLE_GRACE_MS: how long a drained connection may stay silent
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


class NodeChild:
    """One node process as the daemon sees it: its pid, its IPC channel, its output."""

    def __init__(self, app: str, proc: subprocess.Popen[bytes], channel: socket.socket | None) -> None:
        self.app, self.proc, self.pid, self.channel = app, proc, proc.pid, channel
        self._inbox = b""
        self._stdout = b""

    def _fail(self, what: str) -> NoReturn:
        __tracebackhide__ = True
        pytest.fail(f"node pid {self.pid} ({self.app}): {what}\nstderr: {self.stderr()}")

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        chunks = []
        while select.select([self.proc.stderr], [], [], 0)[0]:
            chunk = os.read(self.proc.stderr.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def message(self, timeout: float = 5.0) -> Any:
        """The next JSON message the child sent on its channel."""
        __tracebackhide__ = True
        assert self.channel is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._inbox:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.channel], [], [], left)[0]:
                self._fail(f"no message within {timeout}s; partial {self._inbox!r}")
            chunk = self.channel.recv(65536)
            if not chunk:
                self._fail(f"channel closed before a message; partial {self._inbox!r}")
            self._inbox += chunk
        line, self._inbox = self._inbox.split(b"\n", 1)
        return json.loads(line)

    def rest_of_channel(self, timeout: float = 5.0) -> bytes:
        """Everything the child sends until its end of the channel closes (it exited)."""
        __tracebackhide__ = True
        assert self.channel is not None
        deadline = time.monotonic() + timeout
        data, self._inbox = self._inbox, b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.channel], [], [], left)[0]:
                self._fail(f"channel still open after {timeout}s; got {data!r}")
            chunk = self.channel.recv(65536)
            if not chunk:
                return data
            data += chunk

    def send(self, message: Any) -> None:
        assert self.channel is not None
        self.channel.sendall(json.dumps(message).encode() + b"\n")

    def wait_output(self, text: str, timeout: float = 5.0) -> None:
        """Wait until the child's stdout contains `text`."""
        __tracebackhide__ = True
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while text.encode() not in self._stdout:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self._fail(f"{text!r} not printed within {timeout}s; stdout {self._stdout!r}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                self._fail(f"stdout closed before {text!r}; stdout {self._stdout!r}")
            self._stdout += chunk

    def wait_exit(self, timeout: float = 5.0) -> int:
        __tracebackhide__ = True
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"still running {timeout}s later")

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # its own session: pgid == pid
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self.channel is not None:
            self.channel.close()


Spawn = Callable[..., NodeChild]


@pytest.fixture
def spawn_node() -> Iterator[Spawn]:
    """spawn(app, sockets=[(family, host, port, sock)], env={...}) -> NodeChild."""
    children: list[NodeChild] = []

    def spawn(app: str, *, sockets: list[tuple[str, str, int, socket.socket]] | None = None,
              env: dict[str, str] | None = None, pmx_cluster: str | None = "1",
              channel: bool = True, entries: str | None = None) -> NodeChild:
        sockets = sockets or []
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_", "PMX_"))}
        if pmx_cluster is not None:
            child_env["PMX_CLUSTER"] = pmx_cluster
        if entries is None:
            entries = ",".join(f"{family}/{host}/{port}={sock.fileno()}"
                               for family, host, port, sock in sockets)
        if sockets or entries:
            child_env["PMX_CLUSTER_SOCKETS"] = entries
        child_env["PMX_KILL_TIMEOUT_MS"] = str(KILL_TIMEOUT_MS)
        pass_fds = [sock.fileno() for *_, sock in sockets]
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        if channel:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child_env["NODE_CHANNEL_FD"] = str(theirs.fileno())
            child_env["NODE_CHANNEL_SERIALIZATION_MODE"] = "json"
            pass_fds.append(theirs.fileno())
        child_env.update(env or {})
        assert NODE is not None
        try:
            proc = subprocess.Popen(
                [NODE, "--require", str(PRELOAD), str(APPS / app)], env=child_env,
                pass_fds=pass_fds, start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            if theirs is not None:
                theirs.close()  # only the child holds its end: EOF when it exits
        child = NodeChild(app, proc, ours)
        children.append(child)
        return child

    try:
        yield spawn
    finally:
        survivors = []
        for child in children:
            try:
                child.kill()
            except subprocess.TimeoutExpired:
                survivors.append(child.pid)
        assert not survivors, f"node pids {survivors} survived SIGKILL"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """The daemon-owned listening socket on 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    try:
        yield sock
    finally:
        sock.close()


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (any address), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                rows = file.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def fd_inode(pid: int, fd: int) -> str | None:
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return target[len("socket:["):-1] if target.startswith("socket:[") else None


def socket_fd_count(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def shared_instance(spawn_node: Spawn, listener: socket.socket, app: str = "node_hello.js",
                    env: dict[str, str] | None = None) -> NodeChild:
    """An instance given the listener, once it reported serving on it."""
    port = port_of(listener)
    child = spawn_node(app, sockets=[("inet", "127.0.0.1", port, listener)],
                       env={"PORT": str(port), **(env or {})})
    report = child.message()
    assert report == {"pmx": "listening", "family": "inet", "host": "127.0.0.1", "port": port,
                      "fd": listener.fileno(), "adopted": True}
    return child


def total(clients: list[LoadClient]) -> LoadResult:
    result = LoadResult()
    for client in clients:
        result.ok += client.result.ok
        result.failed += client.result.failed
        result.errors += client.result.errors
        result.pids |= client.result.pids
    return result


def read_response(conn: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """(head, body, bytes read past it) of one Content-Length response; EOF raises."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF before a response; got {data!r}")
        data += chunk
    head, data = data.split(b"\r\n\r\n", 1)
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n")
               if line.lower().startswith(b"content-length:")]
    assert lengths, f"no Content-Length in {head!r}"
    length = int(lengths[0])
    while len(data) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF in a response body; got {head!r} {data!r}")
        data += chunk
    return head, data[:length], data[length:]


def says_close(head: bytes) -> bool:
    return b"\r\nconnection: close" in head.lower()


def sigterm_and_wait_drain(child: NodeChild, listener: socket.socket) -> None:
    """SIGTERM, then wait until the child closed its copy of the shared socket (the drain
    began: it stopped accepting)."""
    inode = fd_inode(child.pid, listener.fileno())
    assert inode is not None
    os.kill(child.pid, signal.SIGTERM)
    wait_until(lambda: (fd_inode(child.pid, listener.fileno()) != inode, None), timeout=5,
               what="node closing its copy of the listening socket")


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on 127.0.0.1:port (ss shows it as Send-Q)."""
    assert SS is not None
    out = subprocess.run([SS, "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[2])  # State Recv-Q Send-Q Local Peer


def somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as file:
        return int(file.read())


# --- inert unless asked ----------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "0", "true", " 1"])
def test_preload_is_inert_unless_pmx_cluster_is_exactly_1(spawn_node: Spawn, listener: socket.socket,
                                                          value: str | None) -> None:
    # The entry names the app's port but another socket: obeying it would serve elsewhere.
    port = free_port()
    child = spawn_node("node_hello.js", pmx_cluster=value, env={"PORT": str(port)},
                       sockets=[("inet", "127.0.0.1", port, listener)])
    assert wait_until(lambda: (get_pid_or_none(port) == child.pid, get_pid_or_none(port)),
                      timeout=5, what="the app serving on its own port") == child.pid
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait_exit() == -signal.SIGTERM  # Node's default: no drain installed
    assert child.rest_of_channel() == b""  # and nothing reported


def get_pid_or_none(port: int) -> int | None:
    try:
        return get_pid(port)
    except OSError:
        return None


def test_malformed_socket_entries_are_ignored(spawn_node: Spawn) -> None:
    port = free_port()
    child = spawn_node("node_hello.js", env={"PORT": str(port)},
                       entries=f"garbage,inet/x/{port}=,unix//{port}=3,inet6/::/{port}=99,=,,inet/{port}=3")
    report = child.message()
    assert report["adopted"] is False and report["port"] == port
    assert get_pid(port) == child.pid


# --- redirected listens ----------------------------------------------------------------


def test_two_instances_serve_the_same_inherited_socket(spawn_node: Spawn, listener: socket.socket) -> None:
    # Both call listen(process.env.PORT) on a port the test holds: without the preload
    # each would fail with EADDRINUSE.
    first = shared_instance(spawn_node, listener)
    second = shared_instance(spawn_node, listener)
    seen: set[int] = set()

    def both_answer() -> tuple[bool, set[int]]:
        seen.add(get_pid(port_of(listener)))  # a fresh connection each time
        return seen == {first.pid, second.pid}, seen

    wait_until(both_answer, timeout=10, what="both instances answering on the shared port")


def test_self_bound_listen_is_reported_with_its_real_fd(spawn_node: Spawn) -> None:
    port = free_port()
    child = spawn_node("node_hello.js", env={"PORT": str(port)})  # no PMX_CLUSTER_SOCKETS
    report = child.message()
    # listen(port) with no host binds "::" (dual stack), as plain Node does.
    assert {k: report[k] for k in ("pmx", "family", "host", "port", "adopted")} == {
        "pmx": "listening", "family": "inet6", "host": "::", "port": port, "adopted": False}
    inode = fd_inode(child.pid, report["fd"])
    assert inode is not None, f"fd {report['fd']} of pid {child.pid} is not a socket"
    assert inode in listening_inodes(port)
    assert get_pid(port) == child.pid


def test_self_bound_with_empty_socket_list(spawn_node: Spawn) -> None:
    port = free_port()
    child = spawn_node("node_hello.js", env={"PORT": str(port)}, entries="")
    assert child.message()["adopted"] is False
    assert get_pid(port) == child.pid


def test_second_server_on_another_port_binds_itself(spawn_node: Spawn, listener: socket.socket) -> None:
    port, other = port_of(listener), free_port()
    child = spawn_node("node_two_ports.js", sockets=[("inet", "127.0.0.1", port, listener)],
                       env={"PORT": str(port), "PORT2": str(other)})
    reports = {r["port"]: r for r in (child.message(), child.message())}
    assert reports[port]["adopted"] is True and reports[port]["fd"] == listener.fileno()
    assert reports[other]["adopted"] is False
    assert fd_inode(child.pid, reports[other]["fd"]) in listening_inodes(other)
    assert get_pid(port) == child.pid
    assert get_pid(other) == child.pid


@pytest.mark.skipif(SS is None, reason="ss (iproute2) is not installed")
@pytest.mark.parametrize(("args", "expected"),
                         [(["PORT", "127.0.0.1"], None), (["PORT", "127.0.0.1", 64], 64)],
                         ids=["default", "app-backlog"])
def test_inherited_socket_keeps_a_large_backlog(spawn_node: Spawn, listener: socket.socket,
                                                args: list[Any], expected: int | None) -> None:
    # Node listens again on the inherited socket, which sets the backlog of the socket
    # every instance shares: Node's default 511 would apply to all of them.
    port = port_of(listener)
    assert listen_backlog(port) == 128  # the fixture's
    child = spawn_node("node_listen_args.js", sockets=[("inet", "127.0.0.1", port, listener)],
                       env={"LISTEN_ARGS": json.dumps([port if a == "PORT" else a for a in args])})
    assert child.message()["adopted"] is True
    assert listen_backlog(port) == (expected or min(4096, somaxconn()))


# Each case: listen() arguments (PORT and FD are replaced) and which socket it must get:
# "inet", "inet6" (the inherited ones) or None (listen passed through: no report).
LISTEN_CASES = [
    (["PORT"], "inet6"),  # no host: Node would bind "::", so inet6 first
    (["SPORT"], "inet6"),  # the port as a numeric string (process.env.PORT)
    (["PORT", "127.0.0.1"], "inet"),
    (["PORT", "::1"], "inet6"),
    (["PORT", "127.0.0.1", 64], "inet"),  # positional backlog
    ([{"port": "PORT", "host": "::1"}], "inet6"),
    ([{"port": "SPORT", "host": "127.0.0.1", "exclusive": True}], "inet"),
    ([{"port": "PORT", "host": "localhost"}], "inet"),  # a name: any entry, in list order
    ([0], None),
    ([{"port": 0, "host": "127.0.0.1"}], None),
    ([{"fd": "FD"}], None),  # the app already serves on an fd
    (["PATH"], None),  # a unix socket path
]


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) to bind")
@pytest.mark.parametrize(("args", "expected"), LISTEN_CASES, ids=[json.dumps(c[0]) for c in LISTEN_CASES])
def test_listen_arguments_pick_the_matching_socket(spawn_node: Spawn, tmp_path: Path,
                                                   args: list[Any], expected: str | None) -> None:
    v4 = socket.socket(socket.AF_INET)
    v6 = socket.socket(socket.AF_INET6)
    try:
        v4.bind(("127.0.0.1", 0))
        port = port_of(v4)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            v6.bind(("::1", port))
        except OSError:
            pytest.skip(f"[::1]:{port} is taken")
        v4.listen(16)
        v6.listen(16)
        fds = {"inet": v4.fileno(), "inet6": v6.fileno()}
        values = {"PORT": port, "SPORT": str(port), "FD": v4.fileno(), "PATH": str(tmp_path / "s.sock")}

        def fill(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            return values.get(value, value) if isinstance(value, str) else value

        child = spawn_node("node_listen_args.js", sockets=[("inet", "127.0.0.1", port, v4),
                                                            ("inet6", "::1", port, v6)],
                           env={"LISTEN_ARGS": json.dumps([fill(a) for a in args])})
        first = child.message()
        if expected is None:
            assert first["app"] == "listening", f"the preload reported a passed-through listen: {first}"
        else:
            assert first["pmx"] == "listening" and first["adopted"] is True
            assert first["fd"] == fds[expected] and first["family"] == expected
            assert child.message()["app"] == "listening"  # the app's own callback still runs
    finally:
        v4.close()
        v6.close()


# --- drain -----------------------------------------------------------------------------


@pytest.mark.parametrize("keep_alive", [True, False], ids=["keep-alive", "fresh-connections"])
@pytest.mark.parametrize("app", ["node_hello.js", "node_slow.js"])
def test_sigterm_drains_one_instance_under_load(spawn_node: Spawn, listener: socket.socket,
                                                keep_alive: bool, app: str) -> None:
    # node_slow.js holds each request 50 ms, so some are in flight at the signal: exiting
    # without a drain resets them (a fresh connection's reset is never retried).
    port = port_of(listener)
    victim = shared_instance(spawn_node, listener, app=app, env={"DELAY_MS": "50"})
    survivor = shared_instance(spawn_node, listener, app=app, env={"DELAY_MS": "50"})
    idle_sockets = socket_fd_count(victim.pid)  # the shared socket and the channel
    clients: list[LoadClient] = []
    try:
        # A kept-alive connection stays with the instance that accepted it: add clients
        # until the victim holds some of them, and (slow app) one is in flight there now.
        def victim_loaded() -> tuple[bool, tuple[set[int], int]]:
            if len(clients) < 16 and (not clients or clients[-1].result.ok):
                clients.append(LoadClient("127.0.0.1", port, keep_alive=keep_alive, max_seconds=20))
                clients[-1].start()
            pids, connections = total(clients).pids, socket_fd_count(victim.pid) - idle_sockets
            busy = connections > 0 or app == "node_hello.js"  # its connections live for microseconds
            return pids == {victim.pid, survivor.pid} and busy, (pids, connections)

        wait_until(victim_loaded, timeout=10, what="load reaching both instances")
        os.kill(victim.pid, signal.SIGTERM)
        started = time.monotonic()
        assert victim.wait_exit(timeout=4) == 0
        assert time.monotonic() - started < 2.0  # drained, not stopped by the 4.5 s deadline
        served = total(clients).ok
        wait_until(lambda: (total(clients).ok > served + 20, total(clients).ok), timeout=5,
                   what="load still served after the victim exited")
        assert survivor.is_running()
        assert get_pid(port) == survivor.pid
    finally:
        for client in clients:
            client.stop()
    result = total(clients)
    assert result.failed == 0, result.errors


@pytest.mark.parametrize("delay_ms", ["400", "1200"])  # 1200: longer than the idle grace
def test_drain_finishes_in_flight_response_with_connection_close(spawn_node: Spawn,
                                                                  listener: socket.socket,
                                                                  delay_ms: str) -> None:
    port = port_of(listener)
    child = shared_instance(spawn_node, listener, app="node_slow.js",
                           env={"DELAY_MS": delay_ms, "LOG_REQUESTS": "1"})
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    busy = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        idle.request("GET", "/")
        answer = idle.getresponse()
        assert answer.read() == f"hello {child.pid}\n".encode() and not answer.will_close
        busy.request("GET", "/")
        child.wait_output("request\nrequest\n")  # the app holds the second one for a while
        os.kill(child.pid, signal.SIGTERM)
        answer = busy.getresponse()
        assert answer.read() == f"hello {child.pid}\n".encode()
        assert answer.getheader("Connection") == "close"
        assert idle.sock is not None
        idle.sock.settimeout(5)
        assert idle.sock.recv(1) == b""  # the idle kept-alive connection was closed
        assert child.wait_exit(timeout=3) == 0
    finally:
        idle.close()
        busy.close()


def test_drain_serves_a_connection_accepted_just_before_the_signal(spawn_node: Spawn,
                                                                  listener: socket.socket) -> None:
    # A connection accepted before the drain whose first request comes after it: the
    # drain leaves it open for the idle grace, and the request that then arrives is
    # served and told to close before the app's handler answers it.
    port = port_of(listener)
    child = shared_instance(spawn_node, listener)
    before = socket_fd_count(child.pid)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        wait_until(lambda: (socket_fd_count(child.pid) > before, socket_fd_count(child.pid)),
                   timeout=5, what="node accepting the connection")
        inode = fd_inode(child.pid, listener.fileno())
        os.kill(child.pid, signal.SIGTERM)
        wait_until(lambda: (fd_inode(child.pid, listener.fileno()) != inode, None), timeout=5,
                   what="node closing its copy of the listening socket")
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nConnection: close\r\n" in reply
    assert reply.endswith(f"hello {child.pid}\n".encode())
    assert child.wait_exit(timeout=3) == 0


def test_drain_answers_the_next_request_on_an_idle_kept_alive_connection(
        spawn_node: Spawn, listener: socket.socket) -> None:
    # The race a reload under keep-alive load loses: the connection is idle between a
    # response and the client's next request when the drain begins. Closing idle
    # connections at once resets that request; the drain must answer it, with
    # `Connection: close`, and then close.
    child = shared_instance(spawn_node, listener)
    with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=5) as conn:
        conn.sendall(REQUEST)
        head, body, rest = read_response(conn)
        assert body == f"hello {child.pid}\n".encode() and not says_close(head)
        sigterm_and_wait_drain(child, listener)  # the drain began while the connection was idle
        conn.sendall(REQUEST)
        head, body, rest = read_response(conn, rest)
        assert head.startswith(b"HTTP/1.1 200 ") and says_close(head), head
        assert body == f"hello {child.pid}\n".encode() and rest == b""
        assert conn.recv(1) == b""  # closed after the response, not reset
    assert child.wait_exit(timeout=3) == 0


def test_drain_closes_a_silent_kept_alive_connection_after_the_grace(
        spawn_node: Spawn, listener: socket.socket) -> None:
    child = shared_instance(spawn_node, listener)
    with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=5) as conn:
        conn.sendall(REQUEST)
        read_response(conn)
        signalled = time.monotonic()
        sigterm_and_wait_drain(child, listener)
        conn.settimeout(IDLE_GRACE_S / 2)
        with pytest.raises(TimeoutError):
            conn.recv(1)  # still open a while after the drain began
        conn.settimeout(5)
        assert conn.recv(1) == b""
        closed = time.monotonic() - signalled
    assert IDLE_GRACE_S * 0.9 < closed < IDLE_GRACE_S + 1.0
    assert child.wait_exit(timeout=3) == 0


def test_drain_serves_a_request_that_arrives_slowly(spawn_node: Spawn, listener: socket.socket) -> None:
    # Bytes of a request whose headers are not complete yet keep the connection from
    # counting as silent, though Node has no request (nor response) for it yet.
    child = shared_instance(spawn_node, listener)
    with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=5) as conn:
        conn.sendall(REQUEST)
        read_response(conn)
        sigterm_and_wait_drain(child, listener)
        for byte in REQUEST[:-1]:  # the whole request takes 3x the grace to arrive
            conn.sendall(bytes([byte]))
            # Nothing comes back (no close, no reset) while the request is incomplete.
            assert select.select([conn], [], [], 3 * IDLE_GRACE_S / len(REQUEST))[0] == []
        conn.sendall(REQUEST[-1:])
        head, body, _ = read_response(conn)
        assert says_close(head) and body == f"hello {child.pid}\n".encode()
    assert child.wait_exit(timeout=3) == 0


class BackToBackClient(threading.Thread):
    """A keep-alive client that sends its next request the moment a response is read,
    never retries, and reconnects only when a response says `Connection: close`."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stopping = threading.Event()
        self.pid: int | None = None  # the instance serving its current connection
        self.answers: dict[int, int] = {}
        self.closes: dict[int, int] = {}  # responses that said `Connection: close`
        self.failures: list[str] = []

    def run(self) -> None:
        conn: socket.socket | None = None
        rest = b""
        while not self.stopping.is_set():
            try:
                if conn is None:
                    conn, rest = socket.create_connection(("127.0.0.1", self.port), timeout=5), b""
                conn.sendall(REQUEST)
                head, body, rest = read_response(conn, rest)
                self.pid = int(body.split()[1])
                self.answers[self.pid] = self.answers.get(self.pid, 0) + 1
                if says_close(head):
                    self.closes[self.pid] = self.closes.get(self.pid, 0) + 1
                    conn.close()
                    conn, self.pid = None, None
            except (OSError, ValueError) as exc:  # ConnectionError, a timeout, a bad body
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn, self.pid = None, None
        if conn is not None:
            conn.close()


def test_drain_resets_no_back_to_back_keep_alive_request(spawn_node: Spawn,
                                                        listener: socket.socket) -> None:
    # Without retries: each reset is a failed request. The victim holds some of the
    # connections, each between two requests for only the client's turnaround.
    victim = shared_instance(spawn_node, listener)
    survivor = shared_instance(spawn_node, listener)
    clients: list[BackToBackClient] = []

    def on_victim() -> int:
        return sum(client.pid == victim.pid for client in clients)

    try:
        def both_loaded() -> tuple[bool, list[int | None]]:
            pids = [client.pid for client in clients]
            if len(clients) < 24 and (not clients or clients[-1].answers):
                clients.append(BackToBackClient(port_of(listener)))
                clients[-1].start()
            return on_victim() >= 2 and survivor.pid in pids, pids

        wait_until(both_loaded, timeout=10, what="kept-alive connections on both instances")
        os.kill(victim.pid, signal.SIGTERM)
        assert victim.wait_exit(timeout=4) == 0
        served = sum(sum(client.answers.values()) for client in clients)
        wait_until(lambda: (sum(sum(c.answers.values()) for c in clients) > served + 200, None),
                   timeout=5, what="the survivor serving the load")
    finally:
        for client in clients:
            client.stopping.set()
        for client in clients:
            client.join(10)
    failures = [failure for client in clients for failure in client.failures]
    assert failures == []
    assert sum(client.closes.get(victim.pid, 0) for client in clients) >= 2  # told, not cut


def test_drain_gives_up_at_90_percent_of_the_kill_timeout(spawn_node: Spawn,
                                                         listener: socket.socket) -> None:
    child = shared_instance(spawn_node, listener, app="node_slow.js",
                            env={"DELAY_MS": "60000", "LOG_REQUESTS": "1", "PMX_KILL_TIMEOUT_MS": "1000"})
    with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        child.wait_output("request")  # answered in a minute: the drain cannot finish
        started = time.monotonic()
        os.kill(child.pid, signal.SIGTERM)
        assert child.wait_exit(timeout=5) == 0
    assert 0.8 < time.monotonic() - started < 2.5


def test_without_ipc_channel_listens_are_still_redirected_and_drained(spawn_node: Spawn,
                                                                      listener: socket.socket) -> None:
    port = port_of(listener)
    child = spawn_node("node_hello.js", sockets=[("inet", "127.0.0.1", port, listener)],
                       env={"PORT": str(port)}, channel=False)
    wait_until(lambda: (get_pid_or_none(port) == child.pid, get_pid_or_none(port)), timeout=5,
               what="the app serving on the inherited socket")
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait_exit() == 0


@pytest.mark.parametrize("once", ["0", "1"], ids=["on", "once"])
def test_app_with_its_own_sigterm_handler_is_left_alone(spawn_node: Spawn, listener: socket.socket,
                                                        once: str) -> None:
    child = shared_instance(spawn_node, listener, app="node_own_handler.js", env={"ONCE": once})
    os.kill(child.pid, signal.SIGTERM)
    child.wait_output("got SIGTERM, staying up")
    assert get_pid(port_of(listener)) == child.pid
    assert child.is_running()
    if once == "1":
        # Its handler is gone now: the next SIGTERM is the preload's to drain.
        os.kill(child.pid, signal.SIGTERM)
        assert child.wait_exit() == 0


def test_sigterm_with_no_server_left_kills_by_sigterm(spawn_node: Spawn) -> None:
    child = spawn_node("node_listen_then_close.js", env={"PORT": str(free_port()), "STAY": "1"})
    assert child.message()["pmx"] == "listening"
    child.wait_output("closed")
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait_exit() == -signal.SIGTERM


def test_channel_does_not_keep_an_app_alive(spawn_node: Spawn) -> None:
    child = spawn_node("node_listen_then_close.js", env={"PORT": str(free_port())})
    assert child.message()["pmx"] == "listening"
    assert child.wait_exit() == 0


# --- PM2's 'shutdown' message ----------------------------------------------------------


def test_shutdown_message_drains_and_exits_0(spawn_node: Spawn, listener: socket.socket) -> None:
    child = shared_instance(spawn_node, listener)
    with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"hello" in conn.recv(4096)  # a kept-alive connection, idle from now on
        child.send("shutdown")
        assert child.wait_exit(timeout=3) == 0
        assert conn.recv(1) == b""


def test_shutdown_message_is_left_to_an_app_listening_for_messages(spawn_node: Spawn) -> None:
    child = spawn_node("node_listen_then_close.js", env={"PORT": str(free_port()), "ECHO": "1"})
    assert child.message()["pmx"] == "listening"
    child.wait_output("closed")
    child.send("shutdown")
    assert child.message() == {"echo": "shutdown"}
    # Its server is closed: only its own 'message' listener keeps it alive, as in plain Node.
    child.send("ping")
    assert child.message() == {"echo": "ping"}
    assert child.channel is not None
    child.channel.shutdown(socket.SHUT_WR)  # the daemon goes away: the channel disconnects
    assert child.wait_exit() == 0


def test_shutdown_message_reaches_the_apps_sigterm_handler(spawn_node: Spawn,
                                                           listener: socket.socket) -> None:
    child = shared_instance(spawn_node, listener, app="node_own_handler.js")
    child.send("shutdown")
    child.wait_output("got SIGTERM, staying up")
    assert get_pid(port_of(listener)) == child.pid


def test_shutdown_message_with_no_server_kills_by_sigterm(spawn_node: Spawn) -> None:
    child = spawn_node("node_listen_then_close.js", env={"PORT": str(free_port()), "STAY": "1"})
    assert child.message()["pmx"] == "listening"
    child.wait_output("closed")
    child.send("shutdown")
    assert child.wait_exit() == -signal.SIGTERM


@pytest.mark.parametrize(("close", "returncode"), [("0", 0), ("1", -signal.SIGTERM)],
                         ids=["serving", "server-closed"])
def test_signal_exit_listeners_are_not_the_apps_own(spawn_node: Spawn, listener: socket.socket,
                                                    close: str, returncode: int) -> None:
    # signal-exit waits for every other listener to be gone; if the preload waited for it
    # too, only SIGKILL would stop the app.
    child = shared_instance(spawn_node, listener, app="node_signal_exit_like.js", env={"CLOSE": close})
    if close == "1":
        child.wait_output("closed")
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait_exit() == returncode
