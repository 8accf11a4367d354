"""Public data sets as they come: dolly-15k, common question/answer layouts, preference data."""

from __future__ import annotations

import logging

import pytest
import tokenizers_zoo as zoo

from sftrainer.data.formats import implied_columns


@pytest.mark.parametrize(
    ("row", "prompt", "answer"),
    [
        (
            {"instruction": "Name a fruit.", "context": "It is red.", "response": "Apple."},
            "Name a fruit.\n\nIt is red.",
            "Apple.",
        ),
        ({"instruction": "Name a fruit.", "response": "Apple."}, "Name a fruit.", "Apple."),
        ({"prompt": "Name a fruit.", "answer": "Apple."}, "Name a fruit.", "Apple."),
        ({"question": "Name a fruit.", "answer": "Apple."}, "Name a fruit.", "Apple."),
        ({"query": "Name a fruit.", "response": "Apple."}, "Name a fruit.", "Apple."),
        ({"input": "Name a fruit.", "output": "Apple."}, "Name a fruit.", "Apple."),
    ],
)
def test_common_layouts_are_read_as_a_prompt_and_its_answer(row, prompt, answer, caplog):
    tok = zoo.chatml()
    with caplog.at_level(logging.INFO, logger="sftrainer.data.prepare"):
        rows, stats = zoo.prep([row], tok)
    assert stats.kept == 1
    assert zoo.trained_spans(tok, rows[0]["input_ids"], rows[0]["labels"]) == [f"{answer}<|im_end|>"]
    assert f"<|im_start|>user\n{prompt}<|im_end|>" in tok.decode(rows[0]["input_ids"])
    assert " read as " in caplog.text  # the mapping is said once


def test_known_formats_and_user_mappings_are_not_remapped():
    assert implied_columns(["instruction", "input", "output"]) == {}  # Alpaca
    assert implied_columns(["prompt", "response", "answer"]) == {}  # prompt/response already
    assert implied_columns(["input", "output", "prompt"]) == {}  # would collide with the prompt column
    rows, _ = zoo.prep(
        [{"q": "2+2?", "answer": "4"}], zoo.chatml(), columns={"q": "prompt", "answer": "response"}
    )
    assert len(rows) == 1


def test_sharegpt_preference_rows_train_the_chosen_answer():
    """Conversations ending on the user, with `chosen` / `rejected` answers: every row is kept and the
    chosen answer is trained (such a file used to lose most rows as 'no trained token')."""
    tok = zoo.chatml()
    rows = [
        {
            "conversations": [{"from": "human", "value": f"Count to {i}."}],
            "chosen": {"from": "gpt", "value": " ".join(str(k) for k in range(1, i + 1))},
            "rejected": {"from": "gpt", "value": "No."},
        }
        for i in range(1, 11)
    ]
    prepared, stats = zoo.prep(rows, tok)
    assert (stats.rows, stats.kept, stats.dropped_empty) == (10, 10, 0)
    spans = [zoo.trained_spans(tok, r["input_ids"], r["labels"]) for r in prepared]
    assert spans[2] == ["1 2 3<|im_end|>"]
    assert all("No." not in tok.decode(r["input_ids"]) for r in prepared)


def test_prompt_chosen_rejected_rows_train_the_chosen_completion():
    tok = zoo.chatml()
    rows, _ = zoo.prep([{"prompt": "2+2=", "chosen": "4", "rejected": "5"}], tok)
    assert zoo.trained_spans(tok, rows[0]["input_ids"], rows[0]["labels"]) == ["4<|im_end|>"]
    conversational = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    rows, _ = zoo.prep([conversational], tok)
    assert zoo.trained_spans(tok, rows[0]["input_ids"], rows[0]["labels"]) == ["4<|im_end|>"]
