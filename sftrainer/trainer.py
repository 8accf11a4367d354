"""``SFTTrainer``: a ``transformers.Trainer`` that prepares SFT data and models in its constructor.

It accepts both call styles of TRL's ``SFTTrainer``:

- current: ``SFTTrainer(model="path", args=SFTConfig(max_length=...), processing_class=tok, ...)``
- older: ``SFTTrainer(model, tokenizer=tok, dataset_text_field=..., max_seq_length=..., packing=...,
  args=TrainingArguments(...))``, with one ``FutureWarning`` naming the new spelling.

After construction ``trainer.train_dataset`` holds the prepared rows (``input_ids``, ``labels``
with ``IGNORE_INDEX`` on every untrained token) and ``trainer.data_stats`` what preparing them
counted (rows, truncated, dropped).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import PreTrainedModel, Trainer, TrainingArguments

from sftrainer import lora
from sftrainer.config import SFTConfig, to_sft_config
from sftrainer.data import load as data_load
from sftrainer.data.collate import PaddedCollator
from sftrainer.data.prepare import PrepareStats, prepare
from sftrainer.errors import did_you_mean
from sftrainer.evaluate import exact_match
from sftrainer.model import load_model, load_tokenizer, prepare_tokenizer, upcast_for_cpu

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
        args = to_sft_config(args, output_dir)
        processing_class = self._apply_legacy(args, processing_class, legacy)

        if isinstance(model, str):
            model_path = model
            model = load_model(model_path, **(args.model_init_kwargs or {}))
        if processing_class is None:
            processing_class = load_tokenizer(_model_path(model))
        prepare_tokenizer(processing_class, args.chat_template)
        model = upcast_for_cpu(model, args.precision_fallback)
        model = lora.apply(model, peft_config, gradient_checkpointing=bool(args.gradient_checkpointing))
        if args.gradient_checkpointing:
            model.config.use_cache = (
                False  # the KV cache is useless in training and conflicts with checkpointing
            )

        self.data_stats: dict[str, PrepareStats] = {}
        if isinstance(train_dataset, DatasetDict | IterableDatasetDict):
            train_dataset, split_eval = data_load.split_dataset_dict(train_dataset)
            eval_dataset = eval_dataset if eval_dataset is not None else split_eval
        settings = args.data_settings()
        if train_dataset is not None:
            train_dataset = self._prepare(
                train_dataset, processing_class, settings, "train data", formatting_func
            )
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                key: self._prepare(ds, processing_class, settings, f"eval data '{key}'", formatting_func)
                for key, ds in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._prepare(
                eval_dataset, processing_class, settings, "eval data", formatting_func
            )

        if data_collator is None:
            data_collator = PaddedCollator(processing_class.pad_token_id, args.pad_to_multiple_of)
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
        self, dataset: Any, tokenizer: Any, settings: Any, name: str, formatting_func: Callable | None
    ) -> Dataset | IterableDataset:
        dataset = data_load.load(dataset, name)
        prepared, stats = prepare(dataset, tokenizer, settings, name, formatting_func)
        self.data_stats[name] = stats
        return prepared

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Trainer's evaluation (loss), plus greedy exact match when ``exact_match_samples`` > 0."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        n = self.args.exact_match_samples
        if n and isinstance(dataset, Dataset):
            rows = dataset.select(range(min(n, len(dataset))))
            score, self.exact_match_samples = exact_match(
                self.model, self.processing_class, rows, self.args.exact_match_max_new_tokens
            )
            metrics[f"{metric_key_prefix}_exact_match"] = score
            self.log({f"{metric_key_prefix}_exact_match": score})
        return metrics


def _model_path(model: Any) -> str:
    path = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if not path:
        raise ValueError(
            "pass processing_class= (the tokenizer): the model does not say where it was loaded from"
        )
    return path
