"""The model behind `pmx monit` (cli/monit_board.py), without a daemon: rows from `list`,
`describe` and the publish stream, the describe cache, log buffers and batches.

The event orders are pmxd's, recorded; the tests against a real pmxd are in
tests/integration/test_monit.py.
"""

from __future__ import annotations

from pmx.cli.monit_board import (
    EVENTS_PER_APP,
    MAX_BATCH_EVENTS,
    Batch,
    Board,
    LogBuffer,
    LogLine,
    json_float,
    json_int,
    json_objects,
    json_opt_int,
    json_str,
)
from pmx.supervisor.protocol import EVENT_PREFIX, LOG_PREFIX, STATS_TOPIC, JsonObject


def listed(ident: int, app: str = "api", *, instance: int | None = None, pid: int | None = 100,
           status: str = "online", **more: object) -> JsonObject:
    """One row of a `list` reply (or an instance of a `describe` reply)."""
    row: JsonObject = {"name": app, "id": ident, "instance": ident if instance is None
                       else instance, "pid": pid, "status": status, "reason": "started",
                       "restarts": 0, "exec_mode": "fork", "uptime": 5.0, "since": 1.0}
    row.update(more)  # type: ignore[arg-type]
    return row


def state_event(ident: int, state: str, when: float, *, app: str = "api", pid: int | None = 100,
                reason: str = "", instance: int = 0) -> JsonObject:
    return {"kind": "state", "app": app, "id": ident, "instance": instance, "pid": pid,
            "state": state, "reason": reason, "time": when}


# ---------------------------------------------------------------- rows and the stream


def test_board_ignores_the_old_process_of_a_finished_replacement() -> None:
    """The order pmxd publishes a reload in, recorded: launching (no pid yet), online with
    the new pid, then stopping/stopped of the old pid under the same id."""
    board = Board()
    board.seed([{"name": "api", "id": 0, "instance": 0, "pid": 100, "status": "online",
                 "reason": "started", "restarts": 0, "exec_mode": "cluster", "uptime": 5.0,
                 "since": 1.0, "listen": ["127.0.0.1:1"]}], now=10.0, reset_history=True)
    base: JsonObject = {"kind": "state", "app": "api", "id": 0, "instance": 0}
    board.apply_event({**base, "pid": None, "state": "launching", "reason": "reloaded",
                       "time": 11.0})
    assert sorted(board.rows) == ["0", "0+"]
    board.apply_stats({"instances": [{"id": 0, "pid": 100, "cpu": 1.0, "memory": 10},
                                     {"id": 0, "pid": 200, "cpu": 2.0, "memory": 20}]})
    assert board.rows["0+"].pid == 200 and board.rows["0"].memory == 10
    board.apply_event({**base, "pid": 200, "state": "online", "reason": "ready", "time": 12.0})
    board.apply_event({**base, "pid": 100, "state": "stopping", "reason": "replaced",
                       "time": 12.1})
    board.apply_event({**base, "pid": 100, "state": "stopped", "reason": "exit 0", "time": 12.2})
    assert list(board.rows) == ["0"]
    row = board.rows["0"]
    assert (row.pid, row.status, row.restarts, row.exec_mode) == (200, "online", 1, "cluster")


def test_board_keeps_an_event_newer_than_a_describe_reply() -> None:
    board = Board()
    board.apply_event({"kind": "state", "app": "w", "id": 3, "instance": 0, "pid": 7,
                       "state": "stopping", "reason": "stop", "time": 50.0})
    described: list[JsonObject] = [{"name": "w", "id": 3, "instance": 0, "pid": 7,
                                    "status": "online", "reason": "started", "restarts": 2,
                                    "exec_mode": "fork", "uptime": 9.0, "since": 40.0}]
    board.merge_described("w", described, whole_app=True, asked_at=45.0, now=60.0)
    row = board.rows["3"]
    assert (row.status, row.restarts, row.exec_mode) == ("stopping", 2, "fork")


