"""Pre-flight: what a run will cost and what looks wrong, before it spends compute.

Printed by ``sftrainer data`` and logged at the start of ``sftrainer train``: trained tokens,
optimizer steps, time per epoch (measured, never guessed), an estimate of peak accelerator memory,
and warnings for likely mistakes.

Measured vs estimated:

- steps: computed the way ``transformers.Trainer`` computes them (tested against ``state.max_steps``).
- time: ``sftrainer data --probe`` runs a few real training steps and one evaluation of the sampled
  rows (``measure_step_time``); at train start ``StepTimeCallback`` times the first optimizer steps of
  the run itself, with evaluations taken out, and the evaluation before training, and logs the
  estimate then: steps (those left, on a resumed run) x time per step + evaluations x time per
  evaluation (``sftrainer.timing``). Without either, no time is given.
- memory: what the process holds now, measured, plus the tensors of training by
  ``sftrainer.memory_estimate.estimate_memory``, a formula (see its docstring), labelled an estimate;
  ``memory_check`` compares it with a measured peak.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import TrainerCallback

from sftrainer.constants import FULL_LR_RANGE, LORA_LR_RANGE, TRUNCATED_WARN_FRACTION
from sftrainer.memory import describe_optimizer
from sftrainer.memory_estimate import (
    MemoryEstimate,
    ModelShape,
    estimate_memory,
    format_bytes,
    model_shape,
    peak_process_memory,
    process_memory,
)
from sftrainer.timing import RunClock, TimeEstimate, duration, eval_seconds, evaluation_steps

logger = logging.getLogger(__name__)

PROBE_STEPS = 3  # timed optimizer steps, after one untimed warm-up step


# ---- steps -----------------------------------------------------------------------------------


@dataclass
class StepPlan:
    sequences: int  # rows (packed sequences when packing) in one epoch
    per_step: int  # sequences per optimizer step: batch x devices x accumulation
    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def plan_steps(
    sequences: int,
    batch_size: int,
    grad_accum: int = 1,
    epochs: float = 1.0,
    max_steps: int = -1,
    devices: int = 1,
    drop_last: bool = False,
) -> StepPlan:
    """Optimizer steps as ``Trainer.set_initial_training_values`` counts them: batches per epoch
    (``ceil(sequences / (batch_size * devices))``, floor with ``drop_last``), then ``ceil(batches /
    grad_accum)`` steps per epoch; ``max_steps > 0`` wins over ``epochs``."""
    per_batch = batch_size * devices
    batches = sequences // per_batch if drop_last else math.ceil(sequences / per_batch)
    per_epoch = max(batches // grad_accum + int(batches % grad_accum > 0), 1)
    total = max_steps if max_steps > 0 else math.ceil(epochs * per_epoch)
    return StepPlan(sequences, per_batch * grad_accum, per_epoch, total)


def plan_from_args(sequences: int, args: Any) -> StepPlan:
    return plan_steps(
        sequences,
        args.train_batch_size,  # per device x GPUs of one process (DataParallel)
        args.gradient_accumulation_steps,
        args.num_train_epochs,
        args.max_steps,
        max(1, args.world_size),
        args.dataloader_drop_last,
    )


# ---- warnings --------------------------------------------------------------------------------


def rows_missing_stop(arrays: Any, stop_ids: list[int], max_length: int | None) -> int:
    """Rows that train no EOS / end-of-turn token, not counting rows cut at max_length (which lose
    theirs by truncation, counted apart)."""
    if not arrays.lengths.size:
        return 0
    missing = ~arrays.rows_with_any(stop_ids)
    if max_length is not None:
        missing &= arrays.lengths < max_length
    return int(missing.sum())


def check_run(
    *,
    rows: int,
    truncated: int,
    missing_stop: int,
    dropped: int = 0,
    duplicates: int,
    eval_rows: int | None,
    learning_rate: float,
    lora: bool | None,
    stop_tokens: str = "EOS",
) -> list[str]:
    """Warnings for likely mistakes. ``eval_rows``: None when no eval data is configured.
    ``lora``: None skips the learning-rate check (the built-in model is trained from scratch)."""
    out = []
    if missing_stop:
        out.append(
            f"{missing_stop} of {rows} rows train no end token ({stop_tokens}): the model may not learn "
            "to stop. Check the chat template (does the assistant turn end with it?) and train_on."
        )
    if rows and truncated / rows > TRUNCATED_WARN_FRACTION:
        out.append(
            f"{truncated} of {rows} rows ({truncated / rows:.0%}) are cut to max_length: raise max_length, "
            "or use packing_strategy=bfd_split to split instead of cutting."
        )
    if dropped:
        out.append(
            f"{dropped} of {rows} rows are dropped (reasons above); a prompt that fills max_length "
            "leaves no trained token: raise max_length or use truncation_mode=keep_end."
        )
    if eval_rows == 0:
        out.append(
            "the eval split is empty: evaluation would measure nothing; give data.eval or a larger eval_split."
        )
    if duplicates:
        out.append(f"{duplicates} rows repeat an earlier row exactly (they are trained more than once).")
    if lora is not None:
        low, high = LORA_LR_RANGE if lora else FULL_LR_RANGE
        kind = "LoRA" if lora else "full fine-tuning"
        if not low <= learning_rate <= high:
            out.append(
                f"learning_rate={learning_rate:g} is outside the usual range for {kind} "
                f"({low:g} to {high:g}; see sftrainer/constants.py)."
            )
    return out


# ---- time ------------------------------------------------------------------------------------


class StepTimeCallback(TrainerCallback):
    """Times optimizer steps: after one warm-up step, the next ``steps`` ones, with the evaluations that
    ran in between taken out; evaluations are timed from their logs (the one before training too, when
    the callback is added before it). ``seconds_per_step`` is then set; with ``steps_per_epoch`` given,
    the estimate (``estimate``: this ``train()`` call's steps, resumed or not, and its evaluations, plus
    ``final_evaluation``: one more after training) is logged once."""

    def __init__(
        self,
        steps: int = PROBE_STEPS,
        steps_per_epoch: int | None = None,
        total: int | None = None,
        final_evaluation: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.steps = steps
        self.steps_per_epoch = steps_per_epoch
        self.total = total
        self.final_evaluation = final_evaluation
        self.seconds_per_step: float | None = None
        self.estimate: TimeEstimate | None = None
        self.clock = RunClock(clock)
        self.clock.stop()
        self._first_step = 0
        self._eval_steps: list[int] = []
        self._started = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._first_step = state.global_step  # > 0 when resuming
        self._eval_steps = evaluation_steps(args, state.max_steps, self.steps_per_epoch)
        self._started = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        seconds = eval_seconds(logs or {})
        if seconds is not None:
            self.clock.evaluated(state.global_step, seconds)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._started:
            self._started = True
            self.clock.start(state.global_step)  # after the warm-up step
            return
        done = state.global_step - self.clock.first_step
        if self.seconds_per_step is None and done >= self.steps:
            self.seconds_per_step = self.clock.train_seconds / done
            if not self.steps_per_epoch:
                return
            total = self.total or state.max_steps
            # A resumed run's checkpoint step was evaluated before it was saved.
            evaluations = sum(s > self._first_step or s == 0 for s in self._eval_steps)
            self.estimate = TimeEstimate(
                self.seconds_per_step,
                total - self._first_step,
                evaluations + int(self.final_evaluation),
                self.clock.seconds_per_evaluation,
                self.clock.evaluation_source(),
                self._first_step,
            )
            if state.is_world_process_zero:
                logger.info(
                    "Pre-flight: %s",
                    format_time(self.seconds_per_step, self.steps_per_epoch, done, self.estimate),
                )


def format_time(
    seconds_per_step: float, steps_per_epoch: int, measured: int, run: TimeEstimate | None = None
) -> str:
    text = (
        f"measured {seconds_per_step:.3g} s per optimizer step (over {measured} steps) -> "
        f"about {duration(seconds_per_step * steps_per_epoch)} per epoch"
    )
    return f"{text}, {run.describe()}" if run is not None else text


def planned_evaluations(args: Any, plan: StepPlan, eval_rows: int | None) -> tuple[int, bool]:
    """Evaluations a ``sftrainer train`` run makes after the one before training: those
    ``eval_strategy`` runs during training, and whether one more follows training (``train.py`` reuses
    the last step's when that step evaluated the weights it ends with)."""
    if not eval_rows:
        return 0, False
    during = evaluation_steps(args, plan.total_steps, plan.steps_per_epoch)
    final = not during or during[-1] != plan.total_steps or bool(args.load_best_model_at_end)
    return len(during), final


@dataclass
class Probe:
    seconds_per_step: float
    steps: int
    peak_memory: int | None  # bytes, measured by torch.cuda (None on CPU)
    device: str
    seconds_per_eval_row: float | None = None  # an evaluation of the sampled rows (loss only), per row


def measure_step_time(cfg: Any, train_rows: Any, tokenizer: Any, rows_per_sequence: float = 1.0) -> Probe:
    """Load the model and run 1 + ``PROBE_STEPS`` real training steps (the run's settings, batch
    size and accumulation) on a sample of the training rows; time the last ``PROBE_STEPS``. Then
    evaluate the sample (loss only, as often as the run would need one evaluation) and time it per row."""
    import torch

    import sftrainer.builtin as builtin
    from sftrainer.lora import peft_config_from
    from sftrainer.model import load_model
    from sftrainer.run_config import apply_overrides, build_config
    from sftrainer.trainer import SFTTrainer

    with tempfile.TemporaryDirectory(prefix="sftrainer-probe-") as tmp:
        overrides = [
            f"output_dir={tmp}",
            f"max_steps={PROBE_STEPS + 1}",
            "save_strategy=no",
            "eval_strategy=no",
            "logging_strategy=no",
            "report_to=none",
            "disable_tqdm=true",
            "exact_match_samples=0",
            "generation_prompts=null",
            "resume_from_checkpoint=null",
            "load_best_model_at_end=false",
        ]
        # The run's own intervals go with its strategies (set to 'no' above, or they would be
        # warned about as having no effect).
        source = {
            k: v for k, v in cfg.source.items() if k not in ("save_steps", "eval_steps", "logging_steps")
        }
        probe_cfg = build_config(apply_overrides(source, overrides))
        args = probe_cfg.train
        need = math.ceil(
            (PROBE_STEPS + 1) * args.train_batch_size * args.gradient_accumulation_steps * rows_per_sequence
        )
        rows = train_rows.shuffle(seed=args.seed)
        rows = rows.select(range(min(len(rows), need))) if hasattr(rows, "select") else rows.take(need)
        name = cfg.model.name_or_path
        model = load_model(
            builtin.model_path(name),
            dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
        )
        timer = StepTimeCallback(PROBE_STEPS)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
            peft_config=peft_config_from(cfg.lora),
            callbacks=[timer],
        )
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() if cuda else None
        device = str(trainer.args.device)
        evaluated = trainer.evaluate(rows)
        per_row = evaluated["eval_runtime"] / max(1, len(rows))
    return Probe(timer.seconds_per_step or float("nan"), PROBE_STEPS, peak, device, per_row)


