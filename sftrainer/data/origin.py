"""Where a loaded data set's rows come from, so that a message about the data names its file, and a
message about a row its line.

``datasets`` keeps no record of the files a ``Dataset`` was read from, and the data set reaches
``prepare`` as an object (the CLI loads it before the trainer is built). So ``load`` remembers the
origin of what it reads, keyed weakly by the ``Dataset`` object, and the functions that derive one
data set from another (renaming, splitting, sampling) pass it on, with the row of the files that
each row is (a mixture's sample, an ``eval_split`` part), or the fact that this is not known.
Places are found by reading the files again, only when a message needs them.
"""

from __future__ import annotations

import csv
import json
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

MAX_FILES_NAMED = 3

_ORIGINS: weakref.WeakKeyDictionary[Any, Origin] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Origin:
    """Where the rows of one loaded data set come from."""

    source: str  # as the user named it: a path, glob, directory or hub id
    files: tuple[str, ...] = ()  # the local files read, in the order their rows come
    in_file_order: bool = True  # row k is the k-th row of the files, or row rows(k); False: unknown
    rows: Callable[[int], int] | None = None  # the files' row of row k (of a sample or a split)

    def named(self) -> str:
        """The files (the first few), or the source when it names no files (a hub id)."""
        if not self.files:
            return self.source
        more = len(self.files) - MAX_FILES_NAMED
        return ", ".join(self.files[:MAX_FILES_NAMED]) + (f" and {more} more files" if more > 0 else "")

    def places(self, indices: Iterable[int]) -> dict[int, str]:
        """Where the rows at these 0-based indices are: 'file:line' (JSON lines, CSV), 'file, item k'
        (a JSON array) or 'file, row k' (Parquet). {} where that is not known (after ``eval_split``)."""
        if not self.files or not self.in_file_order:
            return {}
        asked = {i: self.rows(i) if self.rows is not None else i for i in indices}
        wanted = set(asked.values())
        at: dict[int, str] = {}
        every_row = (place for path in self.files for place in _row_places(path))
        for index, place in enumerate(every_row):
            if len(at) == len(wanted):
                break
            if index in wanted:
                at[index] = place
        return {i: at[row] for i, row in asked.items() if row in at}


def remember(dataset: Any, origin: Origin) -> Any:
    """Record where ``dataset`` (a ``Dataset`` or ``IterableDataset``) came from; returns it."""
    _ORIGINS[dataset] = origin
    return dataset


def origin_of(dataset: Any) -> Origin | None:
    try:
        return _ORIGINS.get(dataset)
    except TypeError:  # not weakly referable (a list of rows): it has no recorded origin
        return None


def pass_on(
    derived: Any, source: Any, *, rows: Callable[[int], int] | None = None, known: bool = True
) -> Any:
    """``derived`` (made from ``source``) gets its origin. ``rows``: which row of ``source`` row k
    of ``derived`` is (a sample, a split); ``known`` False: that is not known. Returns ``derived``."""
    origin = origin_of(source)
    if origin is None:
        return derived
    if not known:
        origin = replace(origin, in_file_order=False, rows=None)
    elif rows is not None:
        outer = origin.rows
        origin = replace(origin, rows=rows if outer is None else lambda k: outer(rows(k)))
    return remember(derived, origin)


def selected_rows(part: Any, whole: Any) -> Callable[[int], int] | None:
    """Which row of ``whole`` row k of ``part`` (a ``select`` of it) is. datasets (5.2) keeps a
    selection as the indices table ``_indices`` (not public); None where there is none (a
    contiguous selection is a slice) or ``whole`` is itself a selection."""
    indices = getattr(part, "_indices", None)
    if indices is None or getattr(whole, "_indices", None) is not None:
        return None
    column = indices.column(0)
    return lambda k: column[k].as_py()


def places(origin: Origin | None, indices: Iterable[int]) -> dict[int, str]:
    """Where the rows at these 0-based indices are (``Origin.places``), or 'row N' where N is exact
    (a list of rows, a hub split); {} for rows split or sampled from files."""
    indices = list(indices)
    if origin is not None and origin.files:
        return origin.places(indices)
    if origin is not None and not origin.in_file_order:
        return {}
    return {i: f"row {i + 1}" for i in indices}


def where(name: str, origin: Origin | None) -> str:
    """``name`` with the source it was read from: 'train data (data/train.jsonl)'."""
    if origin is None:
        return name
    named = origin.named()
    return name if named in name or origin.source in name else f"{name} ({named})"


def _row_places(path: str) -> Iterator[str]:
    """The place of each row of one file, as ``datasets`` reads them (blank lines skipped)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for k in range(pq.ParquetFile(path).metadata.num_rows):
            yield f"{path}, row {k + 1}"
        return
    with open(path, encoding="utf-8", errors="replace", newline="" if suffix == ".csv" else None) as fh:
        if suffix == ".csv":
            reader = csv.reader(fh)
            header, start = False, 1
            for fields in reader:
                first, start = start, reader.line_num + 1  # a quoted value may span lines
                if not fields or (not header and not any(f.strip() for f in fields)):
                    continue
                if header:
                    yield f"{path}:{first}"
                header = True
            return
        head = fh.read(1 << 16).lstrip()
        fh.seek(0)
        if head.startswith("["):  # one JSON array
            for k in range(len(json.load(fh))):
                yield f"{path}, item {k + 1}"
            return
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                yield f"{path}:{lineno}"
