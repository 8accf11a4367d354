"""``SFTTrainer``: a ``transformers.Trainer`` that prepares SFT data and models in its constructor.

The constructor is the recipe, one named step a line, in the order they run: check the inputs and the
machine (``sftrainer.trainer_args``), the processing class and the model for training (``sftrainer.setup``),
the data (prepared by ``trainer.data_pipeline``), the collator (``sftrainer.trainer_data``), the loss plan;
then ``Trainer.__init__`` and the callbacks.

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
a NaN / inf loss or weights stop training with ``NonFiniteLossError`` (see ``sftrainer.nonfinite``).

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
step-<global_step>.jsonl``, copied to ``OUTPUT_DIR/eval_samples.jsonl``), set before ``on_evaluate``;
``trainer.generation_eval`` (``sftrainer.generation_eval``) does it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import rotate_checkpoints

from sftrainer import checkpoint, memory, nonfinite, run, run_dir, setup, sharding, trainer_args, trainer_data
from sftrainer.config import OVERWRITE_AND_RESUME, SFTConfig
from sftrainer.console import ConsoleCallback
from sftrainer.constants import MODEL_TAGS
from sftrainer.data.pack import PackStats
from sftrainer.data.prepare import PrepareStats
from sftrainer.errors import ConfigError
from sftrainer.generation_eval import GenerationEval, refuse_for_vision
from sftrainer.loss import CHUNKED, TRAINER, sft_loss, token_stats, verify_chunked, without_chunking
from sftrainer.metrics import TokenMetrics, input_tokens
from sftrainer.pipeline import DataPipeline
from sftrainer.tracking import MetricsFileCallback, SamplesCallback, place_tensorboard_logs

logger = logging.getLogger(__name__)


class SFTTrainer(Trainer):
    # Narrower than Trainer's: __init__ always turns what it is given into an SFTConfig (trainer_args)
    # and loads a model (no model_init).
    args: SFTConfig
    model: PreTrainedModel | torch.nn.Module

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
        # The recipe, in the order it runs: settings and checks, processing class, model, data, loss.
        trainer_args.check_inputs(model, train_dataset, eval_dataset)
        args = trainer_args.trainer_args(model, args)  # a copy: the caller's is never written to
        processing_class = trainer_args.apply_legacy(args, processing_class, legacy)
        trainer_args.check_machine(args)
        trainer_args.device_transfers(args, torch.cuda.is_available())
        trainer_args.resolve_checkpointing(args)
        callers_model = not isinstance(model, str)
        model = setup.load_training_model(model, args, quantization_config)
        processing_class, peft_config = setup.training_processing_class(
            model, processing_class, args, peft_config, callers_model
        )
        refuse_for_vision(args, processing_class)  # images do not reach generation-based evaluation yet
        model = setup.model_for_training(model, args, peft_config, callers_model)
        pipeline, train_dataset, eval_dataset = trainer_data.prepare_datasets(
            model, args, processing_class, data_collator, formatting_func, train_dataset, eval_dataset
        )
        self._keep_pipeline(pipeline)
        by_position = trainer_data.check_packing_data(model, args, train_dataset, pipeline)
        data_collator = trainer_data.collator(
            data_collator, model, processing_class, args, pipeline, by_position
        )
        self.loss_plan = trainer_args.loss_plan(model, args, compute_loss_func)
        trainer_data.keep_columns(args, pipeline, by_position, self.loss_plan)
        self._start_metrics()
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
        self._finish_setup()

    # ---- the constructor's steps, in the order it takes them ----

    def _keep_pipeline(self, pipeline: DataPipeline) -> None:
        """The data pipeline (prepares raw data given to ``evaluate`` too), its counts, and the
        generation-based evaluation that prepares its prompts with it (see the module docstring)."""
        self.data_pipeline = pipeline
        self.data_stats: dict[str, PrepareStats] = pipeline.data_stats
        self.pack_stats: dict[str, PackStats] = pipeline.pack_stats
        self.generation_eval = GenerationEval(pipeline)

    def _start_metrics(self) -> None:
        """What training and evaluation accumulate between logs: token metrics, tokens/s, the NaN flag."""
        self._token_metrics = TokenMetrics()
        self._log_window = (time.perf_counter(), 0.0)  # (start, seconds spent evaluating since)
        self._nonfinite = nonfinite.NonFiniteFlag()  # the micro-batches' losses since the flag was last read
        self._nonfinite_on_device = False  # a fused optimizer skips a NaN step itself (set at train begin)
        self._logits_needed = True  # False inside a loss-only evaluation loop

    def _finish_setup(self) -> None:
        """After ``Trainer.__init__``: the final loss plan (logged), run state, model-card tags, callbacks."""
        engine = sharding.parameter_sharding(self)
        if engine:
            self.loss_plan = without_chunking(self.loss_plan, f"{engine} shards the LM head's weight")
        logger.info("%s", self.loss_plan.describe())
        self._checked_for_training = False
        self._isolation_checked: tuple | None = None  # the conditions check_packed_isolation passed under
        self._checkpoint_staging: str | None = None  # set while _save_checkpoint writes
        self._output_dir_claimed = False  # this trainer has evaluated or trained into output_dir
        # DeepSpeed's engine steps inside backward() on the last micro-batch of a step, before the
        # optimizer-step hook: there the NaN flag is read after every micro-batch (a sync each), as before.
        self._nonfinite_each_micro_batch = self.is_deepspeed_enabled
        self._eval_nan_inf_filter = self.args.logging_nan_inf_filter  # the caller's (train() turns it off)
        add_model_tags = getattr(self.model, "add_model_tags", None)
        if add_model_tags is not None:  # model-card tags of what save_model / push_to_hub write
            add_model_tags(list(MODEL_TAGS))
        self.add_callback(_TrainingRunHooks(self))
        # Compact lines, a bar on terminals and a summary instead of the raw dicts transformers prints.
        for printer in {ProgressCallback, PrinterCallback, DEFAULT_PROGRESS_CALLBACK}:
            self.remove_callback(printer)
        for callback in (ConsoleCallback(), MetricsFileCallback(), SamplesCallback(self)):
            self.add_callback(callback)
        assert self.args.output_dir is not None  # TrainingArguments.__post_init__ defaults it
        place_tensorboard_logs(self.callback_handler.callbacks, self.args.output_dir)

    def check_packed_isolation(self) -> None:
        """Refuse (``ContaminationError``) an attention backend that lets packed rows see each other.

        Run at the start of training (and of an evaluation outside training), so it tests the model
        as it runs: on the training device, under the training autocast, with the attention
        implementation of that moment, not as it sat on the CPU when the trainer was built. Skipped
        when the model, device, autocast, attention implementation and layout are those it passed
        under last time (the evaluations before and after training of one run).
        """
        self._isolation_checked = trainer_data.check_packed_isolation(
            self.model, self.data_collator, self.accelerator, self._isolation_checked
        )

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
            self._token_metrics.add(mode, stats, input_tokens(inputs) if mode == "train" else None)
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
        assert self.args.output_dir is not None  # TrainingArguments.__post_init__ defaults it
        resuming = resume_from_checkpoint is not None and resume_from_checkpoint is not False
        if resuming and self.args.overwrite_output_dir:
            raise ConfigError(OVERWRITE_AND_RESUME)
        if resuming:
            resume_from_checkpoint = checkpoint.resolve_checkpoint(
                resume_from_checkpoint, self.args.output_dir
            )
            assert resume_from_checkpoint is not None  # resuming: a checkpoint directory, or it raised
            checkpoint.check_resume_layout(resume_from_checkpoint, self.args)
        else:
            earlier = run_dir.earlier_run(self.args.output_dir)
            if earlier and not self.args.overwrite_output_dir and self.args.should_save:
                run_dir.set_aside_earlier_run(earlier)
            elif earlier or not self._output_dir_claimed:  # else this trainer's evaluation cleared it
                self._overwrite_output_dir()
        self._output_dir_claimed = True
        # transformers' logging_nan_inf_filter reads every micro-batch's loss on the host (a sync each) to
        # keep a NaN out of the logged loss; the NaN guard stops training on one instead, so training runs
        # without it (evaluation keeps the caller's setting: evaluation_loop).
        self._eval_nan_inf_filter = self.args.logging_nan_inf_filter
        self.args.logging_nan_inf_filter = False
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.args.logging_nan_inf_filter = self._eval_nan_inf_filter
        self._read_nonfinite()
        self._refuse_nonfinite_weights()  # the last update may have overflowed: never save such weights
        return output

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Read at the optimizer step or at logging (_TrainingRunHooks), not here: no host-device sync
        # per micro-batch.
        self._nonfinite.add(loss, self.state.global_step + 1)
        if self._nonfinite_each_micro_batch:
            self._read_nonfinite(self.state.global_step + 1)
        return loss

    def _read_nonfinite(self, step: int | None = None) -> None:
        """``NonFiniteLossError`` if a micro-batch loss since the flag was last read is NaN / inf (one sync);
        ``step``: the optimizer step it is read at, the last one done by default."""
        assert self.args.output_dir is not None  # TrainingArguments.__post_init__ defaults it
        at = self.state.global_step if step is None else step
        self._nonfinite.check(self.accelerator, at, self.args.output_dir)

    def _refuse_nonfinite_weights(self) -> None:
        """``NonFiniteLossError`` if a trainable weight holds NaN / inf (checked on every process)."""
        bad = nonfinite.first_nonfinite_parameter(self.model)  # this process's shard of the weights
        flag = torch.tensor(float(bad is not None), device=self.args.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "sum")
        if flag.item():
            step = self.state.global_step
            assert self.args.output_dir is not None  # TrainingArguments.__post_init__ defaults it
            nonfinite.refuse_nonfinite_weights(bad or "on another process", step, self.args.output_dir)

    def _overwrite_output_dir(self) -> None:
        """``overwrite_output_dir``: remove an earlier run's checkpoints, metrics and samples (main process)."""
        if self.args.overwrite_output_dir and self.args.should_save:
            assert self.args.output_dir is not None  # TrainingArguments.__post_init__ defaults it
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
        self._read_nonfinite()
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
        self._read_nonfinite()  # never log (or go on after) a step whose loss was NaN / inf
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
        self.generation_eval.queue(self.args, dataset)  # scored inside the evaluation loop
        if not self._checked_for_training:  # else on_train_begin checked it, for this training run
            self.check_packed_isolation()
        if not self._output_dir_claimed:  # an evaluation before training starts the run's metrics
            self._overwrite_output_dir()
            self._output_dir_claimed = True
        began = time.perf_counter()
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self.generation_eval.clear()
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
        filter_in_training = self.args.logging_nan_inf_filter
        self.args.logging_nan_inf_filter = self._eval_nan_inf_filter  # the caller's: off in training only
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        finally:
            self._logits_needed = True
            self.args.logging_nan_inf_filter = filter_in_training
        assert output.metrics is not None  # Trainer.evaluation_loop always returns a dict of metrics
        output.metrics.update(self._token_metrics.pop("eval", self._reduce, f"{metric_key_prefix}_"))
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(loss) if loss < 700 else math.inf
        self.generation_eval.run(
            self.args,
            self.model,
            self.processing_class,
            output.metrics,
            metric_key_prefix,
            self.state.global_step,
            self.is_world_process_zero(),
        )
        return output

    @property
    def generation_samples(self) -> list[dict[str, Any]]:
        """The latest evaluation's generation samples (``GenerationEval.samples``)."""
        return self.generation_eval.samples

    @property
    def generation_samples_file(self) -> Path | None:
        """Where the latest evaluation's generation samples were written (``GenerationEval.samples_file``)."""
        return self.generation_eval.samples_file

    @property
    def exact_match_predictions(self) -> list[dict[str, Any]]:
        """Older name of ``generation_samples``."""
        return self.generation_samples

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, "sum")


