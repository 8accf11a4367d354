"""Memory-saving settings of a run, checked and resolved in one place: the optimizer by name,
gradient (activation) checkpointing, and activation offloading.

- Optimizers are transformers' (``optim`` names ``OptimizerNames``). Some need an optional package:
  bitsandbytes (8-bit / paged AdamW, Lion, ...: the ``quant`` extra) or torchao (low-bit AdamW: the
  ``torchao`` extra). A missing one is a ``ConfigError`` when the config is built, naming the extra,
  not an ImportError after the model has loaded.
- Gradient checkpointing is non-reentrant unless the user says ``use_reentrant``: the reentrant
  variant needs an input that requires grad and re-runs the forward under ``no_grad`` rules
  (torch recommends non-reentrant; TRL defaults to it too).
- Activation offloading keeps the tensors saved for backward in (pinned) CPU memory. Parameters are
  not copied: they stay on the device anyway, so copying them would only cost transfers and host
  memory (torch's ``save_on_cpu`` copies every saved tensor).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from transformers.training_args import OptimizerNames

from sftrainer.constants import BITSANDBYTES_OPTIMIZERS, TORCHAO_OPTIMIZERS
from sftrainer.errors import did_you_mean

OPTIMIZER_NAMES = tuple(o.value for o in OptimizerNames)
# optim name -> (package it imports, sftrainer extra that installs it)
OPTIMIZER_PACKAGES = {
    **dict.fromkeys(BITSANDBYTES_OPTIMIZERS, ("bitsandbytes", "quant")),
    **dict.fromkeys(TORCHAO_OPTIMIZERS, ("torchao", "torchao")),
}


def is_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def optimizer_problems(optim: Any, installed: Callable[[str], bool] = is_installed) -> list[str]:
    """Problems with ``optim`` (a name or ``OptimizerNames``), as 'optim: problem'."""
    name = getattr(optim, "value", optim)
    if name not in OPTIMIZER_NAMES:
        return [
            f"optim: must be one of transformers' optimizer names (adamw_torch, adamw_torch_fused, "
            f"adamw_8bit, paged_adamw_8bit, adafactor, adamw_torch_4bit, ...), got {name!r}"
            f"{did_you_mean(str(name), OPTIMIZER_NAMES)}"
        ]
    package, extra = OPTIMIZER_PACKAGES.get(name, (None, None))
    if package is not None and not installed(package):
        return [f"optim: {name!r} needs {package}, which is not installed: pip install 'sftrainer[{extra}]'"]
    return []


def describe_optimizer(optim: Any) -> str:
    """``optim`` as the pre-flight block states it: the name, and what transformers' default is."""
    name = str(getattr(optim, "value", optim))
    if name == "adamw_torch_fused":  # TrainingArguments' default (transformers 5.25)
        return f"{name} (transformers' default: torch's fused AdamW, one kernel per device and dtype a step)"
    return name


def offloading_problems(activation_offloading: bool, use_cpu: bool) -> list[str]:
    """Why activation offloading cannot help this run, as 'activation_offloading: problem'."""
    if not activation_offloading:
        return []
    if use_cpu:
        where = "use_cpu=True trains on the CPU, where the activations are in CPU memory already"
    elif not torch.cuda.is_available():
        where = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    else:
        return []
    return [
        "activation_offloading: keeps the activations saved for backward in CPU memory instead of CUDA GPU "
        f"memory, so it needs a CUDA GPU, but {where}. Set activation_offloading=false; "
        "activation_checkpointing=true (gradient checkpointing) also saves activation memory"
    ]


def checkpointing_kwargs(enabled: bool, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpointing kwargs a run uses: the user's, with ``use_reentrant=False`` unless they set it.

    Returns a new dict (the caller's is never changed), or ``kwargs`` itself when checkpointing is off.
    """
    if not enabled:
        return kwargs
    return {"use_reentrant": False, **(kwargs or {})}


def offload_saved_tensors(enabled: bool, pin_memory: bool = True) -> contextlib.AbstractContextManager:
    """A context under which tensors saved for backward on a CUDA device are kept in CPU memory.

    A null context when ``enabled`` is False. Tensors already on the CPU, and parameters (which stay
    on the device whatever happens), are saved as they are.
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(*offload_hooks(pin_memory))


def offload_hooks(pin_memory: bool = True) -> tuple[Callable, Callable]:
    """(pack, unpack) for ``saved_tensors_hooks``: see ``offload_saved_tensors``."""

    def pack(tensor: torch.Tensor) -> Any:
        if not should_offload(tensor):
            return tensor
        pinned = pin_memory and not tensor.is_sparse
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pinned)
        host.copy_(tensor, non_blocking=pinned)
        return _Offloaded(tensor.device, host, pinned)

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, _Offloaded):
            return packed.host.to(packed.device, non_blocking=packed.pinned)
        return packed

    return pack, unpack


def should_offload(tensor: torch.Tensor) -> bool:
    """Whether a tensor saved for backward is copied to CPU memory: device tensors that are not parameters."""
    return tensor.device.type == "cuda" and not isinstance(tensor, torch.nn.Parameter)


class _Offloaded:
    __slots__ = ("device", "host", "pinned")

    def __init__(self, device: torch.device, host: torch.Tensor, pinned: bool):
        self.device, self.host, self.pinned = device, host, pinned
