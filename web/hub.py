"""What the dashboard shows, kept once per `pmx web` process, and its fan-out to browsers.

The feed (feed.py) delivers batches from its thread; `Hub.apply` runs on the event loop
(the one writer) and updates the model: the apps as `describe all` last gave them (env
secrets masked by pmxd), CPU and memory history per instance id for the sparklines, the
last events, the last log lines of each app, and counters of reload and memory-limit
events for /metrics. It sends each change once to every connected browser as a
server-sent event: `daemon`, `apps`, `stats`, `event`, `log`. A new browser first gets
`hello`, the whole model.

A browser that cannot keep up (its queue is full) is disconnected rather than slowing the
others or growing memory without bound; it reconnects and gets a fresh `hello`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field

from pmx.cli.monit_board import json_float, json_int, json_objects, json_str
from pmx.supervisor.protocol import EVENT_PREFIX, LOG_PREFIX, STATS_TOPIC, Json, JsonObject
from pmx.supervisor.states import RUNNING

from .feed import Batch

HISTORY_POINTS = 90  # one per stats message: a minute and a half at 1/s
MAX_EVENTS = 200
MAX_LOG_LINES = 300  # per app
MAX_LINE_CHARS = 4000  # pmxd splits lines at 64 KiB; a page shows the start of such a line
CLIENT_QUEUE = 2000  # messages a slow browser may lag behind before it is dropped
COUNTER_KINDS = {"reload": "reloaded_instances", "reload_failed": "reload_failures",
                 "memory_restart": "memory_restarts"}


@dataclass(eq=False, slots=True)
class Subscriber:
    """One browser's stream: encoded messages, then None when it must end."""

    queue: asyncio.Queue[bytes | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=CLIENT_QUEUE))

    def offer(self, message: bytes | None) -> bool:
        """Queue a message; False (and the stream ended) when the browser lags too far."""
        try:
            self.queue.put_nowait(message)
            return True
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return False


