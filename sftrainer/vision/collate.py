"""Batches of vision-language rows: the text laid out as for text rows, the images made into the
model's pixel inputs batch by batch (as TRL does: processed pixels would fill the disk).

``VisionCollator`` lays the tokens out with ``PaddedCollator`` (padded rows, an attention mask) or
``PositionCollator`` (packing and padding-free: rows kept apart by ``position_ids``), then decodes
the batch's images and runs the processor on them. The model scatters image features into its image
tokens in order (row-major over the batch), so the images are passed in the order their tokens
appear: row by row, and within a packed or flattened row, sequence by sequence.

Returns what the text collator returns (``input_ids``, ``labels``, ``attention_mask`` or
``position_ids``), plus the processor's image inputs (``pixel_values``, and per family
``pixel_attention_mask``, ``image_sizes``, ``image_grid_thw``, ...), plus ``token_type_ids`` /
``mm_token_type_ids`` (1 on image tokens) for the families whose processor returns them (Gemma 3
attends bidirectionally within an image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sftrainer.data.collate import PaddedCollator, PositionCollator
from sftrainer.data.formats import ChatExample
from sftrainer.errors import DataError
from sftrainer.vision.encode import VisionTokenizer, expand_placeholders
from sftrainer.vision.images import load_image, split_images, with_parts
from sftrainer.vision.processor import feature_token_ids, placeholder

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "text_replacement_offsets")
TYPE_ID_KEYS = ("token_type_ids", "mm_token_type_ids")


@dataclass
class VisionCollator:
    """Rows with ``input_ids``, ``labels``, ``images`` (and ``position_ids`` when packed) -> a batch.

    ``by_position``: lay the rows out as ``PositionCollator`` (packing / padding-free), with
    ``flatten`` as there; else as ``PaddedCollator``.
    """

    processor: Any
    pad_token_id: int
    by_position: bool = False
    flatten: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        text = [{k: v for k, v in f.items() if k != "images"} for f in features]
        if self.by_position:
            batch = PositionCollator(self.pad_token_id, self.flatten, self.pad_to_multiple_of)(text)
        else:
            batch = PaddedCollator(self.pad_token_id, self.pad_to_multiple_of)(text)
        images = [[load_image(ref) for ref in f.get("images") or []] for f in features]
        if self.by_position and self.flatten:
            images = [[image for row in images for image in row]]
        batch.update(image_inputs(self.processor, images, batch["input_ids"]))
        return batch


def image_inputs(processor: Any, images: Sequence[Sequence[Any]], input_ids: torch.Tensor) -> dict[str, Any]:
    """The processor's image inputs for ``images`` (a list per row of ``input_ids``), and the token
    type ids its model reads, built from ``input_ids``; {} when there are no images."""
    rows = [list(row) for row in images if row]
    out: dict[str, Any] = {}
    if rows:
        token = placeholder(processor)
        texts = [token * len(row) for row in rows]  # its text outputs are dropped: the rows have theirs
        processed = processor(text=texts, images=rows, return_tensors="pt", padding=True)
        out = {k: v for k, v in processed.items() if k not in TEXT_KEYS}
        for key in TYPE_ID_KEYS:
            if key in processed:
                out[key] = torch.isin(input_ids, torch.tensor(sorted(feature_token_ids(processor)))).long()
    return out


def prompt_inputs(
    processor: Any, messages: list[dict[str, Any]], images: Sequence[Any] = ()
) -> dict[str, Any]:
    """Model inputs (batch of one) for generating the answer to ``messages``, rendered and tokenized
    as training renders them: typed parts, the chat template's generation prompt, each image's
    expansion, BOS once. ``images`` (paths, bytes, PIL images) fill the messages' ``{"type": "image"}``
    parts in order, or, when the messages are plain strings, go before the first user text."""
    row, refs = split_images({"messages": messages, "images": list(images)}, "images" if images else None)
    loaded = [load_image(ref, f"image {k + 1}") for k, ref in enumerate(refs)]
    tokenizer = processor.tokenizer
    parts = with_parts(ChatExample(row["messages"])).messages
    text = tokenizer.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
    encoder = VisionTokenizer(processor)
    if text.count(encoder.placeholder) != len(loaded):
        raise DataError(
            f"the chat template renders {text.count(encoder.placeholder)} image placeholders for "
            f"{len(loaded)} image(s): give one {{'type': 'image'}} part per image"
        )
    text = expand_placeholders(text, encoder.placeholder, encoder.expansions([loaded])[0])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if encoder.text.bos_id is not None and ids[:1] != [encoder.text.bos_id]:
        ids.insert(0, encoder.text.bos_id)
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        **image_inputs(processor, [loaded], input_ids),
    }
