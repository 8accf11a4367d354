"""Collators: tokenized rows -> batch tensors.

``PaddedCollator`` returns, for a batch of B rows padded on the right to length L:
``input_ids`` [B, L] (pad_token_id), ``attention_mask`` [B, L] (0 on padding), ``labels`` [B, L]
(``IGNORE_INDEX`` on padding and on untrained tokens). ``PositionCollator`` keeps rows apart by
``position_ids`` (packing, padding-free). ``DataCollatorForLanguageModeling`` is TRL's public
collator, built on the two.
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
        width = _padded_width(max(lengths), self.pad_to_multiple_of)
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
    ``position_ids`` of shape [1, T] with T the total number of tokens; no padding at all, unless
    ``pad_to_multiple_of`` asks for it. Varlen
    FlashAttention reads the row boundaries from ``position_ids``; eager / SDPA / flex attention get
    a block-diagonal causal mask from transformers' mask utilities (no ``attention_mask`` is sent,
    which is what makes them look at ``position_ids``).

    ``flatten=False``: B rows (each one packed sequence) padded on the right to length L, shapes
    [B, L]. Attention cost stays B * L^2 instead of (B * L)^2 on backends that build dense masks.
    Padding has position 0 (each padding token a sequence of its own, as TRL lays it out) and the
    label ``IGNORE_INDEX``.

    The first token of each row gets the label ``IGNORE_INDEX`` so nothing learns to follow the
    previous row.

    ``flash_kwargs`` (with ``flatten``; for varlen FlashAttention): also ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` (int32, the offsets where each sequence starts, then T) and ``max_length_q`` /
    ``max_length_k`` (Python ints), the form ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``
    documents. Computed here, on the CPU: given ``position_ids`` alone, transformers derives them on the
    device in every attention layer, reading the maximum back to the host each time.
    """

    pad_token_id: int
    flatten: bool = True
    pad_to_multiple_of: int | None = None
    flash_kwargs: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
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
        if self.flatten:  # one row; padding to a multiple is a separate block at its end
            ids, labels, positions = [torch.cat(ids)], [torch.cat(labels)], [torch.cat(positions)]
        width = _padded_width(max(len(t) for t in ids), self.pad_to_multiple_of)
        rows = len(ids)
        out_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
        out_pos = torch.zeros((rows, width), dtype=torch.long)
        for row, (i, lab, pos) in enumerate(zip(ids, labels, positions)):
            n = len(i)
            out_ids[row, :n], out_labels[row, :n], out_pos[row, :n] = i, lab, pos
        batch: dict[str, Any] = {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos}
        if self.flatten and self.flash_kwargs:
            batch.update(flash_attention_kwargs(out_pos[0]))
        return batch


def flash_attention_kwargs(positions: torch.Tensor) -> dict[str, Any]:
    """Varlen FlashAttention's sequence boundaries for one flat row of ``position_ids`` (each sequence
    starts at position 0; a padding token is a sequence of its own)."""
    starts = torch.nonzero(positions == 0).flatten()
    cu_seq_lens = torch.cat([starts, torch.tensor([len(positions)])]).to(torch.int32)
    longest = int(cu_seq_lens.diff().max()) if len(positions) else 0
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


@dataclass
class DataCollatorForLanguageModeling:
    """TRL 1.16's collator, by name and constructor: ``from sftrainer import DataCollatorForLanguageModeling``.

    Rows: ``input_ids``, optionally ``labels`` (else the input ids are the labels), and TRL's
    ``completion_mask`` / ``assistant_masks`` (a row without ``labels`` is trained where they are 1;
    ``completion_mask`` only with ``completion_only_loss``, as older TRL collators did). Packed rows
    carry ``position_ids`` (sftrainer) or ``seq_lengths`` (TRL).

    Returns, as ``PaddedCollator``: ``input_ids``, ``attention_mask``, ``labels`` [B, L], plus
    ``position_ids`` [B, L] with ``return_position_ids``. With ``padding_free`` (or for packed rows), as
    ``PositionCollator``: ``input_ids``, ``labels``, ``position_ids``, no ``attention_mask``; rows that
    share a row of the batch never attend to each other. Unlike TRL's, packed rows (``seq_lengths``)
    are kept apart whatever ``padding_free`` says: TRL pads them as one sequence with an attention
    mask, so their documents attend to each other (README, "Switching from TRL").
    """

    pad_token_id: int
    padding_free: bool = False
    return_position_ids: bool = False
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    completion_only_loss: bool = True  # older TRL (<= 0.2x) keyword

    def __post_init__(self) -> None:
        if self.return_tensors != "pt":
            raise ValueError(
                f"return_tensors: only 'pt' is supported (as in TRL), got {self.return_tensors!r}"
            )

    @property
    def flatten(self) -> bool:  # as PositionCollator's, read by the isolation check
        return self.padding_free

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = [self._feature(example) for example in examples]
        packed = "position_ids" in features[0]
        if self.padding_free or packed:
            return PositionCollator(self.pad_token_id, self.padding_free, self.pad_to_multiple_of)(features)
        batch = PaddedCollator(self.pad_token_id, self.pad_to_multiple_of)(features)
        if self.return_position_ids:
            mask = batch["attention_mask"]
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0) * mask
        return batch

    @staticmethod
    def get_position_ids_from_packed_seq_lengths(
        batch_seq_lengths: Sequence[Sequence[int]],
    ) -> list[torch.Tensor]:
        """TRL's helper: the position ids of each packed row, restarting at 0 for each of its sequences.

        ``batch_seq_lengths``: per row, the lengths of the sequences packed into it. Returns one 1-D
        tensor per row, of the row's total length.
        """
        return [
            torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
            if len(lengths)
            else torch.zeros(0, dtype=torch.long)
            for lengths in batch_seq_lengths
        ]

    def _feature(self, example: dict[str, Any]) -> dict[str, Any]:
        ids = list(example["input_ids"])
        out: dict[str, Any] = {"input_ids": ids}
        labels = example.get("labels")
        if labels is None:
            masks = [example.get("assistant_masks")]
            if self.completion_only_loss:
                masks.append(example.get("completion_mask"))
            labels = list(ids)
            for mask in (m for m in masks if m is not None):
                labels = [label if bit else IGNORE_INDEX for label, bit in zip(labels, mask)]
        out["labels"] = list(labels)
        if "position_ids" in example:
            out["position_ids"] = list(example["position_ids"])
        elif "seq_lengths" in example:
            out["position_ids"] = [p for n in example["seq_lengths"] for p in range(n)]
        return out


def _padded_width(width: int, multiple: int | None) -> int:
    return -(-width // multiple) * multiple if multiple else width