# ---- the block ---------------------------------------------------------------------------------


@dataclass
class Preflight:
    trained_tokens: int  # per epoch
    plan: StepPlan
    memory: MemoryEstimate | None
    warnings: list[str]
    probe: Probe | None = None
    time_note: str = ""
    eval_rows: int | None = None
    evaluations: tuple[int, bool] = (0, False)  # during training, and one after it (planned_evaluations)
    generation: bool = False  # evaluations also generate (exact_match_samples / generation_prompts)
    resumed_at: int = 0  # the step a resumed run starts from
    optimizer: str = ""  # memory.describe_optimizer(args.optim)

    def _probe_time(self) -> str:
        """The probe's step time over the run, with its evaluations: the one before training, those
        during it and one after, each costing the eval rows at the probe's time per row."""
        probe, plan = self.probe, self.plan
        assert probe is not None
        during, final = self.evaluations
        per_row = probe.seconds_per_eval_row
        count = (1 + during + int(final)) if self.eval_rows else 0
        per_eval = per_row * self.eval_rows if per_row is not None and self.eval_rows else None
        source = f"{self.eval_rows} eval rows at the probe's {per_row:.3g} s per row" if per_eval else ""
        if per_eval is not None and self.generation:
            source += "; generation-based evaluation not timed"
        run = TimeEstimate(probe.seconds_per_step, plan.total_steps, count, per_eval, source)
        return format_time(probe.seconds_per_step, plan.steps_per_epoch, probe.steps, run)

    def format(self) -> str:
        plan = self.plan
        lines = [
            "Pre-flight:",
            f"  trained tokens: {_count(self.trained_tokens)} per epoch, "
            f"{_count(round(self.trained_tokens * plan.epochs))} over the run",
            f"  optimizer steps: {plan.total_steps} ({plan.steps_per_epoch} per epoch x {plan.epochs:.3g} "
            f"epochs; {plan.sequences} sequences, {plan.per_step} per step)"
            + (
                f"; resuming at step {self.resumed_at}: {plan.total_steps - self.resumed_at} left"
                if self.resumed_at
                else ""
            ),
        ]
        if self.optimizer:
            lines.append(f"  optimizer: {self.optimizer}")
        if self.probe is not None:
            lines.append(f"  time ({self.probe.device}): {self._probe_time()}")
        elif self.time_note:
            lines.append(f"  time: {self.time_note}")
        if self.memory is not None:
            lines.append(
                f"  peak memory, estimated: {self.memory.describe()}; {'; '.join(self.memory.notes)}"
            )
        if self.probe is not None and self.probe.peak_memory is not None:
            lines.append(
                f"  peak memory, measured by the probe (torch.cuda): {format_bytes(self.probe.peak_memory)}"
            )
        lines += [f"  warning: {w}" for w in self.warnings] or ["  warnings: none"]
        return "\n".join(lines)


