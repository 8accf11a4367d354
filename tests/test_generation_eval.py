"""Generation-based evaluation: the normaliser, scorers, prompts, per-step sample files, the metrics
callbacks see (early stopping on eval_normalized_match), perplexity and train tokens/s."""

from __future__ import annotations

import json
import math

import pytest
from tiny_models import ROWS, quick_args
from transformers import EarlyStoppingCallback, TrainerCallback

from sftrainer import SFTConfig, SFTTrainer
from sftrainer.errors import ConfigError
from sftrainer.evaluate import load_scorer, mean_scores, normalize_text, score_sample

SCORER = """
CALLS = []

def lengths(prediction, reference, prompt):
    CALLS.append((prediction, reference, prompt))
    return {"chars": float(len(prediction)), "has_reference": float(reference is not None)}

def answer_length(prediction, reference, prompt):
    return len(prediction)

def bad(prediction, reference, prompt):
    return {"loss": 1.0}

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def scorer_file(tmp_path):
    path = tmp_path / "my_scorer.py"
    path.write_text(SCORER)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris.", "paris"),
        ("  The  Eiffel Tower!  ", "eiffel tower"),
        ("a cat, an owl and the dog", "cat owl and dog"),
        ("theatre another", "theatre another"),  # articles are whole words only
        ("William\tShakespeare\n", "william shakespeare"),
        ("3", "3"),
        ("", ""),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_score_sample_exact_and_normalized():
    sample = {"prompt": "Capital of France?", "reference": "Paris", "prediction": "The paris."}
    assert score_sample(sample) == {"exact_match": 0.0, "normalized_match": 1.0}
    assert score_sample({**sample, "prediction": "Paris"}) == {"exact_match": 1.0, "normalized_match": 1.0}
    assert score_sample({**sample, "reference": None}) == {}  # nothing to compare with


def test_scorer_from_a_file_and_a_module(scorer_file, monkeypatch):
    lengths = load_scorer(f"{scorer_file}:lengths")
    sample = {"prompt": "p", "reference": "ab", "prediction": "abc"}
    assert score_sample(sample, lengths) == {
        "exact_match": 0.0,
        "normalized_match": 0.0,
        "chars": 3.0,
        "has_reference": 1.0,
    }
    monkeypatch.syspath_prepend(str(scorer_file.parent))
    single = load_scorer("my_scorer:answer_length")  # a float is named after the function
    assert score_sample({**sample, "reference": None}, single) == {"answer_length": 3.0}
    with pytest.raises(ConfigError, match="'loss', a name sftrainer already reports"):
        score_sample(sample, load_scorer("my_scorer:bad"))


def test_mean_scores_over_the_samples_that_have_each_score():
    samples = [{"scores": {"exact_match": 1.0, "chars": 2.0}}, {"scores": {"chars": 4.0}}]
    assert mean_scores(samples) == {"exact_match": 1.0, "chars": 3.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected 'module:function' or 'path/to/file.py:function', got 'no_colon'"),
        ("mod:", "expected 'module:function'"),
        ("sftrainer_no_such_module:f", "cannot import 'sftrainer_no_such_module': ModuleNotFoundError"),
        ("/nowhere/s.py:f", "cannot import '/nowhere/s.py': FileNotFoundError: no such file"),
        ("{file}:missing", "has no function 'missing'"),
        ("{file}:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
    ],
)
def test_scorer_errors_name_the_key(tmp_path, scorer_file, spec, message):
    with pytest.raises(ConfigError, match="generation_scorer: ") as err:
        SFTConfig(output_dir=str(tmp_path), generation_scorer=spec.format(file=scorer_file))
    assert message in str(err.value)


def test_a_scorer_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"cannot import '.*broken.py': RuntimeError: boom"):
        load_scorer(f"{path}:f")


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"generation_batch_size": 0}, "generation_batch_size: must be >= 1"),
        ({"exact_match_max_new_tokens": 0}, "exact_match_max_new_tokens: must be >= 1"),
        ({"generation_temperature": -1.0}, "generation_temperature: must be >= 0"),
        ({"generation_prompts": "/no/such/prompts.jsonl"}, "generation_prompts: no such file"),
        ({"generation_prompts": []}, "generation_prompts: the list is empty"),
        ({"generation_prompts": ["hi"], "exact_match_samples": 2}, "not both"),
    ],
)
def test_generation_settings_are_validated(tmp_path, values, key):
    with pytest.raises(ConfigError, match=key):
        SFTConfig(output_dir=str(tmp_path), **values)


class Seen(TrainerCallback):
    """Records what on_evaluate sees: the metrics, and the trainer's samples at that moment."""

    def __init__(self, trainer: SFTTrainer) -> None:
        self.trainer = trainer
        self.seen: list[tuple[dict, list, object]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append(
            (dict(metrics), self.trainer.generation_samples, self.trainer.generation_samples_file)
        )


@pytest.mark.slow
def test_samples_per_step_and_early_stopping_on_normalized_match(tiny_model_dir, tmp_path, scorer_file):
    # An untrained model matches nothing: the score never improves, so training stops after patience 1.
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(
            tmp_path,
            max_steps=10,
            eval_strategy="steps",
            eval_steps=1,
            metric_for_best_model="eval_normalized_match",
            exact_match_samples=3,
            exact_match_max_new_tokens=4,
            generation_batch_size=2,
            generation_scorer=f"{scorer_file}:lengths",
        ),
        train_dataset=ROWS,
        eval_dataset=ROWS,
    )
    seen = Seen(trainer)
    trainer.add_callback(seen)
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=1))
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.state.best_metric == 0.0
    files = sorted(p.name for p in (tmp_path / "eval_samples").iterdir())
    assert files == ["step-1.jsonl", "step-2.jsonl"]
    for step, (metrics, samples, path) in enumerate(seen.seen, start=1):
        assert path == tmp_path / "eval_samples" / f"step-{step}.jsonl"
        written = [json.loads(line) for line in path.read_text().splitlines()]
        assert written == samples and len(samples) == 3
        assert set(written[0]) == {"prompt", "reference", "prediction", "scores"}
        assert [s["reference"] for s in written] == [r["response"] for r in ROWS[:3]]
        assert ROWS[0]["prompt"] in written[0]["prompt"]
        for key in ("exact_match", "normalized_match", "chars", "has_reference"):
            assert metrics[f"eval_{key}"] == mean_scores(samples)[key]
        assert metrics["eval_has_reference"] == 1.0
    # The latest evaluation is also eval_samples.jsonl.
    assert (tmp_path / "eval_samples.jsonl").read_text() == (
        tmp_path / "eval_samples/step-2.jsonl"
    ).read_text()


