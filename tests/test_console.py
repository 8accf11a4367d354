"""The console of a training run: compact lines and a summary table instead of raw dicts; a progress
bar only on a terminal. Also ``metrics.jsonl``, which every run writes."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import pytest
from tiny_models import ROWS, quick_args

from sftrainer import SFTTrainer
from sftrainer.console import ConsoleCallback, duration, format_line, human
from sftrainer.timing import RunClock

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

LINE = re.compile(r"^step \d+/6 \| epoch [\d.]+ \| loss [\d.]+ \| lr [\d.]+e-\d+ \| acc [\d.]+ .*tok/s")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def train(tiny_model_dir, tmp_path, **overrides):
    args = quick_args(
        tmp_path, max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=3, **overrides
    )
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, eval_dataset=ROWS[:2])
    trainer.train()
    return trainer


def test_format_line_and_units():
    logs = {"loss": 1.0934, "learning_rate": 0.0019, "mean_token_accuracy": 0.6912, "epoch": 0.27}
    assert format_line(logs, 50, 564, 1234.0) == (
        "step 50/564 | epoch 0.27 | loss 1.093 | lr 1.9e-03 | acc 0.691 | 1.2k tok/s"
    )
    assert format_line({"eval_loss": 0.98, "eval_exact_match": 0.5}, 50, 564) == (
        "eval @ step 50/564 | loss 0.98 | exact 0.500"
    )
    assert format_line({"eval_before_loss": 5.9}, 0, 0) == "eval_before @ step 0 | loss 5.9"
    assert (human(999), human(1234), human(2_500_000)) == ("999", "1.2k", "2.5M")
    assert (duration(42), duration(83), duration(3725)) == ("42s", "1m23s", "1h02m")


def test_plain_lines_without_a_terminal_and_metrics_jsonl(tiny_model_dir, tmp_path, capsys):
    trainer = train(tiny_model_dir, tmp_path, disable_tqdm=False)  # a bar is allowed, but stdout is no TTY
    out = capsys.readouterr().out
    assert "{'loss'" not in out and "{'eval_loss'" not in out  # transformers' raw dicts are gone
    assert "\r" not in out and "it/s]" not in out  # no progress bar
    lines = out.splitlines()
    train_lines = [line for line in lines if line.startswith("step ")]
    assert len(train_lines) == 3, out  # steps 2, 4, 6
    assert all(LINE.match(line) for line in train_lines), train_lines
    assert "eta " in train_lines[0]
    assert sum(line.startswith("eval @ step 3/6 | loss ") for line in lines) == 1
    summary = out[out.index("Training summary") :]
    for row in ("steps", "6/6", "runtime", "train loss (mean)", "tokens", "eval loss"):
        assert row in summary, summary
    consoles = [c for c in trainer.callback_handler.callbacks if isinstance(c, ConsoleCallback)]
    assert len(consoles) == 1
    assert not [
        c
        for c in trainer.callback_handler.callbacks
        if type(c).__name__ in ("ProgressCallback", "PrinterCallback")
    ]
    assert_metrics_jsonl(tmp_path / "metrics.jsonl")


def test_progress_bar_on_a_terminal(tiny_model_dir, tmp_path, monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr("sys.stdout", tty)
    train(tiny_model_dir, tmp_path, disable_tqdm=False)
    out = tty.getvalue()
    assert "\r" in out  # the bar redraws in place
    assert "eval: " in out  # a transient bar over the eval batches
    assert re.search(
        r"train: +100%.*6/6 \[[\d:]+, loss=[\d.]+, lr=[\d.]+e-\d+, tok/s=[\d.]+k?, eta=0s\]", out
    ), out  # the ETA is the console's (evaluations counted), not tqdm's
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in out.split("\n"))  # what a terminal shows
    assert re.search(r"^step 2/6 \| epoch", text, re.M)
    assert "Training summary" in out


def test_disable_tqdm_on_a_terminal_prints_plain_lines(tiny_model_dir, tmp_path, monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr("sys.stdout", tty)
    train(tiny_model_dir, tmp_path, disable_tqdm=True)
    out = tty.getvalue()
    assert "\r" not in out and "step 6/6 | epoch" in out and "Training summary" in out


def assert_metrics_jsonl(path):
    """One record per log event: step, epoch, timestamp and every metric."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    train_logs = [r for r in records if "loss" in r]
    eval_logs = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_logs] == [2, 4, 6]
    assert [r["step"] for r in eval_logs] == [3, 6]
    for r in train_logs:
        assert {
            "epoch",
            "timestamp",
            "learning_rate",
            "grad_norm",
            "mean_token_accuracy",
            "num_tokens",
        } <= set(r)
        assert r["loss"] > 0 and r["timestamp"] > 1.7e9
    assert train_logs[0]["num_tokens"] < train_logs[-1]["num_tokens"]  # cumulative
    assert "train_runtime" in records[-1] and "train_loss" in records[-1]  # the end-of-training summary
    assert [r["timestamp"] for r in records] == sorted(r["timestamp"] for r in records)


