"""``train(cfg)``: one fine-tuning run, top to bottom.

load model + tokenizer -> load data -> SFTTrainer (prepares data, applies LoRA) -> evaluate ->
train -> evaluate (unless the last step just evaluated these weights) -> save model, tokenizer,
metrics and the resolved config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sftrainer import builtin, preflight, report, sharding
from sftrainer.checkpoint import check_resume_layout, checkpoint_step, resolve_checkpoint
from sftrainer.distributed import main_process_first
from sftrainer.export import run_card
from sftrainer.lora import peft_config_from
from sftrainer.model import load_model
from sftrainer.run import write_run_record
from sftrainer.run_config import RunConfig
from sftrainer.run_dir import check_output_dir
from sftrainer.setup import load_processing_class
from sftrainer.sources import resolve_data
from sftrainer.trainer import SFTTrainer
from sftrainer.vision.processor import is_processor, text_tokenizer

logger = logging.getLogger(__name__)


def train(cfg: RunConfig) -> dict[str, float]:
    """Run one fine-tune. Returns the final metrics (also written to ``<output_dir>/all_results.json``)."""
    args = cfg.train
    assert args.output_dir is not None  # TrainingArguments.__post_init__ defaults it
    sharding.check_machine(args)  # before any work: FSDP / DeepSpeed need GPUs (and FSDP a launcher)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None:
        check_resume_layout(checkpoint, args, warn=False)  # SFTTrainer.train warns, if it must
    else:  # before any work: a run from step 0 into a used output_dir (SFTTrainer.train checks again)
        check_output_dir(args.output_dir, args.overwrite_output_dir)
    name = cfg.model.name_or_path
    # The built-in assets and the datasets cache are built by one process; the others wait and read them.
    with main_process_first(args, "building the demo assets and loading the data"):
        model_path = builtin.model_path(name)
        # A vision-language checkpoint comes with its processor (sftrainer.vision), a text one with its tokenizer.
        tokenizer = load_processing_class(model_path, cfg.model.trust_remote_code, cfg.model.revision)
        vlm = is_processor(tokenizer)
        train_ds, eval_ds = resolve_data(cfg)
    model = load_model(model_path, **cfg.model.load_kwargs(args.model_init_kwargs))
    if cfg.lora is None:
        logger.info("Full fine-tuning (no lora: section)")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config_from(cfg.lora, text_tokenizer(tokenizer), model),
    )
    resumed_at = checkpoint_step(checkpoint) if checkpoint is not None else 0
    _preflight(trainer, train_ds, None if builtin.is_builtin(name) else cfg.lora is not None, resumed_at)
    if trainer.args.should_save:  # before training: a run stopped early still says what it was
        write_run_record(cfg, args.output_dir)

    metrics: dict[str, float] = {}
    if eval_ds is not None:
        metrics.update(trainer.evaluate(metric_key_prefix="eval_before"))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics.update(result.metrics)
    if eval_ds is not None:
        metrics.update(_final_evaluation(trainer))

    output_dir = Path(args.output_dir)
    trainer.save_model(str(output_dir))
    trainer.save_metrics("all", metrics, combined=False)
    logger.info("Saved the %s to %s", "LoRA adapter" if cfg.lora else "model", output_dir)
    if trainer.is_world_process_zero():
        run_card(cfg, metrics, {"train": _rows(train_ds), "eval": _rows(eval_ds)}, vision=vlm)  # README.md
        try:
            report.save_run_inputs(trainer, output_dir)
            png, page = report.write_report(output_dir)
            logger.info("Report: %s (plot: %s)", page, png)
        except Exception as err:  # the model is saved: a failed report must not fail the run
            logger.warning("Could not write the run report: %s: %s", type(err).__name__, err)
    return metrics


def last_step_evaluation(state: Any, args: Any) -> dict[str, float]:
    """The metrics of the evaluation Trainer ran at the last step, when they are those of the weights
    training ended with; else ``{}``. Trainer evaluates at the last step with ``eval_strategy`` steps or
    epoch (transformers 5.x ``DefaultFlowCallback``); ``load_best_model_at_end`` then loads another
    step's weights unless the last step was the best. Several eval sets: their entries merged."""
    step = state.global_step
    if args.load_best_model_at_end and state.best_global_step not in (None, step):
        return {}
    entries = [
        e
        for e in state.log_history
        if e.get("step") == step
        and any(k.startswith("eval_") and k.endswith("_loss") and not k.startswith("eval_before") for k in e)
    ]
    return {k: v for e in entries for k, v in e.items() if k != "step"}


def _final_evaluation(trainer: SFTTrainer) -> dict[str, float]:
    """The evaluation of the trained weights: the last step's own when it evaluated them (no second
    pass over the eval set), else a new one."""
    metrics = last_step_evaluation(trainer.state, trainer.args)
    if metrics:
        logger.info(
            "The final evaluation is the one of step %d (the weights trained)", trainer.state.global_step
        )
        return metrics
    return trainer.evaluate()


def _preflight(trainer: SFTTrainer, train_ds: Any, lora: bool | None, resumed_at: int) -> None:
    """Log the pre-flight block, and time the first steps and evaluations (sftrainer.preflight).
    ``lora``: None skips the learning-rate check (the built-in model is trained from scratch, not
    fine-tuned); ``resumed_at``: the checkpoint's step, when resuming."""
    result, why = preflight.for_trainer(trainer, train_ds, lora, resumed_at)
    if result is None:
        logger.info("Pre-flight %s", why)
        return
    if trainer.is_world_process_zero():
        logger.info("%s", result.format())
    plan = result.plan
    _, final = preflight.planned_evaluations(trainer.args, plan, result.eval_rows)
    trainer.add_callback(
        preflight.StepTimeCallback(preflight.PROBE_STEPS, plan.steps_per_epoch, plan.total_steps, final)
    )


def _rows(dataset: Any) -> int | None:
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an iterable dataset
        return None
