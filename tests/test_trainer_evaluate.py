"""``SFTTrainer.evaluate``: raw eval data is prepared as the constructor prepares it; dict and streaming
eval sets work; exact match is in the metrics callbacks see (early stopping), logged once."""

from __future__ import annotations

import pytest
from datasets import Dataset
from tiny_models import ROWS, quick_args
from transformers import EarlyStoppingCallback, TrainerCallback

from sftrainer import SFTTrainer

pytestmark = pytest.mark.slow


def _trainer(tiny_model_dir, tmp_path, eval_dataset=None, **kw) -> SFTTrainer:
    values = dict(per_device_eval_batch_size=2, exact_match_max_new_tokens=4)
    return SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path, **{**values, **kw}),
        train_dataset=ROWS,
        eval_dataset=eval_dataset,
    )


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> dict[str, float]:
    """Eval metrics of ROWS given to the constructor."""
    return _trainer(tiny_model_dir, tmp_path_factory.mktemp("ref"), eval_dataset=ROWS).evaluate()


@pytest.mark.parametrize(
    "raw",
    [lambda: ROWS, lambda: Dataset.from_list(ROWS), lambda: Dataset.from_list(ROWS).to_iterable_dataset()],
    ids=["list", "dataset", "streaming"],
)
def test_evaluate_prepares_raw_data_like_the_constructor(tiny_model_dir, tmp_path, reference, raw):
    trainer = _trainer(tiny_model_dir, tmp_path)
    metrics = trainer.evaluate(eval_dataset=raw())
    for key in ("eval_loss", "eval_mean_token_accuracy", "eval_entropy"):
        assert metrics[key] == pytest.approx(reference[key], rel=1e-5), key


def test_evaluate_a_dict_of_raw_sets(tiny_model_dir, tmp_path, reference):
    trainer = _trainer(tiny_model_dir, tmp_path, exact_match_samples=2)
    metrics = trainer.evaluate({"a": ROWS, "b": Dataset.from_list(ROWS[:2])})
    assert metrics["eval_a_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert {"eval_b_loss", "eval_a_mean_token_accuracy", "eval_a_exact_match", "eval_b_exact_match"} <= set(
        metrics
    )


class Seen(TrainerCallback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.metrics.append(dict(metrics))


@pytest.mark.parametrize(
    "eval_dataset",
    [
        lambda: ROWS,
        lambda: {"first": ROWS[:2], "second": ROWS[2:]},
        lambda: Dataset.from_list(ROWS).to_iterable_dataset(),
    ],
    ids=["dataset", "dict", "streaming"],
)
def test_exact_match_reaches_callbacks_and_is_logged_once(tiny_model_dir, tmp_path, eval_dataset):
    seen = Seen()
    trainer = _trainer(tiny_model_dir, tmp_path, eval_dataset=eval_dataset(), exact_match_samples=2)
    trainer.add_callback(seen)
    trainer.evaluate()
    keys = [k for m in seen.metrics for k in m if k.endswith("exact_match")]
    logged = [k for h in trainer.state.log_history for k in h if k.endswith("exact_match")]
    assert keys and sorted(keys) == sorted(logged)  # each evaluation's score once, and callbacks saw it
    assert len(set(logged)) == len(logged)
    assert len(trainer.exact_match_predictions) == 2


def test_early_stopping_on_eval_exact_match(tiny_model_dir, tmp_path):
    # An untrained model matches nothing: the score never improves, so training stops after patience 1.
    trainer = _trainer(
        tiny_model_dir,
        tmp_path,
        eval_dataset=ROWS,
        exact_match_samples=2,
        max_steps=10,
        eval_strategy="steps",
        eval_steps=1,
        metric_for_best_model="eval_exact_match",
    )
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=1))
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.state.best_metric == 0.0


def test_eval_steps_alone_evaluates_and_without_eval_data_only_warns(tiny_model_dir, tmp_path, caplog):
    """eval_steps without eval_strategy evaluates every eval_steps (config.resolve_intervals); with no
    eval_dataset it has no effect, as in transformers, and says so (not Trainer's error)."""
    trainer = _trainer(tiny_model_dir, tmp_path / "a", eval_dataset=ROWS, eval_steps=2, max_steps=4)
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e] == [2, 4]
    with caplog.at_level("WARNING", logger="sftrainer"):
        trainer = _trainer(tiny_model_dir, tmp_path / "b", eval_steps=2, max_steps=4)
    assert "eval_steps=2 has no effect: there is no eval_dataset" in caplog.text
    trainer.train()
    assert not [e for e in trainer.state.log_history if "eval_loss" in e]
