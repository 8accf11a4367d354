"""``SFTTrainer``: a ``transformers.Trainer`` that prepares SFT data and models in its constructor.

It accepts both call styles of TRL's ``SFTTrainer``:

- current: ``SFTTrainer(model="path", args=SFTConfig(max_length=...), processing_class=tok, ...)``
- older: ``SFTTrainer(model, tokenizer=tok, dataset_text_field=..., max_seq_length=..., packing=...,
  args=TrainingArguments(...))``, with one ``FutureWarning`` naming the new spelling.

After construction ``trainer.train_dataset`` holds the prepared rows (``input_ids``, ``labels``
with ``IGNORE_INDEX`` on every untrained token) and ``trainer.data_stats`` what preparing them
counted (rows, truncated, dropped); ``trainer.data_pipeline`` prepares them, and raw data given to
``evaluate`` later. ``trainer.loss_plan`` says how the loss is computed (decided and logged once).

Logging: ``ConsoleCallback`` (console.py) replaces transformers' progress / printer callbacks, every
log event is appended to ``<output_dir>/metrics.jsonl``, generation samples go to TensorBoard / W&B, and
TensorBoard's event files go to ``<output_dir>/runs/`` from the first log on (tracking.py).

Checkpoints are written atomically, ``train(resume_from_checkpoint=True)`` skips incomplete ones, and
a NaN / inf loss or weights stop training with ``NonFiniteLossError`` (see ``sftrainer.checkpoint``).

Train and eval logs carry TRL's token metrics (``mean_token_accuracy``, ``entropy``, ``num_tokens``),
and ``aux_loss`` where an MoE model's load-balancing loss is trained (``aux_loss_enabled``); the
end-of-training summary carries those of the steps after the last log. Train logs add
``train_tokens_per_second`` (trained tokens per second of training time since the previous log),
eval metrics ``eval_perplexity`` (exp of ``eval_loss``).

Generation-based evaluation (``exact_match_samples`` eval rows, or ``generation_prompts``) runs
inside the evaluation loop, so its metrics (``eval_exact_match``, ``eval_normalized_match``,
``eval_<scorer>``) reach ``on_evaluate`` callbacks and ``metric_for_best_model``. Its samples
(prompt, reference, prediction, scores) are ``trainer.generation_samples`` (the latest evaluation;
``trainer.generation_samples_file`` is where they were written: ``OUTPUT_DIR/eval_samples/
step-<global_step>.jsonl``, copied to ``OUTPUT_DIR/eval_samples.jsonl``), set before ``on_evaluate``.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import IntervalStrategy, align_special_tokens, rotate_checkpoints

from sftrainer import checkpoint, lora, memory, precision, quant, run, run_dir, sharding, template_tokens
from sftrainer.config import OVERWRITE_AND_RESUME, SFTConfig, to_sft_config
from sftrainer.console import ConsoleCallback
from sftrainer.constants import MODEL_TAGS
from sftrainer.data import load as data_load
from sftrainer.data.collate import DataCollatorForLanguageModeling, PaddedCollator, PositionCollator
from sftrainer.data.pack import PackStats
from sftrainer.data.prepare import PrepareStats
from sftrainer.errors import ConfigError, did_you_mean, warn_caller
from sftrainer.evaluate import (
    format_samples,
    generate_samples,
    generation_prompt_rows,
    load_scorer,
    mean_scores,
)
from sftrainer.isolation import check_row_isolation, stateful_layers
from sftrainer.loss import (
    CHUNKED,
    TRAINER,
    plan_loss,
    sft_loss,
    token_stats,
    verify_chunked,
    without_chunking,
)
from sftrainer.metrics import TokenMetrics
from sftrainer.model import load_model, load_processor, load_tokenizer, prepare_tokenizer
from sftrainer.pipeline import DataPipeline
from sftrainer.tracking import MetricsFileCallback, SamplesCallback, place_tensorboard_logs
from sftrainer.vision.collate import VisionCollator
from sftrainer.vision.model import adapt_for_training, is_vision_model, packing_problem, prepare_processor
from sftrainer.vision.probe import check_isolation as check_vision_isolation
from sftrainer.vision.processor import is_processor, text_tokenizer

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
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict[str, Any]], Any] | None = None,
        **legacy: Any,
    ):
        if model is None:
            raise ValueError("SFTTrainer needs a model: a PreTrainedModel, a PeftModel, or a path / hub id")
        if train_dataset is None and eval_dataset is None:
            raise ValueError(
                "`train_dataset` is required: SFTTrainer was given no data (pass train_dataset=, the rows to "
                "train on; to evaluate only, pass eval_dataset=)"
            )
        output_dir = f"{Path(model).name or 'model'}-sft" if isinstance(model, str) else "sftrainer_output"
        # A copy: the older keywords and remove_unused_columns are written onto it, not the caller's.
        args = copy.copy(to_sft_config(args, output_dir))
        processing_class = self._apply_legacy(args, processing_class, legacy)
        sharding.check_machine(args)  # FSDP / DeepSpeed without GPUs, FSDP without a launcher
        if args.n_gpu > 1:
            # Trainer would wrap the model in nn.DataParallel, which splits every tensor argument
            # (logits_to_keep too) across the GPUs of one process. TRL refuses it as well.
            raise ConfigError(
                f"{args.n_gpu} GPUs are visible to one process: launch with `torchrun --nproc_per_node "
                f"{args.n_gpu}` or `accelerate launch` (one process per GPU), or make one GPU visible "
                "with CUDA_VISIBLE_DEVICES"
            )
        self._resolve_checkpointing(args)

        callers_model = not isinstance(model, str)
        if isinstance(model, str):
            model_path = model
            init_kwargs = {"trust_remote_code": args.trust_remote_code, **(args.model_init_kwargs or {})}
            if quantization_config is not None:
                if "quantization_config" in init_kwargs:
                    raise ConfigError(
                        "quantization_config is given twice: as an argument and in model_init_kwargs"
                    )
                init_kwargs["quantization_config"] = quantization_config
            model = load_model(model_path, **init_kwargs)
        elif quantization_config is not None:
            warn_caller(
                "quantization_config is ignored: the model is already loaded (pass a path to load it quantized)"
            )
        vlm = is_vision_model(model)
        if processing_class is None:
            load = load_processor if vlm else load_tokenizer
            # The tokenizer of the checkpoint the model came from: at the revision it was loaded at.
            revision = (args.model_init_kwargs or {}).get("revision") if not callers_model else None
            processing_class = load(_model_path(model), args.trust_remote_code, revision)
        prepare = prepare_processor if is_processor(processing_class) else prepare_tokenizer
        given = processing_class
        processing_class = prepare(  # a copy where it changes: the caller's stays as it was
            processing_class,
            args.chat_template,
            chat_template_path=args.chat_template_path,
            eos_token=args.eos_token,
            pad_token=args.pad_token,
        )
        if processing_class is not given and not is_processor(processing_class):
            # Tokens a chat_template_path template brought: rows in the model, trained.
            new_ids = template_tokens.new_token_ids(given, processing_class)
            template_tokens.grow_embeddings(model, processing_class, new_ids, callers_model)
            peft_config = template_tokens.trainable_rows(model, peft_config, processing_class, new_ids)
        # The model's config and generation config take the EOS / pad / BOS training uses (as TRL), now
        # rather than when Trainer.train() would (and report it as a change the user did not make).
        align_special_tokens(model, processing_class)
        if peft_config is not None:
            # LoRA's A matrices are drawn at random here, before Trainer.__init__ seeds torch: without
            # this, two trainers built in one process start from different adapters whatever `seed` says.
            set_seed(args.seed)
        if is_processor(processing_class):
            _refuse_for_vision(args)
        if vlm:  # the language model trains; the vision tower and projector unless asked (sftrainer.vision)
            peft_config = adapt_for_training(
                model, peft_config, args.train_projector, args.train_vision_tower
            )
        model = lora.apply(model, peft_config, gradient_checkpointing=bool(args.gradient_checkpointing))
        quant.check_trainable(model)  # a 4-bit / 8-bit base trains only through an adapter
        quant.keep_training_layout(model)  # bitsandbytes' CPU inference layout has no backward
        if sharding.is_partitioned(model):
            # ZeRO-3 partitioned the weights as they loaded (each parameter holds an empty placeholder)
            # and its optimizer keeps fp32 master copies itself under bf16 / fp16.
            logger.info("DeepSpeed ZeRO-3 keeps the master weights: their dtypes are left as loaded")
        else:
            model = precision.keep_master_weights(model, args.bf16 or args.fp16, callers_model)
        self.generation_samples: list[dict[str, Any]] = []  # filled by evaluate(); see the module docstring
        self.generation_samples_file: Path | None = None
        self._generation_source: Dataset | IterableDataset | None = None
        self._generation_prompts: tuple[Dataset, list[bool]] | None = None  # prepared once, when first used
        self._log_window = (time.perf_counter(), 0.0)  # (start, seconds spent evaluating since)
        if isinstance(train_dataset, DatasetDict | IterableDatasetDict):
            train_dataset, split_eval = data_load.split_dataset_dict(train_dataset)
            eval_dataset = eval_dataset if eval_dataset is not None else split_eval

        eval_pack = args.packing if args.eval_packing is None else args.eval_packing
        if args.packing or args.padding_free or eval_pack or _has_positions(train_dataset):
            self._check_packing_model(model, args, processing_class, data_collator)  # before preparing data
        self.data_pipeline = DataPipeline(processing_class, args, formatting_func)
        self.data_stats: dict[str, PrepareStats] = self.data_pipeline.data_stats
        self.pack_stats: dict[str, PackStats] = self.data_pipeline.pack_stats
        if train_dataset is not None:
            train_dataset = self.data_pipeline(train_dataset, "train data", args.packing)
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: self.data_pipeline(ds, f"eval data '{k}'", eval_pack) for k, ds in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self.data_pipeline(eval_dataset, "eval data", eval_pack)
        elif "eval_strategy" in getattr(args, "_implied", ()):
            # eval_steps alone set eval_strategy='steps' (config.resolve_intervals): with no eval data
            # it does nothing, as in transformers, rather than stop at Trainer's "no eval_dataset".
            logger.warning("eval_steps=%s has no effect: there is no eval_dataset", args.eval_steps)
            args.eval_strategy = IntervalStrategy.NO

        # Also with eval_packing and no eval set yet: evaluate(raw rows) packs them later.
        by_position = args.packing or args.padding_free or bool(eval_pack) or _has_positions(train_dataset)
        problem = packing_problem(model) if by_position and self.data_pipeline.vision else None
        if problem:
            raise ConfigError(f"packing / padding_free: {problem}; set packing=False and padding_free=False")
        if data_collator is None:
            pad_id = text_tokenizer(processing_class).pad_token_id
            data_collator = self._default_collator(model, pad_id, args, by_position)
        self.loss_plan = plan_loss(
            model,
            args.loss_type,
            args.router_aux_loss_coef,
            compute_loss_func,
            args.label_smoothing_factor,
            args.loss_chunk_size,
        )
        if self.data_pipeline.vision:
            args.remove_unused_columns = False  # the rows' images are read by the collator
        if by_position:
            if self.loss_plan.virtual_tokens:
                raise ConfigError(
                    "packing / padding_free: PEFT prompt tuning drops position_ids, which keep the rows of a "
                    "packed or padding-free batch apart; set packing=False and padding_free=False"
                )
            # Our prepared rows hold exactly what the model needs; PEFT's forward signature hides
            # position_ids, and dropping them would merge the rows of a packed sequence.
            args.remove_unused_columns = False
        self._token_metrics = TokenMetrics()
        self._logits_needed = True  # False inside a loss-only evaluation loop
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
        engine = _parameter_sharding(self)
        if engine:
            self.loss_plan = without_chunking(self.loss_plan, f"{engine} shards the LM head's weight")
        logger.info("%s", self.loss_plan.describe())
        self._checked_for_training = False
        self._isolation_checked: tuple | None = None  # the conditions check_packed_isolation passed under
        self._checkpoint_staging: str | None = None  # set while _save_checkpoint writes
        self._output_dir_claimed = False  # this trainer has evaluated or trained into output_dir
        if hasattr(self.model, "add_model_tags"):  # model-card tags of what save_model / push_to_hub write
            self.model.add_model_tags(list(MODEL_TAGS))
        self.add_callback(_TrainingRunHooks(self))
        # Compact lines, a bar on terminals and a summary instead of the raw dicts transformers prints.
        for printer in {ProgressCallback, PrinterCallback, DEFAULT_PROGRESS_CALLBACK}:
            self.remove_callback(printer)
        for callback in (ConsoleCallback(), MetricsFileCallback(), SamplesCallback(self)):
            self.add_callback(callback)
        place_tensorboard_logs(self.callback_handler.callbacks, args.output_dir)

    def check_packed_isolation(self) -> None:
        """Refuse (``ContaminationError``) an attention backend that lets packed rows see each other.

        Run at the start of training (and of an evaluation outside training), so it tests the model
        as it runs: on the training device, under the training autocast, with the attention
        implementation of that moment, not as it sat on the CPU when the trainer was built. Skipped
        when the model, device, autocast, attention implementation and layout are those it passed
        under last time (the evaluations before and after training of one run).
        """
        collator = self.data_collator
        vision_packed = isinstance(collator, VisionCollator) and collator.by_position
        if not vision_packed and not isinstance(collator, PositionCollator | DataCollatorForLanguageModeling):
            return
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        check = check_vision_isolation if vision_packed else check_row_isolation
        # What the probe's result depends on: a run checks (and logs) it once, not again at each
        # evaluation before and after training, unless one of these changed in between.
        conditions = (
            id(self.model),
            str(next(self.model.parameters()).device),
            self.accelerator.mixed_precision,
            getattr(self.model.config, "_attn_implementation", None),
            getattr(collator, "flatten", None),
            check,
        )
        if conditions == self._isolation_checked:
            return
        with self.accelerator.autocast():
            check(self.model, collator, dtypes.get(self.accelerator.mixed_precision))
        self._isolation_checked = conditions

    @staticmethod
    def _check_packing_model(model: Any, args: SFTConfig, processing_class: Any, data_collator: Any) -> None:
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
        check_row_isolation(model, PositionCollator(pad_id, flatten=_flattens(model, args)))

    @staticmethod
    def _resolve_checkpointing(args: SFTConfig) -> None:
        """Gradient checkpointing on ``args`` (the trainer's copy): non-reentrant unless the user says otherwise.

        transformers 5.x reads ``activation_checkpointing``; ``gradient_checkpointing`` (TRL's name) mirrors
        it once the config is built, so a script that sets either one afterwards gets checkpointing.
        """
        enabled = bool(args.activation_checkpointing or args.gradient_checkpointing)
        given = args.activation_checkpointing_kwargs or args.gradient_checkpointing_kwargs
        kwargs = memory.checkpointing_kwargs(enabled, given)  # a new dict: the caller's stays as it was
        args.activation_checkpointing = args.gradient_checkpointing = enabled
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = kwargs

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
        warn_caller(
            "SFTTrainer was called in the older TRL style, which still works. Current spelling: "
            + "; ".join(renames),
            FutureWarning,
        )
        return processing_class

    def _default_collator(self, model: Any, pad_token_id: int, args: SFTConfig, by_position: bool) -> Any:
        flatten = by_position and _flattens(model, args)
        if self.data_pipeline.vision:  # rows with images: the processor makes their pixel inputs
            return VisionCollator(
                self.data_pipeline.tokenizer, pad_token_id, by_position, flatten, args.pad_to_multiple_of
            )
        if self.data_pipeline.skip:  # rows as given: TRL's collator also reads seq_lengths / loss masks
            return DataCollatorForLanguageModeling(
                pad_token_id, padding_free=flatten, pad_to_multiple_of=args.pad_to_multiple_of
            )
        if not by_position:
            return PaddedCollator(pad_token_id, args.pad_to_multiple_of)
        return PositionCollator(pad_token_id, flatten=flatten, pad_to_multiple_of=args.pad_to_multiple_of)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        # Training never reads the KV cache, and with one transformers skips the packed-sequence
        # mask that keeps the rows of a packed / padding-free batch apart (transformers 5.x
        # masking_utils only derives it when no cache is passed).
        inputs = {**inputs, "use_cache": False}
        plan = self.loss_plan
        labels = inputs.get("labels")
        with self._activation_offloading(model):
            if plan.kind == TRAINER:
                # Trainer's loss: compute_loss_func's, or the model's own, to which an MoE model adds its
                # load-balancing loss itself (plan_loss set the config's output_router_logits and coefficient).
                loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
                aux = getattr(outputs, "aux_loss", None) if plan.aux_coef else None
                if aux is not None:
                    self._token_metrics.add_aux_loss("train" if model.training else "eval", aux)
                stats = None
                if labels is not None:
                    v = plan.virtual_tokens
                    stats = token_stats(outputs.logits[:, v : v + labels.shape[1] - 1], labels[:, 1:])
            else:
                if plan.kind == CHUNKED and not plan.verified and "input_ids" in inputs:
                    self.loss_plan = plan = verify_chunked(model, inputs["input_ids"], plan)
                full = return_outputs and self._logits_needed
                loss, outputs, stats = sft_loss(model, inputs, num_items_in_batch, plan, full_logits=full)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    # num_items_in_batch counts the trained tokens of every process and DDP averages the
                    # gradients, so scale back up, as Trainer.compute_loss does for the model's own loss.
                    loss = loss * (self.accelerator.num_processes // self.get_tp_size())
                aux = getattr(outputs, "aux_loss", None) if plan.aux_coef else None
                if aux is not None:
                    self._token_metrics.add_aux_loss("train" if model.training else "eval", aux)
                    # A per-micro-batch mean: with num_items_in_batch, Trainer leaves gradient accumulation
                    # to the loss, so average it over the accumulated micro-batches (as TRL).
                    steps = getattr(self, "current_gradient_accumulation_steps", 1)
                    accumulated = num_items_in_batch is not None and model.training
                    loss = loss + plan.aux_coef * aux.to(loss.device) / (steps if accumulated else 1)
        if stats is not None:
            mode = "train" if model.training else "eval"
            self._token_metrics.add(mode, stats, _input_tokens(inputs) if mode == "train" else None)
        return (loss, outputs) if return_outputs else loss

    # ---- checkpoints (sftrainer/checkpoint.py) ----

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer's ``train``; ``resume_from_checkpoint=True`` skips incomplete checkpoints (with a warning).

        A run from step 0 into an ``output_dir`` that holds an earlier training run goes on, as
        TRL's and transformers' do, with the earlier run's ``metrics.jsonl`` and eval samples moved
        to ``earlier-runs/<n>/`` (said in a warning), so the two are never drawn as one;
        ``overwrite_output_dir`` removes that run's checkpoints, ``metrics.jsonl`` and eval samples
        first (sftrainer.run_dir). ``sftrainer train`` refuses such a directory before any work.
        """
        resuming = resume_from_checkpoint is not None and resume_from_checkpoint is not False
        if resuming and self.args.overwrite_output_dir:
            raise ConfigError(OVERWRITE_AND_RESUME)
        if resuming:
            resume_from_checkpoint = checkpoint.resolve_checkpoint(
                resume_from_checkpoint, self.args.output_dir
            )
            checkpoint.check_resume_layout(resume_from_checkpoint, self.args)
        else:
            earlier = run_dir.earlier_run(self.args.output_dir)
            if earlier and not self.args.overwrite_output_dir and self.args.should_save:
                run_dir.set_aside_earlier_run(earlier)
            elif earlier or not self._output_dir_claimed:  # else this trainer's evaluation cleared it
                self._overwrite_output_dir()
        self._output_dir_claimed = True
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._refuse_nonfinite_weights()  # the last update may have overflowed: never save such weights
        return output

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Stop before the optimizer applies a NaN / inf loss (every process, so none waits on the others).
        bad = (~torch.isfinite(loss.detach())).float().sum()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item():  # this process's loss, or NaN when another process had the bad one
            local = loss.detach() if not torch.isfinite(loss.detach()).all() else torch.tensor(float("nan"))
            checkpoint.check_loss(local, self.state.global_step + 1, self.args.output_dir)
        return loss

    def _refuse_nonfinite_weights(self) -> None:
        """``NonFiniteLossError`` if a trainable weight holds NaN / inf (checked on every process)."""
        bad = checkpoint.first_nonfinite_parameter(self.model)  # this process's shard of the weights
        flag = torch.tensor(float(bad is not None), device=self.args.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "sum")
        if flag.item():
            step = self.state.global_step
            checkpoint.refuse_nonfinite_weights(bad or "on another process", step, self.args.output_dir)

    def _overwrite_output_dir(self) -> None:
        """``overwrite_output_dir``: remove an earlier run's checkpoints, metrics and samples (main process)."""
        if self.args.overwrite_output_dir and self.args.should_save:
            run_dir.clear_earlier_run(self.args.output_dir)

    def _get_output_dir(self, trial: Any) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Trainer's checkpoint, written atomically: into ``tmp-checkpoint-<step>/``, then renamed.

        Trainer writes ``checkpoint-<step>`` in place; a crash while saving would leave a broken
        latest checkpoint. Here ``_get_output_dir`` points Trainer at the staging directory while
        it saves; the best-checkpoint path and the rotation (``save_total_limit``) are then redone
        on the real output directory.
        """
        run_dir = super()._get_output_dir(trial)
        step = self.state.global_step
        self._refuse_nonfinite_weights()
        name = f"{checkpoint.PREFIX_CHECKPOINT_DIR}-{step}"
        staging = checkpoint.staging_dir(run_dir, step)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by an earlier crash
        self.accelerator.wait_for_everyone()  # before any process writes its part (DeepSpeed, FSDP shards)
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        best = self.state.best_global_step
        if best and (
            best == step or os.path.isdir(os.path.join(run_dir, f"{checkpoint.PREFIX_CHECKPOINT_DIR}-{best}"))
        ):
            self.state.best_model_checkpoint = os.path.join(
                run_dir, f"{checkpoint.PREFIX_CHECKPOINT_DIR}-{best}"
            )
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staging, name, run.TRAINER_STATE))  # the final paths
            checkpoint.write_layout(os.path.join(staging, name), self.args)
            checkpoint.publish(staging, run_dir, name)
            rotate_checkpoints(
                run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's ``save_model``; an FSDP run saved with ``SHARDED_STATE_DICT`` writes the full model too.

        transformers 5.25 writes no weights at all for such a run (it gathers them only under
        ``FULL_STATE_DICT``); its checkpoints (``_internal_call``) stay sharded, for a fast resume, and the
        model saved at the end is gathered, so ``from_pretrained`` loads it. Every process takes part.
        """
        if _internal_call or not sharding.gathers_nothing_on_save(self):
            super().save_model(output_dir, _internal_call)
            return
        state_dict = self.accelerator.get_state_dict(self.model)  # a collective: on every process
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _activation_offloading(self, model: Any) -> Any:
        """Tensors saved for backward go to (pinned) CPU memory and come back for backward."""
        return memory.offload_saved_tensors(bool(self.args.activation_offloading) and model.training)

    @property
    def router_aux_loss_coef(self) -> float:
        """The weight of an MoE model's load-balancing loss in the trained loss (0.0: not added), as TRL's
        attribute: ``router_aux_loss_coef`` if set, else the model config's own coefficient."""
        return self.loss_plan.aux_coef

    @property
    def aux_loss_enabled(self) -> bool:
        """Whether the load-balancing loss is added (and logged as ``aux_loss``), as TRL's attribute."""
        return self.loss_plan.aux_coef != 0.0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs:  # the end-of-training summary: the steps since the last log, as TRL
            logs.update(self._token_metrics.pop("train", self._reduce))
        if "loss" in logs:  # a training log: add the token metrics of its window
            logs.update(self._token_metrics.pop("train", self._reduce))
            start, paused = self._log_window
            seconds = time.perf_counter() - start - paused
            trained = self._token_metrics.last_count.get("train")
            if trained is not None and seconds > 0:
                logs["train_tokens_per_second"] = round(trained / seconds, 2)
            self._log_window = (time.perf_counter(), 0.0)
        super().log(logs, start_time)

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Trainer's evaluation, on raw data too (prepared as in the constructor); see the module docstring."""
        if isinstance(eval_dataset, dict):  # also DatasetDict / IterableDatasetDict
            metrics: dict[str, float] = {}
            for name, dataset in eval_dataset.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            pack = self.args.packing if self.args.eval_packing is None else self.args.eval_packing
            eval_dataset = self.data_pipeline(eval_dataset, f"{metric_key_prefix} data", pack)
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str) and isinstance(self.eval_dataset, dict):
            dataset = self.eval_dataset[dataset]
        if self.args.generation_enabled() and isinstance(dataset, Dataset | IterableDataset):
            self._generation_source = dataset  # scored inside the evaluation loop
        if not self._checked_for_training:  # else on_train_begin checked it, for this training run
            self.check_packed_isolation()
        if not self._output_dir_claimed:  # an evaluation before training starts the run's metrics
            self._overwrite_output_dir()
            self._output_dir_claimed = True
        began = time.perf_counter()
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._generation_source = None
            start, paused = self._log_window  # evaluation time is not training time
            self._log_window = (start, paused + time.perf_counter() - began)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """Trainer's loop, plus the token metrics and exact match, so that ``evaluate`` logs them once and
        callbacks (``on_evaluate``: early stopping, best checkpoint) see them."""
        loss_only = self.args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
        self._logits_needed = not loss_only  # Trainer asks compute_loss for outputs even when it drops them
        self._token_metrics.pop("eval", lambda t: t)  # drop anything computed outside an evaluation
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        finally:
            self._logits_needed = True
        output.metrics.update(self._token_metrics.pop("eval", self._reduce, f"{metric_key_prefix}_"))
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(loss) if loss < 700 else math.inf
        source, self._generation_source = self._generation_source, None
        if source is not None:
            self._generation_eval(source, output.metrics, metric_key_prefix)
        return output

    @property
    def exact_match_predictions(self) -> list[dict[str, Any]]:
        """Older name of ``generation_samples``."""
        return self.generation_samples

    def _generation_eval(self, source: Any, metrics: dict[str, float], prefix: str) -> None:
        """Generate, score, add ``{prefix}_<score>`` to ``metrics``, write and log the samples."""
        args = self.args
        if args.generation_prompts is not None:
            rows, has_reference = self._prepared_generation_prompts()
        else:
            n = args.exact_match_samples
            rows = (
                source.select(range(min(n, len(source))))
                if isinstance(source, Dataset)
                else list(itertools.islice(source, n))
            )
            has_reference = None
        self.generation_samples = generate_samples(
            self.model,
            self.processing_class,
            rows,
            max_new_tokens=args.exact_match_max_new_tokens,
            batch_size=args.generation_batch_size,
            temperature=args.generation_temperature,
            has_reference=has_reference,
            scorer=load_scorer(args.generation_scorer) if args.generation_scorer else None,
        )
        metrics.update({f"{prefix}_{k}": v for k, v in mean_scores(self.generation_samples).items()})
        step = self.state.global_step
        self.generation_samples_file = None
        if self.is_world_process_zero() and self.generation_samples:
            name = f"step-{step}" if prefix == "eval" else f"step-{step}.{prefix.removeprefix('eval_')}"
            directory = Path(args.output_dir) / run.EVAL_SAMPLES_DIR
            directory.mkdir(parents=True, exist_ok=True)
            text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in self.generation_samples)
            self.generation_samples_file = directory / f"{name}.jsonl"
            self.generation_samples_file.write_text(text, encoding="utf-8")
            (Path(args.output_dir) / run.EVAL_SAMPLES_FILE).write_text(text, encoding="utf-8")
            logger.info(
                "Generation samples (%s, step %d; all in %s):\n%s",
                prefix,
                step,
                self.generation_samples_file,
                format_samples(self.generation_samples),
            )

    def _prepared_generation_prompts(self) -> tuple[Dataset, list[bool]]:
        """``generation_prompts`` as prepared rows, and which rows have a reference (prepared once)."""
        if self._generation_prompts is None:
            rows, has_reference = generation_prompt_rows(self.args.generation_prompts)
            # has_reference follows the rows' order, which shuffle_dataset would change.
            shuffle, self.args.shuffle_dataset = self.args.shuffle_dataset, False
            try:
                prepared = self.data_pipeline(rows, "generation_prompts", False)
            finally:
                self.args.shuffle_dataset = shuffle
            if len(prepared) != len(has_reference):
                raise ConfigError(
                    f"generation_prompts: {len(has_reference) - len(prepared)} of {len(has_reference)} "
                    f"prompts were dropped while preparing them (too long for max_length={self.args.max_length}?)"
                )
            self._generation_prompts = (prepared, has_reference)
        return self._generation_prompts

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, "sum")


