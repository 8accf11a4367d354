"""Where the time of a training run goes, and how much is left: optimizer steps and evaluations,
measured apart.

An evaluation is not a training step: it costs what the eval set costs (plus generation, with
``exact_match_samples`` / ``generation_prompts``), at the steps ``eval_strategy`` names
(``evaluation_steps``). So the time per step is measured with the evaluations that ran in between
taken out (each evaluation's ``<prefix>_runtime``, which ``Trainer.evaluate`` measures), and the
time left is

    steps left x seconds per step + evaluations left x seconds of the latest evaluation

(``remaining_seconds``). Tokens per second divide the tokens trained in a window by the training time
of the same window: both start where this ``train()`` call starts (a resumed run's earlier tokens are
not this call's) and the evaluations inside the window are not training time. ``RunClock`` keeps
these for the console (its ETA, tokens per second and summary); ``preflight.StepTimeCallback`` for
the pre-flight estimate. The clock is injectable, so the arithmetic is tested without timing anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers.trainer_utils import IntervalStrategy


def evaluation_steps(args: Any, max_steps: int, steps_per_epoch: int | None = None) -> list[int]:
    """The optimizer steps after which ``Trainer.train`` evaluates, as transformers 5.x's
    ``DefaultFlowCallback`` decides: ``eval_strategy='steps'``: every ``eval_steps`` steps (a fraction:
    of ``max_steps``) from ``eval_delay`` on, and the last step; ``'epoch'``: the end of each epoch
    (``steps_per_epoch`` steps; unknown: the last only) from ``eval_delay`` epochs on, and the last
    step; ``'no'``: none. ``eval_on_start`` adds step 0."""
    strategy = IntervalStrategy(getattr(args, "eval_strategy", "no") or "no")
    delay = getattr(args, "eval_delay", 0) or 0
    steps: list[int] = []
    if strategy == IntervalStrategy.STEPS:
        every = args.eval_steps or args.logging_steps
        every = math.ceil(max_steps * every) if every < 1 else int(every)
        steps = [s for s in range(every, max_steps + 1, every) if s >= delay]
        if max_steps >= delay and max_steps not in steps:
            steps.append(max_steps)
    elif strategy == IntervalStrategy.EPOCH:
        if steps_per_epoch:
            steps = [
                s for s in range(steps_per_epoch, max_steps, steps_per_epoch) if s / steps_per_epoch >= delay
            ]
        steps.append(max_steps)
    if getattr(args, "eval_on_start", False):
        steps.insert(0, 0)
    return steps


def evaluations_left(steps: list[int], step: int, evaluated_at: int | None) -> int:
    """Evaluations of ``steps`` still to run at optimizer step ``step``: those after it, and the one at
    ``step`` itself unless it already ran (``evaluated_at``: the step of the latest evaluation)."""
    return sum(1 for s in steps if s > step or (s == step and evaluated_at != step))


def eval_seconds(logs: dict[str, Any]) -> float | None:
    """The runtime of an evaluation's log (``eval_runtime``, ``eval_before_runtime``, ``eval_<set>_runtime``)."""
    for key, value in logs.items():
        if key.startswith("eval") and key.endswith("_runtime") and isinstance(value, int | float):
            return float(value)
    return None


def remaining_seconds(
    steps_left: int,
    seconds_per_step: float,
    evaluations: int = 0,
    seconds_per_evaluation: float | None = None,
) -> float:
    """What is left of a run: its steps, and its evaluations at the latest evaluation's time (none measured: 0)."""
    return steps_left * seconds_per_step + evaluations * (seconds_per_evaluation or 0.0)


