"""Protocol fuzz against a real pmxd (issue 9, check 4), and the CLI against a fake daemon.

Every answerable request gets exactly one reply within 1 s: a well-formed error with a
code string (never "internal", which means a bug in a handler) and no traceback. Exactly
one: after the reply, a "fence" ping on the same connection must be the next reply.
Afterwards the daemon still answers and its memory has not grown.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pmx.supervisor.options import OPTIONS
from pmx.supervisor.protocol import MAX_MESSAGE_BYTES, Command

from tests.conftest import CLI, Pmx, make_home
from tests.integration.hostile_helpers import daemon_pid, ping_ok, rss

# When a generated example fails, Hypothesis's pytest plugin imports its patch writer
# (libcst, which imports the deprecated mypy_extensions.TypedDict); under the project's
# `filterwarnings = error` that DeprecationWarning turns the failure report into a pytest
# INTERNALERROR. Import it once here, quietly, so that failures are reported normally.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REPLY_WITHIN_S = 1.0
RSS_GROWTH_LIMIT = 20 * 1024 * 1024
# kill ends the daemon and update replaces it: both are tested on their own.
SAFE_COMMANDS = [c.value for c in Command if c not in (Command.KILL, Command.UPDATE)]

Context = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Pmx]:
    """One pmxd for the whole module, with the same clean-up as the pmx fixture."""
    home = make_home()
    pmx = Pmx(home)
    try:
        pmx.start_daemon()
        yield pmx
    finally:
        problems = pmx.cleanup()
        shutil.rmtree(home, ignore_errors=True)
        if problems:
            pytest.fail("teardown: " + "; ".join(problems))


@pytest.fixture(scope="module")
def baseline_rss(daemon: Pmx) -> int:
    # Warm up the paths the fuzz uses (a big message, many connections) before measuring.
    with zmq.Context() as context:
        for _ in range(20):
            exchange(context, daemon.home, [b"x" * (MAX_MESSAGE_BYTES + 100)])
    return rss(daemon_pid(daemon))


@pytest.fixture(scope="module")
def context(daemon: Pmx, baseline_rss: int) -> Iterator[Context]:
    """The fuzz's zmq context; requesting it takes the RSS baseline before any fuzz."""
    ctx: Context = zmq.Context()
    # An app "fz" for the fuzz to aim at: its program does not exist, so it stays errored
    # and nothing runs, but commands on it (scale, restart, reload) reach their handlers.
    reply = exchange(ctx, daemon.home, [json.dumps({"v": 1, "id": "fz", "cmd": "start", "args": {
        "apps": [{"name": "fz", "script": "/nonexistent/pmx-fuzz"}]}}).encode()])
    assert reply["ok"] is True and reply["result"]["errors"], reply
    yield ctx
    ctx.destroy(linger=0)


def exchange(context: Context, home: Path, frames: list[bytes]) -> dict[str, Any]:
    """Send `frames` as one message; its one reply (fails on none or on a second one)."""
    __tracebackhide__ = True
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{home / 'rpc.sock'}")
        sock.send_multipart(frames)
        shown = repr(frames)[:300]
        assert sock.poll(int(REPLY_WITHIN_S * 1000)), f"no reply within 1 s to {shown}"
        first = sock.recv_multipart()
        assert len(first) == 1, f"reply of {len(first)} frames to {shown}"
        fence = f"fence-{uuid.uuid4().hex[:8]}"
        sock.send(json.dumps({"v": 1, "id": fence, "cmd": "ping"}).encode())
        extra = []
        deadline = time.monotonic() + 5
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and sock.poll(int(remaining * 1000)), "fence ping not answered"
            reply = json.loads(sock.recv())
            if reply.get("id") == fence:
                break
            extra.append(reply)
        assert extra == [], f"more than one reply to {shown}"
        body = json.loads(first[0])
        assert isinstance(body, dict)
        return body
    finally:
        sock.close(linger=0)


def assert_error(reply: dict[str, Any], *, code: str | None = None,
                 request_id: str | None = None) -> None:
    __tracebackhide__ = True
    assert reply.get("v") == 1 and reply.get("ok") is False, reply
    error = reply.get("error")
    assert isinstance(error, dict), reply
    assert isinstance(error.get("code"), str) and error["code"], reply
    assert error["code"] != "internal", f"a handler crashed: {reply}"
    assert isinstance(error.get("message"), str) and error["message"], reply
    assert "\n" not in error["message"], reply
    assert "Traceback" not in json.dumps(reply), reply
    if code is not None:
        assert error["code"] == code, reply
    if request_id is not None:
        assert reply["id"] == request_id, reply


def assert_answered(reply: dict[str, Any]) -> None:
    """A valid request whose outcome is not the point: a well-formed reply, no crash."""
    __tracebackhide__ = True
    if reply.get("ok") is True:
        assert reply.get("v") == 1 and isinstance(reply.get("result"), dict), reply
    else:
        assert_error(reply)


