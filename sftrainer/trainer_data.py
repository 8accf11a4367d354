"""The trainer's data inputs: what ``SFTTrainer.__init__`` makes of the data, the data collator and the
model's ability to keep packed rows apart.

Contract: each function is one step of the constructor's recipe, in the order it runs them, and takes
what it needs. ``prepare_datasets`` returns the ``DataPipeline`` and the train and eval data prepared by
it (packing refused first where the model cannot keep packed rows apart: ``check_packing_model``);
``check_packing_data`` says whether batches keep rows apart by position; ``collator`` returns the data
collator for the prepared rows; ``keep_columns`` turns ``remove_unused_columns`` off on ``args`` (the
trainer's copy) where the collator reads columns the model's forward does not name.
``check_packed_isolation`` probes, where training runs, that the collator's packed rows stay apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import torch
from datasets import DatasetDict, IterableDatasetDict
from transformers.trainer_utils import IntervalStrategy

from sftrainer import sharding
from sftrainer.config import SFTConfig
from sftrainer.data import load as data_load
from sftrainer.data.collate import DataCollatorForLanguageModeling, PaddedCollator, PositionCollator
from sftrainer.errors import ConfigError
from sftrainer.isolation import check_row_isolation, stateful_layers
from sftrainer.loss import LossPlan
from sftrainer.pipeline import DataPipeline
from sftrainer.vision.collate import VisionCollator
from sftrainer.vision.model import packing_problem
from sftrainer.vision.probe import check_isolation as check_vision_isolation
from sftrainer.vision.processor import is_processor, text_tokenizer

# The logger these lines were written under before this module existed: the CLI prints the name.
logger = logging.getLogger("sftrainer.trainer")


def prepare_datasets(
    model: Any,
    args: SFTConfig,
    processing_class: Any,
    data_collator: Any,
    formatting_func: Callable[[dict[str, Any]], Any] | None,
    train_dataset: Any,
    eval_dataset: Any,
) -> tuple[DataPipeline, Any, Any]:
    """The data pipeline, and the train and eval data prepared by it (a ``DatasetDict``'s test split
    is the eval data unless one is given); packing refused first where the model cannot keep packed
    rows apart. With ``eval_steps`` alone and no eval data, ``args.eval_strategy`` is set back to 'no'."""
    if isinstance(train_dataset, DatasetDict | IterableDatasetDict):
        train_dataset, split_eval = data_load.split_dataset_dict(train_dataset)
        eval_dataset = eval_dataset if eval_dataset is not None else split_eval
    eval_pack = args.packing if args.eval_packing is None else args.eval_packing
    if args.packing or args.padding_free or eval_pack or has_positions(train_dataset):
        check_packing_model(model, args, processing_class, data_collator)  # before preparing data
    pipeline = DataPipeline(processing_class, args, formatting_func)
    if train_dataset is not None:
        train_dataset = pipeline(train_dataset, "train data", args.packing)
    if isinstance(eval_dataset, dict):
        eval_dataset = {k: pipeline(ds, f"eval data '{k}'", eval_pack) for k, ds in eval_dataset.items()}
    elif eval_dataset is not None:
        eval_dataset = pipeline(eval_dataset, "eval data", eval_pack)
    elif "eval_strategy" in getattr(args, "_implied", ()):
        # eval_steps alone set eval_strategy='steps' (config.resolve_intervals): with no eval data
        # it does nothing, as in transformers, rather than stop at Trainer's "no eval_dataset".
        logger.warning("eval_steps=%s has no effect: there is no eval_dataset", args.eval_steps)
        args.eval_strategy = IntervalStrategy.NO
    return pipeline, train_dataset, eval_dataset


def check_packing_model(model: Any, args: SFTConfig, processing_class: Any, data_collator: Any) -> None:
    """Refuse packing / padding_free before the data is prepared where the model's family cannot keep
    packed rows apart (``vision.packing_problem``) or its layers carry state along the sequence
    (``isolation.stateful_layers``: the isolation probe runs now, on the model where it is).
    ``train()`` checks again where training runs.
    """
    problem = packing_problem(model) if is_processor(processing_class) else None
    if problem:
        raise ConfigError(f"packing / padding_free: {problem}; set packing=False and padding_free=False")
    ours = data_collator is None or isinstance(
        data_collator, PositionCollator | DataCollatorForLanguageModeling | VisionCollator
    )
    if not ours or sharding.is_partitioned(model) or not stateful_layers(model):
        return
    pad_id = text_tokenizer(processing_class).pad_token_id
    flat = flattens(model, args)
    check_row_isolation(model, PositionCollator(pad_id, flatten=flat, flash_kwargs=varlen_attention(model)))


def check_packing_data(model: Any, args: SFTConfig, train_dataset: Any, pipeline: DataPipeline) -> bool:
    """Whether batches keep rows apart by position (packing, padding-free, or rows packed already);
    refused for image rows of a family that cannot (``vision.packing_problem``)."""
    # Also with eval_packing and no eval set yet: evaluate(raw rows) packs them later.
    eval_pack = args.packing if args.eval_packing is None else args.eval_packing
    by_position = args.packing or args.padding_free or bool(eval_pack) or has_positions(train_dataset)
    problem = packing_problem(model) if by_position and pipeline.vision else None
    if problem:
        raise ConfigError(f"packing / padding_free: {problem}; set packing=False and padding_free=False")
    return by_position


def collator(
    given: Any, model: Any, processing_class: Any, args: SFTConfig, pipeline: DataPipeline, by_position: bool
) -> Any:
    """The data collator: ``given``, else the one for the prepared rows (images, rows as given,
    padded, or kept apart by position)."""
    if given is not None:
        return given
    pad_token_id = text_tokenizer(processing_class).pad_token_id
    flatten = by_position and flattens(model, args)
    # SFTConfig turns TRL's 'auto' into None and refuses any other string.
    pad_to = cast(int | None, args.pad_to_multiple_of)
    if pipeline.vision:  # rows with images: the processor makes their pixel inputs
        return VisionCollator(pipeline.tokenizer, pad_token_id, by_position, flatten, pad_to)
    if pipeline.skip:  # rows as given: TRL's collator also reads seq_lengths / loss masks
        return DataCollatorForLanguageModeling(pad_token_id, padding_free=flatten, pad_to_multiple_of=pad_to)
    if not by_position:
        return PaddedCollator(pad_token_id, pad_to)
    return PositionCollator(pad_token_id, flatten, pad_to, flash_kwargs=varlen_attention(model))


def keep_columns(args: SFTConfig, pipeline: DataPipeline, by_position: bool, loss_plan: LossPlan) -> None:
    """``remove_unused_columns`` off on ``args`` where the collator reads columns the model's forward does
    not name (images, position_ids); prompt tuning, which drops position_ids, refused with packing."""
    if pipeline.vision:
        args.remove_unused_columns = False  # the rows' images are read by the collator
    if by_position:
        if loss_plan.virtual_tokens:
            raise ConfigError(
                "packing / padding_free: PEFT prompt tuning drops position_ids, which keep the rows of a "
                "packed or padding-free batch apart; set packing=False and padding_free=False"
            )
        # Our prepared rows hold exactly what the model needs; PEFT's forward signature hides
        # position_ids, and dropping them would merge the rows of a packed sequence.
        args.remove_unused_columns = False


def check_packed_isolation(
    model: Any, collator: Any, accelerator: Any, checked: tuple | None
) -> tuple | None:
    """Refuse (``ContaminationError``) an attention backend that lets the rows ``collator`` packs see each
    other, probing ``model`` as it runs (its device, ``accelerator``'s autocast, its attention
    implementation); the conditions it passed under, or ``checked`` (those of the last pass) where they
    are the same or ``collator`` does not pack."""
    vision_packed = isinstance(collator, VisionCollator) and collator.by_position
    if not vision_packed and not isinstance(collator, PositionCollator | DataCollatorForLanguageModeling):
        return checked
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    check = check_vision_isolation if vision_packed else check_row_isolation
    # What the probe's result depends on: a run checks (and logs) it once, not again at each
    # evaluation before and after training, unless one of these changed in between.
    conditions = (
        id(model),
        str(next(model.parameters()).device),
        accelerator.mixed_precision,
        getattr(model.config, "_attn_implementation", None),
        getattr(collator, "flatten", None),
        check,
    )
    if conditions == checked:
        return checked
    with accelerator.autocast():
        check(model, collator, dtypes.get(accelerator.mixed_precision))
    return conditions


def flattens(model: Any, args: SFTConfig) -> bool:
    """Whether packed / padding-free batches are one flat row. Varlen FlashAttention reads row boundaries
    from one flat row; backends that build a dense mask (eager, SDPA) keep packed sequences as separate
    rows: B * L^2 attention, not (B * L)^2."""
    return (args.padding_free and not args.packing) or varlen_attention(model)


def varlen_attention(model: Any) -> bool:
    """Whether the model's attention takes no mask and reads where packed sequences start from
    ``position_ids`` / ``cu_seq_lens``: ``flash_attention_2`` / ``3``, a ``kernels`` hub FlashAttention
    kernel, or any implementation registered with FlashAttention's mask function (transformers registers
    hub kernels so)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    impl = str(getattr(model.config, "_attn_implementation", "") or "")
    try:
        return ALL_MASK_ATTENTION_FUNCTIONS[impl] is flash_attention_mask
    except KeyError:  # not registered (yet): by its name
        return "flash" in impl


def has_positions(dataset: Any) -> bool:
    """Rows packed before they reached the trainer (given as is): sftrainer's or TRL's packing columns."""
    columns = getattr(dataset, "column_names", None) or []
    return "position_ids" in columns or "seq_lengths" in columns
