"""The isolation probe for rows with images: whether rows packed (or flattened) with their images
stay apart, checked on the model before training (``isolation.check_row_isolation`` is the probe for
text rows; this one adds an image to each row and runs the text probe too where the model's layers
carry state along the sequence).

``check_isolation`` raises ``ContaminationError`` (with what to set instead) for a family that
``model.packing_problem`` refuses, or when the second of two packed rows' logits differ from the same
row alone beyond the precision's tolerance; it logs the measured difference otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sftrainer.data.collate import PositionCollator
from sftrainer.errors import ContaminationError
from sftrainer.isolation import (
    REDUCED_TOLERANCE,
    attn_implementation,
    check_row_isolation,
    forward_logits,
    model_name,
    stateful_layers,
)
from sftrainer.vision.collate import VisionCollator
from sftrainer.vision.encode import VisionTokenizer
from sftrainer.vision.images import image_ref
from sftrainer.vision.model import packing_problem

logger = logging.getLogger(__name__)

# The row with its image vs the row alone, relative to max(1, max |logit|) of the row alone, in float32:
# looser than text rows' ``isolation.FP32_ALONE`` (1e-4), as this probe has always judged (not
# re-measured here). Reduced precision shares the text probe's bound.
FP32_ALONE_WITH_IMAGES = 1e-3


@torch.no_grad()
def check_isolation(model: Any, collator: Any, compute_dtype: torch.dtype | None = None) -> None:
    """Raise ``ContaminationError`` unless rows packed with their images are isolated.

    As ``isolation.check_row_isolation``, with an image in each row: two rows of text around an image
    each (different images) are laid out as the collator lays out training batches, and the logits of
    the second are compared with those of the same row alone, in a batch of its own.
    """
    problem = packing_problem(model)
    if problem is not None:
        raise ContaminationError(
            f"packing / padding_free: {problem}; set packing=False and padding_free=False"
        )
    if stateful_layers(model):  # rows of text show a state carried from one row into the next
        text = PositionCollator(collator.pad_token_id, flatten=collator.flatten)
        check_row_isolation(model, text, compute_dtype)
    processor = collator.processor
    encoder = VisionTokenizer(processor)
    images = [_probe_image(k) for k in range(2)]
    rows = []
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    for k, image in enumerate(images):
        (expansion,) = encoder.expansions([[image]])[0]
        ids = encoder.tokenizer(expansion, add_special_tokens=False)["input_ids"]
        before, after = (
            [i for i in torch.randint(3, vocab, (n,), generator=gen).tolist() if i not in encoder.special_ids]
            for n in (6 + k, 4)
        )
        rows.append({"input_ids": before + ids + after, "images": [image_ref(image, "probe")]})
    first, second = rows
    if collator.flatten:
        features = rows
    else:  # one packed row, plus a plain row so the batch dimension is exercised too
        positions = [*range(len(first["input_ids"])), *range(len(second["input_ids"]))]
        packed = {"input_ids": first["input_ids"] + second["input_ids"], "position_ids": positions}
        features = [{**packed, "images": first["images"] + second["images"]}, first]
    alone = VisionCollator(processor, collator.pad_token_id)([second])
    together = collator(features)
    span = (len(first["input_ids"]), len(first["input_ids"]) + len(second["input_ids"]))
    error, scale = _difference(model, together, alone, span)
    compute_dtype = compute_dtype or model.dtype
    tolerance = FP32_ALONE_WITH_IMAGES if compute_dtype == torch.float32 else REDUCED_TOLERANCE
    impl = attn_implementation(model)
    name = model_name(model)
    if not error <= tolerance * scale:
        typed = [k for k in ("token_type_ids", "mm_token_type_ids") if k in together]
        if typed:  # is it the bidirectional attention within images that crosses the rows?
            plain_together, plain_alone = (
                {k: v for k, v in b.items() if k not in typed} for b in (together, alone)
            )
            without, scale = _difference(model, plain_together, plain_alone, span)
            if without <= tolerance * scale:
                import transformers

                raise ContaminationError(
                    f"packing / padding_free with images: {name} attends bidirectionally within each image "
                    f"({typed[0]}), and transformers {transformers.__version__}'s attention masks do not keep "
                    f"that inside each packed row (logits differ by {error:.3g} from the row alone; without "
                    f"{typed[0]} by {without:.2g}). Set packing=False and padding_free=False for this model."
                )
        raise ContaminationError(
            f"packed rows with images attend to each other with {name} and attn_implementation='{impl}' "
            f"(logits differ by {error:.3g} from the row alone), so packing or padding-free batches would "
            "train on cross-row context. Set packing=False and padding_free=False, or try "
            "attn_implementation 'sdpa' or 'eager'."
        )
    logger.info(
        "Packed rows with images are isolated (%s, attn_implementation='%s', max logit difference %.2g)",
        name,
        impl,
        error,
    )


def _difference(model: Any, together: dict, alone: dict, span: tuple[int, int]) -> tuple[float, float]:
    """(max |logit difference| of the row at ``span`` of ``together``'s first row vs ``alone``, scale)."""
    got = forward_logits(model, together)[0, span[0] : span[1]]
    want = forward_logits(model, alone)[0]
    return (got - want).abs().max().item(), max(1.0, want.abs().max().item())


def _probe_image(k: int) -> Any:
    from PIL import Image  # as in vision.images: Pillow is imported where images are made

    gen = torch.Generator().manual_seed(k)
    pixels = torch.randint(0, 256, (48, 40, 3), generator=gen, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")