def valid_envelope(data: bytes) -> bool:
    """Our own oracle: is this frame a well-formed request (which may succeed)?"""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return (isinstance(body, dict) and body.get("v") == 1 and body.get("v") is not True
            and isinstance(body.get("id"), str) and 0 < len(body["id"]) <= 64
            and body.get("cmd") in [*SAFE_COMMANDS, "kill"]
            and isinstance(body.get("args", {}), dict) and set(body) <= {"v", "id", "cmd", "args"})


# ---------------------------------------------------------------- strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
not_str = json_values.filter(lambda v: not isinstance(v, str))
not_int_or_str = json_values.filter(lambda v: not isinstance(v, str | int))
strange_digits = st.sampled_from(["\u00b2", "\u2460", "+\u00b2", "-\u00b3", "\u0663", "1\u00b2"])
ids = st.text(min_size=1, max_size=64).filter(lambda s: not s.startswith("fence-"))

# App tables as a client would send them, with wrong types everywhere. What could make a
# real process or a socket (script, interpreter, listen, port, exec_mode) is never a
# usable string: nothing the fuzz sends can start a program or bind an address.
UNSAFE_KEYS = {"script", "interpreter", "interpreter_args", "listen", "port", "exec_mode"}
app_tables = st.fixed_dictionaries(
    {"name": st.sampled_from(["fz", "__class__", "all", "1", ""]) | json_values,
     "script": st.just("/nonexistent/pmx-fuzz") | not_str},
    optional={option.name: (not_int_or_str if option.name in UNSAFE_KEYS else json_values)
              for option in OPTIONS if option.name not in ("name", "script")},
)
arg_values = (json_values | strange_digits | st.sampled_from(["all", "fz", "0", "+1", "-1"])
              | st.lists(app_tables, max_size=3))
arg_objects = st.dictionaries(
    st.sampled_from(["target", "count", "apps", "base_env", "update_env", "force",
                     "show_secrets"]) | st.text(max_size=8),
    arg_values, max_size=4)


# ---------------------------------------------------------------- the fuzz


@FUZZ
@given(data=st.binary(max_size=512))
@example(data=b"")
@example(data=b"\x00")
@example(data=b"null")
@example(data=b"{}")
def test_random_bytes_get_one_error_reply(daemon: Pmx, context: Context, data: bytes) -> None:
    assert_one_fitting_reply(context, daemon.home, data)


def assert_one_fitting_reply(context: Context, home: Path, data: bytes) -> None:
    """A valid envelope is answered (ok or a command error); anything else is an error."""
    __tracebackhide__ = True
    reply = exchange(context, home, [data])
    if valid_envelope(data):
        assert_answered(reply)
    else:
        assert_error(reply)


@FUZZ
@given(value=json_values)
def test_random_json_values_get_one_error_reply(daemon: Pmx, context: Context,
                                                value: object) -> None:
    data = json.dumps(value).encode()
    assert_one_fitting_reply(context, daemon.home, data)


@FUZZ
@given(body=st.fixed_dictionaries(
    {}, optional={"v": st.just(1) | json_values, "id": ids | json_values,
                  "cmd": st.sampled_from(SAFE_COMMANDS) | json_values,
                  "args": arg_objects | json_values, "extra": json_values}))
def test_envelopes_with_wrong_types_get_one_error_reply(daemon: Pmx, context: Context,
                                                        body: dict[str, object]) -> None:
    data = json.dumps(body).encode()
    assert_one_fitting_reply(context, daemon.home, data)


@FUZZ
@given(cmd=st.sampled_from(["__class__", "__init__", "__dict__", "__getattribute__",
                            "__call__", "cmd_kill", "cmd_ping", "_resolve", "_stop_all",
                            "PING", "Ping", " ping", "ping ", "ping\x00", "kill\x00", "KILL",
                            "mro", "run", "loop", "control", "handlers", ""])
       | st.text(max_size=100).filter(lambda c: c not in [*SAFE_COMMANDS, "kill"]),
       request_id=ids)
def test_unknown_commands_and_attribute_names_are_refused(daemon: Pmx, context: Context,
                                                          cmd: str, request_id: str) -> None:
    data = json.dumps({"v": 1, "id": request_id, "cmd": cmd, "args": {}}).encode()
    reply = exchange(context, daemon.home, [data])
    assert_error(reply, code="unknown_command", request_id=request_id)


@FUZZ
@given(version=st.sampled_from([0, 2, -1, 1.5, "1", True, None, [1], {"v": 1}, 10**30])
       | json_values.filter(lambda v: v != 1))
