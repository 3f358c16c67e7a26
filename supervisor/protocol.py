"""The control protocol between pmxd and its clients: the one contract both sides import.

Transport: two ZeroMQ sockets in the daemon's home.

* `rpc.sock`, a ROUTER: a client's DEALER sends one frame, a JSON request; the daemon
  answers with exactly one frame, a JSON reply carrying the request's id.
* `pub.sock`, a PUB: two frames, a topic and a JSON body; a log publication has a third,
  its lines as raw bytes (see below). An app's topics end with
  ":", a character app names cannot hold, because subscriptions match byte prefixes:
  "log.api:" must match neither "log.api-v2:" nor "log.api.v2:". "log." gets every app.

Examples (version 1)::

    request  {"v": 1, "id": "7f3a", "cmd": "stop", "args": {"target": "api"}}
    reply    {"v": 1, "id": "7f3a", "ok": true, "result": {"stopped": ["api"], "errors": [],
              "results": [{"target": "api", "ok": true}]}}
    error    {"v": 1, "id": "7f3a", "ok": false,
              "error": {"code": "not_found", "message": "no app or id \\"apj\\""}}
    event    event.api:   {"kind": "state", "app": "api", "id": 0, "instance": 0,
                           "pid": 4242, "state": "online", "reason": "started", "time": 1.7e9}
    log      log.api:     {"app": "api", "id": 0, "instance": 0, "stream": "out", "seq": 41}
                          b"listening on 8000\n"   (decode_publication gives "lines": [...])
    stats    stats.       {"time": 1.7e9, "instances": [{"id": 0, "cpu": 1.5, "memory": 31457280}]}

A log publication's lines are the bytes of the app's log file, newline-ended: pmxd never
decodes or escapes them (that cost more than the app's own writing); the subscriber
decodes them, invalid UTF-8 replaced, into the body's "lines". It holds at most
MAX_PUBLICATION_BYTES of lines (a batch is cut between lines), so that
the PUB socket's high-water mark, counted in messages, bounds in bytes what pmxd queues for
a subscriber that does not read (PUBLISH_BUDGET_BYTES): past it, that subscriber loses
messages. "seq" numbers the lines of each app (the first line of this message), so that a
subscriber sees a gap and can say how many lines it lost (`DroppedLines`).

`decode_request` checks the whole envelope before anything is dispatched and raises
ProtocolError with its own code for each kind of damage.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Mapping

from .errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1024 * 1024

# A JSON value (what json.loads can return).
Json = None | bool | int | float | str | list["Json"] | dict[str, "Json"]
JsonObject = dict[str, Json]


class Command(enum.StrEnum):
    PING = "ping"
    LIST = "list"
    DESCRIBE = "describe"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    RELOAD = "reload"
    DELETE = "delete"
    SCALE = "scale"
    FLUSH = "flush"
    SAVE = "save"
    RESURRECT = "resurrect"
    KILL = "kill"
    UPDATE = "update"
    RESET = "reset"
    SIGNAL = "signal"


class ErrorCode(enum.StrEnum):
    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    BAD_VERSION = "bad_version"
    BAD_FIELD = "bad_field"
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGS = "bad_args"
    NOT_FOUND = "not_found"
    BUSY = "busy"
    FAILED = "failed"
    DENIED = "denied"
    INTERNAL = "internal"


class Request:
    """One request: a command, its arguments and an id for matching the reply.

    A plain class rather than a dataclass or a NamedTuple: `pmx list` imports this
    module, and dataclasses (with inspect) or typing would add milliseconds to every
    short command."""

    __slots__ = ("args", "command", "id")

    def __init__(self, command: Command, args: JsonObject | None = None,
                 id: str | None = None) -> None:
        self.command = command
        self.args: JsonObject = {} if args is None else args
        self.id = id if id is not None else os.urandom(6).hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and (self.command, self.args, self.id) == \
            (other.command, other.args, other.id)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Request({self.command!r}, {self.args!r}, {self.id!r})"


class Reply:
    """One reply: to the request with `id`, its result, or an error's code and message.
    A plain class for the same reason as Request (typing's NamedTuple costs an import)."""

    __slots__ = ("error_code", "error_message", "id", "ok", "result")

    def __init__(self, id: str, ok: bool, result: JsonObject,
                 error_code: str = "", error_message: str = "") -> None:
        self.id, self.ok, self.result = id, ok, result
        self.error_code, self.error_message = error_code, error_message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reply) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Reply({self.id!r}, {self.ok!r}, {self.result!r}, {self.error_code!r})"


def encode_request(request: Request) -> bytes:
    body = {"v": PROTOCOL_VERSION, "id": request.id, "cmd": request.command.value,
            "args": request.args}
    return json.dumps(body, separators=(",", ":")).encode()


def _loads(data: bytes, request_id: str | None = None) -> JsonObject:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(data)} bytes is over the "
                            f"{MAX_MESSAGE_BYTES} byte limit")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_JSON, "message is not valid UTF-8") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_JSON, "message is nested too deeply") from None
    except ValueError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"message is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.NOT_OBJECT,
                            f"message must be a JSON object, got {type(value).__name__}")
    return value


