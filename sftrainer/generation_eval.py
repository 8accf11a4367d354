"""``GenerationEval``: generation-based evaluation inside the trainer's evaluation loop.

Contract: ``queue(dataset)`` names the prepared eval rows an evaluation scores (``evaluate`` calls it);
``run(...)`` at the end of that evaluation loop generates completions (``exact_match_samples`` rows of
the eval data, or every ``generation_prompts`` prompt), scores them (``sftrainer.evaluate``), adds
``{prefix}_<score>`` to the loop's metrics, so ``on_evaluate`` callbacks and ``metric_for_best_model``
see them, and keeps the samples: ``samples`` (the latest evaluation's; prompt, reference, prediction,
scores) and ``samples_file`` (``OUTPUT_DIR/eval_samples/step-<global_step>.jsonl``, copied to
``OUTPUT_DIR/eval_samples.jsonl``; written by the main process only, else None).

``generation_prompts`` are prepared by the trainer's data pipeline once, when first used, in the
order given (not shuffled: which prompt has a reference follows that order).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset

from sftrainer import run
from sftrainer.errors import ConfigError
from sftrainer.evaluate import (
    format_samples,
    generate_samples,
    generation_prompt_rows,
    load_scorer,
    mean_scores,
)
from sftrainer.vision.processor import is_processor

# The trainer's logger, as before this module existed: log configurations that name it keep the samples.
logger = logging.getLogger("sftrainer.trainer")

# The trainer's data pipeline: (raw rows, name for messages, pack) -> prepared rows.
Prepare = Callable[[Any, str, bool], Any]


def refuse_for_vision(args: Any, processing_class: Any) -> None:
    """Generation-based evaluation of a vision-language run (a processor), refused by key before any work."""
    if is_processor(processing_class) and args.generation_enabled():
        key = "exact_match_samples" if args.exact_match_samples else "generation_prompts"
        raise ConfigError(
            f"{key}: generation-based evaluation does not pass images to the model yet; for a "
            "vision-language model set exact_match_samples=0 and generation_prompts=null (eval_loss still "
            "measures held-out rows; `sftrainer generate RUN --image PATH` answers with an image)"
        )


class GenerationEval:
    """The generation-based evaluation of one trainer: its queued eval rows, prompts and latest samples."""

    def __init__(self, prepare: Prepare) -> None:
        self.prepare = prepare
        self.samples: list[dict[str, Any]] = []  # the latest evaluation's; see the module docstring
        self.samples_file: Path | None = None
        self._source: Dataset | IterableDataset | None = None  # the eval rows of the running evaluation
        self._prompts: tuple[Dataset, list[bool]] | None = None  # generation_prompts, prepared once

    def queue(self, args: Any, dataset: Any) -> None:
        """Score ``dataset`` (prepared rows) at the end of the evaluation loop about to run, if enabled."""
        if args.generation_enabled() and isinstance(dataset, Dataset | IterableDataset):
            self._source = dataset

    def clear(self) -> None:
        self._source = None

    def run(
        self,
        args: Any,
        model: Any,
        processing_class: Any,
        metrics: dict[str, float],
        prefix: str,
        step: int,
        is_main_process: bool,
    ) -> None:
        """Generate, score, add ``{prefix}_<score>`` to ``metrics``, write and log the samples; nothing
        when no rows were queued."""
        source, self._source = self._source, None
        if source is None:
            return
        if args.generation_prompts is not None:
            rows, has_reference = self.prompts(args)
        else:
            n = args.exact_match_samples
            rows = (
                source.select(range(min(n, len(source))))
                if isinstance(source, Dataset)
                else list(itertools.islice(source, n))
            )
            has_reference = None
        self.samples = generate_samples(
            model,
            processing_class,
            rows,
            max_new_tokens=args.exact_match_max_new_tokens,
            batch_size=args.generation_batch_size,
            temperature=args.generation_temperature,
            has_reference=has_reference,
            scorer=load_scorer(args.generation_scorer) if args.generation_scorer else None,
        )
        metrics.update({f"{prefix}_{k}": v for k, v in mean_scores(self.samples).items()})
        self.samples_file = None
        if is_main_process and self.samples:
            self._write(args.output_dir, prefix, step)

    def _write(self, output_dir: str, prefix: str, step: int) -> None:
        name = f"step-{step}" if prefix == "eval" else f"step-{step}.{prefix.removeprefix('eval_')}"
        directory = Path(output_dir) / run.EVAL_SAMPLES_DIR
        directory.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in self.samples)
        self.samples_file = directory / f"{name}.jsonl"
        self.samples_file.write_text(text, encoding="utf-8")
        (Path(output_dir) / run.EVAL_SAMPLES_FILE).write_text(text, encoding="utf-8")
        logger.info(
            "Generation samples (%s, step %d; all in %s):\n%s",
            prefix,
            step,
            self.samples_file,
            format_samples(self.samples),
        )

    def prompts(self, args: Any) -> tuple[Dataset, list[bool]]:
        """``generation_prompts`` as prepared rows, and which rows have a reference (prepared once)."""
        if self._prompts is None:
            rows, has_reference = generation_prompt_rows(args.generation_prompts)
            # has_reference follows the rows' order, which shuffle_dataset would change.
            shuffle, args.shuffle_dataset = args.shuffle_dataset, False
            try:
                prepared = self.prepare(rows, "generation_prompts", False)
            finally:
                args.shuffle_dataset = shuffle
            if len(prepared) != len(has_reference):
                raise ConfigError(
                    f"generation_prompts: {len(has_reference) - len(prepared)} of {len(has_reference)} "
                    f"prompts were dropped while preparing them (too long for max_length={args.max_length}?)"
                )
            self._prompts = (prepared, has_reference)
        return self._prompts