def test_a_failed_replacement_is_dropped_and_the_old_process_keeps_serving() -> None:
    board = Board()
    board.seed([listed(0, pid=100)], now=10.0, reset_history=True)
    board.apply_event(state_event(0, "launching", 11.0, pid=200))
    assert sorted(board.rows) == ["0", "0+"]
    board.apply_event(state_event(0, "errored", 12.0, pid=200, reason="not ready"))
    assert list(board.rows) == ["0"]
    assert (board.rows["0"].pid, board.rows["0"].status) == (100, "online")


def test_an_event_about_an_unknown_instance_adds_it_and_marks_its_app_dirty() -> None:
    board = Board()
    board.apply_event(state_event(4, "starting", 20.0, app="new", pid=42))
    row = board.rows["4"]
    assert (row.app, row.status, row.started, row.is_running) == ("new", "starting", 20.0, True)
    assert board.dirty == {"new"}
    assert board.events["new"][-1].endswith("new:0 (pid 42) starting: ")


def test_a_stopped_instance_has_no_cpu_memory_or_uptime() -> None:
    board = Board()
    board.seed([listed(0)], now=10.0, reset_history=True)
    board.apply_stats({"instances": [{"id": 0, "pid": 100, "cpu": 5.0, "memory": 1000}]})
    board.apply_event(state_event(0, "stopped", 11.0, reason="stop"))
    row = board.rows["0"]
    assert (row.cpu, row.memory, row.started, row.uptime_s(99.0)) == (0.0, 0, None, 0.0)


def test_stats_history_is_capped_and_counts_one_point_per_message() -> None:
    board = Board(history_points=3)
    board.seed([listed(0)], now=10.0, reset_history=True)
    for memory in range(5):
        board.apply_stats({"instances": [{"id": 0, "pid": 100, "cpu": 1.0, "memory": memory}]})
    assert list(board.memory_history[0]) == [2.0, 3.0, 4.0]
    assert list(board.cpu_history[0]) == [1.0, 1.0, 1.0]


def test_events_per_app_are_capped() -> None:
    board = Board()
    for n in range(EVENTS_PER_APP + 5):
        board.apply_event({"kind": "reload", "app": "api", "message": f"step {n}",
                           "time": 100.0 + n})
    notes = board.events["api"]
    assert len(notes) == EVENTS_PER_APP
    assert notes[-1].endswith(f"reload: step {EVENTS_PER_APP + 4}")


def test_forget_app_keeps_rows_changed_after_the_question() -> None:
    board = Board()
    board.seed([listed(0, since=1.0), listed(1, instance=1, since=9.0)], now=10.0,
               reset_history=True)
    board.forget_app("api", asked_at=5.0)
    assert list(board.rows) == ["1"]


def test_matching_filters_by_app_or_label_in_any_case_and_keeps_the_order() -> None:
    board = Board()
    board.seed([listed(0, "Web"), listed(1, "web", instance=1), listed(2, "worker", instance=0)],
               now=10.0, reset_history=True)
    assert [r.key for r in board.matching("")] == ["0", "1", "2"]
    assert [r.key for r in board.matching("WEB")] == ["0", "1"]
    assert [r.key for r in board.matching("web:1")] == ["1"]
    assert board.matching("nothing") == []


# ---------------------------------------------------------------- describe cache


def test_a_describe_reply_is_kept_for_the_detail_panel_and_merged() -> None:
    board = Board()
    board.seed([listed(0, restarts=0)], now=10.0, reset_history=True)
    reply: JsonObject = {"apps": [{"name": "api", "spec": {"script": "/srv/api.py"},
                                   "instances": [listed(0, restarts=3, last_exit="exit 1")]}]}
    board.take_described(reply, whole_app=True, asked_at=20.0)
    assert board.described["api"]["spec"] == {"script": "/srv/api.py"}
    assert board.instance_info[0]["last_exit"] == "exit 1"
    assert board.rows["0"].restarts == 3
    assert not board.dirty