def decode_request(data: bytes) -> Request:
    """Parse and check one request frame. Raises ProtocolError (with the id when known)."""
    body = _loads(data)
    raw_id = body.get("id")
    request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 64 else None
    version = body.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(ErrorCode.BAD_VERSION,
                            f"protocol version {version!r} is not supported (this daemon "
                            f"speaks {PROTOCOL_VERSION})", request_id)
    if request_id is None:
        raise ProtocolError(ErrorCode.BAD_FIELD, '"id" must be a string of 1 to 64 characters')
    cmd = body.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError(ErrorCode.BAD_FIELD, '"cmd" must be a string', request_id)
    try:
        command = Command(cmd)
    except ValueError:
        shown = cmd if len(cmd) <= 40 else cmd[:37] + "..."
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {shown!r}",
                            request_id) from None
    args = body.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(ErrorCode.BAD_FIELD, '"args" must be an object', request_id)
    extra = set(body) - {"v", "id", "cmd", "args"}
    if extra:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"unknown field {sorted(extra)[0]!r}", request_id)
    return Request(command, args, request_id)


def encode_reply(reply: Reply) -> bytes:
    body: JsonObject = {"v": PROTOCOL_VERSION, "id": reply.id, "ok": reply.ok}
    if reply.ok:
        body["result"] = reply.result
    else:
        body["error"] = {"code": reply.error_code, "message": reply.error_message}
    return json.dumps(body, separators=(",", ":")).encode()


def error_reply(request_id: str | None, code: str, message: str) -> Reply:
    return Reply(request_id or "", False, {}, str(code), message)


def decode_reply(data: bytes) -> Reply:
    """Parse a reply frame (client side). Raises ProtocolError on anything malformed."""
    body = _loads(data)
    reply_id, ok = body.get("id"), body.get("ok")
    if body.get("v") != PROTOCOL_VERSION or not isinstance(reply_id, str) or not isinstance(ok, bool):
        raise ProtocolError(ErrorCode.BAD_FIELD, "the daemon's reply is not a pmx reply")
    if ok:
        result = body.get("result", {})
        if not isinstance(result, dict):
            raise ProtocolError(ErrorCode.BAD_FIELD, "the daemon's reply has no result object")
        return Reply(reply_id, True, result)
    error = body.get("error")
    if not isinstance(error, dict):
        raise ProtocolError(ErrorCode.BAD_FIELD, "the daemon's error reply has no error object")
    return Reply(reply_id, False, {}, str(error.get("code", "")), str(error.get("message", "")))


# ---------------------------------------------------------------- publish stream

EVENT_PREFIX = "event."
LOG_PREFIX = "log."
STATS_TOPIC = "stats."


def event_topic(app: str) -> str:
    return f"{EVENT_PREFIX}{app}:"


def log_topic(app: str) -> str:
    return f"{LOG_PREFIX}{app}:"


def encode_publication(topic: str, body: Mapping[str, object]) -> list[bytes]:
    return [topic.encode(), json.dumps(body, separators=(",", ":")).encode()]


def decode_publication(frames: list[bytes]) -> tuple[str, JsonObject]:
    """(topic, body). A log publication's lines come as a third frame of raw bytes (see
    encode_log_block): they are decoded here, into the body's "lines", one string each."""
    if len(frames) not in (2, 3):
        raise ProtocolError(ErrorCode.BAD_FIELD, "publication must have two or three frames")
    body = _loads(frames[1])
    if len(frames) == 3:
        lines = frames[2].decode("utf-8", "replace").split("\n")
        if lines[-1] == "":
            lines.pop()
        body["lines"] = list[Json](lines)
    return frames[0].decode("utf-8", "replace"), body


# What pmxd may queue for one subscriber that stops reading (a `pmx logs` suspended with
# Ctrl-Z): the PUB socket's high-water mark is counted in messages, so log publications
# are kept under a size and the mark is the budget over that size.
MAX_PUBLICATION_BYTES = 256 * 1024
PUBLISH_BUDGET_BYTES = 32 * 1024 * 1024
PUBLISH_HWM = PUBLISH_BUDGET_BYTES // MAX_PUBLICATION_BYTES


def encode_log_block(topic: str, head: Mapping[str, object], block: bytes,
                     seq: int) -> tuple[list[list[bytes]], int]:
    """An app's log lines, as they are in its log file (each ending in a newline), as
    publications of at most MAX_PUBLICATION_BYTES of lines, cut between lines: the topic,
    `head` with "seq" (the number of its first line) as JSON, and the lines as raw bytes,
    never decoded nor escaped by pmxd (a subscriber does that, decode_publication); and
    the seq of the line after them. A piece with no newline in MAX_PUBLICATION_BYTES (no
    log line is that long: logs.py cuts them at 64 KiB) is cut there and counts as a line."""
    name = topic.encode()
    out: list[list[bytes]] = []
    start = 0
    while start < len(block):
        end = len(block)
        if end - start > MAX_PUBLICATION_BYTES:
            end = block.rfind(b"\n", start, start + MAX_PUBLICATION_BYTES) + 1
            if end <= start:
                end = start + MAX_PUBLICATION_BYTES
        piece = block[start:end]
        count = piece.count(b"\n") + (0 if piece.endswith(b"\n") else 1)
        out.append([name, json.dumps({**head, "seq": seq}, separators=(",", ":")).encode(),
                    piece])
        seq += count
        start = end
    return out, seq


class DroppedLines:
    """A subscriber's count of the log lines it missed, from each publication's "seq":
    `missed(body)` is how many lines of the body's app went by unseen just before it."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def missed(self, body: Mapping[str, object]) -> int:
        app, seq, lines = body.get("app"), body.get("seq"), body.get("lines")
        if not isinstance(app, str) or not isinstance(seq, int) or not isinstance(lines, list):
            return 0
        expected = self._next.get(app)
        self._next[app] = seq + len(lines)
        # A seq below the expected one is a new pmxd counting from 0: nothing was lost.
        return seq - expected if expected is not None and seq > expected else 0
