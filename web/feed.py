"""The one subscription of a `pmx web` process to pmxd's publish stream.

`Feed` owns the SUB socket and its own `Client`, in a thread (ZeroMQ sockets belong to
one thread, and every call is blocking); the thread, its reconnect loop and its reading
are `SubscriberThread`'s (cli/client.py), which monit's feed shares. It reads the stream
for BATCH_S at a time and hands each period's publications to `deliver` as one `Batch`,
so however many browsers watch, pmxd serves one subscriber and a few requests:

* after (re)connecting, after a batch that held events (a state change, a reload
  step, a deletion), and when poked (an action ended), one `describe all` (the apps,
  their settings with secrets masked, every instance) and one `ping`; also every
  FULL_REFRESH_S as a safety net (BUSY_REFRESH_S while an app is busy);
* nothing per browser: the hub (hub.py) fans the batches out.

pmxd going away is noticed as monit notices it (no stats for STATS_SILENCE_S and a
failed ping, or a failed request); the feed then delivers `down` and retries every
RECONNECT_S. A pmxd that was replaced between two looks (another pid or start time) is
delivered as `restarted`, so the hub forgets the old daemon's ids and history.

`deliver` is called on the feed's thread: the caller makes it thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from pmx.cli.client import Client, SubscriberThread
from pmx.cli.log_commands import _log_files, _tail
from pmx.cli.monit_board import json_objects
from pmx.supervisor.errors import CommandError, PmxError
from pmx.supervisor.protocol import (
    EVENT_PREFIX,
    LOG_PREFIX,
    STATS_TOPIC,
    Command,
    DroppedLines,
    JsonObject,
)

log = logging.getLogger(__name__)

BATCH_S = 0.2
STATS_SILENCE_S = 3.0
PING_TIMEOUT_S = 1.5
FULL_REFRESH_S = 10.0
BUSY_REFRESH_S = 1.0  # while an app is busy: its end publishes no event of its own
MAX_LINES_PER_BATCH = 300  # per app; a flood beyond that cannot be read in a browser anyway
SEED_LINES = 20  # per log file, when an app is first seen


@dataclass(slots=True)
class Batch:
    """What one period brought. `apps` and `daemon` are set when they were asked again."""

    publications: list[tuple[str, JsonObject]] = field(default_factory=list)
    apps: list[JsonObject] | None = None
    daemon: JsonObject | None = None
    down: str | None = None
    restarted: bool = False
    seed_logs: dict[str, list[JsonObject]] = field(default_factory=dict)
    skipped_lines: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.publications or self.apps is not None or self.daemon is not None
                    or self.down is not None or self.seed_logs or self.skipped_lines)


class Feed(SubscriberThread):
    """The SUB socket in a thread of its own; see the module docstring."""

    def __init__(self, home: Path, deliver: Callable[[Batch], None]) -> None:
        super().__init__(home, program="pmx web", thread_name="pmx-web-feed", stop_timeout_s=3)
        self._deliver = deliver
        self._poked = threading.Event()
        self._daemon_key: tuple[object, object] | None = None
        self._seeded: set[str] = set()
        self._last_stats = time.monotonic()
        self._last_refresh = 0.0
        self._is_busy = False  # some app had an operation running at the last describe
        self._dropped = DroppedLines()  # lines pmxd dropped while we were too slow

    def poke(self) -> None:
        """Describe again at the end of this period: an action just ended, and its app's
        `busy` is over without an event saying so. Any thread."""
        self._poked.set()

    def _say_down(self, why: str, crash: str | None) -> None:
        if crash is not None:  # a bug: say so on the page, and in the log
            log.error("the feed stopped: %s", crash)
        self._deliver(Batch(down=why))

    def _connect(self, client: Client) -> zmq.Socket[bytes] | None:
        try:
            sock = self._subscribe(client, [EVENT_PREFIX, STATS_TOPIC, LOG_PREFIX])
        except PmxError:
            self._down(self._unreachable())
            return None
        batch = Batch()
        if not self._refresh(client, batch):
            sock.close(linger=0)
            return None
        self._is_down = False
        self._last_stats = time.monotonic()
        self._deliver(batch)
        return sock

    def _refresh(self, client: Client, batch: Batch) -> bool:
        """Ask `ping` and `describe all` into `batch`; False (and `down` delivered) when
        pmxd does not answer."""
        try:
            daemon = client.call(Command.PING, timeout_s=PING_TIMEOUT_S)
            apps = json_objects(client.call(Command.DESCRIBE, {"target": "all"}).get("apps"))
        except PmxError as exc:
            self._down(str(exc) if isinstance(exc, CommandError) else self._unreachable())
            return False
        key = (daemon.get("pid"), daemon.get("started"))
        if key != self._daemon_key:
            batch.restarted = self._daemon_key is not None
            self._daemon_key = key
            self._seeded.clear()
        batch.daemon, batch.apps = daemon, apps
        self._is_busy = any(app.get("busy") for app in apps)
        self._seed_logs(apps, batch)
        self._last_refresh = time.monotonic()
        return True

    def _seed_logs(self, apps: list[JsonObject], batch: Batch) -> None:
        """The last lines of the log files of apps seen for the first time, so that a
        page opened now is not blank until the app prints again."""
        for app in apps:
            name = str(app.get("name"))
            if name in self._seeded:
                continue
            self._seeded.add(name)
            lines: list[JsonObject] = []
            for path, label in _log_files([app], ["out", "error"]):
                stream = "error" if "error" in Path(path).name else "out"
                for text in _tail(Path(path), SEED_LINES):
                    lines.append({"label": label, "stream": stream, "line": text})
            batch.seed_logs[name] = lines

    def _pump(self, client: Client, sock: zmq.Socket[bytes]) -> bool:
        """Read for one batch period and deliver it; False when pmxd is gone."""
        batch = Batch()
        lines: dict[str, int] = {}
        dropped: dict[str, int] = {}
        wants_refresh = False

        def take(topic: str, body: JsonObject) -> None:
            nonlocal wants_refresh
            if topic == STATS_TOPIC:
                self._last_stats = time.monotonic()
            elif topic.startswith(EVENT_PREFIX):
                wants_refresh = True
            elif topic.startswith(LOG_PREFIX):
                app = str(body.get("app"))
                count = len(body.get("lines") or [])  # type: ignore[arg-type]
                lines[app] = lines.get(app, 0) + count
                if missed := self._dropped.missed(body):
                    dropped[app] = dropped.get(app, 0) + missed
            batch.publications.append((topic, body))

        self._read_period(sock, BATCH_S, take)
        _cap_log_lines(batch, lines)
        for app, missed in dropped.items():  # shown as lines not shown, like the capped ones
            batch.skipped_lines[app] = batch.skipped_lines.get(app, 0) + missed
        every = BUSY_REFRESH_S if self._is_busy else FULL_REFRESH_S
        stale = time.monotonic() - self._last_refresh > every
        silent = time.monotonic() - self._last_stats > STATS_SILENCE_S
        poked = self._poked.is_set()
        self._poked.clear()
        if wants_refresh or stale or silent or poked:
            # pmxd publishes stats every interval even with nothing running: silence
            # means it is gone, or replaced (a new pmxd takes the same socket paths).
            if not self._refresh(client, batch):
                return False
            self._last_stats = time.monotonic()
        if batch:
            self._deliver(batch)
        return True


def _cap_log_lines(batch: Batch, lines: dict[str, int]) -> None:
    """Keep the last MAX_LINES_PER_BATCH lines of each app; count the rest as skipped."""
    over = {app: count - MAX_LINES_PER_BATCH for app, count in lines.items()
            if count > MAX_LINES_PER_BATCH}
    if not over:
        return
    budget = dict.fromkeys(over, MAX_LINES_PER_BATCH)
    kept: list[tuple[str, JsonObject]] = []
    for topic, body in reversed(batch.publications):
        app = str(body.get("app"))
        if topic.startswith(LOG_PREFIX) and app in budget:
            received = body.get("lines")
            texts = received if isinstance(received, list) else []
            room = budget[app]
            if room <= 0:
                continue
            if len(texts) > room:
                body = {**body, "lines": texts[-room:]}
            budget[app] -= min(room, len(texts))
        kept.append((topic, body))
    kept.reverse()
    batch.publications = kept
    batch.skipped_lines = over
