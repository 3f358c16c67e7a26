"""The threads of `pmx monit` that talk to pmxd, and the messages they post to MonitApp.

`Feed` owns the SUB socket, in a thread of its own (ZeroMQ sockets belong to one thread;
the thread, its reconnect loop and its reading are `SubscriberThread`'s, in client.py):
it seeds the board with one `list` (again after a reconnect), then hands the app one
`Batch` of publications at a time with `post_message`, the next only once the app has
consumed the last one, so a flood of log lines is coalesced instead of queued without
bound. If pmxd goes away (no stats for STATS_SILENCE_S and ping fails) it posts
`Disconnected` and retries every RECONNECT_S.

`Calls` runs requests one at a time in a thread with its own Client (monit has two: its
queries, and the user's actions), so a 30-second reload never freezes the screen. Every
thread is a daemon thread: quitting never waits for pmxd.

`Describer` sends the `describe` requests that keep the board complete: a state event
carries no restart count, exec mode or listen address, and nothing is published when an
app is deleted, so an app whose instances started or stopped is described again
(coalesced: at most one request per app per REFRESH_DELAY_S).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq
from pmx.supervisor.errors import CommandError, PmxError
from pmx.supervisor.protocol import (
    EVENT_PREFIX,
    LOG_PREFIX,
    STATS_TOPIC,
    Command,
    DroppedLines,
    JsonObject,
)
from textual.app import App
from textual.message import Message
from textual.timer import Timer

from .client import Client, SubscriberThread
from .monit_board import Batch, Board, json_objects

BATCH_S = 0.2  # at most five screen updates a second from the stream
STATS_SILENCE_S = 3.0
PING_TIMEOUT_S = 1.5
REFRESH_DELAY_S = 0.5


class FeedBatch(Message):
    """The publications of one batch period; the feed sends no other before `consumed`."""

    def __init__(self, batch: Batch) -> None:
        super().__init__()
        self.batch = batch


class Seeded(Message):
    """A `list` reply, asked for at `asked_at`: the board starts again from it."""

    def __init__(self, rows: list[JsonObject], asked_at: float) -> None:
        super().__init__()
        self.rows = rows
        self.asked_at = asked_at


class Disconnected(Message):
    """pmxd went away, or the feed thread hit a bug (`crash`)."""

    def __init__(self, why: str, crash: str | None = None) -> None:
        super().__init__()
        self.why = why
        self.crash = crash  # a traceback: the feed thread hit a bug and stopped


class CallDone(Message):
    """A request's outcome, for `done` to take on the app's thread."""

    def __init__(self, done: Callable[[JsonObject | PmxError], None],
                 result: JsonObject | PmxError) -> None:
        super().__init__()
        self.done = done
        self.result = result


def _post(app: App[int], message: Message) -> bool:
    """post_message from another thread; False once the app is closing or gone."""
    try:
        return app.post_message(message)
    except RuntimeError:  # the event loop is already closed
        return False


# ---------------------------------------------------------------- threads


class Feed(SubscriberThread):
    """The SUB socket, in a thread of its own: seeds, batches, notices pmxd going away."""

    def __init__(self, home: Path, app: App[int]) -> None:
        super().__init__(home, program="pmx monit", thread_name="pmx-monit-feed",
                         stop_timeout_s=2)
        self._app = app
        self.consumed = threading.Event()
        self.consumed.set()
        self._batch = Batch()
        self._dropped = DroppedLines()  # lines pmxd dropped while we were too slow
        self._last_stats = time.monotonic()

    def _say_down(self, why: str, crash: str | None) -> None:
        # A crash is shown on screen; its traceback is printed once the terminal is back.
        _post(self._app, Disconnected(why, crash))

    def _connect(self, client: Client) -> zmq.Socket[bytes] | None:
        sock = None
        try:
            sock = self._subscribe(client, [EVENT_PREFIX, STATS_TOPIC, LOG_PREFIX])
            asked_at = time.time()
            rows = json_objects(client.call(Command.LIST).get("instances"))
        except PmxError as exc:
            if sock is not None:
                sock.close(linger=0)
            self._down(str(exc) if isinstance(exc, CommandError) else self._unreachable())
            return None
        self._is_down = False
        self._batch = Batch()
        self.consumed.set()
        self._last_stats = time.monotonic()
        _post(self._app, Seeded(rows, asked_at))
        return sock

    def _pump(self, client: Client, sock: zmq.Socket[bytes]) -> bool:
        """Read for one batch period; False when pmxd is gone."""
        self._read_period(sock, BATCH_S, self._take)
        if self._batch and self.consumed.is_set():
            self.consumed.clear()
            batch, self._batch = self._batch, Batch()
            if not _post(self._app, FeedBatch(batch)):
                return True
        if time.monotonic() - self._last_stats > STATS_SILENCE_S:
            # No stats: pmxd is gone, or simply has no running process. Ask.
            try:
                client.call(Command.PING, timeout_s=PING_TIMEOUT_S)
            except PmxError:
                return False
            self._last_stats = time.monotonic()
        return True

    def _take(self, topic: str, body: JsonObject) -> None:
        if topic == STATS_TOPIC:
            self._last_stats = time.monotonic()
        elif topic.startswith(LOG_PREFIX):
            self._batch.dropped_logs += self._dropped.missed(body)
        self._batch.add(topic, body)


class Calls:
    """Runs requests one at a time in a daemon thread with its own Client."""

    def __init__(self, home: Path, app: App[int], name: str) -> None:
        self._home = home
        self._app = app
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[Client], JsonObject], Callable[[JsonObject | PmxError], None]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"pmx-monit-{name}", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[Client], JsonObject],
               done: Callable[[JsonObject | PmxError], None]) -> None:
        self._jobs.put((call, done))

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        client = Client(self._home)
        try:
            while (job := self._jobs.get()) is not None:
                call, done = job
                result: JsonObject | PmxError
                try:
                    result = call(client)
                except PmxError as exc:
                    result = exc
                except Exception as exc:  # a bug, or ZeroMQ failing: shown as the outcome
                    result = PmxError(f"{type(exc).__name__}: {exc}")
                _post(self._app, CallDone(done, result))
        finally:
            client.close()


class Describer:
    """`describe` requests on the queries thread, their replies merged into the board on
    the app's thread; `changed` is called after each merge to redraw."""

    def __init__(self, app: App[int], board: Board, queries: Calls,
                 changed: Callable[[], None]) -> None:
        self._app = app
        self._board = board
        self._queries = queries
        self._changed = changed
        self._timer: Timer | None = None

    def soon(self, delay_s: float = REFRESH_DELAY_S) -> None:
        """Describe the board's dirty apps after delay_s, unless that is already planned."""
        if self._board.dirty and self._timer is None:
            self._timer = self._app.set_timer(delay_s, self.refresh_dirty)

    def refresh_dirty(self) -> None:
        self._timer = None
        apps, self._board.dirty = self._board.dirty, set()
        for app in apps:
            self.describe(app, whole_app=True)

    def describe(self, target: str, *, whole_app: bool, app: str | None = None) -> None:
        """Describe `target` (an app, or an instance id of `app`). whole_app: the reply
        lists every instance of the app, so rows it does not name are gone."""
        board = self._board
        asked_at = time.time()
        name = app or target

        def done(result: JsonObject | PmxError) -> None:
            if isinstance(result, CommandError) and result.code == "not_found":
                if whole_app:
                    board.forget_app(name, asked_at)
                    board.described.pop(name, None)
                else:
                    board.dirty.add(name)
                    self.refresh_dirty()
            elif isinstance(result, dict):
                board.take_described(result, whole_app=whole_app, asked_at=asked_at)
            else:
                return  # pmxd is gone: the feed says so
            self._changed()
            self.soon(REFRESH_DELAY_S * 2)

        self._queries.submit(lambda c: c.call(Command.DESCRIBE, {"target": target}), done)