def summarize(
    *,
    arrays: Any,
    sequences: int,
    args: Any,
    stats: Any,
    shape: ModelShape | None,
    stop_ids: list[int],
    stop_tokens: str,
    duplicates: int,
    eval_rows: int | None,
    lora: bool | None,
    eager_attention: bool = False,
    chunked_loss: bool = True,
    probe: Probe | None = None,
    time_note: str = "",
    baseline: tuple[int | None, str, int] = (None, "", 0),
) -> Preflight:
    """The pre-flight of a run from its prepared train rows (``RowArrays``, packed rows split back).
    ``baseline``: what the process holds now (bytes or None, what was measured, bytes of the training
    tensors already in it), see ``memory_baseline``."""
    plan = plan_from_args(sequences, args)
    lengths = arrays.lengths
    seq_len = (
        args.max_length if args.packing and args.max_length else int(lengths.max() if lengths.size else 1)
    )
    memory = None
    if shape is not None:
        memory = estimate_memory(
            shape,
            args.per_device_train_batch_size,
            seq_len,
            mixed_precision=bool(args.bf16 or args.fp16),
            optim=args.optim,
            gradient_checkpointing=bool(args.gradient_checkpointing),
            eager_attention=eager_attention,
            logits_at_once=logits_at_once(args, shape.vocab) if chunked_loss else None,
        )
        memory.logits_label = "loss chunk" if chunked_loss else "logits (all at once)"
        memory.baseline, memory.baseline_what, memory.resident = baseline
        memory.notes.append(
            "not counted: allocator slack and memory the allocator keeps after freeing, optimizer "
            "temporaries in step(), the CUDA context (0.5-1 GiB), SDPA's attention matrices on the CPU"
        )
    warnings = check_run(
        rows=stats.rows,
        truncated=stats.truncated,
        dropped=stats.dropped_empty + stats.dropped_invalid,
        missing_stop=rows_missing_stop(arrays, stop_ids, args.max_length),
        duplicates=duplicates,
        eval_rows=eval_rows,
        learning_rate=args.learning_rate,
        lora=lora,
        stop_tokens=stop_tokens,
    )
    trained = int(np.asarray(arrays.trained_per_row()).sum())
    return Preflight(
        trained,
        plan,
        memory,
        warnings,
        probe,
        time_note,
        eval_rows,
        planned_evaluations(args, plan, eval_rows),
        bool(getattr(args, "generation_enabled", lambda: False)()),
        optimizer=describe_optimizer(args.optim),
    )


