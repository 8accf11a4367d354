"""Token-normalised causal-LM loss that computes logits only where a token is trained.

In SFT most positions are prompt or padding, and their logits (batch x length x vocabulary, often the
largest tensor of the step) are thrown away by the loss. The model is asked for the logits of the
trained positions only, through the ``logits_to_keep`` argument transformers models take, so the
LM head, the softmax and their gradients run on those positions alone. Everything the model does to
its logits (final soft-capping, scaling) still happens, since it is the model's own forward.

The loss is the sum of token losses divided by ``num_items_in_batch`` (the trained tokens of the
whole optimizer step, counted by ``Trainer``), so gradient accumulation gives the gradients of one
big batch.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from sftrainer.constants import IGNORE_INDEX

CHUNK_POSITIONS = 2048  # positions per fp32 upcast of the logits: bounds the fp32 copy for bf16 models


def accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions p whose logits are trained: those where label p + 1 is not ignored, in any row.

    labels: [B, T] (not shifted). Returns a 1-D index tensor into the sequence dimension.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def sft_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[torch.Tensor, Any]:
    """Sum of the cross-entropy of trained tokens / number of trained tokens. Returns (loss, outputs)."""
    labels = inputs["labels"]
    keep = trained_positions(labels)  # [K]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**model_inputs, logits_to_keep=keep)
    logits = outputs.logits  # [B, K, V]
    targets = labels[:, keep + 1]  # [B, K]: the token each kept position predicts
    total = logits.new_zeros((), dtype=torch.float32)
    for lo in range(0, targets.shape[1], CHUNK_POSITIONS):
        chunk = logits[:, lo : lo + CHUNK_POSITIONS].float()
        total = total + F.cross_entropy(
            chunk.reshape(-1, chunk.shape[-1]),
            targets[:, lo : lo + CHUNK_POSITIONS].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch, outputs
