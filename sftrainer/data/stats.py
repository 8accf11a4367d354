"""Row statistics of prepared data, as pure functions: ``RowArrays`` (a prepared data set as flat token
arrays, packed sequences split back into their rows) and ``count_duplicates`` (rows repeating an earlier one).

Contract: ``row_arrays`` reads ``input_ids`` and ``labels`` (and ``position_ids`` when packed: a row starts
where its position is 0) and copies nothing it does not need; every count here is a function of those arrays.
``sftrainer data`` (``sftrainer.preview``) and the pre-flight (``sftrainer.preflight``) count with these.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset

from sftrainer.constants import IGNORE_INDEX


@dataclass
class RowArrays:
    """The prepared rows as flat arrays: token ``ids`` and ``labels``, and ``offsets`` (row k is
    ``ids[offsets[k]:offsets[k + 1]]``). Packed sequences are split back into their rows."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def trained_per_row(self) -> np.ndarray:
        trained = (self.labels != IGNORE_INDEX).astype(np.int64)
        return np.add.reduceat(trained, self.offsets[:-1]) if self.lengths.size else trained[:0]

    def rows_with_any(self, token_ids: list[int]) -> np.ndarray:
        """Per row: does a trained position hold one of ``token_ids``?"""
        hit = (self.labels != IGNORE_INDEX) & np.isin(self.ids, token_ids)
        if not self.lengths.size:
            return np.zeros(0, dtype=bool)
        return np.add.reduceat(hit.astype(np.int64), self.offsets[:-1]) > 0


def row_arrays(dataset: Dataset) -> RowArrays:
    """Flat arrays of a prepared data set (``input_ids``, ``labels``, optional ``position_ids``)."""
    if dataset._indices is not None:  # a filtered / shuffled view: the rows it selects
        dataset = dataset.flatten_indices()

    def column(name: str) -> pa.ListArray:
        return dataset.data.column(name).combine_chunks()

    ids_col = column("input_ids")
    ids = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    labels = column("labels").flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = ids_col.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    if "position_ids" in dataset.column_names:  # packed: a row starts wherever its position is 0
        positions = column("position_ids").flatten().to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(positions == 0)
        offsets = np.concatenate([starts, [ids.size]]).astype(np.int64)
    return RowArrays(ids, labels, offsets)


def count_duplicates(dataset: Any) -> int:
    """Rows that repeat an earlier row exactly (all columns equal)."""
    seen: set[bytes] = set()
    duplicates = 0
    for row in dataset:
        key = hashlib.blake2b(json.dumps(row, sort_keys=True, default=str).encode(), digest_size=16).digest()
        if key in seen:
            duplicates += 1
        seen.add(key)
    return duplicates
