"""The token metrics TRL logs, accumulated per mode: ``mean_token_accuracy``, ``entropy``, ``num_tokens``.

``compute_loss`` adds each batch's sums (trained tokens, top-1 hits, summed entropy, see
``loss.token_stats``); training logs add the averages over the logging window, evaluation adds them
over the whole eval set, under the evaluation's prefix (``eval_mean_token_accuracy``), so they
reach callbacks and ``metric_for_best_model``. ``num_tokens`` is the number of input tokens
trained on so far, as TRL counts it: padding excluded where the batch has an attention mask; batches
laid out by position (packing, padding-free) count every position, including the few padding
tokens that end a packed row or round up to ``pad_to_multiple_of``.

Averages are over trained tokens (TRL averages per-batch averages; the two agree when batches hold
equally many trained tokens).

MoE models whose load-balancing loss is part of the trained loss also log ``aux_loss``, the mean of
the model's (unweighted) auxiliary loss over the batches of the window, as TRL does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes (identity on one)


class TokenMetrics:
    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._aux: dict[str, torch.Tensor | None] = {"train": None, "eval": None}  # [sum of means, batches]
        self._num_tokens: torch.Tensor | None = None  # this process's input tokens trained so far
        self._num_tokens_before = 0.0  # all processes' count when this run started (a resumed run's)
        self._num_tokens_host = 0  # this process's input tokens counted on the host (batches without a mask)
        self.last_count: dict[str, float] = {}  # trained tokens (all processes) of the last pop, per mode

    def start_count(self, num_tokens: float) -> None:
        """A training run starts with ``num_tokens`` already trained (0, or the count a resumed run had)."""
        self._num_tokens, self._num_tokens_before, self._num_tokens_host = None, float(num_tokens), 0

    def add(self, mode: str, stats: torch.Tensor, num_tokens: torch.Tensor | int | None = None) -> None:
        """Add one batch: ``stats`` = [trained tokens, top-1 hits, summed entropy]; input tokens when training."""
        previous = self._sums[mode]
        self._sums[mode] = stats.detach() if previous is None else previous + stats.detach()
        if isinstance(num_tokens, int):  # a batch's size, known on the host: no copy to the device
            self._num_tokens_host += num_tokens
        elif num_tokens is not None:
            count = num_tokens.detach().float()
            self._num_tokens = count if self._num_tokens is None else self._num_tokens + count

    def add_aux_loss(self, mode: str, aux_loss: torch.Tensor) -> None:
        """Add one batch's MoE auxiliary (load-balancing) loss, a scalar."""
        value = torch.stack([aux_loss.detach().float().reshape(()), torch.ones((), device=aux_loss.device)])
        previous = self._aux[mode]
        self._aux[mode] = value if previous is None else previous + value

    def pop(self, mode: str, reduce: Reduce, prefix: str = "") -> dict[str, float]:
        """The averages since the last pop, named ``{prefix}mean_token_accuracy`` etc. All processes call it."""
        sums, self._sums[mode] = self._sums[mode], None
        aux, self._aux[mode] = self._aux[mode], None
        if sums is None:
            return {}
        n, hits, entropy = reduce(sums).tolist()
        self.last_count[mode] = n
        out = {
            f"{prefix}entropy": entropy / n if n else 0.0,
            f"{prefix}mean_token_accuracy": hits / n if n else 0.0,
        }
        if aux is not None:
            total, batches = reduce(aux).tolist()
            out[f"{prefix}aux_loss"] = total / batches
        if self._num_tokens is not None or self._num_tokens_host:
            mine = sums.new_tensor(float(self._num_tokens_host))  # at logging only: one copy to the device
            if self._num_tokens is not None:
                mine = mine + self._num_tokens
            count = float(reduce(mine).item())
            out[f"{prefix}num_tokens"] = self._num_tokens_before + count
        return out


def input_tokens(inputs: dict[str, Any]) -> Any:
    """Input tokens of a batch, padding excluded where an attention mask says where it is."""
    mask = inputs.get("attention_mask")
    return mask.sum() if mask is not None else inputs["input_ids"].numel()
