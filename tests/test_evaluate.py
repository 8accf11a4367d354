"""evaluate.py: the prompt / reference split of tokenized rows, and greedy exact match."""

from __future__ import annotations

import pytest
from tiny_models import quick_args

from sftrainer import IGNORE_INDEX, SFTTrainer
from sftrainer.evaluate import exact_match, split_prompt_reference

pytestmark = pytest.mark.slow

X = IGNORE_INDEX

# Distinct prompts (each row's answer is decidable from its prompt) with short answers.
MEMORISE = [
    {"prompt": "Reverse the words: cat dog", "response": "dog cat"},
    {"prompt": "Sort the words: owl egg", "response": "egg owl"},
    {"prompt": "Count the words: sun sun sun", "response": "3"},
    {"prompt": "Last word of: moon hat", "response": "hat"},
]


@pytest.mark.parametrize(
    ("input_ids", "labels", "expected"),
    [
        ([1, 2, 3, 4, 5], [X, X, X, 4, 5], ([1, 2, 3], [4, 5])),
        # Only the first trained span is the reference; later turns are not part of it.
        ([1, 2, 3, 4, 5, 6, 7], [X, 2, 3, X, X, 6, 7], ([1], [2, 3])),
        # Label 0 is never predicted (nothing precedes it), so it cannot start the reference.
        ([1, 2, 3], [1, X, 3], ([1, 2], [3])),
        ([1, 2, 3], [X, X, X], None),
        ([1], [1], None),
        ([], [], None),
    ],
)
def test_split_prompt_reference(input_ids, labels, expected):
    assert split_prompt_reference(input_ids, labels) == expected


@pytest.fixture(scope="module")
def memorised(tiny_model_dir, tmp_path_factory):
    """The built-in model, trained until it has memorised four rows (eval = the same rows)."""
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(
            tmp_path_factory.mktemp("memorise"),
            max_steps=30,
            per_device_train_batch_size=4,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            exact_match_samples=4,
            exact_match_max_new_tokens=8,
        ),
        train_dataset=MEMORISE,
        eval_dataset=MEMORISE,
    )
    before = trainer.evaluate()
    trainer.train()
    return trainer, before


def test_untrained_model_does_not_match(memorised):
    _, before = memorised
    assert before["eval_exact_match"] < 1.0


def test_memorised_rows_match_exactly(memorised):
    trainer, _ = memorised
    metrics = trainer.evaluate()
    assert metrics["eval_exact_match"] == 1.0
    samples = trainer.exact_match_predictions
    assert [s["reference"] for s in samples] == [r["response"] for r in MEMORISE]
    assert [s["prediction"] for s in samples] == [r["response"] for r in MEMORISE]
    for sample, row in zip(samples, MEMORISE):
        assert row["prompt"] in sample["prompt"]
        assert row["response"] not in sample["prompt"].split("assistant")[-1]


def test_exact_match_batches_and_restores_training_mode(memorised):
    trainer, _ = memorised
    model, tokenizer, rows = trainer.model, trainer.processing_class, list(trainer.eval_dataset)
    model.train()
    # Batches of 3 and 1 rows of different prompt lengths: left padding must not change the answer.
    score, samples = exact_match(model, tokenizer, rows, max_new_tokens=8, batch_size=3)
    assert score == 1.0 and len(samples) == 4
    assert model.training
    # A wrong reference is not a match: the score really compares texts.
    wrong = dict(rows[0], input_ids=[*rows[0]["input_ids"]], labels=[*rows[0]["labels"]])
    trained = [i for i, label in enumerate(wrong["labels"]) if label != IGNORE_INDEX]
    other = next(t for t, lb in zip(rows[1]["input_ids"], rows[1]["labels"]) if lb != IGNORE_INDEX)
    wrong["input_ids"][trained[0]] = wrong["labels"][trained[0]] = other
    score, _ = exact_match(model, tokenizer, [wrong, *rows[1:]], max_new_tokens=8)
    assert score == 0.75


def test_exact_match_without_trained_tokens(tokenizer, tiny_model):
    assert exact_match(tiny_model, tokenizer, [{"input_ids": [1, 2, 3], "labels": [X, X, X]}]) == (0.0, [])


def test_a_truncated_reference_does_not_stop_other_rows(memorised):
    """A row cut by max_length ends on an ordinary token, which must not end every row's generation."""
    trainer, _ = memorised
    model, tokenizer = trainer.model, trainer.processing_class
    full = trainer.eval_dataset[0]  # "dog cat" + <|im_end|>
    first = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    cut = {"input_ids": full["input_ids"][: first + 1], "labels": full["labels"][: first + 1]}
    assert tokenizer.decode(cut["input_ids"][first:]).strip() == "dog"
    _, samples = exact_match(model, tokenizer, [cut, full], max_new_tokens=8)
    assert samples[1]["prediction"] == "dog cat"