def _refuse_for_vision(args: SFTConfig) -> None:
    """Settings a vision-language run cannot honour, refused by key before any work."""
    if args.generation_enabled():
        key = "exact_match_samples" if args.exact_match_samples else "generation_prompts"
        raise ConfigError(
            f"{key}: generation-based evaluation does not pass images to the model yet; for a "
            "vision-language model set exact_match_samples=0 and generation_prompts=null (eval_loss still "
            "measures held-out rows; `sftrainer generate RUN --image PATH` answers with an image)"
        )


def _input_tokens(inputs: dict[str, Any]) -> Any:
    """Input tokens of a batch, padding excluded where an attention mask says where it is."""
    mask = inputs.get("attention_mask")
    return mask.sum() if mask is not None else inputs["input_ids"].numel()


def _flattens(model: Any, args: SFTConfig) -> bool:
    """Whether packed / padding-free batches are one flat row. Varlen FlashAttention reads row boundaries
    from one flat row; backends that build a dense mask (eager, SDPA) keep packed sequences as separate
    rows: B * L^2 attention, not (B * L)^2."""
    impl = str(getattr(model.config, "_attn_implementation", "") or "")
    return (args.padding_free and not args.packing) or "flash" in impl


def _has_positions(dataset: Any) -> bool:
    """Rows packed before they reached the trainer (given as is): sftrainer's or TRL's packing columns."""
    columns = getattr(dataset, "column_names", None) or []
    return "position_ids" in columns or "seq_lengths" in columns


