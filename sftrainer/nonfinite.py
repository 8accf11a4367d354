"""The NaN / inf guard: no non-finite loss reaches the optimizer, and no non-finite weights reach a checkpoint.

- ``NonFiniteFlag``: each micro-batch's loss is folded into a flag that stays on the device (no
  host-device sync per micro-batch); ``check`` reads it once, before the optimizer step, and raises
  ``NonFiniteLossError`` (``check_loss``) naming the step if any micro-batch of it, on any process,
  had a NaN / inf loss. Under DeepSpeed, whose engine steps inside ``backward()``, the trainer reads it
  after every micro-batch instead (as before the flag existed): the step of a NaN in the last micro-batch
  is then already applied, and ``refuse_nonfinite_weights`` keeps it out of every checkpoint.
- ``check_loss``: the error for a NaN or infinite loss, raised before the optimizer applies it.
- ``first_nonfinite_parameter`` / ``refuse_nonfinite_weights``: weights that turned NaN / inf anyway
  are refused at the next save, so no checkpoint of a bad state is ever written.
"""

from __future__ import annotations

from typing import Any

import torch

from sftrainer.checkpoint import latest_checkpoint
from sftrainer.errors import NonFiniteLossError


class NonFiniteFlag:
    """The non-finite losses of the micro-batches since the last optimizer step, kept on the device.

    ``add`` costs a few device ops and never syncs; ``check`` syncs once (and, with several processes,
    all-reduces once), so that every process stops at the same step with the same message.
    """

    def __init__(self) -> None:
        self._count: torch.Tensor | None = None  # non-finite micro-batch losses, on the loss's device
        self._first: torch.Tensor | None = None  # the first such loss (NaN when there was none)

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float().sum()  # a scalar already (Trainer.training_step's); NaN / inf survive
        bad = ~torch.isfinite(loss)
        if self._count is None or self._first is None:
            self._count = torch.zeros((), device=loss.device)
            self._first = torch.full((), float("nan"), device=loss.device)
        self._first = torch.where(bad & (self._count == 0), loss, self._first)
        self._count = self._count + bad.float()

    def check(self, accelerator: Any, step: int, output_dir: str) -> None:
        """``NonFiniteLossError`` for optimizer step ``step`` (1-based) if a loss since the last check was
        NaN / inf, on this process or (NaN in the message) another one; then start over."""
        count, first = self._count, self._first
        self._count = self._first = None
        if count is None or first is None:
            return
        total = accelerator.reduce(count, "sum") if accelerator.num_processes > 1 else count
        if total.item():  # the one host-device sync per optimizer step
            check_loss(first if count.item() else torch.tensor(float("nan")), step, output_dir)


def check_loss(loss: torch.Tensor, step: int, output_dir: str) -> None:
    """Raise ``NonFiniteLossError`` naming ``step`` (1-based optimizer step) if ``loss`` is NaN or inf.

    Trainer itself (``logging_nan_inf_filter``) replaces such a loss by the running mean in the logs
    and applies its gradients: the weights turn NaN and every later checkpoint with them.
    """
    if torch.isfinite(loss).all():
        return
    value = "nan" if torch.isnan(loss).any() else "inf"
    last = latest_checkpoint(output_dir)
    kept = (
        f"the last checkpoint, {last}, is kept (resume_from_checkpoint: true continues from it)"
        if last
        else "no checkpoint was written before it"
    )
    raise NonFiniteLossError(
        f"the training loss is {value} at step {step}; training stopped before applying it, and {kept}. "
        "Lower learning_rate, set max_grad_norm, or check the data of that step"
    )


def first_nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first trainable parameter holding a NaN or inf, or None."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            return name
    return None


def refuse_nonfinite_weights(name: str, step: int, output_dir: str) -> None:
    """Raise ``NonFiniteLossError``: the weights at ``step`` hold NaN / inf, so no checkpoint is written."""
    last = latest_checkpoint(output_dir)
    kept = f"the last checkpoint, {last}, is kept" if last else "no checkpoint was written before it"
    raise NonFiniteLossError(
        f"the weights hold nan or inf after step {step} (first: {name}); training stopped without saving "
        f"them, and {kept}. Lower learning_rate or set max_grad_norm"
    )