@dataclass
class TimeEstimate:
    """A run's time from measured parts: the pre-flight's figure."""

    seconds_per_step: float
    steps: int  # optimizer steps it covers (those left, on a resumed run)
    evaluations: int = 0  # evaluations those steps run (and the one after training, if any)
    seconds_per_evaluation: float | None = None  # measured; None: not yet
    evaluation_source: str = ""  # what measured it, for the message
    resumed_at: int = 0  # the step a resumed run starts from

    @property
    def total(self) -> float | None:
        """Seconds for the steps and evaluations; None while evaluations are planned but not timed."""
        if self.evaluations and self.seconds_per_evaluation is None:
            return None
        return remaining_seconds(
            self.steps, self.seconds_per_step, self.evaluations, self.seconds_per_evaluation
        )

    def describe(self) -> str:
        """'2m39s for 30 steps + 3 evaluations x 17s (measured: ...) = 3m30s'."""
        text = f"{duration(self.seconds_per_step * self.steps)} for {self.steps} steps"
        if self.resumed_at:
            text = (
                f"{duration(self.seconds_per_step * self.steps)} for the {self.steps} steps left "
                f"(resumed at step {self.resumed_at} of {self.resumed_at + self.steps})"
            )
        if not self.evaluations:
            return text
        evaluations = f"{self.evaluations} evaluation{'s' if self.evaluations > 1 else ''}"
        if self.seconds_per_evaluation is None:
            return f"{text} + {evaluations} (not timed yet)"
        source = f" ({self.evaluation_source})" if self.evaluation_source else ""
        total = self.total or 0.0
        return f"{text} + {evaluations} x {duration(self.seconds_per_evaluation)}{source} = {duration(total)}"


class RunClock:
    """Training time of one ``train()`` call with its evaluations taken out, the tokens trained over
    the same windows, and the time left. ``clock``: seconds (``time.monotonic``; a fake one in tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.start(0)
        self.seconds_per_evaluation: float | None = None  # the latest evaluation's (all its eval sets)
        self.evaluated_at: int | None = None  # step of the latest evaluation inside training
        self._evaluation: tuple[bool, int] | None = None  # (inside training, step) of the latest one

    def start(self, step: int, tokens: float = 0.0) -> None:
        """A ``train()`` call starts at optimizer ``step`` with ``tokens`` already trained (a resumed run's)."""
        now = self.clock()
        self.training = True
        self.first_step, self.first_tokens = step, tokens
        self._start = now
        self._paused = 0.0  # seconds of evaluation inside this call
        self._window = (now, tokens, 0.0)  # (time, tokens, paused) at the previous training log
        self.evaluated_at = None

    def stop(self) -> None:
        self.training = False

    def evaluation_source(self) -> str:
        """What timed ``seconds_per_evaluation``, for messages."""
        if self._evaluation is None:
            return ""
        inside, step = self._evaluation
        return f"as the evaluation at step {step}" if inside else "as the evaluation before training"

    def evaluated(self, step: int, seconds: float) -> None:
        """An evaluation (of one eval set) ran for ``seconds`` at ``step``; inside training it is not
        training time. The eval sets of one evaluation add up."""
        point = (self.training, step)
        if point == self._evaluation and self.seconds_per_evaluation is not None:
            seconds_total = self.seconds_per_evaluation + seconds
        else:
            seconds_total = seconds
        self.seconds_per_evaluation, self._evaluation = seconds_total, point
        if self.training:
            self._paused += seconds
            self.evaluated_at = step

    @property
    def train_seconds(self) -> float:
        """Seconds of this ``train()`` call so far, evaluations excluded."""
        return max(0.0, self.clock() - self._start - self._paused)

    def tokens_per_second(self, tokens: float) -> float | None:
        """Tokens per second since the previous training log; ``tokens``: the cumulative count now."""
        now = self.clock()
        then, before, paused = self._window
        seconds = now - then - (self._paused - paused)
        self._window = (now, tokens, self._paused)
        since = tokens - before
        return since / seconds if since >= 0 and seconds > 0 else None

    def tokens_per_second_overall(self) -> float | None:
        """Tokens trained in this ``train()`` call per second of its training time, up to the latest
        count given to ``tokens_per_second``."""
        then, tokens, paused = self._window
        seconds, since = then - self._start - paused, tokens - self.first_tokens
        return since / seconds if seconds > 0 and since >= 0 else None

    def eta(self, step: int, max_steps: int, evaluations: int = 0) -> float | None:
        """Seconds left at optimizer ``step``: the steps at this call's rate, and ``evaluations`` more at
        the latest evaluation's time. None before the first step."""
        done = step - self.first_step
        if done <= 0 or not max_steps:
            return None
        return remaining_seconds(
            max_steps - step, self.train_seconds / done, evaluations, self.seconds_per_evaluation
        )


def duration(seconds: float) -> str:
    """83 -> '1m23s', 3725 -> '1h02m'; '?' for a value that is not finite."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
