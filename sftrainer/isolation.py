"""Check that rows sharing a packed / padding-free batch cannot attend to each other.

Rather than trusting a list of attention implementations, the check runs the model once on a small
batch laid out exactly as the collator lays out training batches, and compares the logits of a row
placed after another row with the logits of the same row alone. Equal logits mean the row saw nothing
of its neighbour. This covers eager, SDPA, flex and FlashAttention alike, custom models too; a
backend that leaks is refused before training starts, never silently used.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sftrainer.errors import SFTrainerError

logger = logging.getLogger(__name__)


class ContaminationError(SFTrainerError):
    """Packed rows would attend to each other with this model's attention implementation."""


@torch.no_grad()
def check_row_isolation(model: Any, collator: Any, compute_dtype: torch.dtype | None = None) -> None:
    """Raise ``ContaminationError`` unless packed rows are isolated. Costs one tiny forward pass.

    Run it where training runs (the model on its training device, under the training autocast), as
    ``SFTTrainer`` does at the start of ``train()``: whether a backend isolates rows can depend on the
    device and kernel. ``compute_dtype``: the autocast dtype, if any (sets the tolerance).
    """
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randint(3, vocab, (7,), generator=gen), torch.randint(3, vocab, (5,), generator=gen)
    positions = torch.cat([torch.arange(7), torch.arange(5)])
    if collator.flatten:
        features = [{"input_ids": first.tolist()}, {"input_ids": second.tolist()}]
    else:  # one packed row, plus a plain row so the batch dimension is exercised too
        packed = torch.cat([first, second]).tolist()
        features = [{"input_ids": packed, "position_ids": positions.tolist()}, {"input_ids": first.tolist()}]
    batch = collator(features)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # use_cache=False as in training (SFTTrainer.compute_loss): with a cache, transformers skips
        # the packed-sequence mask.
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        together = model(**inputs, use_cache=False)
        alone = model(input_ids=second[None].to(device), use_cache=False)
    finally:
        model.train(was_training)
    got = together.logits[0, 7:12].float()
    want = alone.logits[0].float()
    error = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    compute_dtype = compute_dtype or model.dtype
    tolerance = 1e-3 if compute_dtype == torch.float32 else 3e-2
    impl = getattr(model.config, "_attn_implementation", None) or "unknown"
    if not error <= tolerance * scale:
        raise ContaminationError(
            f"packed rows attend to each other with attn_implementation='{impl}' "
            f"(logits differ by {error:.3g} from the row alone), so packing or padding-free batches "
            "would train on cross-row context. Use attn_implementation 'sdpa', 'eager', 'flex_attention' "
            "or 'flash_attention_2' (model.attn_implementation in YAML), or turn packing / padding_free off."
        )
    logger.info(
        "Packed rows are isolated with attn_implementation='%s' on %s in %s (max logit difference %.2g)",
        impl,
        device,
        str(compute_dtype).removeprefix("torch."),
        error,
    )