def test_wrong_versions_are_refused_with_the_request_id(daemon: Pmx, context: Context,
                                                        version: object) -> None:
    data = json.dumps({"v": version, "id": "versioned", "cmd": "ping"}).encode()
    reply = exchange(context, daemon.home, [data])
    assert_error(reply, code="bad_version", request_id="versioned")


@FUZZ
@given(cmd=st.sampled_from(SAFE_COMMANDS), args=arg_objects, request_id=ids)
@example(cmd="stop", args={"target": "\u00b2"}, request_id="sup")
@example(cmd="describe", args={"target": "\u2460"}, request_id="circled")
@example(cmd="scale", args={"target": "fz", "count": "\u00b2"}, request_id="scale")
def test_known_commands_with_wrong_argument_types_never_crash_a_handler(
        daemon: Pmx, context: Context, cmd: str, args: dict[str, object], request_id: str) -> None:
    data = json.dumps({"v": 1, "id": request_id, "cmd": cmd, "args": args}).encode()
    reply = exchange(context, daemon.home, [data])
    assert_answered(reply)
    assert reply["id"] == request_id, reply


@FUZZ
@given(depth=st.integers(0, 3000) | st.sampled_from([900, 950, 960, 970, 975, 980, 990, 999,
                                                     1000, 1001, 5000, 100_000]),
       where=st.sampled_from(["top", "v", "id", "cmd", "args", "target"]),
       objects=st.booleans())
def test_deep_nesting_gets_one_error_reply(daemon: Pmx, context: Context, depth: int,
                                           where: str, objects: bool) -> None:
    nested = '{"a":' * depth + "1" + "}" * depth if objects else "[" * depth + "]" * depth
    fields = {"v": "1", "id": '"deep"', "cmd": '"describe"', "args": '{"target":"x"}'}
    if where == "target":
        fields["args"] = '{"target":' + nested + "}"
    elif where != "top":
        fields[where] = nested
    body = nested if where == "top" else "{" + ",".join(f'"{k}":{v}' for k, v in
                                                        fields.items()) + "}"
    reply = exchange(context, daemon.home, [body.encode()])
    assert_error(reply)


@FUZZ
@given(bad=st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xc0\xaf",
                            b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]),
       position=st.integers(0, 40))
def test_invalid_utf8_gets_bad_json(daemon: Pmx, context: Context, bad: bytes,
                                    position: int) -> None:
    good = b'{"v":1,"id":"utf","cmd":"ping","args":{}}'
    position = min(position, len(good))
    reply = exchange(context, daemon.home, [good[:position] + bad + good[position:]])
    assert_error(reply, code="bad_json")


@FUZZ
@given(frames=st.lists(st.binary(max_size=64), min_size=2, max_size=5))
@example(frames=[b"", b'{"v":1,"id":"req-style","cmd":"ping"}'])
def test_multi_frame_messages_get_one_error_reply(daemon: Pmx, context: Context,
                                                  frames: list[bytes]) -> None:
    reply = exchange(context, daemon.home, frames)
    assert_error(reply, code="bad_field")


def test_message_just_over_the_limit_gets_too_large(daemon: Pmx, context: Context) -> None:
    data = b'{"v":1,"id":"big","cmd":"ping","args":{"pad":"' + b"x" * MAX_MESSAGE_BYTES + b'"}}'
    assert len(data) <= MAX_MESSAGE_BYTES + 4096  # under libzmq's limit: pmxd itself refuses
    reply = exchange(context, daemon.home, [data])
    assert_error(reply, code="too_large")


def test_oversize_message_drops_the_connection_and_the_daemon_carries_on(
        daemon: Pmx, context: Context) -> None:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{daemon.home / 'rpc.sock'}")
        sock.send(b"[" * (3 * 1024 * 1024))  # over MAXMSGSIZE: libzmq drops the connection
        if sock.poll(1000):  # a reply is allowed, but then it must be an error
            assert_error(json.loads(sock.recv()))
    finally:
        sock.close(linger=0)
    assert ping_ok(daemon.home, timeout=REPLY_WITHIN_S)
    assert "is up" in daemon.run("ping").stdout


def test_zz_daemon_answers_and_memory_is_bounded_after_the_fuzz(
        daemon: Pmx, baseline_rss: int) -> None:
    assert ping_ok(daemon.home, timeout=REPLY_WITHIN_S)
    grown = rss(daemon_pid(daemon)) - baseline_rss
    assert grown < RSS_GROWTH_LIMIT, f"pmxd's RSS grew by {grown / 2**20:.1f} MiB over the fuzz"


def test_zz_no_handler_crashed_during_the_fuzz(daemon: Pmx) -> None:
    log = (daemon.home / "pmxd.log").read_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 200:][:3000]


# ---------------------------------------------------------------- the CLI against a fake daemon


Behaviour = Callable[[bytes], list[bytes] | None]  # request frame -> reply frames, or silence


