"""Where metrics go besides the console: ``metrics.jsonl`` always, and generation samples to the
experiment trackers that ``report_to`` names (transformers' own callbacks send the scalars).

- ``MetricsFileCallback`` appends one JSON object per log event to ``<output_dir>/metrics.jsonl``
  (main process only): ``step``, ``epoch``, ``timestamp`` (Unix seconds), then every metric of the
  event as logged (training, evaluation, and the final ``train_runtime`` summary). Non-finite
  values are written as ``null`` so that any JSON reader takes the file. A resumed run appends; the
  report keeps the last record of each step. A run from step 0 does not append to another run's
  records: ``sftrainer train`` refuses it, ``SFTTrainer.train()`` moves them to ``earlier-runs/<n>/``,
  ``overwrite_output_dir`` removes them (sftrainer.run_dir).
- ``SamplesCallback`` sends the latest generation samples (prompt, reference, prediction) as a text
  table to TensorBoard (``add_text``) and as a ``wandb.Table`` to W&B after each evaluation.
- ``place_tensorboard_logs`` gives transformers' ``TensorBoardCallback`` its directory,
  ``<output_dir>/runs/<date>_<host>``, when the trainer is built rather than when training begins, so
  that an evaluation before training does not open its writer in ``./runs`` of the launch directory.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.integrations.integration_utils import default_logdir

from sftrainer.run import METRICS_FILE

MAX_SAMPLES = 20  # rows sent to a tracker per evaluation
SAMPLE_COLUMNS = ("prompt", "reference", "prediction")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    try:
        return float(value)  # a 0-d tensor / numpy scalar
    except (TypeError, ValueError):
        return str(value)


class MetricsFileCallback(TrainerCallback):
    """Appends every log event to ``<output_dir>/metrics.jsonl``; see the module docstring."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "timestamp": round(time.time(), 3)}
        record.update({k: _json_value(v) for k, v in logs.items()})
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def latest_samples(trainer: Any) -> list[dict[str, Any]]:
    """The generation samples of the trainer's last evaluation: ``generation_samples`` where the
    trainer has them, else the exact-match predictions."""
    samples = getattr(trainer, "generation_samples", None)
    if not samples:
        samples = getattr(trainer, "exact_match_predictions", None)
    return list(samples or [])


def markdown_table(samples: list[dict[str, Any]]) -> str:
    """Samples as a Markdown table (TensorBoard renders Markdown in its text tab)."""

    def cell(value: Any) -> str:
        return str(value if value is not None else "").replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(s.get(c)) for c in SAMPLE_COLUMNS) + " |" for s in samples]
    return "\n".join(lines)


class SamplesCallback(TrainerCallback):
    """Generation samples to TensorBoard and W&B after each evaluation (main process only)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        samples = latest_samples(self.trainer)[:MAX_SAMPLES]
        if not samples or not state.is_world_process_zero:
            return
        report_to = args.report_to or []
        if "tensorboard" in report_to:
            for callback in self.trainer.callback_handler.callbacks:
                writer = getattr(callback, "tb_writer", None)
                if writer is not None:
                    writer.add_text("eval/generation_samples", markdown_table(samples), state.global_step)
                    writer.flush()
        wandb = sys.modules.get("wandb")  # imported by transformers' WandbCallback when it is in use
        if "wandb" in report_to and wandb is not None and getattr(wandb, "run", None) is not None:
            table = wandb.Table(columns=list(SAMPLE_COLUMNS))
            for s in samples:
                table.add_data(*(str(s.get(c, "")) for c in SAMPLE_COLUMNS))
            wandb.log({"eval/generation_samples": table, "train/global_step": state.global_step})


def place_tensorboard_logs(callbacks: list[TrainerCallback], output_dir: str) -> None:
    """Point the ``TensorBoardCallback`` among ``callbacks`` at ``<output_dir>/runs/<date>_<host>``, the
    directory its ``on_train_begin`` would choose, unless it already has a directory or a writer (one
    given by the caller, or ``TENSORBOARD_LOGGING_DIR``).

    transformers 5.25 sets that directory in ``on_train_begin`` only; a log before it (an evaluation
    before training) opens ``SummaryWriter(log_dir=None)``, i.e. ``./runs/`` of the current directory,
    and keeps writing there until training ends.
    """
    for callback in callbacks:
        if (
            isinstance(callback, TensorBoardCallback)
            and callback.tb_writer is None
            and callback.logging_dir is None
        ):
            callback.logging_dir = os.path.join(output_dir, default_logdir())
