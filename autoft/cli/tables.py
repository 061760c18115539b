"""Tables that a terminal shows boxed, and a log or a pipe gets whole.

Rich fits a table to the console's width, cutting cells (``paramet…``) where they do not
fit: right for a terminal, where the user can widen the window, wrong for a log, where what
was cut is lost. Printed where the console is no terminal, :class:`WholeTable` gives one
line a row instead, the columns padded to their widest cell and nothing cut (print it with
``crop=False``: Rich crops every printed line to the console's width otherwise).
"""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

GAP = "  "


class WholeTable:
    """``table`` as itself on a terminal, else as plain lines: the title, the header, a line a
    row (a ``--`` line after a section), the caption."""

    def __init__(self, table: Table):
        self.table = table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if console.is_terminal:
            yield self.table
            return
        for line in plain_lines(self.table):
            yield Segment(line)  # segments, not Text: the console wraps nothing of them
            yield Segment.line()


def plain_lines(table: Table) -> list[str]:
    """The table's text, one line a row, columns aligned, no cell cut."""
    columns = [[_plain(column.header), *map(_plain, column.cells)] for column in table.columns]
    widths = [max(map(len, cells)) for cells in columns]
    right = [column.justify == "right" for column in table.columns]

    def line(index: int) -> str:
        cells = [c[index].rjust(w) if r else c[index].ljust(w) for c, w, r in zip(columns, widths, right)]
        return GAP.join(cells).rstrip()

    lines = [_plain(table.title)] if table.title else []
    lines.append(line(0))
    for row_index, row in enumerate(table.rows):
        lines.append(line(row_index + 1))
        if row.end_section and row_index + 1 < len(table.rows):
            lines.append("--")
    if table.caption:
        lines.append(_plain(table.caption))
    return lines


def _plain(cell: object) -> str:
    """A cell's text without markup or styles, on one line."""
    if isinstance(cell, Text):
        text = cell.plain
    elif isinstance(cell, str):
        text = Text.from_markup(cell).plain
    else:
        text = "" if cell is None else str(cell)
    return " ".join(text.split("\n"))