class _TrainingRunHooks(TrainerCallback):
    """What SFTTrainer does when a training run starts, once the model is placed and prepared and a
    resumed run's state is loaded, before the first optimizer step: check that packed rows are
    isolated, open the tokens/s window, and continue ``num_tokens`` from where a resumed run was."""

    def __init__(self, trainer: SFTTrainer):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.check_packed_isolation()
        self.trainer._checked_for_training = True
        self.trainer._log_window = (time.perf_counter(), 0.0)
        logged = [e["num_tokens"] for e in state.log_history if "num_tokens" in e and "loss" in e]
        self.trainer._token_metrics.start_count(logged[-1] if logged else 0.0)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._checked_for_training = False
        for stats in self.trainer.data_stats.values():
            if stats.streamed and stats.rows and state.is_world_process_zero:
                log = (
                    logger.warning
                    if stats.truncated or stats.dropped_empty or stats.dropped_invalid
                    else logger.info
                )
                log(stats.summary(args.max_length))


def _model_path(model: Any) -> str:
    path = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if not path:
        raise ValueError(
            "pass processing_class= (the tokenizer): the model does not say where it was loaded from"
        )
    return path


def _parameter_sharding(trainer: Trainer) -> str | None:
    """The engine that shards parameters across processes (FSDP, DeepSpeed ZeRO-3, tensor
    parallelism), if one is used."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    if trainer.get_tp_size() > 1:
        return "tensor parallelism"
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        return "DeepSpeed ZeRO-3"
    return None