def test_generation_prompts_without_references(tiny_model_dir, tmp_path, scorer_file, caplog):
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(
            tmp_path,
            generation_prompts=["Reverse the words: a b", "Count the words: x y"],
            exact_match_max_new_tokens=3,
            generation_scorer=f"{scorer_file}:lengths",
        ),
        train_dataset=ROWS,
        eval_dataset=ROWS,
    )
    with caplog.at_level("INFO", logger="sftrainer.trainer"):
        metrics = trainer.evaluate()
    assert "eval_exact_match" not in metrics and "eval_normalized_match" not in metrics
    assert metrics["eval_has_reference"] == 0.0 and "eval_chars" in metrics
    samples = trainer.generation_samples
    assert [s["reference"] for s in samples] == [None, None]
    assert "Reverse the words: a b" in samples[0]["prompt"] and "x" not in samples[0]["prompt"].split("b")[-1]
    assert "Generation samples (eval, step 0" in caplog.text and "prediction:" in caplog.text


def test_generation_prompts_file_with_references(tiny_model_dir, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "Who wrote Hamlet?", "reference": "Shakespeare"},
        {"prompt": "Say hi", "reference": ""},
        *({"prompt": f"Say {i}", "reference": None} for i in range(4)),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        # shuffle_dataset shuffles training rows, never the prompts (nor which have a reference).
        args=quick_args(
            tmp_path, generation_prompts=str(path), exact_match_max_new_tokens=3, shuffle_dataset=True
        ),
        train_dataset=ROWS,
    )
    metrics = trainer.evaluate(ROWS)
    assert [s["reference"] for s in trainer.generation_samples] == ["Shakespeare"] + [None] * 5
    assert all(r["prompt"] in s["prompt"] for r, s in zip(rows, trainer.generation_samples))
    assert trainer.generation_samples[1]["scores"] == {}
    assert metrics["eval_exact_match"] == trainer.generation_samples[0]["scores"]["exact_match"]


@pytest.mark.slow
def test_perplexity_is_exp_loss_and_train_logs_tokens_per_second(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path, logging_steps=1, max_steps=2),
        train_dataset=ROWS,
        eval_dataset=ROWS,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all(h["train_tokens_per_second"] > 0 for h in logs)


def test_sampling_with_a_temperature(tiny_model, tokenizer):
    from sftrainer.evaluate import generate_samples

    ids = tokenizer("Reverse the words: cat dog")["input_ids"]
    row = {"input_ids": [*ids, ids[-1]], "labels": [-100] * len(ids) + [ids[-1]]}
    samples = generate_samples(tiny_model, tokenizer, [row] * 3, max_new_tokens=3, temperature=1.0)
    assert len(samples) == 3 and all(set(s["scores"]) == {"exact_match", "normalized_match"} for s in samples)