def memory_baseline(
    device: Any | None, shape: ModelShape | None, model_loaded: bool
) -> tuple[int | None, str, int]:
    """What the process holds now, for the memory estimate: (bytes, what they are, bytes of the
    training tensors already among them). On CUDA, what torch has allocated (the model, once the
    trainer placed it: its weights are in it); on the CPU, the process's resident memory (a model's
    weights read from safetensors are mapped from the file and count once training reads them, so
    none are taken as resident)."""
    import torch

    if device is None:  # not placed yet: where training would run
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        if not torch.cuda.is_initialized() and not model_loaded:
            return None, "", 0  # nothing allocated yet; the CUDA context is not counted
        weights = shape.frozen_bytes + shape.trainable_bytes if shape is not None and model_loaded else 0
        return torch.cuda.memory_allocated(device), "allocated by torch.cuda now", weights
    what = "this process's RSS now: Python, libraries" + (", model, data" if model_loaded else "")
    return process_memory(), what, 0


def memory_check(trainer: Any) -> tuple[int, int]:
    """(estimated, measured) peak memory of training ``trainer`` (it trains): on CUDA, the pre-flight's
    peak against ``torch.cuda.max_memory_allocated`` (reset first); on the CPU, against the process's
    peak RSS (``memory_estimate.peak_process_memory``: call it in a fresh process, whose peak so far is
    below training's). Both include the baseline (``memory_baseline``): subtract ``estimate.baseline`` for what training added.
    Raises ValueError where the pre-flight cannot estimate (streamed data)."""
    import torch

    report, why = for_trainer(trainer, None, lora=None)
    if report is None or report.memory is None:
        raise ValueError(f"no memory estimate: {why or 'the model shape is unknown'}")
    cuda = trainer.args.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.args.device)
    trainer.train()
    measured = torch.cuda.max_memory_allocated(trainer.args.device) if cuda else peak_process_memory()
    return report.memory.peak, measured


