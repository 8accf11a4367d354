"""The errors ``data.prepare`` raises about a data set's rows as a whole: rows that cannot be used,
listed together (``invalid_rows_error``: row number, file and line where known, field, problem), and
rows of several formats (``refuse_mixed_formats``).

Contract: each function builds or raises one ``DataError`` from what it is given; nothing is logged.
"""

from __future__ import annotations

import re
from typing import Any

from datasets import Dataset

from sftrainer.data.formats import REQUIRED_COLUMNS, Format, mixed_formats_error, row_formats
from sftrainer.data.origin import Origin, places, where
from sftrainer.errors import DataError

MAX_LISTED_PROBLEMS = 5


def refuse_mixed_formats(dataset: Any, fmt: Format, name: str, origin: Origin | None) -> None:
    """Rows of several formats (prompt/response lines in a messages file) are refused up front, naming
    the first row of each, not row by row after tokenizing. A stream is checked row by row as read."""
    if not isinstance(dataset, Dataset):
        return
    candidates = [cols for cols in REQUIRED_COLUMNS.values() if set(cols) <= set(dataset.column_names)]
    if len(candidates) < 2:
        return  # the columns of one format only: the rows cannot mix formats
    needed = sorted({c for cols in candidates for c in cols})
    formats = row_formats(dataset.select_columns(needed).with_format("arrow")[:])
    if len(formats) > 1:
        firsts = places(origin, [first for first, _ in formats.values()])
        raise mixed_formats_error(where(name, origin), formats, fmt, firsts)


_ROW = re.compile(r"row (\d+): ")  # how a problem begins (data.prepare)


def invalid_rows_error(
    name: str, invalid: list[str], rows: int, described: str, origin: Origin | None = None
) -> DataError:
    """The error for rows that cannot be used: how many, the first few problems (row, field, what;
    with the file and line where ``origin`` knows them), and what to do."""
    shown = [(_ROW.match(p), p) for p in invalid[:MAX_LISTED_PROBLEMS]]
    found = origin.places(int(m.group(1)) - 1 for m, _ in shown if m) if origin is not None else {}
    listed = "\n".join(
        f"  row {m.group(1)} ({found[int(m.group(1)) - 1]}): {p[m.end() :]}"
        if m and int(m.group(1)) - 1 in found
        else f"  {p}"
        for m, p in shown
    )
    more = (
        f"\n  ... and {len(invalid) - MAX_LISTED_PROBLEMS} more" if len(invalid) > MAX_LISTED_PROBLEMS else ""
    )
    return DataError(
        f"{where(name, origin)}: {len(invalid)} of {rows} rows cannot be used ({described}):\n{listed}{more}\n"
        "Fix these rows, or set skip_invalid_rows=true to drop them (they are counted)."
    )
