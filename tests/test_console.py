"""The console of a training run: compact lines and a summary table instead of raw dicts; a progress
bar only on a terminal. Also ``metrics.jsonl``, which every run writes."""

from __future__ import annotations

import io
import json
import re

import pytest
from tiny_models import ROWS, quick_args

from sftrainer import SFTTrainer
from sftrainer.console import ConsoleCallback, duration, format_line, human

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

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
        r"train: +100%.*6/6 \[[\d:]+<[\d:]+.*loss=[\d.]+, lr=[\d.]+e-\d+, tok/s=[\d.]+k?", out
    ), out
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