def sse(kind: str, data: Json) -> bytes:
    """One server-sent event. JSON never holds a raw newline, so one data line is enough."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Hub:
    """The dashboard's model and its subscribers; see the module docstring."""

    def __init__(self) -> None:
        self.daemon: JsonObject = {"reachable": False, "why": "connecting to pmxd"}
        self.apps: list[JsonObject] = []
        self.events: deque[JsonObject] = deque(maxlen=MAX_EVENTS)
        self.logs: dict[str, deque[JsonObject]] = {}
        self.history: dict[int, deque[tuple[float, int]]] = {}
        self.counters: dict[str, dict[str, int]] = {}
        self._apps_at = time.monotonic()
        self._subscribers: set[Subscriber] = set()

    # ------------------------------------------------------------ subscribers

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber()
        subscriber.offer(sse("hello", self.snapshot()))
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def close(self) -> None:
        """End every stream (shutting down)."""
        for subscriber in list(self._subscribers):
            subscriber.offer(None)
        self._subscribers.clear()

    def _send(self, kind: str, data: Json) -> None:
        if not self._subscribers:
            return
        message = sse(kind, data)
        for subscriber in list(self._subscribers):
            if not subscriber.offer(message):
                self._subscribers.discard(subscriber)

    # ------------------------------------------------------------ the model

    def snapshot(self) -> JsonObject:
        """Everything a page needs to draw itself (`hello`, and GET /api/state)."""
        history: JsonObject = {
            str(ident): {"cpu": [cpu for cpu, _ in points], "memory": [mem for _, mem in points]}
            for ident, points in self.history.items()}
        return {"daemon": self.daemon, "apps": self.current_apps(), "history": history,
                "events": list(self.events),
                "logs": {app: list(lines) for app, lines in self.logs.items()},
                "time": time.time()}

    def current_apps(self) -> list[Json]:
        """The apps with each running instance's uptime brought up to now."""
        elapsed = time.monotonic() - self._apps_at
        apps: list[Json] = []
        for app in self.apps:
            instances: list[Json] = []
            for inst in json_objects(app.get("instances")):
                if json_str(inst.get("status")) in RUNNING:
                    inst = {**inst, "uptime": round(json_float(inst.get("uptime")) + elapsed, 1)}
                instances.append(inst)
            apps.append({**app, "instances": instances})
        return apps

    def apply(self, batch: Batch) -> None:
        """Take one batch from the feed (on the event loop) and tell the browsers."""
        if batch.down is not None:
            self.daemon = {"reachable": False, "why": batch.down}
            self._add_event({"kind": "daemon", "app": "", "time": time.time(),
                             "text": f"daemon unreachable: {batch.down}"})
            self._send("daemon", self.daemon)
        if batch.restarted:
            self.history.clear()
        if batch.daemon is not None:
            was_down = not self.daemon.get("reachable")
            self.daemon = {"reachable": True, **batch.daemon}
            if was_down or batch.restarted:
                self._add_event({"kind": "daemon", "app": "", "time": time.time(),
                                 "text": f"connected to pmxd (pid {batch.daemon.get('pid')})"})
            self._send("daemon", self.daemon)
        for app, lines in batch.seed_logs.items():
            if not self.logs.get(app):
                self.logs[app] = deque(({**line, "app": app, "time": None,
                                         "line": _shorten(json_str(line.get("line")))}
                                        for line in lines), maxlen=MAX_LOG_LINES)
        for topic, body in batch.publications:
            if topic == STATS_TOPIC:
                self._take_stats(body)
            elif topic.startswith(EVENT_PREFIX):
                self._take_event(body)
            elif topic.startswith(LOG_PREFIX):
                self._take_log(body)
        for app, count in batch.skipped_lines.items():
            note: JsonObject = {"app": app, "label": app, "stream": "note", "time": time.time(),
                                "line": f"... {count:,} lines not shown (see pmx logs {app})"}
            self.logs.setdefault(app, deque(maxlen=MAX_LOG_LINES)).append(note)
            self._send("log", {"app": app, "lines": [note]})
        if batch.apps is not None:
            self._take_apps(batch.apps)

    def _take_apps(self, apps: list[JsonObject]) -> None:
        self.apps, self._apps_at = apps, time.monotonic()
        names = {json_str(app.get("name")) for app in apps}
        for name in names:
            self.counters.setdefault(name, dict.fromkeys(COUNTER_KINDS.values(), 0))
        ids = {json_int(inst.get("id")) for app in apps
               for inst in json_objects(app.get("instances"))}
        for gone in set(self.history) - ids:
            del self.history[gone]
        for gone_app in set(self.logs) - names:
            del self.logs[gone_app]
        self._send("apps", self.current_apps())

    def _take_stats(self, body: JsonObject) -> None:
        serving = {json_int(inst.get("id")): inst for app in self.apps
                   for inst in json_objects(app.get("instances")) if not inst.get("replacement")}
        samples: list[Json] = []
        for sample in json_objects(body.get("instances")):
            ident, pid = json_int(sample.get("id")), sample.get("pid")
            inst = serving.get(ident)
            if inst is None or inst.get("pid") != pid:
                continue  # a replacement, or a process the last describe did not know yet
            cpu, memory = json_float(sample.get("cpu")), json_int(sample.get("memory"))
            inst["cpu"], inst["memory"] = cpu, memory
            points = self.history.setdefault(ident, deque(maxlen=HISTORY_POINTS))
            points.append((cpu, memory))
            samples.append({"id": ident, "pid": pid, "cpu": cpu, "memory": memory})
        self._send("stats", {"time": json_float(body.get("time")), "instances": samples})

    def _take_event(self, body: JsonObject) -> None:
        kind, app = json_str(body.get("kind")), json_str(body.get("app"))
        if kind in COUNTER_KINDS:
            counts = self.counters.setdefault(app, dict.fromkeys(COUNTER_KINDS.values(), 0))
            counts[COUNTER_KINDS[kind]] += 1
        if kind == "state":
            label = f"{app}:{json_int(body.get('instance'))}"
            pid = body.get("pid")
            text = f"{label} {json_str(body.get('state'))}" + (f" (pid {pid})" if pid else "")
            reason = json_str(body.get("reason"))
            text += f": {reason}" if reason else ""
        else:
            text = json_str(body.get("message"), kind)
        record: JsonObject = {"kind": kind, "app": app, "time": json_float(body.get("time"),
                                                                            time.time()),
                              "text": text}
        for key in ("id", "instance", "pid", "state"):
            if key in body:
                record[key] = body[key]
        self._add_event(record)

    def _add_event(self, record: JsonObject) -> None:
        self.events.append(record)
        self._send("event", record)

    def _take_log(self, body: JsonObject) -> None:
        app = json_str(body.get("app"))
        stream = json_str(body.get("stream"), "out")
        label = f"{app}:{json_int(body.get('instance'))}"
        received = body.get("lines")
        now = time.time()
        lines: list[Json] = [{"app": app, "label": label, "stream": stream, "time": now,
                              "line": _shorten(str(text))}
                             for text in (received if isinstance(received, list) else [])]
        buffer = self.logs.setdefault(app, deque(maxlen=MAX_LOG_LINES))
        buffer.extend(line for line in lines if isinstance(line, dict))
        self._send("log", {"app": app, "lines": lines})


def _shorten(text: str) -> str:
    if len(text) <= MAX_LINE_CHARS:
        return text
    return f"{text[:MAX_LINE_CHARS]}... ({len(text) - MAX_LINE_CHARS:,} more characters)"
