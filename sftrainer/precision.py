"""Precision policy, in one place: what the hardware offers, which autocast a run uses, and which
dtype the trained weights are kept in.

- Compute: fp16 / bf16 autocast where it was asked for and an accelerator can run it; bf16 by default
  on an accelerator that supports it. The accelerator is whatever ``torch.accelerator`` reports
  (CUDA, Apple MPS, Intel XPU, ...), not CUDA alone.
- Storage: every trainable parameter is an fp32 master weight. AdamW's step at fine-tuning learning
  rates (about lr = 2e-5 per step) is far below the resolution of bf16 (8 significant bits: a weight
  of 1.0 moves in steps of 0.0078) and fp16, so a half-precision weight rounds most updates away and
  norm weights never change at all. Frozen weights (a LoRA base) keep their dtype: they are never
  updated, and half precision halves their memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import is_torch_bf16_gpu_available

from sftrainer.errors import warn_caller

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)


def accelerator_type() -> str | None:
    """The accelerator torch would train on ("cuda", "mps", "xpu", ...), or None on a CPU-only machine."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        device = accelerator.current_accelerator() if accelerator.is_available() else None
        return device.type if device is not None else None
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    xpu = getattr(torch, "xpu", None)
    return "xpu" if xpu is not None and xpu.is_available() else None


def has_accelerator() -> bool:
    return accelerator_type() is not None


def accelerator_supports_bf16() -> bool:
    """The check ``TrainingArguments`` validates ``bf16=True`` with, so a bf16 default never fails it."""
    return has_accelerator() and is_torch_bf16_gpu_available()


@dataclass(frozen=True)
class MixedPrecision:
    """The autocast a run uses; ``dropped`` names a precision that was asked for and cannot run."""

    fp16: bool
    bf16: bool
    dropped: str | None = None


def choose_mixed_precision(
    fp16: bool, bf16: bool | None, use_cpu: bool, accelerator: str | None, bf16_supported: bool
) -> MixedPrecision:
    """Decide fp16 / bf16 autocast from what was asked (``bf16=None``: not asked) and the hardware.

    Pure, so every combination is testable without the hardware. fp16 autocast needs an accelerator
    (on the CPU accelerate silently skips it); bf16 runs on the CPU too, but only when ``use_cpu=True``
    says so: without an accelerator, ``bf16=True`` alone most likely came from a GPU recipe.
    """
    on_cpu = use_cpu or accelerator is None
    if bf16 is None:
        bf16 = not fp16 and not on_cpu and bf16_supported
    if fp16 and on_cpu:
        return MixedPrecision(False, False, "fp16")
    if bf16 and accelerator is None and not use_cpu:
        return MixedPrecision(False, False, "bf16")
    return MixedPrecision(fp16, bf16)


def apply_mixed_precision(args: Any) -> None:
    """Set ``args.fp16`` / ``args.bf16`` for this machine; one warning when a request is dropped.

    Called from ``SFTConfig.__post_init__``, before ``TrainingArguments`` validates them.
    """
    accelerator = accelerator_type()
    choice = choose_mixed_precision(
        bool(args.fp16), args.bf16, bool(args.use_cpu), accelerator, accelerator_supports_bf16()
    )
    args.fp16, args.bf16 = choice.fp16, choice.bf16
    if choice.dropped is None:
        return
    where = "use_cpu=True was set" if accelerator is not None else "none is available"
    hint = " (for bf16 autocast on the CPU, set use_cpu=True)" if choice.dropped == "bf16" else ""
    warn_caller(
        f"{choice.dropped}=True needs a GPU or other accelerator (CUDA, MPS, XPU) and {where}: "
        f"training in fp32 on the CPU instead{hint}.",
        UserWarning,
    )
    if hasattr(args, "mixed_precision"):
        args.mixed_precision = "no"


def is_quantized(model: Any) -> bool:
    """k-bit models: their dtypes belong to transformers' quantizer and PEFT's k-bit preparation."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "hf_quantizer", None) is not None or bool(
        getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
    )


def keep_master_weights(model: Any, autocast: bool, callers_model: bool = True) -> Any:
    """Make every trainable parameter an fp32 master weight, in place; frozen ones keep their dtype.

    ``autocast``: the run computes under fp16/bf16 autocast, which lets fp32 and half operands meet.
    Without it an op cannot mix them (``F.linear`` raises), and only PEFT's adapter layers cast their
    own inputs; so if a trainable non-adapter tensor (``modules_to_save``, a bias) sits in a
    half-precision base, the whole model goes to fp32. ``callers_model``: the model object came from
    the caller, who may still hold it, so the conversion is a warning rather than an info line.

    A quantized base (QLoRA) follows the same policy for its non-quantized tensors (embeddings, norms,
    lm_head); its 4-bit / 8-bit weights are never converted (``model.to`` is refused for them).
    """
    params = [(n, p) for n, p in model.named_parameters() if not _is_quantized_param(p)]
    half_trained = [p for _, p in params if p.requires_grad and p.dtype in HALF_DTYPES]
    if not half_trained:
        return model
    half_frozen = [p for _, p in params if not p.requires_grad and p.dtype in HALF_DTYPES]
    dtypes = _names(half_trained)
    if half_frozen and autocast:
        for param in half_trained:
            param.data = param.data.to(torch.float32)
        what = f"the model's {len(half_trained)} trainable {dtypes} tensors (frozen ones keep their dtype)"
    elif is_quantized(model):
        for param in half_trained + half_frozen:
            param.data = param.data.to(torch.float32)
        what = f"all the model's non-quantized {_names(half_trained + half_frozen)} weights"
    else:
        model.to(torch.float32)
        what = f"all the model's {_names(half_trained + half_frozen)} weights"
        if half_frozen:
            what += (
                " (without bf16/fp16 autocast, float32 trained modules cannot run in a half-precision model)"
            )
    log = logger.warning if callers_model else logger.info
    log(
        "Converted %s to float32, in place: trainable weights are float32 master weights, because AdamW "
        "updates at fine-tuning learning rates are below %s resolution and would round away. bf16/fp16=True "
        "autocast still computes in half precision. To keep half-precision weights, train a LoRA adapter "
        "(peft_config): its frozen base keeps its dtype.",
        what,
        dtypes,
    )
    return model


def _is_quantized_param(param: torch.nn.Parameter) -> bool:
    """bitsandbytes' packed 4-bit / int8 weights (by class name: bitsandbytes is an optional extra)."""
    return type(param).__name__ in ("Params4bit", "Int8Params")


def _names(params: list[torch.nn.Parameter]) -> str:
    return "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in params}))
