"""Collators: tokenized rows -> batch tensors.

``PaddedCollator`` returns, for a batch of B rows padded on the right to length L:
``input_ids`` [B, L] (pad_token_id), ``attention_mask`` [B, L] (0 on padding), ``labels`` [B, L]
(``IGNORE_INDEX`` on padding and on untrained tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sftrainer.constants import IGNORE_INDEX


@dataclass
class PaddedCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, (feature, n) in enumerate(zip(features, lengths)):
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(feature.get("labels", feature["input_ids"]), dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PositionCollator:
    """Rows kept apart by ``position_ids`` instead of padding masks (packing and padding-free).

    ``flatten=True`` (padding-free): the whole batch becomes one row, ``input_ids`` / ``labels`` /
    ``position_ids`` of shape [1, T] with T the total number of tokens; no padding at all. Varlen
    FlashAttention reads the row boundaries from ``position_ids``; eager / SDPA / flex attention get
    a block-diagonal causal mask from transformers' mask utilities (no ``attention_mask`` is sent,
    which is what makes them look at ``position_ids``).

    ``flatten=False``: B rows (each one packed sequence) padded on the right to length L, shapes
    [B, L]. Attention cost stays B * L^2 instead of (B * L)^2 on backends that build dense masks.
    Padding gets its own positions (a separate block, label ``IGNORE_INDEX``).

    The first token of each row gets the label ``IGNORE_INDEX`` so nothing learns to follow the
    previous row.
    """

    pad_token_id: int
    flatten: bool = True
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [
            torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long).clone() for f in features
        ]
        positions = [
            torch.as_tensor(f["position_ids"], dtype=torch.long)
            if "position_ids" in f
            else torch.arange(len(f["input_ids"]), dtype=torch.long)
            for f in features
        ]
        for lab, pos in zip(labels, positions):
            lab[pos == 0] = IGNORE_INDEX
        if self.flatten:
            return {
                "input_ids": torch.cat(ids)[None],
                "labels": torch.cat(labels)[None],
                "position_ids": torch.cat(positions)[None],
            }
        width = max(len(t) for t in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        out_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        out_pos = torch.arange(width, dtype=torch.long).repeat(batch, 1)
        for row, (i, lab, pos) in enumerate(zip(ids, labels, positions)):
            n = len(i)
            out_ids[row, :n], out_labels[row, :n], out_pos[row, :n] = i, lab, pos
            out_pos[row, n:] -= n  # padding restarts at 0: its own block
        return {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos}
