"""The NaN / inf guard: no non-finite loss reaches the optimizer, and no non-finite weights reach a checkpoint.

- ``NonFiniteFlag``: each micro-batch's loss is folded into a flag that stays on the device (no
  host-device sync per micro-batch). How the optimizer is kept from applying a non-finite step:
  - a fused optimizer (``adamw_torch_fused``, transformers' default; torch's fused Adam / AdamW / SGD /
    Adagrad) reads the flag itself, as ``found_inf``, the tensor torch's ``GradScaler`` hands it: its
    kernel skips the update on the device (``skip_on_device``). The flag stays set until it is read, so
    every later step is skipped too, and it is read (one sync) when the trainer logs, saves a checkpoint
    or ends training: no sync at all on the steps between (``on_device``);
  - any other optimizer, fp16 with its gradient scaler (which sets ``found_inf`` itself), or parameters
    sharded across processes (FSDP, tensor parallelism: the skip is checked on whole tensors only): the
    flag is read once before each optimizer step;
  - DeepSpeed, whose engine steps inside ``backward()``: read after every micro-batch, as before the flag
    existed (the step of a NaN in the last micro-batch is then already applied, and
    ``refuse_nonfinite_weights`` keeps it out of every checkpoint).
  ``check`` raises ``NonFiniteLossError`` (``check_loss``) naming the first step with a NaN / inf loss,
  on this process or another one.
- ``check_loss``: the error for a NaN or infinite loss, raised before the optimizer applies it.
- ``first_nonfinite_parameter`` / ``refuse_nonfinite_weights``: weights that turned NaN / inf anyway
  are refused at the next save, so no checkpoint of a bad state is ever written.
"""

from __future__ import annotations

from typing import Any

import torch

from sftrainer.checkpoint import latest_checkpoint
from sftrainer.errors import NonFiniteLossError


def on_device(optimizer: Any, accelerator: Any) -> bool:
    """Whether ``optimizer`` (or the one accelerate wraps) skips a step on the device given ``found_inf``:
    torch's fused optimizers do (``_step_supports_amp_scaling``), unless a gradient scaler (fp16) sets
    ``found_inf`` itself."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return (
        bool(getattr(inner, "_step_supports_amp_scaling", False))
        and getattr(accelerator, "scaler", None) is None
    )


def skip_on_device(optimizer: Any, found_inf: torch.Tensor | None) -> None:
    """Hand ``found_inf`` (1.0: skip this step) to a fused optimizer's next ``step``, as ``GradScaler``
    does; None takes it back."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if found_inf is not None:
        inner.found_inf = found_inf
    elif hasattr(inner, "found_inf"):
        del inner.found_inf


class NonFiniteFlag:
    """The non-finite losses of the micro-batches since the flag was last read, kept on the device.

    ``add`` costs a few device ops and never syncs; ``found_inf`` is the flag as a fused optimizer reads
    it (device ops only; an all-reduce with several processes); ``check`` syncs once (and, with several
    processes, gathers once), so that every process stops at the same step with the same message.
    """

    def __init__(self) -> None:
        self._count: torch.Tensor | None = None  # non-finite micro-batch losses, on the loss's device
        self._first: torch.Tensor | None = None  # the first such loss (NaN when there was none)
        self._step: torch.Tensor | None = None  # its optimizer step (1-based)

    def add(self, loss: torch.Tensor, step: int) -> None:
        """One micro-batch's loss, of optimizer step ``step`` (1-based)."""
        loss = loss.detach().float().sum()  # a scalar already (Trainer.training_step's); NaN / inf survive
        bad = ~torch.isfinite(loss)
        if self._count is None or self._first is None or self._step is None:
            self._count = torch.zeros((), device=loss.device)
            self._first = torch.full((), float("nan"), device=loss.device)
            self._step = torch.zeros((), device=loss.device)
        new = bad & (self._count == 0)
        self._first = torch.where(new, loss, self._first)
        self._step = torch.where(new, float(step), self._step)
        self._count = self._count + bad.float()

    def found_inf(self, accelerator: Any) -> torch.Tensor | None:
        """1.0 if a loss since the last read was NaN / inf on any process, else 0.0 (on the device)."""
        if self._count is None:
            return None
        bad = (self._count > 0).float()
        return accelerator.reduce(bad, "sum").clamp(max=1.0) if accelerator.num_processes > 1 else bad

    def check(self, accelerator: Any, step: int, output_dir: str) -> None:
        """``NonFiniteLossError`` if a loss since the last check was NaN / inf, on this process or
        another; ``step``: the optimizer step it is read at (1-based). Then start over."""
        count, first, at = self._count, self._first, self._step
        self._count = self._first = self._step = None
        if count is None or first is None or at is None:
            return
        row = torch.stack([count, first, at])[None]
        rows = accelerator.gather(row) if accelerator.num_processes > 1 else row
        bad = [r for r in rows.tolist() if r[0] > 0]  # the one host-device sync
        if bad:
            _, loss, first_step = min(bad, key=lambda r: r[2])
            check_loss(torch.tensor(loss), int(first_step), output_dir, read_at=step)


def check_loss(loss: torch.Tensor, step: int, output_dir: str, read_at: int | None = None) -> None:
    """Raise ``NonFiniteLossError`` naming ``step`` (1-based optimizer step) if ``loss`` is NaN or inf;
    ``read_at``: the step it was noticed at, when later (the optimizer skipped the steps in between).

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
    skipped = (
        f" (nor the steps after it: the optimizer skipped steps {step}-{read_at} on the device, and the "
        "flag is read when the trainer logs, saves or ends)"
        if read_at is not None and read_at > step
        else ""
    )
    raise NonFiniteLossError(
        f"the training loss is {value} at step {step}; training stopped before applying it{skipped}, and "
        f"{kept}. Lower learning_rate, set max_grad_norm, or check the data of that step"
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
