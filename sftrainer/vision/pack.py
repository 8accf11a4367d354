"""Packing rows that carry images: ``pack_with_images``, ``data.pack.pack_dataset`` with each packed
sequence given its rows' images, in the order of its rows (the order the model meets their image tokens).

Input rows: ``input_ids``, ``labels`` and ``images`` (as ``data.prepare.prepare`` gives them with the
vision encoder); output: ``pack_dataset``'s rows plus ``images``. Only whole rows (``bfd``) can keep
their images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset

from sftrainer.data.pack import best_fit_decreasing, pack_dataset
from sftrainer.errors import ConfigError


def pack_with_images(dataset: Dataset, max_length: int, strategy: str = "bfd") -> tuple[Dataset, Any]:
    """``pack.pack_dataset`` for rows with ``images``: each packed sequence gets its rows' images, in
    the order of its rows (the order the model meets their image tokens).

    Only whole rows can carry their images (``bfd``): a row split across sequences would be parted
    from them. The rows' placement is recomputed here (best-fit decreasing is deterministic) and
    checked against the packed tokens, so the images can never land in another row's sequence.
    """
    if strategy != "bfd":
        raise ConfigError(
            f"packing_strategy='{strategy}' splits rows across sequences, which would part a row's tokens "
            "from its images; use packing_strategy='bfd' (whole rows) for image data"
        )
    if dataset._indices is not None:
        dataset = dataset.flatten_indices()
    packed, stats = pack_dataset(dataset.remove_columns("images"), max_length, strategy)
    ids = dataset.data.column("input_ids").combine_chunks()
    lengths = np.diff(ids.offsets.to_numpy().astype(np.int64))
    bins = best_fit_decreasing(lengths, max_length)
    order = np.lexsort((-lengths, bins))  # as pack_dataset lays the rows out: by bin, longest first
    want = ids.take(pa.array(order)).flatten().to_numpy(zero_copy_only=False)
    got = packed.data.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if not np.array_equal(want, got):
        raise RuntimeError(
            "pack_with_images: the packed rows are not in the order it expects (pack.py changed?)"
        )
    images = dataset.data.column("images").combine_chunks().take(pa.array(order))
    counts = np.diff(images.offsets.to_numpy().astype(np.int64))
    per_bin = np.bincount(bins[order], weights=counts, minlength=len(packed)).astype(np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_bin)]), pa.int32())
    table = packed.data.table.append_column("images", pa.ListArray.from_arrays(offsets, images.flatten()))
    return Dataset(table), stats
