"""The trainer's arguments: what ``SFTTrainer.__init__`` checks and settles before it builds anything.

Contract: each function is one step of the constructor's recipe, in the order it runs them, and takes
what it needs. ``trainer_args`` returns the trainer's own ``SFTConfig`` (a copy: the caller's is never
written to); ``apply_legacy`` and ``resolve_checkpointing`` write onto that copy, and say so.
``check_inputs`` and ``check_machine`` refuse, before any work, what the trainer cannot run; ``loss_plan``
is how the loss is computed, from the settings that choose it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from transformers import TrainingArguments
from transformers.trainer_pt_utils import AcceleratorConfig

from sftrainer import memory, sharding
from sftrainer.config import SFTConfig, to_sft_config
from sftrainer.errors import ConfigError, did_you_mean, warn_caller
from sftrainer.loss import LossPlan, plan_loss

# Older TRL keyword arguments of SFTTrainer itself -> the SFTConfig field that now holds them.
LEGACY_KWARGS = {
    "dataset_text_field": "dataset_text_field",
    "max_seq_length": "max_length",
    "packing": "packing",
    "dataset_num_proc": "dataset_num_proc",
    "model_init_kwargs": "model_init_kwargs",
}


def check_inputs(model: Any, train_dataset: Any, eval_dataset: Any) -> None:
    if model is None:
        raise ValueError("SFTTrainer needs a model: a PreTrainedModel, a PeftModel, or a path / hub id")
    if train_dataset is None and eval_dataset is None:
        raise ValueError(
            "`train_dataset` is required: SFTTrainer was given no data (pass train_dataset=, the rows to "
            "train on; to evaluate only, pass eval_dataset=)"
        )


def trainer_args(model: Any, args: SFTConfig | TrainingArguments | None) -> SFTConfig:
    """The trainer's own ``SFTConfig``: a copy, since the older keywords and remove_unused_columns are
    written onto it, not the caller's; without ``args``, the defaults with an output_dir named after
    the model."""
    output_dir = f"{Path(model).name or 'model'}-sft" if isinstance(model, str) else "sftrainer_output"
    return copy.copy(to_sft_config(args, output_dir))


def apply_legacy(args: SFTConfig, processing_class: Any, legacy: dict[str, Any]) -> Any:
    """Move older-TRL keyword arguments onto ``args`` (the trainer's copy), with one FutureWarning for all
    of them; the processing class, ``tokenizer=``'s where none was given."""
    known = {"tokenizer", *LEGACY_KWARGS}
    unknown = [k for k in legacy if k not in known]
    if unknown:
        raise TypeError(
            f"SFTTrainer got an unexpected keyword argument '{unknown[0]}'"
            f"{did_you_mean(unknown[0], [*known, 'peft_config', 'formatting_func', 'processing_class'])}"
        )
    if not legacy:
        return processing_class
    renames = []
    if "tokenizer" in legacy:
        tokenizer = legacy.pop("tokenizer")
        processing_class = processing_class if processing_class is not None else tokenizer
        renames.append("tokenizer= -> processing_class=")
    for key, value in legacy.items():
        renames.append(f"{key}= -> SFTConfig({LEGACY_KWARGS[key]}=...)")
        setattr(args, LEGACY_KWARGS[key], value)
    problems = args.problems()
    if problems:
        raise ValueError("Invalid SFTTrainer arguments:\n" + "\n".join(f"  {p}" for p in problems))
    warn_caller(
        "SFTTrainer was called in the older TRL style, which still works. Current spelling: "
        + "; ".join(renames),
        FutureWarning,
    )
    return processing_class


def check_machine(args: SFTConfig) -> None:
    """Refuse machines the settings cannot run on, before any work."""
    sharding.check_machine(args)  # FSDP / DeepSpeed without GPUs, FSDP without a launcher
    if args.n_gpu > 1:
        # Trainer would wrap the model in nn.DataParallel, which splits every tensor argument
        # (logits_to_keep too) across the GPUs of one process. TRL refuses it as well.
        raise ConfigError(
            f"{args.n_gpu} GPUs are visible to one process: launch with `torchrun --nproc_per_node "
            f"{args.n_gpu}` or `accelerate launch` (one process per GPU), or make one GPU visible "
            "with CUDA_VISIBLE_DEVICES"
        )


def device_transfers(args: SFTConfig, cuda: bool) -> None:
    """Batches to the GPU without a stall: where CUDA is present and the dataloader pins its batches
    (``dataloader_pin_memory``, transformers' default), they are copied with ``non_blocking`` (accelerate's
    ``non_blocking``, off by default), so the copy overlaps the previous step's kernels. On ``args`` (the
    trainer's copy), with a new ``accelerator_config``: the caller's is never written to.
    ``dataloader_pin_memory=False`` keeps both off."""
    config = args.accelerator_config  # an AcceleratorConfig once TrainingArguments.__post_init__ ran
    if not cuda or not args.dataloader_pin_memory or not isinstance(config, AcceleratorConfig):
        return
    if not config.non_blocking:
        args.accelerator_config = dataclasses.replace(config, non_blocking=True)


def resolve_checkpointing(args: SFTConfig) -> None:
    """Gradient checkpointing on ``args`` (the trainer's copy): non-reentrant unless the user says otherwise.

    transformers 5.x reads ``activation_checkpointing``; ``gradient_checkpointing`` (TRL's name) mirrors
    it once the config is built, so a script that sets either one afterwards gets checkpointing.
    transformers before 5.2x has only ``gradient_checkpointing`` (5.17 has no ``activation_checkpointing``
    field): then that is the one set.
    """
    enabled = bool(getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing)
    # TrainingArguments reads a JSON string into a dict (another string fails in checkpointing_kwargs).
    given = cast(
        dict[str, Any] | None,
        getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs,
    )
    kwargs = memory.checkpointing_kwargs(enabled, given)  # a new dict: the caller's stays as it was
    args.gradient_checkpointing, args.gradient_checkpointing_kwargs = enabled, kwargs
    if hasattr(args, "activation_checkpointing"):
        args.activation_checkpointing, args.activation_checkpointing_kwargs = enabled, kwargs


def loss_plan(model: Any, args: SFTConfig, compute_loss_func: Callable | None) -> LossPlan:
    """How the loss is computed (``loss.plan_loss``), from the settings that choose it."""
    return plan_loss(
        model,
        args.loss_type,
        args.router_aux_loss_coef,
        compute_loss_func,
        args.label_smoothing_factor,
        args.loss_chunk_size,
    )
