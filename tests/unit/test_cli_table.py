"""The plain table writer behind `pmx list` (no rich: see cli/table.py)."""

from __future__ import annotations

from pmx.cli import table
from pmx.cli.table import Cell, Column

COLUMNS = (Column("id", right=True), Column("name"), Column("status"))


def test_columns_are_padded_to_their_widest_cell_and_numbers_right_aligned() -> None:
    text = table.render(COLUMNS, [["0", "api:0", "online"], ["12", "worker:1", "stopped"]],
                        colour=False)
    lines = text.splitlines()
    assert lines[0] == "id   name       status"
    assert lines[1] == "──   ────────   ───────"
    assert lines[2] == " 0   api:0      online"
    assert lines[3] == "12   worker:1   stopped"


def test_wide_characters_take_two_columns() -> None:
    text = table.render(COLUMNS, [["0", "日本:0", "online"], ["1", "ab:0", "online"]], colour=False)
    first, second = text.splitlines()[2:4]
    assert table.width("日本:0") == 6
    assert table.width(first[:first.index("online")]) == table.width(second[:second.index("online")])


def test_colour_only_when_asked_and_alignment_ignores_escape_codes() -> None:
    coloured = table.render(COLUMNS, [["0", "api:0", Cell("online", "green")]], colour=True)
    plain = table.render(COLUMNS, [["0", "api:0", Cell("online", "green")]], colour=False)
    assert "\x1b[32monline\x1b[0m" in coloured
    assert "\x1b" not in plain
    assert coloured.replace("\x1b[32m", "").replace("\x1b[0m", "").replace("\x1b[1m", "") \
        .replace("\x1b[2m", "") == plain