class FakeDaemon:
    """A ROUTER at HOME/rpc.sock that answers every request the way it is told to."""

    def __init__(self, home: Path, behaviour: Behaviour) -> None:
        self.home = home
        self.behaviour = behaviour
        self.requests = 0
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeDaemon:
        self._thread.start()
        assert self._bound.wait(10), "the fake daemon did not bind"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _serve(self) -> None:
        with zmq.Context() as context, context.socket(zmq.ROUTER) as sock:
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(f"ipc://{self.home / 'rpc.sock'}")
            # Look like a running pmxd: the CLI takes a socket without a pid file as stale.
            (self.home / "pmxd.pid").write_text(f"{os.getpid()}\n")
            self._bound.set()
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                identity, *frames = sock.recv_multipart()
                self.requests += 1
                reply = self.behaviour(frames[-1])
                if reply is not None:
                    sock.send_multipart([identity, *reply])


def request_id(frame: bytes) -> str:
    try:
        return str(json.loads(frame)["id"])
    except (ValueError, KeyError, TypeError):
        return ""


def reply_with(body: Callable[[str], object]) -> Behaviour:
    return lambda frame: [json.dumps(body(request_id(frame))).encode()]


FAKES: dict[str, Behaviour] = {
    "invalid utf-8": lambda frame: [b"\xff\xfe garbage \x00"],
    "not json": lambda frame: [b"hello, I am not pmxd"],
    "json array": lambda frame: [b"[1, 2, 3]"],
    "empty frame": lambda frame: [b""],
    "several frames": lambda frame: [b"junk", b"more junk", b"\x00"],
    "object, not a reply": reply_with(lambda rid: {"hello": "world"}),
    "wrong version": reply_with(lambda rid: {"v": 99, "id": rid, "ok": True, "result": {}}),
    "ok not a boolean": reply_with(lambda rid: {"v": 1, "id": rid, "ok": "yes"}),
    "result not an object": reply_with(lambda rid: {"v": 1, "id": rid, "ok": True,
                                                    "result": [1]}),
    "error not an object": reply_with(lambda rid: {"v": 1, "id": rid, "ok": False,
                                                   "error": "boom"}),
    "huge garbage": lambda frame: [b"\x00" * (4 * 1024 * 1024)],
}
SLOW_FAKES: dict[str, Behaviour] = {
    "silence": lambda frame: None,
    "replies to another request": reply_with(lambda rid: {"v": 1, "id": "someone-else",
                                                          "ok": True, "result": {}}),
}
CLI_TIMEOUT_S = 5.0
SLACK_S = 3.0  # interpreter start-up and a loaded machine


def run_against_fake(behaviour: Behaviour, command: str) -> tuple[subprocess.CompletedProcess[str],
                                                                  float, int]:
    home = make_home()
    try:
        with FakeDaemon(home, behaviour) as fake:
            env = Pmx(home).env
            began = time.monotonic()
            result = subprocess.run([*CLI, command], env=env, capture_output=True, text=True,
                                    timeout=60)
            return result, time.monotonic() - began, fake.requests
    finally:
        shutil.rmtree(home, ignore_errors=True)


def assert_one_line_failure(result: subprocess.CompletedProcess[str], took: float,
                            requests: int) -> None:
    __tracebackhide__ = True
    assert requests >= 1, "the CLI never reached the fake daemon"
    assert result.returncode != 0, result
    assert result.stdout == "", result
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("pmx: "), result.stderr
    assert "Traceback" not in result.stderr
    assert took < CLI_TIMEOUT_S + SLACK_S, f"took {took:.1f}s"


@pytest.mark.parametrize("command", ["ping", "list"])
@pytest.mark.parametrize("fake", list(FAKES))
def test_cli_facing_a_garbage_daemon_fails_in_one_line(fake: str, command: str) -> None:
    assert_one_line_failure(*run_against_fake(FAKES[fake], command))


@pytest.mark.slow
@pytest.mark.parametrize("fake", list(SLOW_FAKES))
def test_cli_facing_a_daemon_that_never_answers_it_times_out_in_one_line(fake: str) -> None:
    result, took, requests = run_against_fake(SLOW_FAKES[fake], "ping")
    assert_one_line_failure(result, took, requests)
    assert "did not answer" in result.stderr
    assert took >= CLI_TIMEOUT_S - 0.5


def test_cli_shows_a_hostile_error_message_on_one_line_without_escapes() -> None:
    hostile = reply_with(lambda rid: {"v": 1, "id": rid, "ok": False, "error": {
        "code": "failed", "message": "first line\nsecond line \x1b[2J\x1b]0;pwned\x07"}})
    result, took, requests = run_against_fake(hostile, "ping")
    assert_one_line_failure(result, took, requests)
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