# ---- the arithmetic, on a fake clock --------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(console, fake, *, first=0, max_steps=30, logging=4, evals=(10, 20, 30), history=()):
    """Drive ``console`` as Trainer does: 5 s and 1,000 input tokens per step, a log every
    ``logging`` steps, a 17 s evaluation at ``evals`` (after that step's log), one of 36 s before."""
    args = SimpleNamespace(eval_strategy="steps", eval_steps=10, logging_steps=logging, eval_delay=0,
                           eval_on_start=False, disable_tqdm=True, gradient_accumulation_steps=1)  # fmt: skip
    state = SimpleNamespace(is_world_process_zero=True, global_step=first, max_steps=max_steps,
                            log_history=list(history))  # fmt: skip
    fake.now += 36.0
    console.on_log(args, state, None, logs={"eval_before_loss": 2.0, "eval_before_runtime": 36.0})
    console.on_train_begin(args, state, None)
    for step in range(first + 1, max_steps + 1):
        fake.now += 5.0
        state.global_step = step
        console.on_step_end(args, state, None)
        if step % logging == 0:
            console.on_log(args, state, None, logs={"loss": 1.0, "num_tokens": 1000.0 * step})
        if step in evals:
            fake.now += 17.0
            console.on_log(args, state, None, logs={"eval_loss": 1.0, "eval_runtime": 17.0})
    console.on_train_end(args, state, None)


def train_lines(out: str) -> dict[int, str]:
    return {int(line.split()[1].split("/")[0]): line for line in out.splitlines() if line.startswith("step ")}


def test_tokens_per_second_after_an_evaluation_between_logs():
    """An evaluation at step 10 between the logs at 8 and 12: tokens and time both cover steps 9-12
    (not the tokens of 4 steps over the time of 2: twice the rate)."""
    fake, out = FakeClock(), io.StringIO()
    simulate(ConsoleCallback(out, bar=False, clock=RunClock(fake)), fake)
    lines = train_lines(out.getvalue())
    assert all("| 200 tok/s |" in line for line in lines.values()), lines  # 1000 / 5


def test_tokens_per_second_right_after_a_resume():
    fake, out = FakeClock(), io.StringIO()
    history = [{"loss": 1.0, "num_tokens": 20_000.0, "step": 20}]  # the checkpoint's log history
    simulate(ConsoleCallback(out, bar=False, clock=RunClock(fake)), fake, first=20, history=history)
    assert "| 200 tok/s |" in train_lines(out.getvalue())[24]  # not 24k tokens over 4 steps' time
    summary = out.getvalue().split("Training summary")[1]
    assert "tokens" in summary and "(200 tok/s)" in summary  # this call's 8k logged tokens over their 40 s


def test_the_eta_counts_the_evaluations_left():
    """The ETA at each log against the time the simulated run really had left."""
    fake, out = FakeClock(), io.StringIO()
    simulate(ConsoleCallback(out, bar=False, clock=RunClock(fake)), fake, logging=5)
    lines = train_lines(out.getvalue())
    # Left after step s's log: (30 - s) steps, and the evaluations at 10, 20, 30 from s on.
    truth = {s: (30 - s) * 5.0 + 17.0 * sum(e >= s for e in (10, 20, 30)) for s in lines}
    for step, line in lines.items():
        # Until the first evaluation in training, the evaluation before it (36 s) times those left.
        expected = truth[step] if step > 10 else (30 - step) * 5.0 + 36.0 * 3
        assert line.endswith(f"eta {duration(expected)}"), (line, truth[step])
    assert lines[5].endswith("eta 3m53s") and lines[15].endswith("eta 1m49s")
