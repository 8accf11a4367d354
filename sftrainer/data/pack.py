"""Packing of tokenized rows into sequences of at most ``max_length`` tokens.

Strategies: ``bfd`` / ``bfd_split`` place whole rows (or ``max_length`` pieces of overlong ones) by
best-fit decreasing; ``wrapped`` concatenates the rows in order and cuts every ``max_length`` tokens.

Rows are never mixed: each keeps its own ``position_ids`` (restarting at 0), which is how the
attention layers tell the rows of a packed sequence apart (see ``collate.py`` and
``isolation.py``), and the first token of each row gets the label ``IGNORE_INDEX``, so no token
is ever trained to follow the previous row.

Packing works on Arrow buffers and NumPy arrays, never on per-token Python lists, and the bin search
is a segment tree over remaining capacities: O(n log max_length) for n rows.

Output rows: ``input_ids`` list[int], ``labels`` list[int], ``position_ids`` list[int], all of the
packed sequence's length (<= max_length), and ``seq_lengths`` list[int]: the lengths of the pieces
packed into it, in order (TRL's column; ``sum(seq_lengths)`` is the row's length).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from datasets import Dataset

from sftrainer.constants import IGNORE_INDEX, PACKING_STRATEGIES
from sftrainer.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)


def packing_strategy_problems(strategy: str) -> list[str]:
    if strategy in PACKING_STRATEGIES:
        return []
    return [
        f"packing_strategy: must be one of {PACKING_STRATEGIES}, got {strategy!r}"
        f"{did_you_mean(strategy, PACKING_STRATEGIES)}"
    ]


@dataclass
class PackStats:
    rows: int
    sequences: int
    tokens: int
    max_length: int
    split_rows: int = 0

    @property
    def fill_ratio(self) -> float:
        return self.tokens / max(1, self.sequences * self.max_length)

    def summary(self, name: str) -> str:
        split = f", {self.split_rows} rows split across sequences" if self.split_rows else ""
        return (
            f"{name}: packed {self.rows} rows into {self.sequences} sequences of <= {self.max_length} tokens "
            f"(fill {self.fill_ratio:.1%}, {self.tokens} tokens{split})"
        )


class _Capacities:
    """Counts of open bins by remaining capacity; finds the tightest bin that still fits."""

    def __init__(self, capacity: int):
        self.size = 1 << (capacity + 1).bit_length()
        self.count = [0] * (2 * self.size)
        self.bins: dict[int, list[int]] = {}

    def add(self, remaining: int, bin_id: int) -> None:
        self.bins.setdefault(remaining, []).append(bin_id)
        i = remaining + self.size
        while i:
            self.count[i] += 1
            i >>= 1

    def pop_at_least(self, need: int) -> tuple[int, int] | None:
        """Remove and return (remaining, bin) with the smallest remaining >= need, or None."""
        i = need + self.size
        if not self.count[i]:
            # Climb until a right sibling has an open bin, then descend to its leftmost one.
            while i > 1 and not (i % 2 == 0 and self.count[i + 1]):
                i >>= 1
            if i <= 1:
                return None
            i += 1
            while i < self.size:
                i = 2 * i if self.count[2 * i] else 2 * i + 1
        remaining = i - self.size
        bin_id = self.bins[remaining].pop()
        while i:
            self.count[i] -= 1
            i >>= 1
        return remaining, bin_id


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each item to a bin (sum of lengths per bin <= capacity). Returns the bin of each item.

    Items are placed longest first, each into the open bin it fills most tightly; a new bin is
    opened only when none fits.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"every length must be in [1, {capacity}]")
    bins = np.empty(lengths.size, dtype=np.int64)
    open_bins = _Capacities(capacity)
    n_bins = 0
    for item in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[item])
        found = open_bins.pop_at_least(need)
        if found is None:
            remaining, bin_id = capacity, n_bins
            n_bins += 1
        else:
            remaining, bin_id = found
        bins[item] = bin_id
        if remaining - need > 0:
            open_bins.add(remaining - need, bin_id)
    return bins


def _split_overlong(
    starts: np.ndarray, lengths: np.ndarray, max_length: int, strategy: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """bfd_split: cut rows longer than max_length into max_length pieces (bfd: refuse them)."""
    overlong = lengths > max_length
    if not overlong.any():
        return starts, lengths, 0
    if strategy != "bfd_split":
        raise ValueError(
            f"{int(overlong.sum())} rows are longer than max_length={max_length}; truncate them first "
            "or use packing_strategy='bfd_split'"
        )
    pieces = -(-lengths // max_length)  # ceil
    row_of_piece = np.repeat(np.arange(lengths.size), pieces)
    k = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = starts[row_of_piece] + k * max_length
    lengths = np.minimum(lengths[row_of_piece] - k * max_length, max_length)
    return starts, lengths, int(overlong.sum())


def _wrap(offsets: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """wrapped: the rows as one stream, cut every max_length tokens; returns pieces and their sequence.

    A piece is the part of one row inside one sequence, so row boundaries stay piece boundaries
    (each piece gets its own positions: rows sharing a sequence stay isolated), and a row that
    crosses a cut continues as a new piece in the next sequence.
    """
    total = int(offsets[-1])
    cuts = np.arange(0, total, max_length, dtype=np.int64)
    starts = np.union1d(offsets[:-1], cuts)  # sorted, unique
    lengths = np.diff(np.append(starts, total))
    inside = np.setdiff1d(cuts, offsets[:-1])  # cuts that fall inside a row
    split_rows = np.unique(np.searchsorted(offsets, inside, side="right") - 1).size
    return starts, lengths, starts // max_length, int(split_rows)


def _list_column(dataset: Dataset, name: str) -> pa.ListArray:
    column = dataset.data.column(name).combine_chunks()
    return column.cast(pa.list_(pa.int64())) if column.type != pa.list_(pa.int64()) else column


def pack_dataset(dataset: Dataset, max_length: int, strategy: str = "bfd") -> tuple[Dataset, PackStats]:
    """Pack a tokenized data set (``input_ids``, ``labels``). See the module docstring."""
    problems = packing_strategy_problems(strategy)
    if problems:
        raise ConfigError(problems[0])
    if dataset._indices is not None:  # a filtered/selected view: materialise the rows it selects
        dataset = dataset.flatten_indices()
    ids_col, labels_col = _list_column(dataset, "input_ids"), _list_column(dataset, "labels")
    offsets = ids_col.offsets.to_numpy().astype(np.int64)
    if not np.array_equal(offsets, labels_col.offsets.to_numpy()):
        raise ValueError("every row's labels must be as long as its input_ids")
    table, stats = pack_arrays(
        ids_col.values.to_numpy(), labels_col.values.to_numpy(), offsets, max_length, strategy
    )
    return Dataset(table), stats


def pack_arrays(
    ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, max_length: int, strategy: str
) -> tuple[pa.Table, PackStats]:
    """Rows given as flat token arrays and row offsets -> a table of packed sequences."""
    starts, lengths = offsets[:-1], np.diff(offsets)
    if strategy == "wrapped":
        starts, lengths, bins, split_rows = _wrap(offsets, max_length)
        order = np.arange(lengths.size)  # stream order
    else:
        starts, lengths, split_rows = _split_overlong(starts, lengths, max_length, strategy)
        bins = best_fit_decreasing(lengths, max_length)
        order = np.lexsort((-lengths, bins))  # by bin, longest piece first inside a bin
    piece_len = lengths[order]
    total = int(piece_len.sum())
    piece_start_out = np.cumsum(piece_len) - piece_len  # where each piece starts in the packed stream
    within = np.arange(total) - np.repeat(piece_start_out, piece_len)
    gather = np.repeat(starts[order], piece_len) + within

    new_ids = ids[gather]
    new_labels = labels[gather]
    new_labels[piece_start_out] = IGNORE_INDEX  # a row's first token never follows the previous row
    tokens_per_bin = np.bincount(bins, weights=lengths, minlength=int(bins.max()) + 1 if bins.size else 0)
    seq_offsets = pa.array(np.concatenate([[0], np.cumsum(tokens_per_bin).astype(np.int64)]), pa.int64())
    list_type = pa.list_(pa.int64()) if total < 2**31 else pa.large_list(pa.int64())

    def as_list(values: np.ndarray) -> pa.Array:
        return pa.LargeListArray.from_arrays(seq_offsets, pa.array(values, pa.int64())).cast(list_type)

    pieces_per_bin = np.bincount(bins, minlength=len(tokens_per_bin))  # pieces are sorted by bin
    piece_offsets = pa.array(np.concatenate([[0], np.cumsum(pieces_per_bin)]).astype(np.int64), pa.int64())
    seq_lengths = pa.LargeListArray.from_arrays(piece_offsets, pa.array(piece_len, pa.int64()))
    table = pa.table(
        {
            "input_ids": as_list(new_ids),
            "labels": as_list(new_labels),
            "position_ids": as_list(within),
            "seq_lengths": seq_lengths.cast(pa.list_(pa.int64())),
        }
    )
    stats = PackStats(
        rows=int(offsets.size - 1),
        sequences=len(tokens_per_bin),
        tokens=total,
        max_length=max_length,
        split_rows=split_rows,
    )
    return table, stats


class StreamPacker:
    """The function given to a stream's batched ``map``: each window of rows packed on its own.

    Memory holds one window; bins are closed at the end of each window, so the last sequences of a
    window may be less full than packing the whole data set at once would make them.
    """

    def __init__(self, max_length: int, strategy: str):
        problems = packing_strategy_problems(strategy)
        if problems:
            raise ConfigError(problems[0])
        self.max_length, self.strategy = max_length, strategy

    def __call__(self, batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        rows, row_labels = batch["input_ids"], batch["labels"]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        if any(len(a) != len(b) for a, b in zip(rows, row_labels)):
            raise ValueError("every row's labels must be as long as its input_ids")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
        labels = np.fromiter((t for r in row_labels for t in r), dtype=np.int64, count=int(offsets[-1]))
        table, _ = pack_arrays(ids, labels, offsets, self.max_length, self.strategy)
        return table.to_pydict()
