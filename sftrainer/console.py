"""What a training run prints: a progress bar, one compact line per log, a summary table at the end.

``ConsoleCallback`` replaces transformers' ``ProgressCallback`` / ``PrinterCallback`` (which print
raw dictionaries). On a terminal it shows one tqdm bar whose postfix holds the latest loss, learning
rate and tokens per second (tqdm shows elapsed time and ETA), and writes one line per logging step
above it::

    step 50/564 | epoch 0.27 | loss 1.093 | lr 1.9e-03 | acc 0.690 | 1.2k tok/s | eta 1m12s

When the stream is not a terminal (CI logs, files), or with ``disable_tqdm=True``, there is no bar:
the same lines only. Only the main process writes.

The ETA counts the evaluations still to run at the latest evaluation's time (``sftrainer.timing``:
the steps ``eval_strategy`` evaluates at, the evaluation before training timing the first), and the
steps left at this run's rate with evaluation time taken out. Tokens per second are the input tokens
(``num_tokens``) of the window since the previous log over the training time of that same window;
on the bar the ETA is in the postfix (tqdm's own would count evaluations as slow steps).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from transformers import TrainerCallback

from sftrainer.timing import RunClock, duration, eval_seconds, evaluation_steps, evaluations_left

# Shown by the compact line, in this order, when present: (key without the eval_ prefix, label, format)
FIELDS = [
    ("loss", "loss", "{:.4g}"),
    ("learning_rate", "lr", "{:.1e}"),
    ("mean_token_accuracy", "acc", "{:.3f}"),
    ("exact_match", "exact", "{:.3f}"),
]  # the rest (entropy, grad_norm, ...) is in metrics.jsonl
SUMMARY_LABELS = {"acc": "accuracy", "exact": "exact match"}
# The final log of Trainer.train(): kept for the summary, not printed as a line.
TRAIN_SUMMARY_KEY = "train_runtime"


def human(n: float) -> str:
    """1234 -> '1.2k', 2_500_000 -> '2.5M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def eval_prefix(logs: dict[str, Any]) -> str | None:
    """'eval_' for an evaluation log (also 'eval_before_', 'eval_<set>_'), None for a training log."""
    for key in logs:
        if key.endswith("_loss") and key.startswith("eval"):
            return key[: -len("loss")]
    return None