def logits_at_once(args: Any, vocab: int) -> int:
    """Logits one chunk of the chunked loss holds (``sftrainer.loss``: loss_chunk_size positions, else
    CHUNK_LOGITS logits)."""
    from sftrainer.loss import LossPlan, chunk_positions

    return chunk_positions(LossPlan(chunk_size=getattr(args, "loss_chunk_size", None)), vocab) * vocab


def _count(n: float) -> str:
    from sftrainer.console import human

    return human(n)


def for_trainer(
    trainer: Any, train_raw: Any, lora: bool | None, resumed_at: int = 0
) -> tuple[Preflight | None, str]:
    """The pre-flight of a constructed ``SFTTrainer`` (its prepared rows and loaded model), or None
    and why not; ``resumed_at``: the step of the checkpoint a resumed run starts from. The time is left
    to ``StepTimeCallback`` (measured on the run's own steps and evaluations)."""
    from datasets import Dataset

    from sftrainer.data.stats import count_duplicates, row_arrays
    from sftrainer.generate import stop_token_ids

    dataset, stats = trainer.train_dataset, trainer.data_stats.get("train data")
    if not isinstance(dataset, Dataset) or "labels" not in dataset.column_names or stats is None:
        return None, "skipped: the train data is streamed or used as given, so it cannot be counted up front"
    from sftrainer.vision.processor import text_tokenizer

    tokenizer = text_tokenizer(trainer.processing_class)  # a vision-language processor's tokenizer
    stop_ids = stop_token_ids(tokenizer)
    eval_rows = None
    if isinstance(trainer.eval_dataset, Dataset):
        eval_rows = len(trainer.eval_dataset)
    elif isinstance(trainer.eval_dataset, dict) and all(
        isinstance(d, Dataset) for d in trainer.eval_dataset.values()
    ):  # several eval sets: each evaluation goes through all of them
        eval_rows = sum(len(d) for d in trainer.eval_dataset.values())
    model_config = getattr(trainer.model, "config", None)
    shape = model_shape(trainer.model)
    report = summarize(
        arrays=row_arrays(dataset),
        sequences=len(dataset),
        args=trainer.args,
        stats=stats,
        shape=shape,
        stop_ids=stop_ids,
        stop_tokens=", ".join(tokenizer.convert_ids_to_tokens(stop_ids)),
        duplicates=count_duplicates(train_raw) if isinstance(train_raw, Dataset) else 0,
        eval_rows=eval_rows,
        lora=lora,
        eager_attention=getattr(model_config, "_attn_implementation", None) == "eager",
        chunked_loss=getattr(getattr(trainer, "loss_plan", None), "kind", None) == "chunked",
        time_note=f"measured on the first {PROBE_STEPS + 1} optimizer steps{' after the resume' if resumed_at else ''}"
        " and the evaluation before training (if any), logged then"
        if plan_from_args(len(dataset), trainer.args).total_steps - resumed_at > PROBE_STEPS
        else "not measured (the run is shorter than the steps it takes to time)",
        baseline=memory_baseline(trainer.args.device, shape, model_loaded=True),
    )
    report.resumed_at = resumed_at
    return report, ""