class _TrainingRunHooks(TrainerCallback):
    """What SFTTrainer does when a training run starts, once the model is placed and prepared and a
    resumed run's state is loaded, before the first optimizer step: check that packed rows are
    isolated, open the tokens/s window, and continue ``num_tokens`` from where a resumed run was; and
    before each optimizer step, stop on a NaN / inf loss of its micro-batches (``nonfinite``)."""

    def __init__(self, trainer: SFTTrainer):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.check_packed_isolation()
        self.trainer._checked_for_training = True
        self.trainer._log_window = (time.perf_counter(), 0.0)
        logged = [e["num_tokens"] for e in state.log_history if "num_tokens" in e and "loss" in e]
        self.trainer._token_metrics.start_count(logged[-1] if logged else 0.0)
        self.trainer._nonfinite = nonfinite.NonFiniteFlag()
        # Parameters sharded across processes (FSDP, tensor parallelism) read the flag each step instead:
        # the device-side skip is checked here on whole tensors only.
        on_device = nonfinite.on_device(self.trainer.optimizer, self.trainer.accelerator)
        sharded = sharding.parameter_sharding(self.trainer) is not None
        self.trainer._nonfinite_on_device = (
            on_device and not sharded and not self.trainer._nonfinite_each_micro_batch
        )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Keep a NaN / inf loss from the optimizer: the fused optimizer skips the step on the device, or
        # the flag is read here (every process, so none waits on the others).
        trainer = self.trainer
        if trainer._nonfinite_on_device:
            nonfinite.skip_on_device(trainer.optimizer, trainer._nonfinite.found_inf(trainer.accelerator))
        elif not trainer._nonfinite_each_micro_batch:
            trainer._read_nonfinite(state.global_step + 1)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer._nonfinite_on_device:
            nonfinite.skip_on_device(self.trainer.optimizer, None)

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
