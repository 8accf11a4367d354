"""``SFTTrainer``: a ``transformers.Trainer`` that prepares SFT data and models in its constructor.

It accepts both call styles of TRL's ``SFTTrainer``:

- current: ``SFTTrainer(model="path", args=SFTConfig(max_length=...), processing_class=tok, ...)``
- older: ``SFTTrainer(model, tokenizer=tok, dataset_text_field=..., max_seq_length=..., packing=...,
  args=TrainingArguments(...))``, with one ``FutureWarning`` naming the new spelling.

After construction ``trainer.train_dataset`` holds the prepared rows (``input_ids``, ``labels``
with ``IGNORE_INDEX`` on every untrained token) and ``trainer.data_stats`` what preparing them
counted (rows, truncated, dropped). ``trainer.exact_match_predictions`` holds the prompt,
reference and prediction of each row scored by the last exact-match evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from sftrainer import lora, precision
from sftrainer.config import SFTConfig, to_sft_config
from sftrainer.data import load as data_load
from sftrainer.data.collate import PaddedCollator, PositionCollator
from sftrainer.data.pack import PackStats, pack_dataset
from sftrainer.data.prepare import PrepareStats, prepare
from sftrainer.errors import ConfigError, did_you_mean
from sftrainer.evaluate import exact_match
from sftrainer.isolation import check_row_isolation
from sftrainer.loss import accepts_logits_to_keep, sft_loss
from sftrainer.model import load_model, load_tokenizer, prepare_tokenizer

logger = logging.getLogger(__name__)

# Older TRL keyword arguments of SFTTrainer itself -> the SFTConfig field that now holds them.
LEGACY_KWARGS = {
    "dataset_text_field": "dataset_text_field",
    "max_seq_length": "max_length",
    "packing": "packing",
    "dataset_num_proc": "dataset_num_proc",
    "model_init_kwargs": "model_init_kwargs",
}


class SFTTrainer(Trainer):
    def __init__(
        self,
        model: str | PreTrainedModel | Any = None,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict[str, Any]], Any] | None = None,
        **legacy: Any,
    ):
        if model is None:
            raise ValueError("SFTTrainer needs a model: a PreTrainedModel, a PeftModel, or a path / hub id")
        output_dir = f"{Path(model).name or 'model'}-sft" if isinstance(model, str) else "sftrainer_output"
        # A copy: the older keywords and remove_unused_columns are written onto it, not the caller's.
        args = copy.copy(to_sft_config(args, output_dir))
        processing_class = self._apply_legacy(args, processing_class, legacy)

        callers_model = not isinstance(model, str)
        if isinstance(model, str):
            model_path = model
            model = load_model(model_path, **(args.model_init_kwargs or {}))
        if processing_class is None:
            processing_class = load_tokenizer(_model_path(model))
        processing_class = prepare_tokenizer(  # a copy where it changes: the caller's stays as it was
            processing_class,
            args.chat_template,
            chat_template_path=args.chat_template_path,
            eos_token=args.eos_token,
            pad_token=args.pad_token,
        )
        model = lora.apply(model, peft_config, gradient_checkpointing=bool(args.gradient_checkpointing))
        model = precision.keep_master_weights(model, args.bf16 or args.fp16, callers_model)
        self.data_stats: dict[str, PrepareStats] = {}
        self.pack_stats: dict[str, PackStats] = {}
        self.exact_match_predictions: list[dict[str, str]] = []  # filled by evaluate()
        if isinstance(train_dataset, DatasetDict | IterableDatasetDict):
            train_dataset, split_eval = data_load.split_dataset_dict(train_dataset)
            eval_dataset = eval_dataset if eval_dataset is not None else split_eval

        def tokenize(dataset: Any, name: str, pack: bool) -> Dataset | IterableDataset:
            return self._prepare(dataset, processing_class, args, name, formatting_func, pack)

        if train_dataset is not None:
            train_dataset = tokenize(train_dataset, "train data", args.packing)
        eval_pack = args.packing if args.eval_packing is None else args.eval_packing
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: tokenize(ds, f"eval data '{k}'", eval_pack) for k, ds in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = tokenize(eval_dataset, "eval data", eval_pack)

        by_position = args.packing or args.padding_free or (eval_pack and eval_dataset is not None)
        if data_collator is None:
            data_collator = self._default_collator(model, processing_class.pad_token_id, args, by_position)
        if by_position:
            # Our prepared rows hold exactly what the model needs; PEFT's forward signature hides
            # position_ids, and dropping them would merge the rows of a packed sequence.
            args.remove_unused_columns = False
        # Logits of trained positions only (see loss.py); models without logits_to_keep use their own loss.
        self._lean_loss = accepts_logits_to_keep(model)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self._checked_for_training = False
        self.add_callback(_RowIsolationCheck(self))

    def check_packed_isolation(self) -> None:
        """Refuse (``ContaminationError``) an attention backend that lets packed rows see each other.

        Run at the start of training (and of an evaluation outside training), so it tests the model
        as it runs: on the training device, under the training autocast, with the attention
        implementation of that moment, not as it sat on the CPU when the trainer was built.
        """
        if not isinstance(self.data_collator, PositionCollator):
            return
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        with self.accelerator.autocast():
            check_row_isolation(self.model, self.data_collator, dtypes.get(self.accelerator.mixed_precision))

    @staticmethod
    def _apply_legacy(args: SFTConfig, processing_class: Any, legacy: dict[str, Any]) -> Any:
        """Move older-TRL keyword arguments onto ``args``, with one FutureWarning for all of them."""
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
        warnings.warn(
            "SFTTrainer was called in the older TRL style, which still works. Current spelling: "
            + "; ".join(renames),
            FutureWarning,
            stacklevel=3,
        )
        return processing_class

    def _prepare(
        self,
        dataset: Any,
        tokenizer: Any,
        args: SFTConfig,
        name: str,
        formatting_func: Callable | None,
        pack: bool,
    ) -> Dataset | IterableDataset:
        """Load, tokenize and (optionally) pack one data set; counts go to data_stats / pack_stats."""
        dataset = data_load.load(dataset, name)
        settings = args.data_settings()
        if pack and args.packing_strategy == "bfd_split":
            settings = dataclasses.replace(settings, max_length=None)  # the packer splits long rows
        prepared, self.data_stats[name] = prepare(dataset, tokenizer, settings, name, formatting_func)
        if not pack:
            return prepared
        if not isinstance(prepared, Dataset):
            raise ConfigError(
                f"{name}: packing needs a map-style datasets.Dataset, not a streaming IterableDataset; "
                "load the data without streaming, or set packing=False (padding_free=True also avoids padding)"
            )
        packed, self.pack_stats[name] = pack_dataset(prepared, args.max_length, args.packing_strategy)
        summary = self.pack_stats[name].summary(name)
        truncated = self.data_stats[name].truncated
        logger.info(
            "%s%s", summary, f"; {truncated} rows were truncated to max_length first" if truncated else ""
        )
        return packed

    @staticmethod
    def _default_collator(model: Any, pad_token_id: int, args: SFTConfig, by_position: bool) -> Any:
        if not by_position:
            return PaddedCollator(pad_token_id, args.pad_to_multiple_of)
        impl = str(getattr(model.config, "_attn_implementation", "") or "")
        # Varlen FlashAttention reads row boundaries from one flat row. Backends that build a dense
        # mask (eager, SDPA) keep packed sequences as separate rows: B * L^2 attention, not (B * L)^2.
        flatten = (args.padding_free and not args.packing) or "flash" in impl
        return PositionCollator(pad_token_id, flatten=flatten, pad_to_multiple_of=args.pad_to_multiple_of)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        # Training never reads the KV cache, and with one transformers skips the packed-sequence
        # mask that keeps the rows of a packed / padding-free batch apart (transformers 5.x
        # masking_utils only derives it when no cache is passed).
        inputs = {**inputs, "use_cache": False}
        custom = self.compute_loss_func is not None or self.label_smoother is not None
        if return_outputs or custom or not self._lean_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, _ = sft_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts the trained tokens of every process and DDP averages the
            # gradients, so scale back up, as Trainer.compute_loss does for the model's own loss.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Trainer's evaluation (loss), plus greedy exact match when ``exact_match_samples`` > 0."""
        if not self._checked_for_training:  # else on_train_begin checked it, for this training run
            self.check_packed_isolation()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        n = self.args.exact_match_samples
        if n and isinstance(dataset, Dataset):
            rows = dataset.select(range(min(n, len(dataset))))
            score, self.exact_match_predictions = exact_match(
                self.model, self.processing_class, rows, self.args.exact_match_max_new_tokens
            )
            metrics[f"{metric_key_prefix}_exact_match"] = score
            self.log({f"{metric_key_prefix}_exact_match": score})
        return metrics


class _RowIsolationCheck(TrainerCallback):
    """Runs ``SFTTrainer.check_packed_isolation`` once the model is placed and prepared for training,
    before the first optimizer step."""

    def __init__(self, trainer: SFTTrainer):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.check_packed_isolation()
        self.trainer._checked_for_training = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._checked_for_training = False


def _model_path(model: Any) -> str:
    path = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if not path:
        raise ValueError(
            "pass processing_class= (the tokenizer): the model does not say where it was loaded from"
        )
    return path