def test_a_describe_reply_with_an_instance_stopping_keeps_its_app_dirty() -> None:
    board = Board()
    reply: JsonObject = {"apps": [{"name": "api", "instances": [listed(0, status="stopping")]}]}
    board.take_described(reply, whole_app=True, asked_at=20.0)
    assert board.dirty == {"api"}


def test_reseeding_after_a_reconnect_forgets_what_describe_said() -> None:
    board = Board()
    board.take_described({"apps": [{"name": "api", "instances": [listed(0)]}]},
                         whole_app=True, asked_at=20.0)
    board.seed([listed(0)], now=30.0, reset_history=False)
    assert "api" in board.described and 0 in board.instance_info
    board.seed([listed(0)], now=30.0, reset_history=True)
    assert board.described == {} and board.instance_info == {}


# ---------------------------------------------------------------- logs and batches


def line(app: str, n: int) -> LogLine:
    return LogLine(app, 0, "out", f"line {n}")


def test_log_buffer_keeps_the_last_lines_of_all_apps_and_of_each_app() -> None:
    buffer = LogBuffer(max_lines=3)
    shown = buffer.add([line("a", 0), line("b", 1), line("a", 2), line("a", 3), line("a", 4)],
                       following=None)
    assert len(shown) == 5  # all of them are drawn; the panel has its own cap
    assert [x.text for x in buffer.lines(None)] == ["line 2", "line 3", "line 4"]
    assert [x.text for x in buffer.lines("a")] == ["line 2", "line 3", "line 4"]
    assert [x.text for x in buffer.lines("b")] == ["line 1"]  # b's own history survives
    assert buffer.lines("nobody") == []


def test_log_buffer_returns_only_the_followed_apps_lines_to_show() -> None:
    buffer = LogBuffer()
    shown = buffer.add([line("a", 0), line("b", 1)], following="b")
    assert [x.app for x in shown] == ["b"]
    assert len(buffer.lines(None)) == 2


def test_a_batch_counts_the_log_lines_it_drops() -> None:
    batch = Batch()
    maxlen = batch.logs.maxlen
    assert maxlen is not None
    batch.add(f"{LOG_PREFIX}api:", {"app": "api", "instance": 0, "stream": "error",
                                    "lines": [str(n) for n in range(maxlen + 7)]})
    assert len(batch.logs) == maxlen and batch.dropped_logs == 7
    assert batch.logs[-1] == LogLine("api", 0, "error", str(maxlen + 6))


def test_a_batch_keeps_the_last_stats_and_says_when_it_lost_events() -> None:
    batch = Batch()
    assert not batch
    for n in range(8):
        batch.add(STATS_TOPIC, {"time": float(n), "instances": []})
    assert [s["time"] for s in batch.stats] == [3.0, 4.0, 5.0, 6.0, 7.0]
    for n in range(MAX_BATCH_EVENTS + 1):
        batch.add(f"{EVENT_PREFIX}api:", {"kind": "state", "n": n})
    assert len(batch.events) == MAX_BATCH_EVENTS and batch.lost_events
    assert batch.events[0]["n"] == 1


def test_apply_batch_marks_every_app_dirty_when_events_were_lost() -> None:
    board = Board()
    board.seed([listed(0, "a"), listed(1, "b", instance=0)], now=10.0, reset_history=True)
    batch = Batch(events=[state_event(0, "online", 11.0, app="a")], lost_events=True)
    assert board.apply_batch(batch) == {"a"}
    assert board.dirty == {"a", "b"}


# ---------------------------------------------------------------- reading replies


def test_json_readers_take_only_the_right_type() -> None:
    assert (json_int(3), json_int(True), json_int("3"), json_int(None, 7)) == (3, 0, 0, 7)
    assert (json_opt_int(0), json_opt_int(False), json_opt_int(1.5)) == (0, None, None)
    assert (json_float(2), json_float(False), json_float("1")) == (2.0, 0.0, 0.0)
    assert (json_str("x"), json_str(1, "?")) == ("x", "?")
    assert json_objects([{"a": 1}, 2, "x", {}]) == [{"a": 1}, {}]
    assert json_objects({"a": 1}) == []
