"""A plain, aligned text table: what `pmx list` draws, without importing rich.

`pmx list` is the command people run most; it must answer in the time the interpreter
takes to start plus one round trip. rich costs ~30 ms to import and ~1 s to lay out
1,000 rows, so the list is written here: columns padded to their widest cell, a rule
under the header, colour (ANSI SGR) only on a terminal and never with NO_COLOR set.
Commands that draw richer output (describe, monit) keep using rich.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence

TYPE_CHECKING = False  # typing's own costs `pmx list` an import; mypy reads this as usual
if TYPE_CHECKING:
    from typing import TextIO

STYLES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33",
          "cyan": "36", "bold red": "1;31"}


class Column:
    __slots__ = ("right", "title")

    def __init__(self, title: str, right: bool = False) -> None:
        self.title = title
        self.right = right  # right-justified (numbers)


class Cell:
    __slots__ = ("style", "text")

    def __init__(self, text: str, style: str | None = None) -> None:
        self.text = text
        self.style = style  # a key of STYLES


def use_colour(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def paint(text: str, style: str | None, colour: bool) -> str:
    if not colour or not style or style not in STYLES:
        return text
    return f"\x1b[{STYLES[style]}m{text}\x1b[0m"


def width(text: str) -> int:
    """Terminal columns of text: wide (East Asian) characters take two."""
    if text.isascii():
        return len(text)
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def render(columns: Sequence[Column], rows: Sequence[Sequence[Cell | str]], *,
           colour: bool, gap: int = 3) -> str:
    """The table as text, one line per row, with a trailing newline."""
    cells = [[cell if isinstance(cell, Cell) else Cell(cell) for cell in row] for row in rows]
    widths = [width(column.title) for column in columns]
    for row in cells:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], width(cell.text))
    last = len(columns) - 1
    spacer = " " * gap

    def line(items: Sequence[Cell], header: bool = False) -> str:
        parts = []
        for index, (column, cell) in enumerate(zip(columns, items, strict=True)):
            pad = " " * (widths[index] - width(cell.text))
            text = paint(cell.text, "bold" if header else cell.style, colour)
            if column.right:
                parts.append(pad + text)
            else:
                parts.append(text if index == last else text + pad)
        return spacer.join(parts).rstrip()

    out = [line([Cell(column.title) for column in columns], header=True),
           paint(spacer.join("─" * w for w in widths), "dim", colour)]
    out += [line(row) for row in cells]
    return "\n".join(out) + "\n"
