"""What `pmx` shows a person, without a daemon: log lines on a terminal (colours kept,
other escapes inert), settings in units, one row per slot during a reload (issue 14)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pmx.cli import render
from pmx.supervisor.config import AppSpec, parse_app
from pmx.supervisor.options import OPTIONS
from pmx.supervisor.protocol import JsonObject


@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b[31mred\x1b[0m", "\x1b[31mred\x1b[0m\x1b[0m"),
    ("\x1b[1;38;5;208mamber", "\x1b[1;38;5;208mamber\x1b[0m"),
    ("\x1b[38:2:255:0:0mtrue colour", "\x1b[38:2:255:0:0mtrue colour\x1b[0m"),
    ("plain", "plain"),
    ("\x1b[2Jclear", "\\x1b[2Jclear"),
    ("\x1b[3Aup \x1b[31mred", "\\x1b[3Aup \x1b[31mred\x1b[0m"),
    ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
    ("\x9b31m C1 CSI", "\\x9b31m C1 CSI"),
    ("\x1b[" + "1;" * 40 + "m too long", "\\x1b[" + "1;" * 40 + "m too long"),
], ids=["sgr", "256", "truecolour", "plain", "clear", "cursor", "osc", "c1", "long"])
def test_logs_keep_colour_sequences_and_neutralise_the_rest(raw: str, shown: str) -> None:
    assert render.neutralise_keeping_colour(raw) == shown


def test_without_colour_it_is_neutralise() -> None:
    text = "a\x1b[Kb\x00c\x7f"
    assert render.neutralise_keeping_colour(text) == render.neutralise(text)


def spec_table(**options: object) -> JsonObject:
    spec: AppSpec = parse_app({"name": "api", "script": "api.py", **options}, source="t",
                              index=0, base_dir=Path("/srv"))
    return dict(spec.to_table())  # type: ignore[arg-type]


def test_settings_are_every_option_in_units_with_defaults() -> None:
    rows = {name: (value, default) for name, value, default in render.settings(spec_table(
        max_memory_restart="200M", kill_timeout=1600, listen_timeout="2m",
        min_uptime="500ms", exp_backoff_restart_delay=100))}
    assert list(rows) == [option.name for option in OPTIONS]
    assert rows["max_memory_restart"] == ("200M", "-")
    assert rows["kill_timeout"] == ("1.6s", "5s")
    assert rows["listen_timeout"] == ("2m", "3s")
    assert rows["min_uptime"] == ("500ms", "1s")
    assert rows["restart_delay"] == ("0", "0")
    assert rows["max_log_size"] == ("-", "-")
    assert rows["autorestart"] == ("true", "true")
    assert rows["args"] == ("-", "-")


def row(instance: int, pid: int, status: str, *, replacement: bool = False) -> JsonObject:
    return {"name": "api", "id": 7 + instance, "instance": instance, "pid": pid,
            "status": status, "restarts": 0, "cpu": 0.0, "memory": 0, "exec_mode": "fork",
            "uptime": 3.0, "listen": [], "replacement": replacement}


def test_list_during_a_reload_has_one_row_per_slot(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    render.instance_table([row(0, 100, "online"), row(0, 200, "launching", replacement=True),
                           row(1, 101, "online")])
    out = capsys.readouterr().out
    assert len(re.findall(r"^\s*7\s+api:0\s", out, re.M)) == 1, out
    assert re.search(r"api:0 .* 100 .* replacing", out), out
    assert "api:0 replacing: pid 100 -> pid 200 (launching)" in out, out
    assert re.search(r"api:1 .* 101 .* online", out), out


def test_a_replacement_without_its_old_instance_is_shown_as_it_is(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    render.instance_table([row(0, 200, "launching", replacement=True)])
    out = capsys.readouterr().out
    assert re.search(r"api:0 .* 200 .* launching", out) and "replacing" not in out, out
