"""TRL's token metrics (mean_token_accuracy, entropy, num_tokens) in train logs and eval metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ROWS, quick_args

from sftrainer import SFTTrainer
from sftrainer.constants import IGNORE_INDEX

pytestmark = pytest.mark.slow

METRICS = ("mean_token_accuracy", "entropy", "num_tokens")


def _trainer(tiny_model_dir, tmp_path, **kw) -> SFTTrainer:
    values = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, logging_steps=1)
    return SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path, **{**values, **kw}),
        train_dataset=ROWS,
        eval_dataset=ROWS,
    )


def _expected(trainer: SFTTrainer) -> tuple[float, float]:
    """Accuracy and entropy over the trained tokens of all rows, from the model's full logits."""
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(ROWS))])
    with torch.no_grad():
        logits = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    trained = labels != IGNORE_INDEX
    accuracy = (logits.argmax(-1) == labels)[trained].float().mean()
    logp = F.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)[trained].mean()
    return float(accuracy), float(entropy)


@pytest.mark.parametrize("kw", [{}, {"padding_free": True}], ids=["padded", "padding_free"])
def test_eval_metrics_are_the_accuracy_and_entropy_of_the_trained_tokens(tiny_model_dir, tmp_path, kw):
    trainer = _trainer(tiny_model_dir, tmp_path, **kw)
    metrics = trainer.evaluate()
    accuracy, entropy = _expected(trainer)
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["eval_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert "eval_num_tokens" not in metrics  # nothing trained yet


def test_metrics_with_compute_metrics_match_the_lean_path(tiny_model_dir, tmp_path):
    """compute_metrics needs every logit; the metrics computed from them are the same."""
    lean = _trainer(tiny_model_dir, tmp_path).evaluate()
    trainer = _trainer(tiny_model_dir, tmp_path)
    trainer.compute_metrics = lambda prediction: {"seen": float(prediction.predictions.shape[-1])}
    full = trainer.evaluate()
    assert full["eval_seen"] == len(trainer.processing_class)  # full-vocabulary logits reached it
    for key in ("eval_loss", "eval_mean_token_accuracy", "eval_entropy"):
        assert full[key] == pytest.approx(lean[key], rel=1e-5), key


def test_train_logs_carry_the_metrics_and_num_tokens_counts_input_tokens(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, max_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        assert (
            0.0 <= log["mean_token_accuracy"] <= 1.0 and math.isfinite(log["entropy"]) and log["entropy"] > 0
        )
    tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset)  # two steps of 4 rows: every row twice
    assert [log["num_tokens"] for log in logs] == [tokens, 2 * tokens]
    metrics = trainer.evaluate()
    assert metrics["eval_num_tokens"] == 2 * tokens
    assert not [h for h in trainer.state.log_history if "train_runtime" in h and "entropy" in h]


def test_eval_mean_token_accuracy_as_metric_for_best_model(tiny_model_dir, tmp_path):
    trainer = _trainer(
        tiny_model_dir,
        tmp_path,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_mean_token_accuracy",
        learning_rate=1e-2,
    )
    trainer.train()
    evals = [h["eval_mean_token_accuracy"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3
    assert trainer.state.best_metric == max(evals)
    assert trainer.state.best_model_checkpoint is not None


def test_the_end_of_training_summary_carries_the_metrics_of_its_unlogged_steps(tiny_model_dir, tmp_path):
    # As TRL: steps after the last logging step are reported in the summary log (train_loss, ...).
    trainer = _trainer(tiny_model_dir, tmp_path, max_steps=3, logging_steps=2)
    trainer.train()
    summary = trainer.state.log_history[-1]
    assert "train_loss" in summary
    assert 0.0 <= summary["mean_token_accuracy"] <= 1.0 and summary["entropy"] > 0
    tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset)  # one epoch of 4 rows per step
    assert summary["num_tokens"] == 3 * tokens