def format_line(logs: dict[str, Any], step: int, max_steps: int, tokens_per_s: float | None = None,
                eta: float | None = None) -> str:  # fmt: skip
    """The compact line of one log event (training or evaluation)."""
    prefix = eval_prefix(logs)
    head = f"step {step}/{max_steps}" if max_steps else f"step {step}"
    parts = [f"{prefix.rstrip('_')} @ {head}" if prefix else head]
    if prefix is None and isinstance(logs.get("epoch"), int | float):
        parts.append(f"epoch {logs['epoch']:.2f}")
    for key, label, fmt in FIELDS:
        value = logs.get(f"{prefix}{key}" if prefix else key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{label} {fmt.format(value)}")
    if tokens_per_s:
        parts.append(f"{human(tokens_per_s)} tok/s")
    if eta is not None:
        parts.append(f"eta {duration(eta)}")
    return " | ".join(parts)


class ConsoleCallback(TrainerCallback):
    """The console of a training run; see the module docstring.

    ``stream`` defaults to ``sys.stdout`` as it is when training starts (so redirections and pytest's
    capture apply); ``bar`` forces the progress bar on or off (default: on when the stream is a
    terminal and ``disable_tqdm`` is not set).
    """

    def __init__(self, stream: TextIO | None = None, bar: bool | None = None, clock: RunClock | None = None):
        self._stream = stream
        self._bar_wanted = bar
        self.bar: Any = None
        self.eval_bar: Any = None
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.clock = clock or RunClock()
        self.clock.stop()  # evaluations before train() are timed, not taken out of training time
        self._eval_steps: list[int] = []
        self._tokens_per_s: float | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def _use_bar(self, args: Any) -> bool:
        if self._bar_wanted is not None:
            return self._bar_wanted
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty()) and not args.disable_tqdm

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        logged = [e["num_tokens"] for e in state.log_history if "num_tokens" in e and "loss" in e]
        self.clock.start(state.global_step, logged[-1] if logged else 0.0)  # > 0 when resuming
        self._eval_steps = evaluation_steps(args, state.max_steps, _steps_per_epoch(args, kwargs))
        self._tokens_per_s = None
        if self._use_bar(args):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, file=self.stream, dynamic_ncols=True,
                unit="step", desc="train", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )  # fmt: skip

    def eta(self, state: Any) -> float | None:
        """Seconds left: the steps, and the evaluations still to run (``sftrainer.timing``)."""
        left = evaluations_left(self._eval_steps, state.global_step, self.clock.evaluated_at)
        return self.clock.eta(state.global_step, state.max_steps, left)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None and state.is_world_process_zero:
            self.bar.update(state.global_step - self.bar.n)
            self._set_postfix(self.last_train, self.eta(state))

    def _set_postfix(self, logs: dict[str, Any], eta: float | None) -> None:
        postfix = {}
        if "loss" in logs:
            postfix["loss"] = f"{logs['loss']:.4g}"
        if "learning_rate" in logs:
            postfix["lr"] = f"{logs['learning_rate']:.1e}"
        if self._tokens_per_s:
            postfix["tok/s"] = human(self._tokens_per_s)
        if eta is not None:
            postfix["eta"] = duration(eta)
        self.bar.set_postfix(postfix, refresh=False)

    def on_prediction_step(
        self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        """A transient bar over the eval batches, on a terminal only."""
        if not state.is_world_process_zero or not self._use_bar(args):
            return
        if self.eval_bar is None:
            try:
                total = len(eval_dataloader)
            except TypeError:  # an iterable dataset
                total = None
            from tqdm.auto import tqdm

            self.eval_bar = tqdm(
                total=total, leave=False, file=self.stream, dynamic_ncols=True, desc="eval", unit="batch"
            )
        self.eval_bar.update(1)

    def _close_eval_bar(self, *args: Any, **kwargs: Any) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    on_evaluate = on_predict = _close_eval_bar

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if TRAIN_SUMMARY_KEY in logs:
            self.summary = dict(logs)
            if isinstance(logs.get("num_tokens"), int | float):  # the steps after the last log
                self.clock.tokens_per_second(logs["num_tokens"])
            return
        if eval_prefix(logs) is not None:
            self.last_eval = dict(logs)
            seconds = eval_seconds(logs)
            if seconds is not None:  # taken out of training time, and the time of the evaluations left
                self.clock.evaluated(state.global_step, seconds)
            if self.bar is not None:  # one evaluation fewer to wait for
                self._set_postfix(self.last_train, self.eta(state))
            self.write(format_line(logs, state.global_step, state.max_steps))
            return
        if "loss" not in logs:  # something a user or another callback logs: shown as it is
            self.write(
                ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
            )
            return
        self.last_train = dict(logs)
        tokens = logs.get("num_tokens")
        if isinstance(tokens, int | float):
            self._tokens_per_s = self.clock.tokens_per_second(tokens) or self._tokens_per_s
        eta = self.eta(state)
        if self.bar is not None:
            self._set_postfix(logs, eta)
            eta = None  # the bar shows it
        self.write(format_line(logs, state.global_step, state.max_steps, self._tokens_per_s, eta))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.write(self.summary_table(state))
        self.clock.stop()

    def summary_table(self, state: Any) -> str:
        """The end-of-training table: steps, time, losses, tokens, the last evaluation."""
        s, t, e = self.summary, self.last_train, self.last_eval
        runtime = s.get("train_runtime", self.clock.train_seconds)
        rows = [("steps", f"{state.global_step}/{state.max_steps}")]
        if isinstance(s.get("epoch", t.get("epoch")), int | float):
            rows.append(("epochs", f"{s.get('epoch', t.get('epoch')):.2f}"))
        rows.append(("runtime", duration(runtime)))
        if isinstance(s.get("train_loss"), int | float):
            rows.append(("train loss (mean)", f"{s['train_loss']:.4f}"))
        if "loss" in t:
            rows.append(("train loss (last log)", f"{t['loss']:.4f}"))
        if isinstance(t.get("mean_token_accuracy"), int | float):
            rows.append(("train accuracy (last log)", f"{t['mean_token_accuracy']:.4f}"))
        tokens = s.get("num_tokens", t.get("num_tokens"))
        if isinstance(tokens, int | float):  # tok/s: this call's tokens over its time without evaluations
            speed = self.clock.tokens_per_second_overall()
            rows.append(("tokens", f"{human(tokens)}" + (f" ({human(speed)} tok/s)" if speed else "")))
        prefix = eval_prefix(e) if e else None
        for key, label, _ in FIELDS:
            value = e.get(f"{prefix}{key}") if prefix else None
            if prefix and isinstance(value, int | float) and key != "learning_rate":
                rows.append((f"{prefix.rstrip('_')} {SUMMARY_LABELS.get(label, label)}", f"{value:.4f}"))
        width = max(len(name) for name, _ in rows)
        lines = ["Training summary", *(f"  {name:<{width}}  {value}" for name, value in rows)]
        return "\n".join(lines)


def _steps_per_epoch(args: Any, kwargs: dict[str, Any]) -> int | None:
    """Optimizer steps per epoch, as Trainer counts them from its dataloader (None: a stream)."""
    try:
        batches = len(kwargs["train_dataloader"])
    except (KeyError, TypeError):
        return None
    accumulation = args.gradient_accumulation_steps
    return batches // accumulation + int(batches % accumulation > 0)
